"""Shared test setup.

CI runs the suite with two pytest workers on a 2-core machine: one torch
thread per worker avoids oversubscription (torch's spinning threads made some
files ten times slower when they shared the cores).

Optimizers built without a ``backend`` use the eager reference here, so the
suite checks the semantics without compiling every pipeline it builds;
``tests/test_compiled.py`` runs the compiled backend (the default for users)
against it.
"""

import os

import torch

os.environ.setdefault("GRADPIPE_BACKEND", "eager")
# the on-disk cache of compiled segments is tested where it is set (tests/test_aot_cache.py); a user's
# setting must not turn it on for the tests that count Dynamo's calls
os.environ.pop("GRADPIPE_CACHE_DIR", None)

torch.set_num_threads(1)


# a real Prefect server on 127.0.0.1 for the flow tests (started only by tests that ask for it)
from prefect_server import prefect_server  # noqa: E402,F401
