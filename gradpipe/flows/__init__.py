"""Orchestration: training runs and comparisons as Prefect flows, recorded in MLflow.

    from gradpipe.flows import compare
    result = compare(["adam", "pipelines/scalpel.grad"], task="digits", seeds=[0, 1, 2], steps=200)
    print(result.ranking[0].label, result.parent_run_id)

Modules, in the order data flows through them:

- :mod:`~gradpipe.flows.spec`: :class:`RunSpec` (one run) and the ``--set``/``--grid`` parsers.
- :mod:`~gradpipe.flows.tracking`: MLflow through ``MlflowClient`` with explicit run ids
  (store resolution and checks, parent/child runs, batched metrics, artifacts).
- :mod:`~gradpipe.flows.figures`: loss-curve figures (matplotlib, no pyplot state).
- :mod:`~gradpipe.flows.train`: one run (:func:`execute_run`), as a Prefect task with retries.
- :mod:`~gradpipe.flows.comparison`: pipelines x seeds x grid on a Prefect task runner
  (threads, or Dask), ranked.
- :mod:`~gradpipe.flows.tuning`: a fair comparison: every pipeline tuned with the same budget on
  held-out training data, then its seeds at its best setting, ranked with bootstrap intervals
  (:mod:`~gradpipe.flows.bootstrap`).
- :mod:`~gradpipe.flows.search` (with ``search_eval``, ``search_records``, ``search_output``,
  ``search_command``): ``gradpipe search``, regularized evolution over programs, each candidate
  scored by a learning-rate sweep and recorded as a child run; resumable, on Dask too.
- :mod:`~gradpipe.flows.schedule`: a cron-scheduled deployment re-running a comparison.
- :mod:`~gradpipe.flows.server`, :mod:`~gradpipe.flows.ui`: a local Prefect server, the MLflow UI.
- :mod:`~gradpipe.flows.commands`: the CLI's ``train``, ``compare``, ``serve``, ``ui``, ``demo``
  (:mod:`~gradpipe.flows.tune_command`: ``compare --tune``).

Importing this package sets Prefect's analytics off and a start-up timeout
that suits small machines, unless the environment already sets them
(:data:`~gradpipe.flows.server.PREFECT_DEFAULTS`).
"""

from .server import apply_prefect_defaults

apply_prefect_defaults()

_LAZY = {
    "compare": "comparison", "compare_flow": "comparison", "Comparison": "comparison", "RankedRow": "comparison",
    "rank": "comparison", "serve": "schedule", "scheduled_compare": "schedule", "RunSpec": "spec", "SpecError": "spec",
    "parse_grid": "spec", "parse_sets": "spec", "TrackingError": "tracking", "RunOutcome": "train",
    "execute_run": "train", "train_flow": "train", "train_task": "train",
    "tuned_compare": "tuning", "TunedComparison": "tuning", "TuneRange": "tuning", "parse_range": "tuning",
    "make_config": "search", "SearchResult": "search",  # the function: gradpipe.flows.search.search
}

__all__ = [*_LAZY, "apply_prefect_defaults"]


def __getattr__(name: str):
    """Import submodules on first use: importing prefect and mlflow costs seconds,
    and ``gradpipe check`` should not pay it."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
