"""Optimizer discovery: regularized evolution over `.grad` programs (issue 16).

:class:`Evolution` hands out :class:`Candidate` programs (``ask``) and takes their scores
(``tell``); :mod:`~gradpipe.search.mutate` makes mutants from the stage vocabulary of
:mod:`~gradpipe.search.vocabulary`, and candidates are keyed by the hash of the compiled
program after the passes (:attr:`gradpipe.compiler.program.Program.structure_hash`).
See ``docs/search.md``. This package imports only ``gradpipe.dsl`` and ``gradpipe.compiler``.
"""

from .evolution import Candidate, Evolution

__all__ = ["Candidate", "Evolution"]
