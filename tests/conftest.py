"""Shared test setup.

CI runs the suite with two pytest workers on a 2-core machine: one torch
thread per worker avoids oversubscription (torch's spinning threads made some
files ten times slower when they shared the cores).
"""

import torch

torch.set_num_threads(1)
