"""Ahead-of-time compile of every launch configuration of kernels/ for NVIDIA GPUs, without a GPU.

    python -m kernels.aot                       # sm_80 and sm_90, a table of shared memory / registers / spills
    python -m kernels.aot --json aot.json --md aot.md --jobs 2

What it does: runs the launchers of kernels/attention.py, gather.py and similarity.py on meta tensors for every
input class they accept (each dtype, each head dim of attention.HEAD_DIMS, each padded D class of the gather and
cosine kernels, with and without pos / query_idx), with kernels._common.CAPTURE on, so nothing launches and every
launch they WOULD make is recorded: kernel, constexprs (block sizes), num_warps, num_stages, argument types.
The launch configurations therefore come from the launchers' own tables, not from a copy here. Each distinct
launch is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) and the ptxas bundled in
the triton wheel (no CUDA driver involved), and judged:
  - it compiles;
  - its shared memory fits the target (SHARED_LIMIT: the opt-in maximum per block, 227 KB on sm_90, 163 KB sm_80);
  - it spills no registers (ptxas -v "bytes spill stores/loads"): SPILL_LIMIT bytes per thread, 0 for every dtype.
    The fp32 (exact-parity, ieee-dot) launches were allowed to spill a bounded amount; they no longer need it since
    their tiles are chosen per D (attention.FP32_CONFIGS, similarity.FP32_BWD_CONFIGS), so their limit is 0 too.
There is no autotuning anywhere in kernels/: each (kernel, dtype, padded D) has exactly one configuration.
Arguments are specialised as the JIT does on a real launch (an integer 1 becomes a constant, integers divisible by
16 and tensor pointers carry tt.divisibility 16), for the representative shapes below: N = 197 (not a multiple of
16, the ViT case) and q, k, v as strided views of a fused qkv projection. (A real run at N = 1 or N % 16 == 0 gets
its own specialisation of the same configuration; those are not compiled here.)

Results are cached in a JSON file (PRETEXT_AOT_CACHE, default ~/.cache/pretext/aot.json) keyed by the kernel's
source hash (JITFunction.cache_key: its source and that of everything it calls), the signature, constexprs,
options, target, triton version and TRITON_PTXAS_PATH, so only changed kernels are recompiled. A fresh clone (CI)
has no cache and pays the cold cost (BENCHMARKS.md) unless the CI keeps that file between runs. Needs
TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions at import): tests/test_aot_compile.py runs
it in a subprocess.
"""
import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time

import torch

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may opt into (CUDA guide, Table 21)
TARGETS = (80, 90)
SPILL_LIMIT = {"fp32": 0, "fp16": 0, "bf16": 0}  # bytes of spill stores or loads per thread
CACHE = os.environ.get("PRETEXT_AOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pretext", "aot.json"))
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32"}


def _modules():
    return (importlib.import_module("kernels.attention"), importlib.import_module("kernels.gather"),
            importlib.import_module("kernels.similarity"))


# -----------------------------------------------------------------------------
# the plan: every launch the launchers make, captured on meta tensors

def defined_kernels():
    """Names of every @triton.jit kernel the three modules define (the plan must launch each of them)."""
    from triton.runtime.jit import JITFunction
    return sorted(name for m in _modules() for name, obj in vars(m).items()
                  if isinstance(obj, JITFunction) and obj.__module__ == m.__name__)


def _capture(fn, *args):
    """(what fn returns, the launches it made), with nothing launched."""
    common = importlib.import_module("kernels._common")
    common.CAPTURE = []
    try:
        return fn(*args), common.CAPTURE
    finally:
        common.CAPTURE = None


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def plan():
    """[(label, dtype name, kernel, args, kwargs)] for every distinct launch configuration."""
    attn, gather, sim = _modules()
    launches = []
    B, H, N = 2, 3, 197
    for dtype in attn.DTYPES:
        for D in attn.HEAD_DIMS:
            q, k, v = _meta(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D) fused-qkv views
            (o, lse), _ = _capture(attn.attention_fwd, q, k, v, 0.125)
            label = f"attention D={D}"
            for fn, args in ((attn.attention_fwd, (q, k, v, 0.125)),
                             (attn.attention_bwd, (_meta(B, H, N, D, dtype=dtype), q, k, v, o, lse, 0.125)),
                             (attn.attention_map_fwd, (q, k, _meta(5, dtype=torch.int64), 0.125)),
                             (attn.attention_map_fwd, (q, k, None, 0.125))):
                launches += [(label, dtype) + c for c in _capture(fn, *args)[1]]
    N, K = 197, 49
    for dtype in gather.DTYPES:
        for D in sorted({gather.config("fwd", d, dtype)[1] for d in range(1, 1025)} | {384}):
            x = _meta(B, N, D, dtype=dtype)
            idx = _meta(B, K, dtype=torch.int64)
            label = f"gather D={D}"
            for pos in (None, _meta(1, N, D, dtype=dtype), _meta(1, N, D)):  # none, same dtype, fp32 parameter
                launches += [(label, dtype) + c for c in _capture(gather.gather_fwd, x, idx, pos)[1]]
            launches += [(label, dtype) + c for c in _capture(gather.gather_bwd, _meta(B, K, D, dtype=dtype), idx, N)[1]]
    Na, Nb = 197, 50
    for dtype in sim.DTYPES:
        classes = {}
        for d in range(1, sim.MAX_D + 1):  # one representative D per (padded D, configuration): its largest
            classes[(sim.block_d(d), sim.bwd_config(d, dtype))] = d
        for D in sorted(classes.values()):
            a, b = _meta(B, Na, D, dtype=dtype), _meta(B, Nb, D, dtype=dtype)
            (s, na, nb), fwd = _capture(sim.cos_fwd, a, b, 1e-12)
            _, bwd = _capture(sim.cos_bwd, _meta(B, Na, Nb, dtype=dtype), a, b, na, nb, 1e-12)
            launches += [(f"cosine D={D}", dtype) + c for c in fwd + bwd]
    return launches


