"""GPU benchmark (issue 5): groupnorm's CUDA kernels against torch's and against a device copy, with CUDA events.

For every case (shape, groups, dtype, layout) it times, interleaved round by round, medians over rounds:
- forward: ``gn.group_norm(x, G, w, b, out=y)`` against ``torch.nn.functional.group_norm(x, G, w, b)`` and the
  copy floor ``y.copy_(x)`` (read x, write y);
- backward: ``gn.group_norm_backward(dy, x, mean, rstd, G, w)`` against torch's ``native_group_norm_backward``
  (what autograd runs) and the floor ``torch.add(x, dy, out=dx)`` (read two tensors, write one).
Targets (issue 5): forward within 1.3x of the copy and backward within 2x of its floor on tensors >= 32 MB;
forward >= 3x torch on the Stable Diffusion shapes in float16 channels-last; never slower than torch.

Each timed sample is a batch of calls between two CUDA events (the batch sized to take about 2 ms), divided by
the batch size. The host's time to queue the batch (wall clock, before the wait for the last event) is kept
beside it: where it is as long as the events' time, the call is bound by its Python and launch costs, not by the
GPU. Where CuPy is installed, the forward also runs on CuPy views of the same memory (``cupy.from_dlpack``), in
float16 and float32 (CuPy has no bfloat16). Before timing, each case checks groupnorm against torch (float64 reference) so that a wrong kernel
cannot post a time. ``--device cpu`` runs the same script on the CPU kernels with wall-clock timers: a smoke test
of the script itself (tests/test_bench.py), not a GPU figure.

    python bench/bench_cuda.py                 # the full table (a GPU machine)
    python bench/bench_cuda.py --write         # and replace the "GPU" section of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import groupnorm as gn

SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
BIG_SHAPES = [(8, 512, 128, 128), (1, 128, 512, 512), (16, 256, 64, 64)]
SMALL_SHAPES = [(1, 64, 32, 32), (16, 32, 8, 8), (1, 2048, 8, 8)]
DTYPES = ["float16", "bfloat16", "float32"]
LAYOUTS = ["nchw", "nhwc"]
MB32 = 32 * 2**20


def cases(quick):
    if quick:
        return [((2, 32, 16, 16), 8, "float32", "nchw"), ((2, 32, 16, 16), 8, "float16", "nhwc")]
    out = []
    for shape in SD_SHAPES + BIG_SHAPES + SMALL_SHAPES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                out.append((shape, 32 if shape[1] % 32 == 0 else 1, dtype, layout))
    return out


class Timer:
    """Seconds per call of fn, from CUDA events around batches (or wall-clock on the CPU)."""

    def __init__(self, device):
        self.cuda = device == "cuda"
        self.host = 0.0  # the last batch's host seconds per call (queueing only, on a GPU)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def batch(self, fn, calls):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            self.host = (time.perf_counter() - t0) / calls
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3 / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        self.host = (time.perf_counter() - t0) / calls
        return self.host

    def calls_for(self, fn, target_s):
        fn()
        self.sync()
        one = self.batch(fn, 3)
        return max(1, min(1000, int(target_s / max(one, 1e-7))))


def build(shape, groups, dtype, layout, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def tensor(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=torch_dtype)

    x = tensor(*shape).contiguous(memory_format=fmt)
    dy = tensor(*shape).contiguous(memory_format=fmt)
    w, b = tensor(shape[1]), tensor(shape[1])
    return x, dy, w, b


def check(x, dy, w, b, groups):
    """groupnorm's forward and backward against torch in float64 on the CPU; raises when they disagree."""
    y, mean, rstd = gn.group_norm_forward(x, groups, w, b)
    dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, groups, w)
    xr = x.double().cpu().requires_grad_()
    wr = w.double().cpu().requires_grad_()
    br = b.double().cpu().requires_grad_()
    yr = torch.nn.functional.group_norm(xr, groups, wr, br)
    yr.backward(dy.double().cpu())
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[x.dtype]
    for name, got, want in [("y", y, yr), ("dx", dx, xr.grad), ("dw", dw, wr.grad), ("db", db, br.grad)]:
        err = (got.double().cpu() - want.detach()).abs().max().item() / (want.abs().max().item() + 1)
        if not err <= tol * (1 if name in ("y", "dx") else 50):
            raise AssertionError(f"{name}: error {err:.3g} of the scale (tolerance {tol:g})")


def measure(case, device, rounds, target_s):
    shape, groups, dtype, layout = case
    x, dy, w, b = build(shape, groups, dtype, layout, device)
    check(x, dy, w, b, groups)
    n, c = shape[0], shape[1]
    hw = math.prod(shape[2:])
    y, dx = torch.empty_like(x), torch.empty_like(x)
    _, mean, rstd = gn.group_norm_forward(x, groups, w, b)
    _, tmean, trstd = torch.ops.aten.native_group_norm(x, w, b, n, c, hw, groups, 1e-5)
    contenders = {
        "fwd_copy": lambda: y.copy_(x),
        "fwd_torch": lambda: torch.nn.functional.group_norm(x, groups, w, b),
        "fwd_gn": lambda: gn.group_norm(x, groups, w, b, out=y),
        "bwd_floor": lambda: torch.add(x, dy, out=dx),
        "bwd_torch": lambda: torch.ops.aten.native_group_norm_backward(dy, x, tmean, trstd, w, n, c, hw, groups,
                                                                      [True, True, True]),
        "bwd_gn": lambda: gn.group_norm_backward(dy, x, mean, rstd, groups, w),
    }
    cupy_views = _cupy_views(x, w, b) if device == "cuda" else None
    if cupy_views is not None:
        xc, wc, bc, yc = cupy_views
        contenders["fwd_gn_cupy"] = lambda: gn.group_norm(xc, groups, wc, bc, out=yc)
    timer = Timer(device)
    calls = {k: timer.calls_for(f, target_s) for k, f in contenders.items()}
    samples = {k: [] for k in contenders}
    host = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, f in contenders.items():
            samples[k].append(timer.batch(f, calls[k]))
            host[k].append(timer.host)
    med = {k: statistics.median(v) for k, v in samples.items()}
    med.update({f"host_{k}": statistics.median(v) for k, v in host.items()})
    return {"case": case, "bytes": x.numel() * x.element_size(), **med}


