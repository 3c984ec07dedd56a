"""What a search keeps in MLflow: its configuration, and one child run per evaluated candidate.

The parent run holds the search's :class:`SearchConfig` as the artifact
``search_config.json`` (the seed pipelines' text included, so a resumed search
does not depend on files that may have changed since) and, as params, the
settings a reader compares searches by. Each candidate's child run carries
its lineage twice: as params (columns in the MLflow UI: ``search.index``,
``search.key``, ``search.parent``, ``search.mutation``) and as tags
(``gradpipe.search.key``, ``gradpipe.search.stage``, ``gradpipe.search.index``),
which :func:`recorded_children` reads back to resume.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from . import tracking
from .search_eval import EvalJob, read_score

__all__ = ["SearchConfig", "Recorded", "CONFIG_ARTIFACT", "parent_params", "save_config", "load_config",
           "candidate_params", "candidate_tags", "recorded_children", "SearchResumeError"]

#: The parent run's artifact a resumed search is rebuilt from.
CONFIG_ARTIFACT = "search_config.json"


class SearchResumeError(ValueError):
    """A run that cannot be resumed as a search (unknown id, not a search), in one line."""


@dataclass(frozen=True)
class SearchConfig:
    """Everything that decides a search's candidates and scores.

    Attributes:
        seeds: seed pipeline name -> ``.grad`` text, in the order they are asked.
        task / task_options / steps: the proxy task each candidate's sweep trains on.
        budget: candidates to evaluate on the proxy task (the seeds count).
        seed: the evolution's random seed.
        batch: candidates asked, evaluated in parallel, then told, at a time. It
            decides which population each mutant is drawn from, so it is part of
            the search's identity (``--workers`` only sets its default).
        lrs / lr_spread: the sweep (see :func:`gradpipe.flows.search_eval.sweep_lrs`).
        funnel_task / funnel_options / funnel_steps / top_k: the top ``top_k`` by
            proxy score are evaluated again there (None: no funnel).
        population / tournament / max_tries: :class:`gradpipe.search.Evolution`'s.
        train_seed: the tasks' seed. backend / threads: as for a training run.
    """

    seeds: Mapping[str, str]
    task: str
    budget: int
    seed: int = 0
    batch: int = 2
    steps: int | None = None
    task_options: Mapping[str, Any] = field(default_factory=dict)
    lrs: int = 3
    lr_spread: float = 10.0
    funnel_task: str | None = None
    funnel_options: Mapping[str, Any] = field(default_factory=dict)
    funnel_steps: int | None = None
    top_k: int = 3
    population: int = 16
    tournament: int = 4
    max_tries: int = 100
    train_seed: int = 0
    backend: str = "eager"
    threads: int = 1

    def job(self, source: str, key: str, default_lr: float, *, funnel: bool = False) -> EvalJob:
        """The evaluation of one program on the proxy task (or, ``funnel=True``, the funnel task)."""
        from .search_eval import sweep_lrs
        return EvalJob(source=source, key=key, task=self.funnel_task if funnel and self.funnel_task else self.task,
                       steps=int((self.funnel_steps if funnel else self.steps) or 0),
                       lrs=sweep_lrs(default_lr, self.lrs, self.lr_spread),
                       task_options=dict(self.funnel_options if funnel else self.task_options), seed=self.train_seed,
                       backend=self.backend, threads=self.threads)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = [[k, v] for k, v in self.seeds.items()]  # a list keeps the order through any JSON reader
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SearchConfig":
        values = dict(d)
        values["seeds"] = {str(k): str(v) for k, v in values["seeds"]}
        return cls(**values)


def parent_params(config: SearchConfig, runner: str) -> dict[str, str]:
    """The parent run's params: the settings searches are compared by."""
    return {"task": config.task, "seed_pipelines": ",".join(config.seeds)[:5000], "budget": str(config.budget),
            "seed": str(config.seed), "batch": str(config.batch), "steps": str(config.steps), "lrs": str(config.lrs),
            "lr_spread": str(config.lr_spread), "funnel_task": str(config.funnel_task),
            "funnel_steps": str(config.funnel_steps), "top_k": str(config.top_k),
            "population": str(config.population), "tournament": str(config.tournament), "runner": runner,
            "backend": config.backend, **{f"task.{k}": str(v) for k, v in config.task_options.items()},
            **{f"funnel.{k}": str(v) for k, v in config.funnel_options.items()}}


