"""``gradpipe search``: regularized evolution over ``.grad`` programs, as a tracked, resumable Prefect flow.

The engine (:class:`gradpipe.search.Evolution`) proposes programs; this flow
scores them and keeps the record. In rounds of ``batch`` candidates (the
number of workers by default): ask ``batch`` candidates, evaluate them in
parallel on the flow's task runner (threads, or Dask workers), tell their
scores **in ask order**, until ``budget`` candidates were evaluated. A
candidate's score is the proxy task's metric after a short learning-rate
sweep (:mod:`gradpipe.flows.search_eval`). Then the funnel: the ``top_k``
programs by proxy score are evaluated again on ``funnel_task`` with more
steps, and written, best first, as ``.grad`` files whose header gives their
lineage and scores, each with the ``gradpipe diff`` from the seed pipeline it
descends from (:mod:`gradpipe.flows.search_output`).

MLflow holds one parent run per search and one child run per evaluation
(:mod:`gradpipe.flows.search_records`). Everything is deterministic for a
given configuration on CPU: the engine is, given its seed and tells in ask
order, and every evaluation is (seeded tasks, one torch thread).

**Resume.** Every child run is created, with the candidate's key, before its
evaluation is submitted, and an evaluation writes its ``score`` last. A
search resumed with ``--resume PARENT_RUN_ID`` rebuilds its configuration
from the parent's ``search_config.json``, reads the scored candidates of its
children (lineage from their tags and params, source from their
``pipeline/pipeline.grad``) and hands them to ``Evolution.restore`` (with the
same ``batch``), which makes each again from its recorded parent and checks
it against the record: nothing is trained for them. Candidates asked but not
scored before the stop are handed out again first, as a round of their own,
and evaluated in the child run they already have, skipping the learning rates
it already logged; the rounds after them end where batches end, so every
later candidate is drawn from the same population as in the uninterrupted
search, and the history comes out the same.

**Dask.** Child runs exist before their tasks are submitted, and an
evaluation that runs again (a worker died and Dask re-ran its task) reads
what its run already holds, so a lost worker costs time, never a candidate,
and never a second evaluation of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from prefect import flow

from . import tracking
from .search_eval import EvalResult, evaluate, evaluate_task
from .search_output import Finalist, write_top
from .search_records import (Recorded, SearchConfig, SearchResumeError, candidate_params, candidate_tags,
                             load_config, parent_params, recorded_children, save_config)
from .spec import SpecError, pipeline_label

__all__ = ["SearchConfig", "SearchResult", "SearchResumeError", "search", "search_flow", "search_progress",
           "make_config", "rounds"]

_progress: list[Callable[[str], None]] = []


@contextlib.contextmanager
def search_progress(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(line)`` after each round and stage of a :func:`search` in this process."""
    _progress.append(fn)
    try:
        yield
    finally:
        _progress.remove(fn)


def _say(line: str) -> None:
    for fn in list(_progress):
        fn(line)


@dataclass
class SearchResult:
    """The result of :func:`search`.

    Attributes:
        parent_run_id / experiment_id / tracking_uri: where MLflow keeps it.
        config: the search's :class:`SearchConfig`.
        history: every evaluated candidate, in ask order, with its proxy result.
        finalists: the top ``k``, best first, with their funnel results.
        files: the written ``.grad`` files, best first.
        trained / read_back: evaluations this call trained, and those it read from MLflow (a resume).
        invalid / duplicates: the engine's counts of rejected mutants.
    """

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    config: SearchConfig
    history: list[tuple[Any, EvalResult]]
    finalists: list[Finalist]
    files: list[pathlib.Path]
    trained: int = 0
    read_back: int = 0
    invalid: int = 0
    duplicates: int = 0
    funnel: list[EvalResult] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Candidates whose every learning rate failed (score ``-inf``)."""
        return sum(not r.ok for _, r in self.history)


class _Evaluations:
    """Evaluates candidates on the flow's task runner, reusing what the parent run already holds."""

    def __init__(self, config: SearchConfig, uri: str, experiment_id: str, parent_id: str) -> None:
        self.config, self.uri, self.experiment_id, self.parent_id = config, uri, experiment_id, parent_id
        self.recorded: dict[tuple[str, str], Recorded] = recorded_children(uri, experiment_id, parent_id)
        self.used: set[str] = set()
        self.trained = self.read_back = 0

    def run(self, candidates: Sequence[Any], stage: str, root: Mapping[str, str]) -> list[EvalResult]:
        """Each candidate's result, in order: read back when scored before, else evaluated."""
        import gradpipe
        slots: list[Any] = []
        for c in candidates:
            job = self.config.job(c.source, c.key, float(gradpipe.compile(c.source).defaults()["lr"]),
                                  funnel=stage == "funnel")
            rec = self.recorded.get((stage, c.key))
            if rec is not None and rec.index != c.index:
                raise SearchResumeError(f"candidate {c.key} is #{c.index} in this replay but #{rec.index} in run "
                                        f"{self.parent_id}: the search does not replay as recorded (was gradpipe "
                                        f"upgraded?); start a new search instead of --resume")
            if rec is not None:
                self.used.add(rec.run_id)
            if rec is not None and rec.score is not None:
                slots.append(evaluate(job, self.uri, rec.run_id))  # reads the run, trains nothing
                self.read_back += 1
                continue
            run_id = rec.run_id if rec is not None else tracking.create_child_run(
                self.uri, self.experiment_id, self.parent_id,
                f"{'funnel ' if stage == 'funnel' else ''}#{c.index} {c.mutation}"[:250],
                candidate_params(c, job, stage), candidate_tags(c, stage, root.get(c.key, "")))
            self.used.add(run_id)
            slots.append(evaluate_task.submit(job, self.uri, run_id))
            self.trained += 1
        return [s if isinstance(s, EvalResult) else s.result() for s in slots]

    def unfinished(self) -> list[str]:
        """Child runs of this parent that were created but will not be scored."""
        return [r.run_id for r in self.recorded.values() if r.score is None and r.run_id not in self.used]


