"""Test-session settings: one intra-op thread per process.

The suite runs on 2-core machines, often beside other processes; with several
threads per op, small torch kernels (a 200 x 200 eigendecomposition) spin-wait
for seconds under load. Subprocesses (examples, distributed ranks) inherit it.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment variable, which torch reads at import)

torch.set_num_threads(1)
