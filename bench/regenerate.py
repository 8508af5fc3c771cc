"""Regenerates bench/RESULTS.md, all of it, with one command: ``python3 bench/regenerate.py``.

Steps: a virtual environment (build-bench/venv, created or reused) with the optional peers and groupnorm installed
from this working tree (``pip install --no-build-isolation .``, so that groupnorm.jax's custom calls are built and
measured); the C++ groupnorm_bench built with CMake into build-bench; then every
benchmark in turn, each writing JSON, markdown and a log under build-bench/results: bench_forward.py in float32
and in float16/bfloat16, bench_training.py (float32, float16 and bfloat16, and float32 with ``--activation silu``),
bench_compile.py,
``python -m groupnorm.bench`` (every peer, with the plot
bench/peers.png) and groupnorm_bench on every ISA level; last, RESULTS.md from their outputs: a header (machine,
threads, load, date, commit, this command), every target's PASS/FAIL line, then one section per benchmark with
the command that produced it. The analysis of the figures is written by hand in bench/NOTES.md.
``--quick`` runs the same steps on tiny cases with few rounds into build-bench/quick (or --out), for a test;
``--no-venv`` uses the running interpreter as it is, and a benchmark whose needs are not installed there is
skipped with the reason in its section.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# The optional peers and helpers the benchmarks use; torch is pinned (the development machines' CPU wheel).
VENV_PACKAGES = ["torch==2.13.0", "ml_dtypes", "matplotlib", "tqdm", "onnx", "onnxruntime", "jax", "flax"]
# The command as typed and its start (seconds since the epoch), handed from the set-up to the run in the venv.
COMMAND_VARIABLE, STARTED_VARIABLE = "GROUPNORM_REGENERATE_COMMAND", "GROUPNORM_REGENERATE_STARTED"
# Interleaved rounds per benchmark (repetitions for groupnorm_bench): the whole command took 11 minutes on the
# 2-core development machine with the venv and the C++ build reused (about 2 more to create them); most of it
# is calibration and JAX compilation, not rounds. --quick takes seconds per step instead.
ROUNDS = {"forward": 25, "half": 25, "training": 15, "training-half": 15, "training-silu": 15, "compile": 15,
          "peers": 15, "cpp_reps": 11}
QUICK_CASES = "16x32-g4,1x64x32x32-g8"  # --quick: two small cases, one of them in both layouts
NOISY_LOAD = 0.5  # a 1-minute load average above this during the run is called out in the header


class Skipped(Exception):
    """A step cannot run here; the message says why (it becomes the section's text)."""


def shown(path) -> str:
    """A path as commands take and show it: relative to the repository root when inside it (they run there)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def command_text(command: list) -> str:
    """A command as the reader would type it: this interpreter shown as `python`."""
    return shlex.join(["python" if arg == sys.executable else str(arg) for arg in command])


def run_logged(command: list, log: Path) -> None:
    """Runs command in the repository root with its output in `log`; a failure raises with the log's tail."""
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{command_text(command)} exited with {result.returncode}:\n{tail}")


# groupnorm's build requirements (pyproject.toml): its install below is not isolated, so that it sees jax and
# compiles groupnorm.jax's custom calls (the peers' groupnorm.jax column), as README's JAX section says.
BUILD_PACKAGES = ["scikit-build-core>=0.10", "cython>=3.0", "ninja"]


def prepare_venv(venv: Path, log_dir: Path) -> Path:
    """Creates venv unless it exists, installs the optional peers and groupnorm from this working tree into it
    (`pip install --no-build-isolation .`, with the JAX custom calls), and returns its interpreter."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"regenerate: creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = VENV_PACKAGES + BUILD_PACKAGES + ([] if shutil.which("cmake") else ["cmake"])
    print(f"regenerate: installing {' '.join(packages)} and groupnorm (pip install --no-build-isolation .) into "
          f"{venv}", flush=True)
    run_logged([str(python), "-m", "pip", "install", "--quiet", *packages], log_dir / "pip-peers.log")
    run_logged([str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation", "."],
               log_dir / "pip-groupnorm.log")
    return python


# ---------------------------------------------------------------------------------------------------------
# The steps: each returns the section's markdown (a string) or raises Skipped.

def needs(*modules) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(f"{', '.join(missing)} not installed in {sys.executable}")


def demoted(markdown: str) -> str:
    """A benchmark's markdown section one heading level down, to sit under this file's own heading."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def python_benchmark(run, script: str, name: str, options: list) -> str:
    """bench/<script> with options, --json and --markdown into the results folder; its markdown, demoted."""
    needs("torch", *(["ml_dtypes"] if "half" in options or "bfloat16" in options else []))
    markdown = run.results / f"{name}.md"
    command = [sys.executable, shown(BENCH_DIR / script), "--threads", str(run.threads), *options,
               "--json", shown(run.results / f"{name}.json"), "--markdown", shown(markdown)]
    run.execute(command, name)
    return demoted(markdown.read_text(encoding="utf-8"))


def step_forward(run) -> str:
    return python_benchmark(run, "bench_forward.py", "forward", run.benchmark_options("forward"))


def step_half(run) -> str:
    return python_benchmark(run, "bench_forward.py", "half", ["--dtype", "half"] + run.benchmark_options("half"))


def step_training(run) -> str:
    return python_benchmark(run, "bench_training.py", "training", run.benchmark_options("training"))


def step_training_half(run, dtype: str) -> str:
    """bench_training.py in float16 or bfloat16: issue 3's training targets on the 16-bit types too."""
    return python_benchmark(run, "bench_training.py", f"training-{dtype}",
                            ["--dtype", dtype] + run.benchmark_options("training-half"))


def step_training_silu(run) -> str:
    """bench_training.py --activation silu: GroupNorm+SiLU fused against torch's GroupNorm then SiLU (no targets)."""
    return python_benchmark(run, "bench_training.py", "training-silu",
                            ["--activation", "silu"] + run.benchmark_options("training-silu"))


def step_compile(run) -> str:
    """bench_compile.py; --quick: its one tiny case through the aot_eager backend (no C++ to generate)."""
    options = ["--quick", "--backend", "aot_eager", "--min-batch-ms", "0.05"] if run.quick else \
        ["--rounds", str(ROUNDS["compile"])]
    return python_benchmark(run, "bench_compile.py", "compile", options)


def step_peers(run, dtype: str) -> str:
    """python -m groupnorm.bench in dtype with every installed peer, JSON and plot (peers.png for float32,
    peers-DTYPE.png for the others); the section from its JSON."""
    from groupnorm import bench

    name = "peers" if dtype == "float32" else f"peers-{dtype}"
    if dtype == "bfloat16":
        needs("ml_dtypes")
    result_json = run.results / f"{name}.json"
    command = [sys.executable, "-m", "groupnorm.bench", "--dtype", dtype, "--threads", str(run.threads),
               "--no-progress", "--json", shown(result_json)]
    command += ["--quick"] if run.quick else ["--rounds", str(ROUNDS["peers"])]
    plot = run.out / f"{name}.png"
    if importlib.util.find_spec("matplotlib") is not None:
        command += ["--plot", shown(plot)]
    run.execute(command, name)
    result = json.loads(result_json.read_text(encoding="utf-8"))
    text = demoted("\n".join(bench.markdown_lines(result, plot.name if plot.exists() else None)))
    missing = [name for name in bench.PEERS if name not in result["header"]["peers"]]
    return text + (f"\n\nNot installed, so not run: {', '.join(missing)}.\n" if missing else "")


def build_cpp_bench(run) -> Path:
    """groupnorm_bench built with CMake into the work folder (or --cpp-bench as given)."""
    if run.args.cpp_bench:
        return Path(run.args.cpp_bench)
    # On PATH, else the cmake package that the set-up installs into the venv when PATH has none.
    cmake = "cmake" if shutil.which("cmake") else shutil.which("cmake", path=os.path.dirname(sys.executable))
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        raise Skipped("cmake or a C++ compiler is not available")
    build = run.work
    configure = [cmake, "-S", ".", "-B", shown(build), "-DGROUPNORM_BUILD_BENCH=ON", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    run.execute(configure, "cmake-configure")
    run.execute([cmake, "--build", shown(build), "--target", "groupnorm_bench", "-j", str(os.cpu_count() or 1)],
                "cmake-build")
    return build / "groupnorm_bench"


CPP_DTYPES = ("f32", "f16", "bf16")


def step_cpp(run) -> str:
    """groupnorm_bench on every compiled and supported ISA level, 1 and --threads threads, forward and backward;
    the section from its JSON: per dtype a table with one column per ISA level."""
    exe = build_cpp_bench(run)
    result_json = run.results / "cpp.json"
    threads = sorted({1, run.threads})
    command = [shown(exe), "--dtype", ",".join(CPP_DTYPES), "--threads", ",".join(map(str, threads)), "--backward",
               "--json", shown(result_json)]
    command += ["--quick", "--reps", "2", "--min-batch-ms", "0.05"] if run.quick else [
        "--reps", str(ROUNDS["cpp_reps"])]
    run.execute(command, "cpp")
    return cpp_markdown(json.loads(result_json.read_text(encoding="utf-8")))


def cpp_markdown(result: dict) -> str:
    """groupnorm_bench's JSON as markdown: its header, then per dtype one row per (case, layout, pass, threads)
    with the median us of every ISA level and, for the best level, the copy and the ratio to it."""
    from groupnorm.bench import markdown_table

    header, rows = result["header"], result["rows"]
    isas = list(dict.fromkeys(r["isa"] for r in rows))
    best = header["isa_best"] if header["isa_best"] in isas else isas[-1]
    lines = [f"- machine: {header['machine']} ({header['logical_cpus']} logical CPUs), OpenMP "
             f"{'on' if header['openmp'] else 'OFF'}, up to {header['max_threads']} threads; ISA levels: "
             f"{', '.join(isas)} (best {header['isa_best']})",
             f"- date: {header['date']}; reps: {header['reps']}, warm-up {header['warmup']}, batch >= "
             f"{header['min_batch_ms']} ms",
             f"- command: `{header['command']}`",
             "- timings: median us per call over interleaved rounds (kernel batch, then copy batch); copy = "
             "single-threaded memcpy of the same bytes (forward: read x + write y; backward: read x, dy + write dx); "
             f"GB/s on those minimal bytes; gn/copy and GB/s at {best}", ""]
    columns = ["case", "layout", "pass", "threads"] + [f"{isa} us" for isa in isas] + [
        "copy us", "gn/copy", "GB/s"]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        table = {}
        for r in rows:
            if r["dtype"] == dtype:
                table.setdefault((r["case"], r["layout"], r["pass"], r["threads"]), {})[r["isa"]] = r
        cells = []
        for (case, layout, pass_name, threads), by_isa in table.items():
            ref = by_isa.get(best) or next(iter(by_isa.values()))
            cells.append([case, layout, pass_name, str(threads)]
                         + [f"{by_isa[i]['median_us']:.1f}" if i in by_isa else "-" for i in isas]
                         + [f"{ref['copy_us']:.1f}", f"{ref['over_copy']:.2f}", f"{ref['gbps']:.1f}"])
        lines += [f"### {dtype}", "", markdown_table(columns, cells, left=3), ""]
    return "\n".join(lines)


# name, heading, what the step runs
STEPS = [
    ("peers", "Peers, float32: groupnorm against every installed peer (python -m groupnorm.bench)",
     functools.partial(step_peers, dtype="float32")),
    ("peers-float16", "Peers, float16 (python -m groupnorm.bench --dtype float16)",
     functools.partial(step_peers, dtype="float16")),
    ("peers-bfloat16", "Peers, bfloat16 (python -m groupnorm.bench --dtype bfloat16)",
     functools.partial(step_peers, dtype="bfloat16")),
    ("forward", "Forward, float32, against torch and the copy (bench/bench_forward.py)", step_forward),
    ("half", "Forward, float16 and bfloat16 (bench/bench_forward.py --dtype half)", step_half),
    ("training", "Training: forward+backward through groupnorm.torch (bench/bench_training.py)", step_training),
    ("training-float16", "Training, float16 (bench/bench_training.py --dtype float16)",
     functools.partial(step_training_half, dtype="float16")),
    ("training-bfloat16", "Training, bfloat16 (bench/bench_training.py --dtype bfloat16)",
     functools.partial(step_training_half, dtype="bfloat16")),
    ("training-silu", "Training, GroupNorm+SiLU: activation='silu' against torch's GroupNorm then SiLU "
                      "(bench/bench_training.py --activation silu)", step_training_silu),
    ("compile", "torch.compile: groupnorm.torch in compiled graphs against Inductor's group norm "
                "(bench/bench_compile.py)", step_compile),
    ("cpp", "C++ alone, per ISA level and thread count (groupnorm_bench)", step_cpp),
]


# ---------------------------------------------------------------------------------------------------------
# The run and the file

class Run:
    """One regeneration: where it writes, how it runs a command, and what each command took."""

    def __init__(self, args):
        self.args, self.quick, self.threads = args, args.quick, args.threads
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.results = self.work / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.commands = []  # (name, command as shown, seconds)
        self.done = set()  # the steps that ran

    def benchmark_options(self, name: str) -> list:
        quick = ["--cases", QUICK_CASES, "--rounds", "1", "--min-batch-ms", "0.05"]
        return quick if self.quick else ["--rounds", str(ROUNDS[name])]

    def execute(self, command: list, name: str) -> None:
        start = time.monotonic()
        print(f"regenerate: {name}: {command_text(command)}", flush=True)
        run_logged(command, self.results / f"{name}.log")
        self.commands.append((name, command_text(command), time.monotonic() - start))


def git_commit() -> str:
    """HEAD's short hash, and whether tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def versions() -> str:
    found = []
    for name in ["groupnorm", "numpy", "torch", "ml_dtypes", "onnxruntime", "jax", "flax", "matplotlib"]:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def target_lines(run) -> list:
    """Every target's PASS/FAIL/N/A line, as the benchmarks print them, from their JSON."""
    judging = ("forward", "half", "training", "training-float16", "training-bfloat16")
    if not run.done & set(judging):
        return ["- none: the benchmarks that judge targets (they need torch) did not run"]
    sys.path.insert(0, str(BENCH_DIR))
    import bench_forward
    import bench_training

    lines = []
    for name in judging:
        if name not in run.done:
            continue
        data = json.loads((run.results / f"{name}.json").read_text(encoding="utf-8"))
        training = name.startswith("training")
        if training:
            judged = [(data["header"]["dtype"], data["summary"], bench_training.TARGETS)]
        else:
            judged = [(dtype, summary, bench_forward.targets_of(dtype)) for dtype, summary in data["summaries"].items()]
        for dtype, summary, targets in judged:
            script = "bench_training.py" if training else "bench_forward.py"
            lines += [f"- {script}, {dtype}: {line}" for line in bench_forward.target_lines(summary, targets)]
    return lines


def write_results(run, sections: dict, loads: list) -> Path:
    """RESULTS.md (in --out) from the sections: header, targets, then each section under its heading."""
    import groupnorm as gn
    from groupnorm.bench import cpu_model

    config = gn.config()
    started = float(os.environ[STARTED_VARIABLE])
    start_date = datetime.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds")
    minutes = (time.time() - started) / 60
    peak = max(loads)
    lines = [
        "# Benchmark results" + (" (--quick: a smoke run, not figures to quote)" if run.quick else ""),
        "",
        "Generated, all of it, by the command below; do not edit by hand. What the figures mean and how far to",
        "trust them: [NOTES.md](NOTES.md).",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; groupnorm {config.get('version')}, ISA "
        f"{config.get('isa')}, OpenMP {config.get('openmp')}",
        f"- threads: {run.threads} for groupnorm and every peer that takes a count",
        f"- date: {start_date}; the whole command took {minutes:.1f} minutes",
        f"- commit: {git_commit()}",
        f"- command: `{os.environ[COMMAND_VARIABLE]}`",
        f"- python {sys.version.split()[0]}; {versions()}",
        f"- 1-minute load average: {', '.join(f'{load:.2f}' for load in loads)} (at the start and after each step)"
        + (f"; above {NOISY_LOAD} other work was running, so these figures are noisy" if peak > NOISY_LOAD else ""),
        "",
        "## Targets",
        "",
        "Each benchmark's PASS/FAIL line for the issues' targets (the sections below say how each is judged).",
        "",
        *target_lines(run),
        "",
    ]
    for name, heading, _step in STEPS:
        lines += [f"## {heading}", ""]
        ran = [c for c in run.commands if c[0] == name or (name == "cpp" and c[0].startswith("cmake-"))]
        if ran:  # the commands, one a line (two trailing spaces break a markdown line)
            lines += ["  \n".join(f"`{command}` ({seconds:.0f} s)" for _name, command, seconds in ran), ""]
        lines += [sections[name].rstrip("\n"), ""]
    path = run.out / "RESULTS.md"
    lines += gpu_section(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def gpu_section(path: Path) -> list:
    """The "## GPU" section that bench/bench_cuda.py --write left in the RESULTS.md being replaced, kept as it was:
    this machine has no GPU to measure it again. Empty when there is none."""
    if not path.exists():
        return []
    old = path.read_text(encoding="utf-8")
    start = old.find("\n## GPU")
    if start < 0:
        return []
    end = old.find("\n## ", start + 1)
    return old[start + 1:end if end >= 0 else len(old)].rstrip("\n").split("\n") + [""]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny cases and few rounds, into build-bench/quick unless --out: checks the machinery")
    parser.add_argument("--no-venv", action="store_true",
                        help="use this interpreter as it is: no venv, no installs (skips what it lacks)")
    parser.add_argument("--venv", default=str(ROOT / "build-bench" / "venv"), help="the venv to create or reuse")
    parser.add_argument("--work", default=None,
                        help="CMake build and results/ folder (default build-bench; build-bench/quick with --quick)")
    parser.add_argument("--out", default=None,
                        help="where RESULTS.md and peers.png go (default bench/; the work folder with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every benchmark")
    parser.add_argument("--cpp-bench", default=None, metavar="EXE", help="an already built groupnorm_bench to run")
    args = parser.parse_args(argv)
    args.work = args.work or str(ROOT / "build-bench" / ("quick" if args.quick else ""))
    args.out = args.out or (args.work if args.quick else str(BENCH_DIR))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault(COMMAND_VARIABLE, shlex.join(["python3", os.path.relpath(__file__, ROOT)] + argv))
    os.environ.setdefault(STARTED_VARIABLE, str(time.time()))
    if not args.no_venv:
        log_dir = Path(args.work) / "results"
        log_dir.mkdir(parents=True, exist_ok=True)
        python = prepare_venv(Path(args.venv), log_dir)
        os.execv(str(python), [str(python), __file__, *argv, "--no-venv"])

    run = Run(args)
    sections, loads = {}, [os.getloadavg()[0]]
    for name, _heading, step in STEPS:
        try:
            sections[name] = step(run)
            run.done.add(name)
        except Skipped as reason:
            sections[name] = f"Skipped: {reason}."
            print(f"regenerate: {name} skipped: {reason}", flush=True)
        loads.append(os.getloadavg()[0])
    path = write_results(run, sections, loads)
    minutes = (time.time() - float(os.environ[STARTED_VARIABLE])) / 60
    print(f"regenerate: wrote {path}; the whole command took {minutes:.1f} minutes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
