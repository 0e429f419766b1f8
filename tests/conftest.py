"""Test setup: without a GPU the Triton kernels run in the interpreter, one intra-op thread, and a
torchrun launcher for the multi-process tests.

TRITON_INTERPRET must be set before any module with @triton.jit is imported (triton reads it at
decoration time), so it is set here, at collection start. `make test` sets it too.
"""
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, REPO)

import torch  # noqa: E402

# one intra-op thread: the tests use tiny tensors, and on a shared 2-core box more threads
# oversubscribe badly (a tiny MAE step ran 50x slower with 2 threads while other jobs ran);
# subprocess tests inherit OMP_NUM_THREADS
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def run_torchrun(args, nproc=2, timeout=300):
    """`torchrun --standalone --nproc-per-node NPROC ARGS...` from the repository root ->
    CompletedProcess.

    torchrun's standalone rendezvous binds its own port and hands it to the workers (no port picked
    here that something else could take first). The launch is its own process group, so that a
    timeout kills the agent and every worker, never leaving a process behind."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} ran past {timeout} "
                             f"s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.fixture
def torchrun():
    return run_torchrun
