"""One method's train() in every process of a torchrun launch, each rank's outcome left for the test
that started it (tests/conftest.py run_torchrun):

    torchrun --standalone --nproc-per-node 2 tests/ddp_run.py METHOD RESULT_DIR FLAGS...

writes RESULT_DIR/rank{r}.pt (the losses and the state dict of every model train() returns) or, when
train() stops with a SystemExit, RESULT_DIR/rank{r}.exit (its message), and in both cases
RESULT_DIR/rank{r}.group: "destroyed", or "left initialised" when train() returned or stopped without
tearing its process group down (a rank in that state can abort at exit). For dino and ijepa it then
also runs their cross-rank math in a fresh gloo group (a file:// store in RESULT_DIR):
Sinkhorn-Knopp and SIGReg over the two halves of one batch, saved as RESULT_DIR/rank{r}.math.pt.
"""
import importlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cross_rank_math(method, rank, world, result):
    dist.init_process_group("gloo", init_method=f"file://{result}/store", rank=rank, world_size=world)
    try:
        if method == "dino":
            import dino
            # alike on both ranks
            logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(5)) * 2
            return {"sk": dino.sinkhorn_knopp(logits[rank * 6:(rank + 1) * 6], 0.05)}
        import ijepa
        z = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
        zr = z[rank * 8:(rank + 1) * 8].clone().requires_grad_()
        v = ijepa.sigreg(zr, ijepa.sigreg_directions(0, 3, 32, 16, "cpu"))
        v.backward()
        return {"sigreg": v.detach(), "grad": zr.grad}
    finally:
        dist.destroy_process_group()


def main():
    method, result, *flags = sys.argv[1:]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    mod = importlib.import_module(method)
    try:
        out = mod.train(mod.parse_args(flags))
    except SystemExit as e:
        with open(os.path.join(result, f"rank{rank}.exit"), "w") as f:
            f.write(str(e))
        return
    finally:  # train() must leave no process group behind, whichever way it ended
        with open(os.path.join(result, f"rank{rank}.group"), "w") as f:
            f.write("left initialised" if dist.is_initialized() else "destroyed")
    saved = {k: v.state_dict() for k, v in out.items() if isinstance(v, torch.nn.Module)}
    mine = os.path.join(result, f"rank{rank}.pt")
    torch.save({"losses": out["losses"], "step": out["step"], **saved}, mine)
    if method in ("dino", "ijepa"):
        math = cross_rank_math(method, rank, int(os.environ["WORLD_SIZE"]), result)
        torch.save(math, os.path.join(result, f"rank{rank}.math.pt"))


if __name__ == "__main__":
    main()
