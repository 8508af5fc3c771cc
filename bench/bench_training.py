"""Training benchmark: forward+backward through groupnorm.torch.GroupNorm vs torch.nn.GroupNorm, and groupnorm's
backward kernel alone against the floor of its memory traffic.

fwd+bwd: x requires grad, the module is affine, and one call is ``y = module(x); torch.autograd.backward(y, g)``
with a fixed random g in y's memory format, after setting x's and the parameters' .grad to None (as
``zero_grad()`` does), so every call produces and stores fresh gradients, alike for both.
backward alone: ``gn.group_norm_backward`` on NumPy arrays (dy, x, mean, rstd, weight -> dx, dw, db). Its floor
("add") is ``np.add(x, dy, out=dx)`` on the same bytes: it reads two tensors and writes one, as the backward
must. group_norm_backward has no out= and allocates dx, so np.add(x, dy) allocating its result is shown beside
the floor ("add alloc": the floor plus a fresh output's page faults), and so is torch's threaded
``torch.add(..., out=)`` of the same bytes ("add_").
"Function floor": the same fwd+bwd through a torch.autograd.Function that computes nothing (it returns empty
tensors), i.e. what any Python autograd.Function pays per step before a kernel runs; shown for reference.
``--activation silu``: GroupNorm then SiLU, the diffusion U-Net pair: groupnorm.torch.GroupNorm(...,
activation="silu") (one fused forward, one fused backward) against torch.nn.GroupNorm followed by
torch.nn.functional.silu (torch's two kernels each way); the backward alone gets bias and activation. The issue's
targets are judged without an activation only.
Conventions as bench_forward.py: one process, interleaved rounds, medians of calibrated batches, one thread
count for everyone; targets judged on the issue's case list, channels-last rows beyond it marked (extra).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys

try:
    import resource  # minor page faults per call (Unix)
except ImportError:  # pragma: no cover
    resource = None

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - the benchmark is meaningless without torch
    sys.exit("bench_training.py needs torch: pip install torch==2.13.0 (the pinned CPU wheel)")

import groupnorm as gn
import groupnorm.torch as gnt
from groupnorm import _dlpack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import (ISSUE_CHANNELS_LAST, ONE_MILLION, QUICK_CASE_IDS, all_case_specs,  # noqa: E402
                           calibrate, fmt, format_markdown_table, format_text_table, geometric_mean,
                           header_lines, machine_header, target_lines, time_batch_ns, timing_stats,
                           worst_spread, write_outputs)

CONTENDERS = ("torch", "gn", "fn_floor", "gn_bwd", "add_numpy", "add_alloc", "add_torch")
CHANNELS_LAST_PAIR = "1x320x64x64-g32"  # the case whose channels-last and NCHW backward are compared
TARGETS = {
    "never_slower_than_torch": "groupnorm.torch fwd+bwd never slower than torch (every case)",
    "geomean_speedup_3x": "groupnorm.torch fwd+bwd >= 3x faster than torch in geometric mean",
    "bwd_within_2x_floor": "groupnorm backward within 2x of its floor (np.add) on every case >= 1M elements",
    "channels_last_bwd_as_fast": "channels-last backward within 10% of NCHW on [1,320,64,64] G32",
}
CHANNELS_LAST_SLACK = 1.10
ACTIVATION_NAMES = {"silu": "SiLU"}


class _EmptyFunction(torch.autograd.Function):
    """The autograd plumbing of groupnorm.torch's Function without its work: empty results, same arguments."""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps):
        ctx.save_for_backward(input, weight)
        return torch.empty_like(input)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        return torch.empty_like(input), None, torch.empty_like(weight), torch.empty_like(weight), None


class _TorchGroupNormSiLU(torch.nn.GroupNorm):
    """torch.nn.GroupNorm followed by SiLU, with the module's own weight and bias attributes."""

    def forward(self, input):
        return torch.nn.functional.silu(super().forward(input))