def save_config(uri: str, run_id: str, config: SearchConfig) -> None:
    tracking.RunLogger(uri, run_id).dict(config.to_json(), CONFIG_ARTIFACT)


def load_config(uri: str, run_id: str) -> SearchConfig:
    """The configuration of the search whose parent run is ``run_id``."""
    from mlflow.exceptions import MlflowException
    db = tracking._sqlite_path(uri)
    if db is not None and not pathlib.Path(db).is_file():
        raise SearchResumeError(f"no tracking database {db}: give the --tracking-uri the search ran with")
    client = tracking.open_client(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise SearchResumeError(f"no run {run_id} in {uri}: give the parent run id that gradpipe search "
                                f"printed") from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = pathlib.Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
        return SearchConfig.from_json(json.loads(text))
    except (MlflowException, OSError, ValueError, KeyError, TypeError):
        raise SearchResumeError(f"run {run_id} has no {CONFIG_ARTIFACT}: it is not the parent run of a "
                                f"gradpipe search") from None


def candidate_params(candidate: Any, job: EvalJob, stage: str) -> dict[str, str]:
    """A candidate's child-run params: its lineage and what it is trained on."""
    return {"search.index": str(candidate.index), "search.key": candidate.key,
            "search.parent": candidate.parent or "none", "search.mutation": candidate.mutation[:5000],
            "search.stage": stage, "task": job.task, "steps": str(job.steps), "seed": str(job.seed),
            "lrs": ",".join(f"{x:g}" for x in job.lrs), "backend": job.backend,
            **{f"task.{k}": str(v) for k, v in job.task_options.items()}}


def candidate_tags(candidate: Any, stage: str, root: str) -> dict[str, str]:
    """A candidate's child-run tags (what :func:`recorded_children` looks it up by)."""
    import gradpipe
    return {"gradpipe.version": gradpipe.__version__, "gradpipe.kind": "search-candidate",
            "gradpipe.search.key": candidate.key, "gradpipe.search.stage": stage,
            "gradpipe.search.index": str(candidate.index), "gradpipe.search.parent": candidate.parent or "none",
            "gradpipe.search.root": root}


@dataclass(frozen=True)
class Recorded:
    """A child run found under a search's parent: its id, its candidate's lineage and its score
    (None: not scored yet)."""

    run_id: str
    index: int
    key: str
    parent: str | None
    mutation: str
    score: float | None
    status: str

    def candidate(self, uri: str) -> Any:
        """The :class:`gradpipe.search.Candidate` it evaluated (its source read from the run's artifact)."""
        from ..search import Candidate
        with tempfile.TemporaryDirectory() as tmp:
            source = pathlib.Path(tracking.open_client(uri).download_artifacts(
                self.run_id, "pipeline/pipeline.grad", tmp)).read_text()
        return Candidate(source=source, key=self.key, parent=self.parent, mutation=self.mutation, index=self.index)


def recorded_children(uri: str, experiment_id: str, parent_id: str) -> dict[tuple[str, str], Recorded]:
    """The candidate runs under ``parent_id``, by ``(stage, key)``."""
    client = tracking.open_client(uri)
    out: dict[tuple[str, str], Recorded] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  max_results=1000, page_token=token)
        for r in page:
            tags = r.data.tags
            if "gradpipe.search.key" not in tags:
                continue
            parent = tags.get("gradpipe.search.parent", "none")
            out[(tags["gradpipe.search.stage"], tags["gradpipe.search.key"])] = Recorded(
                run_id=r.info.run_id, index=int(tags.get("gradpipe.search.index", "-1")),
                key=tags["gradpipe.search.key"], parent=None if parent == "none" else parent,
                mutation=r.data.params.get("search.mutation", ""), score=read_score(r.data.metrics),
                status=r.info.status)
        token = page.token
        if not token:
            return out
