"""Forward-pass benchmark: groupnorm vs torch.nn.functional.group_norm vs a plain copy of the same bytes.

All contenders run in one process, interleaved round by round, with the same thread count; each figure
is the median over rounds of (time of a batch of k calls) / k, k calibrated so a batch lasts >= ~1 ms.
The copy floor ("copy") is np.copyto into a preallocated buffer placed half a page from the input modulo 4 KiB
(free of 4K aliasing: the copy at its best): the plain copy the issue's targets are stated against. groupnorm's
out= is np.empty_like(x), wherever the allocator puts it. torch's multithreaded Tensor.copy_ of the same bytes
is reported beside it ("copy_") for reference.
"gn torch" is groupnorm.torch.group_norm on the torch tensors torch gets (nothing requires grad, so no autograd
node): what a torch user pays per call, tensor in and tensor out; reported beside the NumPy call, not a target.
The issue's targets are judged on its own case list (every channels-first case, plus [1,320,64,64]
channels-last); the other channels-last rows are extra information.
float16 and bfloat16 (--dtype) are judged on issue 4's targets instead: [1,320,64,64] G32, NCHW and
channels-last, within 1.3x of the copy and >= 4x torch; every other case is extra. Their data is drawn in float32
and rounded to nearest even; torch gets weight and bias in the input's dtype (as a module after .half() has
them) and groupnorm the same values in float32, its parameter type. torch sees the NumPy memory zero-copy.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass, field

import numpy as np

try:
    import torch
    import torch.nn.functional as torch_functional
except ImportError:  # pragma: no cover - the benchmark is meaningless without torch
    sys.exit("bench_forward.py needs torch: pip install torch==2.13.0 (the pinned CPU wheel)")

import groupnorm as gn
import groupnorm.torch as gnt
# Case list, timing, machine and table helpers shared with `python -m groupnorm.bench`.
from groupnorm.bench import (CASE_SPECS, HALF_DTYPES, all_case_specs, calibrate, case_id_of,  # noqa: F401
                             contiguous_layout_name, copy_destination_for, cpu_model, geometric_mean,
                             loaded_openmp_runtimes, markdown_table, numpy_dtype, text_table, time_batch_ns,
                             torch_view)

ONE_MILLION = 1_000_000
ISSUE_CHANNELS_LAST = {"1x320x64x64-g32"}  # the one channels-last case on the issue's list
CONTENDERS = ("torch", "gn_out", "gn_alloc", "gn_torch", "copy_numpy", "copy_torch")

QUICK_CASE_IDS = [
    "4x256x28x28-g32",
    "1x320x64x64-g32",
    "1x128x256x256-g32",
    "1x256x56x56-g1",
    "16x32-g4",
]
TARGETS = {
    "never_slower_than_torch": "groupnorm never slower than torch (every case)",
    "geomean_speedup_2x": "groupnorm >= 2x faster than torch in geometric mean",
    "out_within_1p3x_copy": "groupnorm (out=) within 1.3x of the copy on every case >= 1M elements",
    "tiny_call_2us": "[16,32] G4 call <= 2 us",
}
# Issue 4 (float16, bfloat16): one case, both layouts.
HALF_ISSUE_CASES = {"1x320x64x64-g32"}
HALF_TARGETS = {
    "half_within_1p3x_copy": "groupnorm (out=) within 1.3x of the copy on [1,320,64,64] G32, NCHW and channels-last",
    "half_speedup_4x": "groupnorm >= 4x faster than torch on [1,320,64,64] G32, NCHW and channels-last",
}
DTYPES = ("float32", "float64") + HALF_DTYPES
DTYPE_GROUPS = {"half": HALF_DTYPES, "all": DTYPES}
# Sanity check, max |gn - torch| / max(1, max|torch|): for the 16-bit types about two ulps of the largest outputs.
TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


@dataclass
class Case:
    """One benchmark case: its arrays, torch views of the same memory, and the timed callables."""

    case_id: str
    shape: tuple
    num_groups: int
    layout: str
    dtype: str
    x: np.ndarray
    storage: np.ndarray  # the contiguous memory behind x, flattened (what the copy floor moves)
    callables: dict = field(default_factory=dict)
    batch_size: dict = field(default_factory=dict)
    samples_ns: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.case_id}:{self.layout.lower()}:{self.dtype}"

    @property
    def elements(self) -> int:
        return int(self.x.size)


def selected_specs(args) -> list:
    """The cases the command line asks for: --cases, else the --quick subset, else all."""
    wanted = None
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    elif args.quick:
        wanted = QUICK_CASE_IDS
    all_specs = all_case_specs()
    if wanted is None:
        return all_specs
    known = {spec[0] for spec in all_specs} | {f"{spec[0]}:{spec[3].lower()}" for spec in all_specs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        sys.exit(f"--cases: unknown case(s) {unknown}; run with --list to see the names")
    return [s for s in all_specs if s[0] in wanted or f"{s[0]}:{s[3].lower()}" in wanted]


def in_issue(case_id: str, layout: str, dtype: str) -> bool:
    """Whether the issue that sets this dtype's targets lists the case: issue 4 for 16-bit types, else issue 2."""
    if dtype in HALF_DTYPES:
        return case_id in HALF_ISSUE_CASES
    return layout != "NHWC" or case_id in ISSUE_CHANNELS_LAST


