"""What the three Triton kernel files share: the interpreter flag, the output-poisoning test hook, the launch helper."""
import os

import torch

# the interpreter is chosen when @triton.jit runs (at import), so the flag is read at import too
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Test hook: when True, every output buffer starts as NaN instead of torch.empty garbage, so an element a kernel
# forgets to write fails the comparison with the reference. tests/test_triton_kernels.py turns it on.
POISON_OUTPUTS = False

# Capture hook: when a list, launch() appends (kernel, grid, args, kwargs) to it instead of launching. kernels/aot.py
# runs the launchers on meta tensors this way, so the configurations it compiles are exactly the ones they launch.
CAPTURE = None


def empty(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), or record it (CAPTURE)."""
    if CAPTURE is not None:
        CAPTURE.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def launch_args(dtype):
    """(UPCAST, PRECISION) constexprs for an input dtype: the interpreter's bf16 tl.dot is wrong, so bf16 tiles are
    upcast there; fp32 operands use exact ieee dots (no TF32), the precision flag is ignored for half types."""
    upcast = INTERPRET and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return upcast, precision
