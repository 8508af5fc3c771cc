"""torch.compile benchmark: groupnorm.torch inside compiled graphs against the group norm Inductor generates.

The block is an affine GroupNorm (``--block gn``, the default) or GroupNorm followed by SiLU (``--block gn_silu``,
the diffusion U-Net's pattern, where Inductor fuses the SiLU into its own group norm's last loop and groupnorm's
side is ``groupnorm.torch.GroupNorm(..., activation="silu")``, the SiLU fused into its kernels both ways). Four
contenders run it, in one process, interleaved round by round, with the same thread count:
- "torch": torch.nn.GroupNorm, eager;
- "torch compiled": the same module under ``torch.compile`` (Inductor decomposes group norm and generates its
  reductions and its normalise-and-SiLU loop as one C++ kernel);
- "gn": groupnorm.torch.GroupNorm, eager (with the SiLU as its activation);
- "gn compiled": that module under ``torch.compile``: the custom operator groupnorm::group_norm_forward (and
  group_norm_backward) as an extern kernel in Inductor's graph.
Passes: "inference" (under torch.no_grad) and "train" (x, weight and bias require grad; y = block(x), then
autograd.backward(y, g) after setting the gradients to None). Each figure is the median over rounds of (time
of a batch of k calls) / k. A compiled call also pays the compiled graph's own entry (guards, the AOTAutograd
wrapper: tens of us on a slow core), as a one-block model does. The copy floor is np.copyto of x's bytes times
the pass's traffic (inference reads x and writes y: 1 copy; train adds reading x and dy and writing dx: 2.5).
Compilation happens before timing (its seconds are reported); Dynamo's caches are reset between cases.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as torch_functional
except ImportError:  # pragma: no cover - the benchmark is meaningless without torch
    sys.exit("bench_compile.py needs torch: pip install torch==2.13.0 (the pinned CPU wheel)")

import groupnorm as gn
import groupnorm.torch as gnt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import (calibrate, copy_destination_for, fmt, format_markdown_table,  # noqa: E402
                           format_text_table, geometric_mean, header_lines, machine_header, time_batch_ns,
                           timing_stats, worst_spread, write_outputs)

CASES = [((1, 320, 64, 64), 32), ((4, 256, 28, 28), 32), ((2, 512, 14, 14), 32)]
QUICK_CASES = [((2, 32, 8, 8), 8)]
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
CONTENDERS = ("torch", "torch_compiled", "gn", "gn_compiled")
PASSES = {"inference": 1.0, "train": 2.5}  # copies' worth of traffic
TOLERANCE = 1e-4  # max |ours - eager torch| / max(1, max|eager torch|) over y and the gradients

COMPILE_DEFINITIONS = {
    "speedup_definition": "torch compiled us / gn compiled us (both under torch.compile with the same backend)",
    "copy_definition": "np.copyto (1 thread) of x's bytes, times 1 (inference) or 2.5 (train)",
}
COMPILE_TIMINGS = ("median per-call us over interleaved rounds; block = GroupNorm(x), or silu(GroupNorm(x)) where the"
                   " heading says so; torch / gn = eager"
                   " torch.nn.GroupNorm / groupnorm.torch.GroupNorm; compiled = torch.compile(block) with the"
                   " backend below; compiled speedup = torch compiled / gn compiled; eager speedup = torch / gn;"
                   " floor = np.copyto of x's bytes times the pass's traffic")


class Block(torch.nn.Module):
    def __init__(self, norm, silu):
        super().__init__()
        self.norm, self.silu = norm, silu

    def forward(self, x):
        y = self.norm(x)
        return torch_functional.silu(y) if self.silu else y


class Case:
    """One shape and layout: the four contenders' blocks (same parameters), inputs, and their timings."""

    def __init__(self, shape, num_groups, layout, backend, silu, rng):
        self.shape, self.num_groups, self.layout = tuple(shape), num_groups, layout
        self.case_id = "x".join(map(str, shape)) + f"-g{num_groups}"
        memory_format = LAYOUTS[layout]

        def data(size):
            return torch.from_numpy(rng.standard_normal(size).astype(np.float32)).contiguous(
                memory_format=memory_format if len(size) == 4 else torch.contiguous_format)

        channels = shape[1]
        self.x, self.grad = data(shape), data(shape)
        self.x_train = self.x.clone(memory_format=torch.preserve_format).requires_grad_()
        weight, bias = data((channels,)), data((channels,))
        torch._dynamo.reset()
        self.blocks = {}
        for name, norm in (("torch", torch.nn.GroupNorm(num_groups, channels)),
                           ("gn", gnt.GroupNorm(num_groups, channels, activation="silu" if silu else None))):
            block = Block(norm, silu and name == "torch")  # groupnorm's module applies the SiLU itself
            with torch.no_grad():
                block.norm.weight.copy_(weight)
                block.norm.bias.copy_(bias)
            self.blocks[name] = block
            self.blocks[f"{name}_compiled"] = torch.compile(block, backend=backend)
        self.compile_seconds = {}
        for name in ("torch_compiled", "gn_compiled"):  # both graphs (no_grad and grad) compile here
            start = time.monotonic()
            self.inference(name)()
            self.train(name)()
            self.compile_seconds[name] = time.monotonic() - start
        storage = self.x.permute(0, 2, 3, 1) if layout == "NHWC" else self.x
        self.copy_source = storage.contiguous().numpy()
        self.copy_destination = copy_destination_for(self.copy_source)
        self.samples_ns = {}
        self.batch_size = {}

    def inference(self, name):
        block = self.blocks[name]

        def call():
            with torch.no_grad():
                return block(self.x)
        return call

    def train(self, name):
        block = self.blocks[name]

        def call():
            self.x_train.grad = None
            block.zero_grad(set_to_none=True)
            y = block(self.x_train)
            torch.autograd.backward(y, self.grad)
            return [y.detach(), self.x_train.grad, block.norm.weight.grad, block.norm.bias.grad]
        return call

    def callables(self):
        entries = {("copy", "copy"): lambda: np.copyto(self.copy_destination, self.copy_source)}
        for pass_name in PASSES:
            for name in CONTENDERS:
                entries[(pass_name, name)] = getattr(self, pass_name)(name)
        return entries

    def verify(self) -> dict:
        """Every contender's output (and gradients) against eager torch's."""
        errors = {}
        reference = [self.inference("torch")()] + self.train("torch")()
        reference = [t.detach().clone() for t in reference]
        for name in CONTENDERS[1:]:
            results = [self.inference(name)()] + self.train(name)()
            for label, mine, theirs in zip(("y", "y_train", "dx", "dw", "db"), results, reference):
                scale = max(1.0, float(theirs.abs().max()))
                errors[f"{name} {label}"] = float((mine.double() - theirs.double()).abs().max()) / scale
        worst = max(errors, key=errors.get)
        return {"max_rel_err": errors[worst], "worst": worst, "tolerance": TOLERANCE,
                "ok": errors[worst] <= TOLERANCE}


