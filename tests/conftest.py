"""Test setup: without a GPU the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any module with @triton.jit is imported (triton reads it at decoration
time), so it is set here, at collection start. `make test` sets it too.
"""
import os
import sys

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# one intra-op thread: the tests use tiny tensors, and on a shared 2-core box more threads oversubscribe badly
# (a tiny MAE step ran 50x slower with 2 threads while other jobs ran); subprocess tests inherit OMP_NUM_THREADS
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