def spec(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, specialised as triton's JIT does on a real launch."""
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        raise SystemExit("kernels.aot: the kernels were imported under TRITON_INTERPRET=1; run this without it")
    signature, constexprs, attrs = {}, {}, {}
    names = kernel.arg_names
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    for i, name in enumerate(names):
        param = kernel.params[i]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations (and the views used here) are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1:  # the JIT turns an integer 1 into a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"kernels.aot: cannot specialise argument {name}={value!r} of {kernel.__name__}")
    return signature, constexprs, attrs, options


def key(kernel, signature, constexprs, attrs, options, cc):
    import triton
    blob = json.dumps([kernel.cache_key, signature, {k: str(v) for k, v in constexprs.items()},
                       {str(k): v for k, v in attrs.items()}, options, cc, triton.__version__,
                       os.environ.get("TRITON_PTXAS_PATH", "")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -----------------------------------------------------------------------------
# compile one launch for one target

PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job):
    """Compile (kernel module, kernel name, signature, constexprs, attrs, options, cc) -> a result dict."""
    module, name, signature, constexprs, attrs, options, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = getattr(importlib.import_module(module), name)
    attrs = {tuple(k): v for k, v in attrs}
    triton.knobs.nvidia.dump_ptxas_log = True  # triton then prints ptxas -v's log: registers and spills
    triton.knobs.compilation.always_compile = True  # never a triton cache hit: that would skip ptxas and its log
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # a configuration that does not compile is a result, reported with its error
        return {"ok_compile": False, "error": f"{type(e).__name__}: {str(e)[:2000]}", "seconds": 0.0}
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    ptxas = ptxas_report(text)
    if ptxas is None:
        return {"ok_compile": False, "error": f"no ptxas -v report in the compile log:\n{text[:2000]}",
                "seconds": seconds}
    return {"ok_compile": True, "shared": int(compiled.metadata.shared), **ptxas, "seconds": round(seconds, 2)}


def ptxas_report(text):
    """ptxas -v's log -> {registers, stack, spill_stores, spill_loads} (the worst function), None without one."""
    regs = [int(r) for r in PTXAS_REGS.findall(text)]
    spills = PTXAS_SPILL.findall(text)
    if not regs or not spills:
        return None
    return {"registers": max(regs), "stack": max(int(s[0]) for s in spills),
            "spill_stores": max(int(s[1]) for s in spills), "spill_loads": max(int(s[2]) for s in spills)}


def judge(result, dtype, cc):
    """The list of reasons a compiled launch is not acceptable (empty: it is)."""
    if not result["ok_compile"]:
        return [f"does not compile: {result['error']}"]
    problems = []
    if result["shared"] > SHARED_LIMIT[cc]:
        problems.append(f"shared memory {result['shared']} B > {SHARED_LIMIT[cc]} B of sm_{cc}")
    limit = SPILL_LIMIT[dtype]
    spilled = max(result["spill_stores"], result["spill_loads"])
    if spilled > limit:
        problems.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads per thread "
                        f"(limit {limit} B for {dtype})")
    return problems


# -----------------------------------------------------------------------------
# run everything

def jobs(targets=TARGETS, only=None, dtypes=None):
    """{key: (row, job)} for the distinct launches of the plan and targets; row is what the report shows."""
    out = {}
    for label, dtype, kernel, grid, args, kwargs in plan():
        if only and not any(o in label or o in kernel.__name__ for o in only):
            continue
        if dtypes and DTYPE_NAMES[dtype] not in dtypes:
            continue
        signature, constexprs, attrs, options = spec(kernel, args, kwargs)
        blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("HEAD_DIM", "HAS_POS",
                                                                                          "HAS_IDX", "WRITE_P")}
        for cc in targets:
            k = key(kernel, signature, constexprs, attrs, options, cc)
            row = {"kernel": kernel.__name__, "case": label, "dtype": DTYPE_NAMES[dtype], "cc": cc,
                   "pointers": " ".join(t[1:] for t in signature.values() if t.startswith("*")),
                   "constexprs": blocks, "num_warps": options.get("num_warps", 4),
                   "num_stages": options.get("num_stages", 3)}
            job = (kernel.__module__, kernel.__name__, signature, constexprs, sorted(attrs.items()), options, cc)
            out.setdefault(k, (row, job))
    return out