def run_rounds(cases: list, rounds: int, min_batch_ns: int) -> None:
    """Calibrate every callable once, then time each once per round, the order rotated round by round."""
    entries = [(case, key, fn) for case in cases for key, fn in case.callables().items()]
    for case, key, fn in entries:
        case.batch_size[key] = calibrate(fn, min_batch_ns)
        case.samples_ns[key] = []
    for round_index in range(rounds):
        shift = round_index % len(entries)
        for case, key, fn in entries[shift:] + entries[:shift]:
            case.samples_ns[key].append(time_batch_ns(fn, case.batch_size[key]) / case.batch_size[key])


def summarise_case(case: Case, check: dict) -> list:
    """One row per pass: medians (us), spreads, the compiled and eager speedups and the floor ratios."""
    def stats(key):
        return {**timing_stats(case.samples_ns[key]), "batch_calls": case.batch_size[key]}

    copy_us = stats(("copy", "copy"))["median_us"]
    rows = []
    for pass_name, traffic in PASSES.items():
        timing = {name: stats((pass_name, name)) for name in CONTENDERS}
        med = {name: t["median_us"] for name, t in timing.items()}
        rows.append({
            "case": case.case_id, "layout": case.layout, "shape": list(case.shape), "num_groups": case.num_groups,
            "pass": pass_name, "elements": int(np.prod(case.shape)),
            **{f"{name}_us": med[name] for name in CONTENDERS},
            "floor_us": copy_us * traffic,
            "compiled_speedup": med["torch_compiled"] / med["gn_compiled"],
            "eager_speedup": med["torch"] / med["gn"],
            "gn_compiled_over_floor": med["gn_compiled"] / (copy_us * traffic),
            "torch_compiled_over_floor": med["torch_compiled"] / (copy_us * traffic),
            "compile_seconds": dict(case.compile_seconds),
            "timing": timing,
            "check": check,
        })
    return rows


def summarise(rows: list) -> dict:
    worst = min(rows, key=lambda r: r["compiled_speedup"]) if rows else None
    spread = worst_spread(rows, CONTENDERS) or (None, None)
    summary = {"all_checks_ok": all(r["check"]["ok"] for r in rows), "worst_spread": spread[0],
               "worst_spread_where": spread[1]}
    for pass_name in PASSES:
        of_pass = [r for r in rows if r["pass"] == pass_name]
        summary[pass_name] = {
            "geomean_compiled_speedup": geometric_mean(r["compiled_speedup"] for r in of_pass) if of_pass else None,
            "geomean_eager_speedup": geometric_mean(r["eager_speedup"] for r in of_pass) if of_pass else None,
        }
    summary["min_compiled_speedup"] = worst["compiled_speedup"] if worst else None
    summary["min_compiled_speedup_case"] = f"{worst['case']} {worst['layout']} {worst['pass']}" if worst else None
    return summary