def build_case(case_id, shape, num_groups, layout, dtype_name, rng) -> Case:
    """Allocate the input, weight, bias, out buffers and torch views, and bind every contender."""
    dtype = numpy_dtype(dtype_name)
    compute = np.float64 if dtype == np.float64 else np.float32  # groupnorm's parameter type for dtype
    x_nchw = (rng.standard_normal(shape).astype(compute) * 2.0 + 0.5).astype(dtype)
    if layout == "NHWC":
        storage_array = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
        x = storage_array.transpose(0, 3, 1, 2)
    else:
        storage_array = x_nchw
        x = x_nchw
    channels = shape[1]
    weight = rng.standard_normal(channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    out = np.empty_like(x)  # empty_like keeps the channels-last strides
    assert out.strides == x.strides

    x_torch = torch_view(x)
    if layout == "NHWC":
        x_torch = x_torch.contiguous(memory_format=torch.channels_last)
    weight_torch = torch_view(weight)
    bias_torch = torch_view(bias)
    weight, bias = weight.astype(compute, copy=False), bias.astype(compute, copy=False)
    weight_compute_torch, bias_compute_torch = torch_view(weight), torch_view(bias)

    storage = storage_array.reshape(-1)
    copy_destination = copy_destination_for(storage)
    storage_torch = torch_view(storage)
    copy_destination_torch = torch_view(copy_destination)

    case = Case(case_id, tuple(shape), num_groups, layout, dtype_name, x, storage)
    case.check["torch_shares_memory"] = x_torch.data_ptr() == x.ctypes.data
    case.callables = {
        "torch": functools.partial(torch_functional.group_norm, x_torch, num_groups, weight_torch,
                                   bias_torch, 1e-5),
        "gn_out": functools.partial(gn.group_norm, x, num_groups, weight, bias, 1e-5, out=out),
        "gn_alloc": functools.partial(gn.group_norm, x, num_groups, weight, bias, 1e-5),
        "gn_torch": functools.partial(gnt.group_norm, x_torch, num_groups, weight_compute_torch,
                                      bias_compute_torch, 1e-5),
        "copy_numpy": functools.partial(np.copyto, copy_destination, storage),
        "copy_torch": functools.partial(copy_destination_torch.copy_, storage_torch),
    }
    case._out = out  # kept alive for the sanity check
    case._torch_args = (x_torch, weight_torch, bias_torch)
    return case


def same_bits_torch(a, b) -> bool:
    """Two tensors of one dtype hold the same bits in the same layout."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a.view(bits), b.view(bits))


def verify_case(case: Case, tolerance: float) -> None:
    """Check once that groupnorm (both variants) matches torch to `tolerance` relative, and the layout."""
    y_torch = case.callables["torch"]().to(torch.float64).numpy()
    y_out = case.callables["gn_out"]()
    y_alloc = case.callables["gn_alloc"]()
    y_tensor = case.callables["gn_torch"]()
    scale = max(1.0, float(np.max(np.abs(y_torch))))
    err_out = float(np.max(np.abs(y_out.astype(np.float64) - y_torch))) / scale
    err_alloc = float(np.max(np.abs(y_alloc.astype(np.float64) - y_torch))) / scale
    case.check.update({
        "max_rel_err_out": err_out,
        "max_rel_err_alloc": err_alloc,
        "tolerance": tolerance,
        "out_is_buffer": y_out is case._out,
        "alloc_keeps_layout": y_alloc.strides == case.x.strides,
        "ok": (err_out <= tolerance and err_alloc <= tolerance and y_out is case._out
               and same_bits_torch(y_tensor, torch_view(y_alloc))),
    })


def run_rounds(cases: list, rounds: int, min_batch_ns: int, progress: bool) -> None:
    """Calibrate each contender once per case, then time every contender on every case once per round."""
    for case in cases:
        for name in CONTENDERS:
            case.batch_size[name] = calibrate(case.callables[name], min_batch_ns)
            case.samples_ns[name] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            # Rotate the order so no contender always runs first (cold-ish caches) or last.
            order = CONTENDERS[round_index % len(CONTENDERS):] + CONTENDERS[:round_index % len(CONTENDERS)]
            for case in cases:
                for name in order:
                    k = case.batch_size[name]
                    case.samples_ns[name].append(time_batch_ns(case.callables[name], k) / k)
            if progress:
                print(f"  round {round_index + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        if gc_was_enabled:
            gc.enable()


def timing_stats(samples_ns) -> dict:
    """Median, minimum and quartiles (us) of one contender's per-call times (ns) over the rounds (shared with
    bench_training.py and bench_compile.py)."""
    ordered = sorted(samples_ns)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median_us": statistics.median(ordered) / 1e3, "min_us": ordered[0] / 1e3,
            "p25_us": q[0] / 1e3, "p75_us": q[2] / 1e3, "rounds": len(ordered)}


def summarise_case(case: Case) -> dict:
    """Per-call medians (us) and the derived ratios for one case."""
    timing = {name: timing_stats(case.samples_ns[name]) for name in CONTENDERS}
    for name in CONTENDERS:
        timing[name]["batch_calls"] = case.batch_size[name]
    med = {name: timing[name]["median_us"] for name in CONTENDERS}
    copy_source = "np.copyto"
    copy_us = med["copy_numpy"]
    return {
        "case": case.case_id,
        "layout": case.layout,
        "dtype": case.dtype,
        "shape": list(case.shape),
        "num_groups": case.num_groups,
        "elements": case.elements,
        "bytes_read": int(case.x.nbytes),
        "torch_us": med["torch"],
        "gn_out_us": med["gn_out"],
        "gn_alloc_us": med["gn_alloc"],
        "gn_torch_us": med["gn_torch"],
        "copy_us": copy_us,
        "copy_source": copy_source,
        "copy_torch_us": med["copy_torch"],
        "gn_out_over_copy_torch": med["gn_out"] / med["copy_torch"],
        "in_issue": in_issue(case.case_id, case.layout, case.dtype),
        "gn_out_over_copy": med["gn_out"] / copy_us,
        "torch_over_copy": med["torch"] / copy_us,
        "speedup": med["torch"] / med["gn_alloc"],
        "speedup_out": med["torch"] / med["gn_out"],
        "speedup_torch_api": med["torch"] / med["gn_torch"],
        "timing": timing,
        "check": {k: v for k, v in case.check.items()},
    }


def summarise(all_rows: list, dtype: str) -> dict:
    """Aggregate figures and PASS/FAIL for each target of the issue that sets dtype's (None where no case
    covers it), over that issue's case list; the extra rows only get their own geometric mean. all_rows are
    one dtype's."""
    rows = [r for r in all_rows if r["in_issue"]]
    extra = [r for r in all_rows if not r["in_issue"]]
    speedups = [r["speedup"] for r in rows]
    big = [r for r in rows if r["elements"] >= ONE_MILLION]
    tiny = [r for r in all_rows if r["shape"] == [16, 32] and r["num_groups"] == 4]
    worst = min(rows, key=lambda r: r["speedup"]) if rows else None
    worst_big = max(big, key=lambda r: r["gn_out_over_copy"]) if big else None
    summary = {
        "geomean_speedup": geometric_mean(speedups),
        "geomean_speedup_out": geometric_mean(r["speedup_out"] for r in rows),
        "geomean_speedup_torch_api": geometric_mean(r["speedup_torch_api"] for r in all_rows),
        "min_speedup_torch_api": min(r["speedup_torch_api"] for r in all_rows),
        "geomean_speedup_extra": geometric_mean(r["speedup"] for r in extra) if extra else None,
        "min_speedup_extra": min((r["speedup"] for r in extra), default=None),
        "min_speedup": worst["speedup"] if worst else None,
        "min_speedup_case": f"{worst['case']} {worst['layout']}" if worst else None,
        "max_gn_out_over_copy_ge_1M": worst_big["gn_out_over_copy"] if worst_big else None,
        "max_gn_out_over_copy_ge_1M_case": f"{worst_big['case']} {worst_big['layout']}" if worst_big else None,
        "tiny_gn_out_us": tiny[0]["gn_out_us"] if tiny else None,
        "tiny_gn_alloc_us": tiny[0]["gn_alloc_us"] if tiny else None,
        "all_checks_ok": all(r["check"]["ok"] for r in all_rows),
    }
    spread = worst_spread(all_rows)
    summary["worst_spread"] = spread[0] if spread else None
    summary["worst_spread_where"] = spread[1] if spread else None
    if dtype in HALF_DTYPES:
        summary["targets"] = {
            "half_within_1p3x_copy": None if not rows else all(r["gn_out_over_copy"] <= 1.3 for r in rows),
            "half_speedup_4x": None if not rows else all(s >= 4.0 for s in speedups),
        }
        return summary
    summary["targets"] = {
        "never_slower_than_torch": None if not rows else all(s >= 1.0 for s in speedups),
        "geomean_speedup_2x": None if not rows else summary["geomean_speedup"] >= 2.0,
        "out_within_1p3x_copy": None if not big else all(r["gn_out_over_copy"] <= 1.3 for r in big),
        "tiny_call_2us": None if not tiny else tiny[0]["gn_out_us"] <= 2.0,
    }
    return summary