def _ask_batch(evo: Any, n: int) -> list[Any]:
    batch = []
    while len(batch) < n:
        c = evo.ask()
        if c is None:
            break
        batch.append(c)
    return batch


def _roots(candidates: Sequence[Any], roots: dict[str, str]) -> dict[str, str]:
    """The seed pipeline each candidate descends from (by key)."""
    for c in candidates:
        roots[c.key] = c.mutation.removeprefix("seed ").strip() if c.parent is None else roots.get(c.parent, "")
    return roots


def _evolution(config: SearchConfig, evals: _Evaluations) -> Any:
    """A new :class:`gradpipe.search.Evolution`, or the one the parent run's scored children restore."""
    from ..search import Evolution
    settings = dict(seed=config.seed, population=config.population, tournament=config.tournament,
                    max_tries=config.max_tries, batch=config.batch)
    from ..search import Candidate
    runs = sorted((r for (stage, _), r in evals.recorded.items() if stage == "proxy" and r.index >= 0),
                  key=lambda r: r.index)
    if not any(r.score is not None for r in runs):
        return Evolution(dict(config.seeds), **settings)
    # a child without a score (its evaluation stopped) still records the candidate's key, parent and
    # index: restored from its parent, not drawn again from a population that lacks its score
    record = [(r.candidate(evals.uri), r.score) if r.score is not None else
              (Candidate("", r.key, r.parent, r.mutation, r.index), None) for r in runs]
    try:
        return Evolution.restore(dict(config.seeds), record, **settings)
    except ValueError as e:
        raise SearchResumeError(f"run {evals.parent_id} does not restore ({str(e).splitlines()[0]}); "
                                f"start a new search instead of --resume") from None


def rounds(evo: Any, batch: int, budget: int) -> Iterator[list[Any]]:
    """The candidates to evaluate, a round at a time, until ``budget`` were asked; the caller
    tells each round's scores, in ask order, before taking the next round.

    Every round ends where a batch of ``batch`` ends, so that every candidate is drawn from
    the population the uninterrupted search had when it drew it. A restored search first
    hands out again the candidates asked but never scored before it stopped; they belong to
    batches not finished then, and go as a round of their own: a new candidate drawn beside
    them would see them unscored where the uninterrupted search saw them scored."""
    if evo.pending:
        yield _ask_batch(evo, len(evo.pending))
    while (n := len(evo.history)) < budget:
        want = min(batch - n % batch, budget - n)
        got = _ask_batch(evo, want)
        if got:
            yield got
        if len(got) < want:
            _say(f"the engine found no new candidate after {evo.max_tries} tries: stopping early")
            return