TABLE_COLUMNS = ["case", "layout", "pass", "torch us", "torch compiled us", "gn us", "gn compiled us", "floor us",
                 "compiled speedup", "eager speedup", "gn compiled/floor", "torch compiled/floor"]


def table_cells(row: dict) -> list:
    flag = "" if row["check"]["ok"] else " MISMATCH"
    return [row["case"] + flag, row["layout"], row["pass"], f"{row['torch_us']:.1f}", f"{row['torch_compiled_us']:.1f}",
            f"{row['gn_us']:.1f}", f"{row['gn_compiled_us']:.1f}", f"{row['floor_us']:.1f}",
            f"{row['compiled_speedup']:.2f}x", f"{row['eager_speedup']:.2f}x",
            f"{row['gn_compiled_over_floor']:.2f}", f"{row['torch_compiled_over_floor']:.2f}"]


def summary_lines(summary: dict, rows: list) -> list:
    s = summary
    lines = [f"{name}: geometric mean speedup, compiled {fmt(s[name]['geomean_compiled_speedup'], suffix='x')}, "
             f"eager {fmt(s[name]['geomean_eager_speedup'], suffix='x')}" for name in PASSES]
    lines.append(f"min compiled speedup: {fmt(s['min_compiled_speedup'], suffix='x')} "
                 f"({s['min_compiled_speedup_case']})")
    seconds = {}
    for row in rows:
        for name, value in row["compile_seconds"].items():
            seconds.setdefault(name, []).append(value)
    lines.append("compile time per case (both graphs): " + ", ".join(
        f"{name} {min(v):.1f}-{max(v):.1f} s" for name, v in seconds.items()))
    lines += [
        f"timing spread: worst (p75 - p25) / median = {fmt(s['worst_spread'], '.0%')} ({s['worst_spread_where']});"
        " above ~10% the machine was too noisy for these figures",
        f"sanity (every output and gradient vs eager torch, to {TOLERANCE:g} of max(1, max|torch|)): "
        f"{'all ok' if s['all_checks_ok'] else 'FAILURES, see MISMATCH rows'}",
    ]
    return lines


def write_markdown(path: str, header: dict, rows: list, summary: dict) -> None:
    block = "GroupNorm + SiLU" if header["block"] == "gn_silu" else "GroupNorm"
    parts = [f"## torch.compile, {block}, {header['dtype']}, {header['threads']} threads, backend {header['backend']}"
             f" — {header['date']}", ""]
    parts += [f"- {line}" for line in header_lines(header, "np.copyto", COMPILE_TIMINGS)]
    parts += ["", format_markdown_table(rows, TABLE_COLUMNS, table_cells), ""]
    parts += [f"- {line}" for line in summary_lines(summary, rows)]
    parts.append("")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for groupnorm and torch alike")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one tiny case, 2 rounds")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for both compiled contenders")
    parser.add_argument("--block", choices=["gn", "gn_silu"], default="gn",
                        help="what is timed: GroupNorm alone, or GroupNorm then SiLU")
    parser.add_argument("--min-batch-ms", type=float, default=1.0, help="calibrate batches to at least this long")
    parser.add_argument("--json", default=None, metavar="PATH", help="write header, rows and summary as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown section")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 15
    if args.rounds < 1 or args.threads < 1 or args.min_batch_ms <= 0:
        parser.error("--rounds and --threads must be >= 1 and --min-batch-ms > 0")
    args.dtype = "float32"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gn.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    header = machine_header(args, args.threads, COMPILE_DEFINITIONS)
    header["backend"], header["block"] = args.backend, args.block
    for line in header_lines(header, "np.copyto", COMPILE_TIMINGS):
        print(line)
    print(f"backend:    {args.backend}    block: {args.block}", flush=True)

    rng = np.random.default_rng(20240611)
    cases, checks = [], []
    for shape, num_groups in (QUICK_CASES if args.quick else CASES):
        for layout in LAYOUTS:
            case = Case(shape, num_groups, layout, args.backend, args.block == "gn_silu", rng)
            checks.append(case.verify())
            cases.append(case)
    run_rounds(cases, args.rounds, int(args.min_batch_ms * 1e6))
    rows = [row for case, check in zip(cases, checks) for row in summarise_case(case, check)]
    summary = summarise(rows)
    print(format_text_table(rows, TABLE_COLUMNS, table_cells))
    print()
    for line in summary_lines(summary, rows):
        print(line)
    write_outputs(args, header, rows, "summary", summary, write_markdown)
    return 0 if summary["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