def targets_of(dtype: str) -> dict:
    """The targets dtype is judged on: issue 4's for the 16-bit types, issue 2's otherwise."""
    return HALF_TARGETS if dtype in HALF_DTYPES else TARGETS


def worst_spread(rows: list, names=None):
    """The largest (p75 - p25) / median over every reported figure (the contenders `names`, by default the
    forward's), and where it occurred (case, layout, the row's pass where it has one, contender)."""
    worst = None
    for r in rows:
        row_names = names or ("torch", "gn_out", "gn_alloc", "gn_torch", "copy_numpy")
        where = " ".join(r[key] for key in ("case", "layout", "pass") if key in r)
        for name in row_names:
            t = r["timing"][name]
            value = (t["p75_us"] - t["p25_us"]) / t["median_us"]
            if worst is None or value > worst[0]:
                worst = (value, f"{where} {name}")
    return worst


FORWARD_DEFINITIONS = {
    "speedup_definition": "torch us / gn us (alloc): both allocate their result",
    "copy_definition": "np.copyto (1 thread) of the input's bytes into a preallocated buffer half a page from the "
                       "input modulo 4 KiB (no 4K aliasing); torch's threaded "
                       "Tensor.copy_ of the same bytes is reported beside it",
}


def machine_header(args, threads: int, definitions=None) -> dict:
    """Everything a reader needs to place the numbers: machine, threads, versions, date, command line, and
    what the derived figures mean (`definitions`, by default the forward's)."""
    config = gn.config()
    return {
        "machine": cpu_model(),
        "platform_processor": platform.processor(),
        "logical_cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": threads,
        "groupnorm_num_threads": config.get("num_threads"),
        "torch_num_threads": torch.get_num_threads(),
        "groupnorm_version": config.get("version"),
        "groupnorm_isa": config.get("isa"),
        "groupnorm_openmp": config.get("openmp"),
        "openmp_runtimes": loaded_openmp_runtimes(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "dtype": args.dtype,
        "rounds": args.rounds,
        "min_batch_ms": args.min_batch_ms,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        **(definitions or FORWARD_DEFINITIONS),
    }


TABLE_COLUMNS = ["case", "layout", "elements", "torch us", "gn us (out=)", "gn us (alloc)", "gn torch us",
                 "copy us", "copy_ us (torch, threads)", "gn/copy", "torch/copy", "speedup (torch/gn)",
                 "torch/gn torch"]


def table_cells(row: dict) -> list:
    flag = "" if row["check"]["ok"] else " MISMATCH"
    extra = "" if row["in_issue"] else " (extra)"
    return [row["case"] + flag + extra, row["layout"], f"{row['elements']:,}", f"{row['torch_us']:.1f}",
            f"{row['gn_out_us']:.1f}", f"{row['gn_alloc_us']:.1f}", f"{row['gn_torch_us']:.1f}",
            f"{row['copy_us']:.1f}", f"{row['copy_torch_us']:.1f}", f"{row['gn_out_over_copy']:.2f}",
            f"{row['torch_over_copy']:.2f}", f"{row['speedup']:.2f}x", f"{row['speedup_torch_api']:.2f}x"]


def format_text_table(rows: list, columns=None, cells_of=None) -> str:
    """rows as an aligned text table (by default the forward's columns)."""
    return text_table(columns or TABLE_COLUMNS, [(cells_of or table_cells)(r) for r in rows])


def format_markdown_table(rows: list, columns=None, cells_of=None) -> str:
    """rows as a markdown table (by default the forward's columns)."""
    return markdown_table(columns or TABLE_COLUMNS, [(cells_of or table_cells)(r) for r in rows])


def fmt(value, spec=".2f", suffix="") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def summary_lines(summary: dict) -> list:
    s = summary
    lines = [
        f"geometric mean speedup (torch / gn alloc): {fmt(s['geomean_speedup'])}x"
        f"   (torch / gn out=: {fmt(s['geomean_speedup_out'])}x)",
        f"min speedup: {fmt(s['min_speedup'])}x ({s['min_speedup_case']})",
        f"extra rows (not on the issue's list): geometric mean speedup {fmt(s['geomean_speedup_extra'])}x, "
        f"min {fmt(s['min_speedup_extra'])}x",
        f"max gn(out=)/copy over cases >= 1M elements: {fmt(s['max_gn_out_over_copy_ge_1M'])}"
        + (f" ({s['max_gn_out_over_copy_ge_1M_case']})" if s["max_gn_out_over_copy_ge_1M_case"] else ""),
        f"groupnorm.torch.group_norm on torch's tensors (every row): geometric mean speedup "
        f"{fmt(s['geomean_speedup_torch_api'])}x, min {fmt(s['min_speedup_torch_api'])}x",
        f"[16,32] G4 gn call: {fmt(s['tiny_gn_out_us'], '.2f', ' us')} with out=, "
        f"{fmt(s['tiny_gn_alloc_us'], '.2f', ' us')} allocating",
        f"timing spread: worst (p75 - p25) / median = {fmt(s['worst_spread'], '.0%')}"
        + (f" ({s['worst_spread_where']})" if s["worst_spread_where"] else "")
        + "; above ~10% the machine was too noisy for these figures",
        f"sanity (gn vs torch to the tolerance, out= returns the buffer): "
        f"{'all ok' if s['all_checks_ok'] else 'FAILURES, see MISMATCH rows'}",
    ]
    return lines


def target_lines(summary: dict, targets=None) -> list:
    """A PASS / FAIL / N/A line per target (by default the forward's)."""
    lines = []
    for key, text in (targets or TARGETS).items():
        verdict = summary["targets"][key]
        word = "N/A " if verdict is None else ("PASS" if verdict else "FAIL")
        lines.append(f"{word}  {text}")
    return lines


FORWARD_TIMINGS = ("median per-call us over interleaved rounds; speedup = torch / gn (alloc);"
                   " gn torch = groupnorm.torch.group_norm on torch's tensors (tensor in, tensor out);"
                   " copy = np.copyto into a preallocated buffer; copy_ = torch's threaded Tensor.copy_;"
                   " targets judged on the issue's cases (rows marked (extra) are not on its list)")


def header_lines(header: dict, floor: str = "np.copyto", timings: str = FORWARD_TIMINGS) -> list:
    """The header as `key: value` lines; `floor` names the single-threaded yardstick, `timings` explains
    the columns."""
    h = header
    load = h["load_average_at_start"]
    return [
        f"machine:    {h['machine']} ({h['logical_cpus']} logical CPUs"
        + (f", load average {load[0]:.2f}" if load else "") + ")",
        f"threads:    {h['threads']} (groupnorm {h['groupnorm_num_threads']}, torch {h['torch_num_threads']};"
        f" {floor} is single-threaded)",
        f"groupnorm:  {h['groupnorm_version']}, ISA {h['groupnorm_isa']}, OpenMP {h['groupnorm_openmp']}",
        f"openmp:     {', '.join(h['openmp_runtimes']) or 'none found'}"
        + ("  (MORE THAN ONE RUNTIME: threads oversubscribe)" if len(h["openmp_runtimes"]) > 1 else ""),
        f"torch:      {h['torch_version']}    numpy: {h['numpy_version']}    python: {h['python_version']}",
        f"dtype:      {h['dtype']}    rounds: {h['rounds']}    batch >= {h['min_batch_ms']} ms",
        f"date:       {h['date']}",
        f"command:    {h['command']}",
        f"timings:    {timings}",
    ]


def report_lines(rows: list, summaries: dict, markdown: bool = False) -> list:
    """Per dtype (a heading when there are several): table, summary and PASS/FAIL lines, as text or markdown."""
    bullet = "- " if markdown else ""
    lines = []
    for dtype, summary in summaries.items():
        dtype_rows = [r for r in rows if r["dtype"] == dtype]
        if len(summaries) > 1:
            lines += [f"### {dtype}" if markdown else f"== {dtype} ==", ""]
        lines += [format_markdown_table(dtype_rows) if markdown else format_text_table(dtype_rows), ""]
        lines += [bullet + line for line in summary_lines(summary)]
        lines += ["", "Targets:", ""] if markdown else [""]
        lines += [bullet + line for line in target_lines(summary, targets_of(dtype))]
        lines.append("")
    return lines


def write_markdown(path: str, header: dict, rows: list, summaries: dict) -> None:
    """A self-contained section for bench/RESULTS.md: header, then table, summary and targets per dtype."""
    parts = [f"## Forward, {header['dtype']}, {header['threads']} threads — {header['date']}", ""]
    parts += [f"- {line}" for line in header_lines(header)]
    parts += [""] + report_lines(rows, summaries, markdown=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def parse_dtypes(text: str) -> list:
    """A --dtype value: a comma list of dtype names, 'half' (float16, bfloat16) or 'all', without repeats."""
    names = []
    for item in (part.strip() for part in text.split(",")):
        for name in DTYPE_GROUPS.get(item, (item,)):
            if name not in DTYPES:
                raise argparse.ArgumentTypeError(
                    f"'{item}' is not one of {', '.join(DTYPES + tuple(DTYPE_GROUPS))}")
            if name not in names:
                names.append(name)
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for groupnorm and torch alike")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 rounds and a subset of the cases")
    parser.add_argument("--cases", default=None,
                        help="comma list of case names (e.g. 4x256x28x28-g32, or 4x256x28x28-g32:nhwc for one layout)")
    parser.add_argument("--dtype", type=parse_dtypes, default=["float32"], metavar="DTYPE[,DTYPE...]",
                        help="float32 (default), float64, float16, bfloat16, half (= float16,bfloat16) or all")
    parser.add_argument("--min-batch-ms", type=float, default=1.0, help="calibrate batches to at least this long")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="sanity check: max |gn - torch| / max(1, max|torch|) (default per dtype: "
                             + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + ")")
    parser.add_argument("--json", default=None, metavar="PATH", help="write header, rows and summary as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown section (header, table, summary)")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument("--progress", action="store_true", help="report each finished round on stderr")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 21
    if args.rounds < 1 or args.threads < 1 or args.min_batch_ms <= 0:
        parser.error("--rounds and --threads must be >= 1 and --min-batch-ms > 0")
    if "bfloat16" in args.dtype and importlib.util.find_spec("ml_dtypes") is None:
        parser.error("--dtype bfloat16 needs ml_dtypes: pip install ml_dtypes")
    args.dtypes, args.dtype = args.dtype, ",".join(args.dtype)  # the header shows the joined names
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
    header = machine_header(args, args.threads)
    for line in header_lines(header):
        print(line)
    print(flush=True)

    rng = np.random.default_rng(20240611)
    cases = [build_case(*spec, dtype, rng) for dtype in args.dtypes for spec in specs]
    with torch.inference_mode():
        for case in cases:
            verify_case(case, TOLERANCE[case.dtype] if args.tolerance is None else args.tolerance)
        run_rounds(cases, args.rounds, int(args.min_batch_ms * 1e6), args.progress)

    rows = [summarise_case(case) for case in cases]
    summaries = {dtype: summarise([r for r in rows if r["dtype"] == dtype], dtype) for dtype in args.dtypes}
    print("\n".join(report_lines(rows, summaries)).rstrip("\n"))
    write_outputs(args, header, rows, "summaries", summaries, write_markdown)
    return 0


def write_outputs(args, header: dict, rows: list, summary_key: str, summary, write_markdown) -> None:
    """Reports the rows whose sanity check failed (stderr), then writes --json (header, rows and the summary
    under `summary_key`) and --markdown (through `write_markdown`) where asked; shared by both benchmarks."""
    for row in rows:
        if not row["check"]["ok"]:
            label = " ".join(str(row[key]) for key in ("case", "layout", "dtype") if key in row)
            print(f"MISMATCH {label}: {row['check']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"header": header, "rows": rows, summary_key: summary}, handle, indent=2)
    if args.markdown:
        write_markdown(args.markdown, header, rows, summary)


if __name__ == "__main__":
    sys.exit(main())