def load_cache(path):
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt


def save_cache(path, cache):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file


def show_progress(done, total, t0, stream=None):
    """'compiled done/total' on stderr: rewritten in place on a terminal, else (a CI log) one line per tenth."""
    stream = stream or sys.stderr
    msg = f"kernels.aot: compiled {done}/{total} ({time.perf_counter() - t0:.0f} s)"
    if stream.isatty():
        print(f"\r{msg}", end="\n" if done == total else "", file=stream, flush=True)
    elif done == total or done * 10 // total > (done - 1) * 10 // total:
        print(msg, file=stream, flush=True)


def run(targets=TARGETS, n_jobs=2, cache_path=CACHE, only=None, dtypes=None, progress=True):
    """Compile every launch for every target (cached); returns (rows, stats) with each row's result and problems."""
    todo = jobs(targets, only, dtypes)
    cache = load_cache(cache_path)
    missing = [(k, job) for k, (row, job) in todo.items() if k not in cache]
    t0 = time.perf_counter()
    if missing:
        # a private triton cache dir: the compiles must run ptxas, and must not fill the user's ~/.triton
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["TRITON_CACHE_DIR"] = tmp
            if n_jobs > 1:
                import multiprocessing as mp
                with mp.get_context("spawn").Pool(n_jobs) as pool:
                    results = pool.imap(compile_one, [job for _, job in missing])
                    for i, ((k, _), res) in enumerate(zip(missing, results)):
                        cache[k] = res
                        if progress:
                            show_progress(i + 1, len(missing), t0)
            else:
                for i, (k, job) in enumerate(missing):
                    cache[k] = compile_one(job)
                    if progress:
                        show_progress(i + 1, len(missing), t0)
        save_cache(cache_path, cache)
    rows = []
    for k, (row, job) in todo.items():
        res = cache[k]
        rows.append(dict(row, **res, problems=judge(res, row["dtype"], row["cc"])))
    stats = {"launches": len(todo), "compiled": len(missing), "cached": len(todo) - len(missing),
             "seconds": round(time.perf_counter() - t0, 1)}
    return rows, stats


def markdown(rows):
    lines = ["| kernel | case | dtype | sm | blocks | warps | stages | shared B | regs | spill st/ld B |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["case"], r["cc"])):
        blocks = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["constexprs"].items())
        if r["ok_compile"]:
            res = f"{r['shared']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']}"
        else:
            res = "does not compile | | "
        lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['cc']} | {blocks} | {r['num_warps']} | "
                     f"{r['num_stages']} | {res} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for (default: 80 90)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    p.add_argument("--cache", default=CACHE, help=f"result cache, '' for none (default {CACHE})")
    p.add_argument("--only", nargs="+", help="only launches whose case or kernel name contains one of these")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "fp16", "bf16"], help="only launches for these dtypes")
    p.add_argument("--json", help="write every row (config, shared memory, registers, spills, problems) here")
    p.add_argument("--md", help="write the markdown table here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernels.aot: unset TRITON_INTERPRET (the interpreter replaces the kernels at import)")
    import triton
    rows, stats = run(a.targets, a.jobs, a.cache, a.only, a.dtypes)
    bad = [r for r in rows if r["problems"]]
    summary = {"triton": triton.__version__, **stats, "failed": len(bad), "defined_kernels": defined_kernels(),
               "max_shared": {cc: max((r["shared"] for r in rows if r["cc"] == cc and r["ok_compile"]), default=0)
                              for cc in a.targets},
               "max_spill": max((max(r["spill_stores"], r["spill_loads"]) for r in rows if r["ok_compile"]),
                                default=0)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(rows) + "\n")
    print(f"kernels.aot: triton {triton.__version__}, {stats['launches']} launch configurations x targets "
          f"({stats['compiled']} compiled, {stats['cached']} from the cache) in {stats['seconds']} s; "
          f"max shared memory {summary['max_shared']} B; max spill {summary['max_spill']} B")
    for r in bad:
        print(f"FAIL {r['kernel']} {r['case']} {r['dtype']} sm_{r['cc']} {r['constexprs']} warps={r['num_warps']} "
              f"stages={r['num_stages']}: {'; '.join(r['problems'])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