@flow(name="gradpipe-search", persist_result=False, log_prints=False)
def search_flow(config: SearchConfig, uri: str, experiment_id: str, parent_id: str, out_dir: str) -> SearchResult:
    """Prefect flow: the search whose parent run ``parent_id`` exists (new, or resumed); see the module docstring."""
    from .train import _clear_failure
    log = tracking.RunLogger(uri, parent_id)
    log.start()  # RUNNING again when resumed
    _clear_failure(uri, parent_id)
    evals = None
    try:
        evals = _Evaluations(config, uri, experiment_id, parent_id)
        evo = _evolution(config, evals)
        results: dict[str, EvalResult] = {}
        roots = _roots([c for c, _ in evo.history], {})
        if evo.history:
            told = [c for c, score in evo.history if score is not None]
            log.tags({"gradpipe.search.resumed_with": str(len(told))})
            results.update(zip([c.key for c in told], evals.run(told, "proxy", roots)))  # read back
        for batch in rounds(evo, config.batch, config.budget):
            for c, r in zip(batch, evals.run(batch, "proxy", _roots(batch, roots))):
                evo.tell(c.key, r.score)
                results[c.key] = r
            done = [results[c.key] for c, _ in evo.history]
            best = max((r.score for r in done), default=-math.inf)
            log.metrics({"search/evaluated": len(done), "search/invalid": evo.invalid,
                         "search/duplicates": evo.duplicates, "search/failed": sum(not r.ok for r in done),
                         **({"best/score": best} if math.isfinite(best) else {})}, len(done))
            _say(f"{len(done)}/{config.budget} evaluated, best score {best:.4g}, "
                 f"{evo.invalid} invalid, {evo.duplicates} duplicate mutants")
        history = [(c, results[c.key]) for c, _ in evo.history]
        finalists, funnel = _funnel(config, history, evals, roots)
        by_key = {c.key: c for c, _ in history}
        scores = {c.key: r.score for c, r in history}
        files = write_top(finalists, by_key, scores, parent_id, config, pathlib.Path(out_dir), log)
        _close(log, config, history, finalists, evo)
        from .comparison import _end_unfinished
        _end_unfinished(uri, evals.unfinished(), "not asked again when the search was resumed")
        return SearchResult(parent_run_id=parent_id, experiment_id=experiment_id, tracking_uri=uri, config=config,
                            history=history, finalists=finalists, files=files, trained=evals.trained,
                            read_back=evals.read_back, invalid=evo.invalid, duplicates=evo.duplicates, funnel=funnel)
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        log.finish("FAILED" if isinstance(e, Exception) else "KILLED", reason)
        if evals is not None:
            from .comparison import _end_unfinished
            _end_unfinished(uri, sorted(evals.used), f"the search stopped ({reason})")
        raise


def _funnel(config: SearchConfig, history: Sequence[tuple[Any, EvalResult]], evals: _Evaluations,
            roots: Mapping[str, str]) -> tuple[list[Finalist], list[EvalResult]]:
    """The top ``k`` by proxy score, evaluated on the funnel task if there is one, best first."""
    ranked = sorted((h for h in history if h[1].ok), key=lambda h: (-h[1].score, h[0].index))[:config.top_k]
    if not config.funnel_task or not ranked:
        return [Finalist(c, r.score, r.best_lr) for c, r in ranked], []
    _say(f"funnel: the top {len(ranked)} on {config.funnel_task}, {config.funnel_steps} steps")
    funnel = evals.run([c for c, _ in ranked], "funnel", roots)
    finalists = [Finalist(c, r.score, r.best_lr, f.score, f.best_lr) for (c, r), f in zip(ranked, funnel)]
    finalists.sort(key=lambda f: (-(f.funnel_score if f.funnel_score is not None else -math.inf), -f.score,
                                  f.candidate.index))
    return finalists, funnel


def _close(log: tracking.RunLogger, config: SearchConfig, history: Sequence[tuple[Any, EvalResult]],
           finalists: Sequence[Finalist], evo: Any) -> None:
    """The parent run's summary (``search.json``, best tags and metrics), then FINISHED."""
    rows = [{"index": c.index, "key": c.key, "parent": c.parent, "mutation": c.mutation, "score": r.score,
             "best_lr": r.best_lr, "run_id": r.run_id} for c, r in history]
    top = [{"rank": i, "key": f.candidate.key, "score": f.score, "funnel_score": f.funnel_score}
           for i, f in enumerate(finalists, 1)]
    log.text(json.dumps({"evaluated": len(history), "invalid": evo.invalid, "duplicates": evo.duplicates,
                         "failed": sum(not r.ok for _, r in history), "candidates": rows, "top": top},
                        indent=2, default=str), "search.json")
    if finalists:
        best = finalists[0]
        log.tags({"gradpipe.best": best.candidate.key, "gradpipe.best_mutation": best.candidate.mutation[:5000]})
        if best.funnel_score is not None and math.isfinite(best.funnel_score):
            log.metrics({"best/funnel_score": best.funnel_score}, len(history))
    log.finish("FINISHED")


