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

torch.set_num_threads(min(2, torch.get_num_threads()))