class _EmptyGroupNorm(gnt.GroupNorm):
    def forward(self, input):
        return _EmptyFunction.apply(input, self.num_groups, self.weight, self.bias, self.eps)


class Case:
    """One benchmark case: torch leaves and modules, NumPy views of the same memory, the timed callables."""

    def __init__(self, case_id, shape, num_groups, layout, dtype, rng, activation=None):
        self.case_id, self.shape, self.num_groups, self.layout = case_id, tuple(shape), num_groups, layout
        self.callables, self.batch_size, self.samples_ns, self.faults, self.check = {}, {}, {}, {}, {}
        channels = shape[1]
        memory_format = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        torch_dtype = getattr(torch, dtype)

        def data(shape, scale=1.0, offset=0.0):
            values = torch.from_numpy(rng.standard_normal(shape) * scale + offset).to(torch_dtype)
            return values.contiguous(memory_format=memory_format) if len(shape) == 4 else values

        self.x = data(shape, 2.0, 0.5).requires_grad_()
        self.grad = data(shape)
        weight, bias = data((channels,)), data((channels,))
        torch_class = torch.nn.GroupNorm if activation is None else _TorchGroupNormSiLU
        self.torch_module = torch_class(num_groups, channels, dtype=torch_dtype)
        self.gn_module = gnt.GroupNorm(num_groups, channels, dtype=torch_dtype, activation=activation)
        self.empty_module = _EmptyGroupNorm(num_groups, channels, dtype=torch_dtype)
        with torch.no_grad():
            for module in (self.torch_module, self.gn_module):
                module.weight.copy_(weight)
                module.bias.copy_(bias)

        # The backward alone, on NumPy views of the same tensors (_dlpack.from_torch, as groupnorm.torch reads them);
        # statistics from the forward.
        self.x_np = _dlpack.from_torch(self.x)
        self.grad_np = _dlpack.from_torch(self.grad)
        self.weight_np = _dlpack.from_torch(weight)
        self.bias_np = _dlpack.from_torch(bias)
        _, self.mean_np, self.rstd_np = gn.group_norm_forward(self.x_np, num_groups, self.weight_np, self.bias_np,
                                                              1e-5, activation=activation)
        # The floor reads x and dy and writes dx, over the contiguous memory behind them.
        x_storage = self.x.detach().permute(*self.memory_order()).contiguous().reshape(-1)
        grad_storage = self.grad.permute(*self.memory_order()).contiguous().reshape(-1)
        assert x_storage.data_ptr() == self.x.data_ptr() and grad_storage.data_ptr() == self.grad.data_ptr()
        self.floor_out = torch.empty_like(x_storage)
        # The NumPy floor adds the same bytes; 16-bit data as int16, which NumPy adds at full speed.
        as_numpy = (lambda t: t.view(torch.int16).numpy()) if x_storage.element_size() == 2 else torch.Tensor.numpy
        self.callables = {
            "torch": functools.partial(self.fwd_bwd, self.torch_module),
            "gn": functools.partial(self.fwd_bwd, self.gn_module),
            "fn_floor": functools.partial(self.fwd_bwd, self.empty_module),
            "gn_bwd": functools.partial(gn.group_norm_backward, self.grad_np, self.x_np, self.mean_np,
                                        self.rstd_np, num_groups, self.weight_np, bias=self.bias_np,
                                        activation=activation),
            "add_numpy": functools.partial(np.add, as_numpy(x_storage), as_numpy(grad_storage),
                                           out=as_numpy(self.floor_out)),
            "add_alloc": functools.partial(np.add, as_numpy(x_storage), as_numpy(grad_storage)),
            "add_torch": functools.partial(torch.add, x_storage, grad_storage, out=self.floor_out),
        }

    def memory_order(self):
        """x's axes in memory order (N, C, H, W or N, H, W, C): a permute that makes x contiguous in place."""
        return (0, 2, 3, 1) if self.layout == "NHWC" else tuple(range(len(self.shape)))

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    def fwd_bwd(self, module):
        """One training step's worth of GroupNorm: fresh gradients (set to None first), forward, backward."""
        self.x.grad = None
        module.weight.grad = None
        module.bias.grad = None
        torch.autograd.backward(module(self.x), self.grad)

    def verify(self, tolerance: float) -> None:
        """Check once that groupnorm's output and gradients match torch's, and the gradient's layout."""
        results = {}
        for name, module in (("torch", self.torch_module), ("gn", self.gn_module)):
            self.x.grad = module.weight.grad = module.bias.grad = None
            y = module(self.x)
            torch.autograd.backward(y, self.grad)
            results[name] = [y.detach(), self.x.grad, module.weight.grad, module.bias.grad]
        dx_np, dw_np, db_np = self.callables["gn_bwd"]()
        results["gn_bwd"] = [results["torch"][0], _dlpack.as_torch(dx_np), torch.from_numpy(dw_np),
                             torch.from_numpy(db_np)]
        errors = {}
        for contender in ("gn", "gn_bwd"):
            for label, mine, reference in zip(("y", "dx", "dw", "db"), results[contender], results["torch"]):
                scale = max(1.0, float(reference.abs().max()))
                errors[f"{contender}_{label}"] = float((mine.double() - reference.double()).abs().max()) / scale
        grad_layout_ok = results["gn"][1].stride() == self.x.stride() == results["torch"][1].stride()
        self.check.update({"max_rel_err": max(errors.values()), "worst": max(errors, key=errors.get),
                           "tolerance": tolerance, "grad_layout_ok": grad_layout_ok,
                           "ok": max(errors.values()) <= tolerance and grad_layout_ok})
        self.x.grad = None


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not say)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def run_rounds(cases: list, rounds: int, min_batch_ns: int, progress: bool) -> None:
    """Calibrate each contender once per case, then time every contender on every case once per round."""
    for case in cases:
        for name in CONTENDERS:
            case.batch_size[name] = calibrate(case.callables[name], min_batch_ns)
            case.samples_ns[name] = []
            case.faults[name] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            # Rotate the order so no contender always runs first (cold-ish caches) or last.
            shift = round_index % len(CONTENDERS)
            order = CONTENDERS[shift:] + CONTENDERS[:shift]
            for case in cases:
                for name in order:
                    k = case.batch_size[name]
                    faults_before = minor_faults()
                    case.samples_ns[name].append(time_batch_ns(case.callables[name], k) / k)
                    case.faults[name].append((minor_faults() - faults_before) / k)
            if progress:
                print(f"  round {round_index + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        if gc_was_enabled:
            gc.enable()


def summarise_case(case: Case) -> dict:
    """Per-call medians (us) and the derived ratios for one case."""
    def stats(name):
        return {**timing_stats(case.samples_ns[name]), "batch_calls": case.batch_size[name],
                "minor_faults_per_call": statistics.median(case.faults[name])}

    timing = {name: stats(name) for name in CONTENDERS}
    med = {name: timing[name]["median_us"] for name in CONTENDERS}
    return {
        "case": case.case_id,
        "layout": case.layout,
        "shape": list(case.shape),
        "num_groups": case.num_groups,
        "elements": case.elements,
        "in_issue": case.layout != "NHWC" or case.case_id in ISSUE_CHANNELS_LAST,
        "torch_fwd_bwd_us": med["torch"],
        "gn_fwd_bwd_us": med["gn"],
        "speedup": med["torch"] / med["gn"],
        "function_floor_us": med["fn_floor"],
        "gn_bwd_us": med["gn_bwd"],
        "floor_us": med["add_numpy"],
        "floor_source": "np.add(x, dy, out=dx)",
        "floor_alloc_us": med["add_alloc"],
        "floor_torch_us": med["add_torch"],
        "gn_bwd_over_floor": med["gn_bwd"] / med["add_numpy"],
        "gn_bwd_over_floor_alloc": med["gn_bwd"] / med["add_alloc"],
        "faults_per_call": {name: timing[name]["minor_faults_per_call"] for name in ("torch", "gn", "gn_bwd")},
        "timing": timing,
        "check": dict(case.check),
    }


def summarise(all_rows: list, activation=None) -> dict:
    """Aggregates and PASS/FAIL per target (None where no case covers it, or with an activation), over the issue's
    case list."""
    rows = [r for r in all_rows if r["in_issue"]]
    extra = [r for r in all_rows if not r["in_issue"]]
    big = [r for r in rows if r["elements"] >= ONE_MILLION]
    worst = min(rows, key=lambda r: r["speedup"]) if rows else None
    worst_big = max(big, key=lambda r: r["gn_bwd_over_floor"]) if big else None
    pair = {r["layout"]: r for r in all_rows if r["case"] == CHANNELS_LAST_PAIR}
    channels_last = None
    if "NCHW" in pair and "NHWC" in pair:
        channels_last = {
            "bwd_nchw_us": pair["NCHW"]["gn_bwd_us"], "bwd_nhwc_us": pair["NHWC"]["gn_bwd_us"],
            "bwd_ratio": pair["NHWC"]["gn_bwd_us"] / pair["NCHW"]["gn_bwd_us"],
            "fwd_bwd_ratio": pair["NHWC"]["gn_fwd_bwd_us"] / pair["NCHW"]["gn_fwd_bwd_us"],
            "torch_fwd_bwd_ratio": pair["NHWC"]["torch_fwd_bwd_us"] / pair["NCHW"]["torch_fwd_bwd_us"],
        }
    summary = {
        "geomean_speedup": geometric_mean(r["speedup"] for r in rows) if rows else None,
        "min_speedup": worst["speedup"] if worst else None,
        "min_speedup_case": f"{worst['case']} {worst['layout']}" if worst else None,
        "geomean_speedup_extra": geometric_mean(r["speedup"] for r in extra) if extra else None,
        "min_speedup_extra": min((r["speedup"] for r in extra), default=None),
        "max_bwd_over_floor_ge_1M": worst_big["gn_bwd_over_floor"] if worst_big else None,
        "max_bwd_over_floor_ge_1M_case": f"{worst_big['case']} {worst_big['layout']}" if worst_big else None,
        "channels_last_vs_nchw": channels_last,
        "all_checks_ok": all(r["check"]["ok"] for r in all_rows),
    }
    spread = worst_spread(all_rows, SPREAD_NAMES)
    summary["worst_spread"], summary["worst_spread_where"] = spread if spread else (None, None)
    summary["targets"] = {
        "never_slower_than_torch": None if not rows else all(r["speedup"] >= 1.0 for r in rows),
        "geomean_speedup_3x": None if not rows else summary["geomean_speedup"] >= 3.0,
        "bwd_within_2x_floor": None if not big else all(r["gn_bwd_over_floor"] <= 2.0 for r in big),
        "channels_last_bwd_as_fast": None if channels_last is None
        else channels_last["bwd_ratio"] <= CHANNELS_LAST_SLACK,
    }
    if activation is not None:  # the issue's targets are for GroupNorm alone
        summary["targets"] = dict.fromkeys(summary["targets"])
    return summary


TRAINING_DEFINITIONS = {
    "speedup_definition": "torch.nn.GroupNorm fwd+bwd us / groupnorm.torch.GroupNorm fwd+bwd us",
    "floor_definition": "np.add(x, dy, out=dx), single-threaded: reads 2 tensors, writes 1, like the backward",
}
SPREAD_NAMES = ("torch", "gn", "gn_bwd", "add_numpy", "add_alloc")


TABLE_COLUMNS = ["case", "layout", "elements", "torch fwd+bwd us", "gn fwd+bwd us", "speedup",
                 "Function floor us", "gn bwd us",
                 "add us (floor)", "add alloc us", "add_ us (torch, threads)", "bwd/floor", "bwd/add alloc",
                 "page faults/call torch|gn|gn bwd"]


def table_cells(row: dict) -> list:
    flag = "" if row["check"]["ok"] else " MISMATCH"
    extra = "" if row["in_issue"] else " (extra)"
    return [row["case"] + flag + extra, row["layout"], f"{row['elements']:,}", f"{row['torch_fwd_bwd_us']:.1f}",
            f"{row['gn_fwd_bwd_us']:.1f}", f"{row['speedup']:.2f}x", f"{row['function_floor_us']:.1f}",
            f"{row['gn_bwd_us']:.1f}",
            f"{row['floor_us']:.1f}", f"{row['floor_alloc_us']:.1f}", f"{row['floor_torch_us']:.1f}",
            f"{row['gn_bwd_over_floor']:.2f}", f"{row['gn_bwd_over_floor_alloc']:.2f}",
            "|".join(f"{row['faults_per_call'][name]:.0f}" for name in ("torch", "gn", "gn_bwd"))]


def summary_lines(summary: dict) -> list:
    s = summary
    lines = [
        f"geometric mean speedup (torch fwd+bwd / gn fwd+bwd): {fmt(s['geomean_speedup'], suffix='x')}",
        f"min speedup: {fmt(s['min_speedup'], suffix='x')} ({s['min_speedup_case']})",
        f"extra channels-last rows: geometric mean speedup {fmt(s['geomean_speedup_extra'], suffix='x')}, "
        f"min {fmt(s['min_speedup_extra'], suffix='x')}",
        f"max gn bwd / floor over cases >= 1M elements: {fmt(s['max_bwd_over_floor_ge_1M'])}"
        + (f" ({s['max_bwd_over_floor_ge_1M_case']})" if s["max_bwd_over_floor_ge_1M_case"] else ""),
    ]
    pair = s["channels_last_vs_nchw"]
    if pair:
        lines.append(f"[1,320,64,64] G32 backward: channels-last {pair['bwd_nhwc_us']:.1f} us vs NCHW "
                     f"{pair['bwd_nchw_us']:.1f} us = {pair['bwd_ratio']:.2f}x; fwd+bwd {pair['fwd_bwd_ratio']:.2f}x"
                     f" (torch's fwd+bwd: {pair['torch_fwd_bwd_ratio']:.2f}x)")
    lines += [
        f"timing spread: worst (p75 - p25) / median = {fmt(s['worst_spread'], '.0%')}"
        + (f" ({s['worst_spread_where']})" if s["worst_spread_where"] else "")
        + "; above ~10% the machine was too noisy for these figures",
        f"sanity (gn output and gradients vs torch to the tolerance, grad_input in the input's layout): "
        f"{'all ok' if s['all_checks_ok'] else 'FAILURES, see MISMATCH rows'}",
    ]
    return lines


TRAINING_TIMINGS = (
    "median per-call us over interleaved rounds; fwd+bwd = module(x) then autograd.backward(y, g) with x,"
    " weight, bias requiring grad; speedup = torch / gn; Function floor = the same step through an"
    " autograd.Function that computes nothing; gn bwd = gn.group_norm_backward on NumPy arrays (allocates dx);"
    " floor = np.add(x, dy, out=dx) (reads 2, writes 1); add alloc = np.add(x, dy); add_ = torch's threaded"
    " torch.add(out=); page faults = minor faults per call (fresh output pages); targets judged on the"
    " issue's cases (rows marked (extra) are not on its list)"
)


def training_header_lines(header: dict) -> list:
    """The forward's header lines, and which autograd node groupnorm.torch runs."""
    node = ("C++ (groupnorm/_torch_node.so) for inputs under 1 MiB, Python's autograd.Function above"
            if header["groupnorm_torch_node"] else
            f"Python's autograd.Function only (no C++ node: {header['groupnorm_torch_node_reason']})")
    lines = header_lines(header, "np.add", TRAINING_TIMINGS)
    return lines[:3] + [f"node:       {node}"] + lines[3:]


def write_markdown(path: str, header: dict, rows: list, summary: dict) -> None:
    """A self-contained section for bench/RESULTS.md: header, table, summary, targets."""
    block = "" if header.get("activation") is None else f", GroupNorm+{ACTIVATION_NAMES[header['activation']]}"
    parts = [f"## Training (forward+backward){block}, {header['dtype']}, {header['threads']} threads — "
             f"{header['date']}", ""]
    parts += [f"- {line}" for line in training_header_lines(header)]
    parts += ["", format_markdown_table(rows, TABLE_COLUMNS, table_cells), ""]
    parts += [f"- {line}" for line in summary_lines(summary)]
    parts += ["", "Targets:", ""]
    parts += [f"- {line}" for line in target_lines(summary, TARGETS)]
    parts.append("")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def selected_specs(args) -> list:
    """The cases the command line asks for: --cases, else the --quick subset (plus the channels-last pair's
    NCHW/NHWC rows), else all."""
    all_specs = all_case_specs()
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    elif args.quick:
        wanted = list(QUICK_CASE_IDS)
    else:
        return all_specs
    known = {spec[0] for spec in all_specs} | {f"{spec[0]}:{spec[3].lower()}" for spec in all_specs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        sys.exit(f"--cases: unknown case(s) {unknown}; run with --list to see the names")
    specs = [s for s in all_specs if s[0] in wanted or f"{s[0]}:{s[3].lower()}" in wanted]
    if args.quick and not args.cases:  # of the extra channels-last rows, --quick keeps only the issue's
        specs = [s for s in specs if s[3] != "NHWC" or s[0] in ISSUE_CHANNELS_LAST]
    return specs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for groupnorm and torch alike")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 rounds and a subset of the cases")
    parser.add_argument("--cases", default=None,
                        help="comma list of case names (e.g. 4x256x28x28-g32, or 1x320x64x64-g32:nhwc for one layout)")
    parser.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32")
    parser.add_argument("--activation", choices=["none", "silu"], default="none",
                        help="silu: GroupNorm then SiLU (groupnorm fused, torch's two modules); targets not judged")
    parser.add_argument("--min-batch-ms", type=float, default=1.0, help="calibrate batches to at least this long")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="sanity check: max |gn - torch| / max(1, max|torch|) over y, dx, dw, db (default 1e-4; "
                             "a few ulps of the dtype for float16 / bfloat16, whose parameter gradients torch "
                             "rounds differently)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write header, rows and summary as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write a markdown section (header, table, summary)")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument("--progress", action="store_true", help="report each finished round on stderr")
    args = parser.parse_args(argv)
    args.activation = None if args.activation == "none" else args.activation
    if args.rounds is None:
        args.rounds = 3 if args.quick else 21
    if args.tolerance is None:
        args.tolerance = {"float16": 4e-3, "bfloat16": 3e-2}.get(args.dtype, 1e-4)
    if args.rounds < 1 or args.threads < 1 or args.min_batch_ms <= 0:
        parser.error("--rounds and --threads must be >= 1 and --min-batch-ms > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for case_id, _shape, _groups, layout in all_case_specs():
            print(f"{case_id}:{layout.lower()}")
        return 0

    specs = selected_specs(args)
    gn.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    available, reason = gnt.cpp_node()
    header = {**machine_header(args, args.threads, TRAINING_DEFINITIONS), "activation": args.activation,
              "groupnorm_torch_node": available, "groupnorm_torch_node_reason": reason}
    for line in training_header_lines(header):
        print(line)
    print(flush=True)

    rng = np.random.default_rng(20240611)
    cases = [Case(*spec, args.dtype, rng, args.activation) for spec in specs]
    for case in cases:
        case.verify(args.tolerance)
    run_rounds(cases, args.rounds, int(args.min_batch_ms * 1e6), args.progress)

    rows = [summarise_case(case) for case in cases]
    summary = summarise(rows, args.activation)
    print(format_text_table(rows, TABLE_COLUMNS, table_cells))
    print()
    for line in summary_lines(summary):
        print(line)
    print()
    for line in target_lines(summary, TARGETS):
        print(line)
    write_outputs(args, header, rows, "summary", summary, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
