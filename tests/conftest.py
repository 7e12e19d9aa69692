import os

import torch

# One thread per test process (and for the CLI subprocesses some tests start): on a shared
# 2-core machine, torch's spinning worker threads make tiny models many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
