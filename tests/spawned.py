"""Running a test's worker in several processes (``torch.multiprocessing``, start method
``spawn``), as tests/test_ddp.py and tests/test_dcp.py do: the parent waits on the processes
(never on sleeps), ends them when one fails or when they pass a deadline, and then reports where
each one was (the ``stacks-rank*.txt`` files each worker's ``faulthandler`` writes in ``tmp_path``)."""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable


def run_processes(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int, tmp_path: pathlib.Path,
                  deadline_s: float, what: str = "the processes") -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes; raises with a child's traceback as soon as
    one fails (the others are ended), or a TimeoutError past ``deadline_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        # join raises (with the child's traceback) as soon as one process fails, ending the other
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                stacks = "".join(f.read_text() for f in sorted(tmp_path.glob("stacks-rank*.txt")))
                raise TimeoutError(f"{what} did not finish in {deadline_s} s\n{stacks}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def join_group(rank: int, world: int, init_file: str, out_dir: str, deadline_s: float) -> None:
    """What each worker does first: write its stack to ``out_dir`` if the parent is about to give
    up on it, use one thread and compile in-process, and join the gloo group (a ``FileStore`` at
    ``init_file``). ``faulthandler.cancel_dump_traceback_later()`` when done."""
    import datetime
    import faulthandler
    import os

    import torch
    import torch.distributed as dist
    from torch._inductor import config as inductor_config

    # where a process is when the parent gives up on it
    stacks = open(os.path.join(out_dir, f"stacks-rank{rank}.txt"), "w")  # noqa: SIM115 - open until exit
    faulthandler.dump_traceback_later(deadline_s - 10, file=stacks)
    torch.set_num_threads(1)
    # compile in this process: a pool of compile workers in each of the two processes costs more
    # than it saves on a 2-core machine
    inductor_config.compile_threads = 1
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