def _cupy_views(x, w, b):
    """CuPy arrays on the memory of x, w, b and a fresh output (None without CuPy, or for bfloat16)."""
    if x.dtype == torch.bfloat16:
        return None
    try:
        import cupy
    except ImportError:
        return None
    xc, wc, bc = (cupy.from_dlpack(t) for t in (x, w, b))
    return xc, wc, bc, cupy.empty_like(xc)


def case_name(case):
    shape, groups, dtype, layout = case
    return f"{'x'.join(map(str, shape))} G{groups} {dtype} {layout}"


def table(rows):
    lines = ["| case | MB | fwd copy us | fwd torch us | fwd gn us | gn/copy | torch/gn | bwd floor us | "
             "bwd torch us | bwd gn us | gn/floor | torch/gn | host us fwd torch/gn, bwd torch/gn | "
             "fwd gn CuPy us |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        us = {k: r[k] * 1e6 for k in r if k.startswith(("fwd", "bwd", "host"))}
        cupy = f"{us['fwd_gn_cupy']:.1f}" if "fwd_gn_cupy" in us else "-"
        lines.append(
            f"| {case_name(r['case'])} | {r['bytes'] / 2**20:.1f} | {us['fwd_copy']:.1f} | {us['fwd_torch']:.1f} | "
            f"{us['fwd_gn']:.1f} | {r['fwd_gn'] / r['fwd_copy']:.2f} | {r['fwd_torch'] / r['fwd_gn']:.2f} | "
            f"{us['bwd_floor']:.1f} | {us['bwd_torch']:.1f} | {us['bwd_gn']:.1f} | "
            f"{r['bwd_gn'] / r['bwd_floor']:.2f} | {r['bwd_torch'] / r['bwd_gn']:.2f} | "
            f"{us['host_fwd_torch']:.1f}/{us['host_fwd_gn']:.1f}, {us['host_bwd_torch']:.1f}/{us['host_bwd_gn']:.1f} "
            f"| {cupy} |")
    return lines


def targets(rows):
    big = [r for r in rows if r["bytes"] >= MB32]
    sd = [r for r in rows if r["case"][0] in SD_SHAPES and r["case"][2] == "float16" and r["case"][3] == "nhwc"]
    verdict = []

    def line(name, ok, detail):
        verdict.append(f"- {name}: {'PASS' if ok else 'FAIL'} ({detail})")

    if big:
        worst = max(r["fwd_gn"] / r["fwd_copy"] for r in big)
        line("forward within 1.3x of the copy, tensors >= 32 MB", worst <= 1.3, f"worst {worst:.2f}x")
        worst = max(r["bwd_gn"] / r["bwd_floor"] for r in big)
        line("backward within 2x of its floor, tensors >= 32 MB", worst <= 2.0, f"worst {worst:.2f}x")
    if sd:
        least = min(r["fwd_torch"] / r["fwd_gn"] for r in sd)
        line(">= 3x torch's forward on the SD shapes, float16 channels-last", least >= 3.0, f"least {least:.2f}x")
    least = min(min(r["fwd_torch"] / r["fwd_gn"], r["bwd_torch"] / r["bwd_gn"]) for r in rows)
    line("never slower than torch (forward and backward, every case)", least >= 1.0, f"least {least:.2f}x")
    return verdict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="two small cases (a smoke test)")
    parser.add_argument("--write", action="store_true", help="replace the GPU section of --results")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                        help="the results file --write edits (default: bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not gn.config()["cuda"] or not torch.cuda.is_available():
            sys.exit(f"bench_cuda.py needs a GPU: {gn.config()['cuda_reason'] or 'torch has no CUDA'}")
        device_name = torch.cuda.get_device_name()
    else:
        device_name = "CPU (script smoke test: wall-clock timers, not a GPU figure)"
    rows = []
    for case in cases(args.quick):
        rows.append(measure(case, args.device, args.rounds, 2e-3 if args.device == "cuda" else 2e-4))
        print(case_name(case), "done", file=sys.stderr)
    header = [f"## GPU: {device_name}", "",
              f"Command: `python bench/bench_cuda.py{' --quick' if args.quick else ''} --device {args.device}`; "
              f"torch {torch.__version__}; medians of {args.rounds} interleaved rounds, CUDA events around "
              f"batches of about 2 ms.", ""]
    text = "\n".join(header + table(rows) + [""] + targets(rows)) + "\n"
    print(text)
    if args.write:
        path = args.results
        with open(path) as f:
            current = f.read()
        start = current.find("## GPU")
        if start >= 0:
            end = current.find("\n## ", start + 1)
            current = current[:start] + (current[end + 1:] if end >= 0 else "")
        with open(path, "w") as f:
            f.write(current.rstrip("\n") + "\n\n" + text)
    return rows


if __name__ == "__main__":
    main()