def make_config(seed_pipelines: Sequence[str], task: str, budget: int, *, seed: int = 0, batch: int = 2,
                steps: int | None = None, task_options: Mapping[str, Any] | None = None, lrs: int = 3,
                lr_spread: float = 10.0, funnel_task: str | None = None,
                funnel_options: Mapping[str, Any] | None = None, funnel_steps: int | None = None, top_k: int = 3,
                population: int = 16, tournament: int = 4, max_tries: int = 100, backend: str = "eager",
                threads: int = 1) -> SearchConfig:
    """A checked :class:`SearchConfig`: the seed pipelines' text read now, default step counts filled in.

    Raises:
        GradError: a seed pipeline does not compile.
        TaskError: a task is unknown or an option wrong.
        SpecError: a count out of range, no seed pipelines, one given twice, one that
            compiles only with the files it imports (the search keeps its text alone), or
            a task with named losses (a search trains single-loss programs).
    """
    from ..runtime.optimizer import BACKENDS
    from ..tasks import get_task
    from ..dsl.diagnostics import GradError
    from ..search.evolution import compile_seed
    from .train import load_pipeline
    checks = [(budget >= 1, "--budget must be at least 1"), (batch >= 1, "--batch must be at least 1"),
              (lrs >= 1, "--lrs must be at least 1"), (lr_spread >= 1.0, "--lr-spread must be at least 1"),
              (top_k >= 0, "--top-k must be 0 or more"), (population >= 1, "--population must be at least 1"),
              (tournament >= 1, "--tournament must be at least 1"), (max_tries >= 1, "--max-tries must be at least 1"),
              (steps is None or steps >= 1, "--steps must be at least 1"),
              (funnel_steps is None or funnel_steps >= 1, "--funnel-steps must be at least 1"),
              (backend in BACKENDS, f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}"),
              (bool(seed_pipelines), "no seed pipelines: give --seed-pipelines adam,sgd")]
    for ok, message in checks:
        if not ok:
            raise SpecError(message)
    labels = [pipeline_label(p) for p in seed_pipelines]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SpecError(f"seed pipeline {dup[0]!r} given twice")
    proxy = get_task(task, **dict(task_options or {}))
    if len(proxy.loss_names) != 1:
        raise SpecError(f"task {task!r} has several named losses; a search needs a single-loss task such as digits")
    funnel = get_task(funnel_task, **dict(funnel_options or {})) if funnel_task else None
    seeds = {label: load_pipeline(ref).source for label, ref in zip(labels, seed_pipelines)}
    for label, text in seeds.items():  # the search compiles the stored text alone: an import finds no file
        try:
            compile_seed(label, text)
        except GradError as e:
            raise SpecError(f"seed pipeline {label!r} does not compile from its text alone, as the search "
                            f"stores it ({str(e).splitlines()[0]}): inline its imports into one file") from None
    return SearchConfig(seeds=seeds, task=task, budget=budget, seed=seed, batch=batch,
                        steps=steps or proxy.default_steps, task_options=dict(task_options or {}), lrs=lrs,
                        lr_spread=float(lr_spread), funnel_task=funnel_task, funnel_options=dict(funnel_options or {}),
                        funnel_steps=(funnel_steps or funnel.default_steps) if funnel is not None else None,
                        top_k=top_k, population=population, tournament=tournament, max_tries=max_tries,
                        backend=backend, threads=threads)


def search(config: SearchConfig | None = None, *, resume: str | None = None, runner: str = "local",
           address: str | None = None, workers: int = 2, tracking_uri: str | None = None,
           experiment: str = "gradpipe-search", out_dir: str | pathlib.Path | None = None,
           name: str | None = None, on_parent: Callable[[str], None] | None = None) -> SearchResult:
    """Run a new search (``config``, see :func:`make_config`) or resume one (``resume``: its parent run id).

    Everything is checked before anything is written: a TrackingError for a store
    that does not answer, ``ConnectionError`` for a Dask address that does not,
    :class:`SearchResumeError` for a run that is not a search. ``on_parent(run_id)``
    is called once the parent run exists. The top-k files go to ``out_dir``
    (default ``./search-<first 8 characters of the parent run id>``).
    """
    from .comparison import check_dask_address, make_runner
    if (config is None) == (resume is None):
        raise SpecError("give a search configuration or --resume RUN_ID, not both")
    runner_obj = make_runner(runner, address=address,
                             workers=workers if config is None or config.backend != "compiled" else 1)
    if runner == "dask" and address:
        check_dask_address(address)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    if resume is not None:
        config = load_config(uri, resume)
        parent, exp_id = resume, tracking.open_client(uri).get_run(resume).info.experiment_id
    else:
        import gradpipe
        exp_id = tracking.ensure_experiment(uri, experiment)  # creates the store before any fan-out
        title = name or f"search {', '.join(config.seeds)} on {config.task} (seed {config.seed})"
        parent = tracking.start_parent_run(uri, exp_id, title, parent_params(config, runner),
                                           {"gradpipe.version": gradpipe.__version__, "gradpipe.kind": "search"})
        save_config(uri, parent, config)
    if on_parent is not None:
        on_parent(parent)
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path.cwd() / f"search-{parent[:8]}"
    return search_flow.with_options(task_runner=runner_obj)(config, uri, str(exp_id), parent, str(out.resolve()))
