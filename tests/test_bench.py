"""The benchmarks run and say what they measured: bench/groupnorm_bench (built through CMake, as
test_cpp_kernels.py builds the kernel check) on a tiny case in every dtype, bench/bench_forward.py in float32 and
the 16-bit dtypes (when torch is installed), `python -m groupnorm.bench --quick` with whatever peers are
installed in every dtype, its JSON, markdown and plot (when matplotlib is installed) and its error without it,
the Flax peer's semantics (when flax is installed), and bench/regenerate.py --quick, whose RESULTS.md must have
every section. Timings are never judged, only what was run and how the figures relate."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import groupnorm as gn
from groupnorm import bench
from test_cpp_kernels import ROOT, build_target, shared_build_dir

BENCH_FORWARD = ROOT / "bench" / "bench_forward.py"
REGENERATE = ROOT / "bench" / "regenerate.py"
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
needs_flax = pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed")


@pytest.fixture(scope="module")
def bench_exe(tmp_path_factory):
    """groupnorm_bench from the session's shared C++ build of the source tree."""
    return build_target(shared_build_dir(tmp_path_factory), "groupnorm_bench")


def test_cpp_bench_tiny_case(bench_exe, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([str(bench_exe), "--shape", "2,8,4,4", "--groups", "2", "--reps", "3",
                             "--min-batch-ms", "0.05", "--threads", "1,2", "--backward", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gn/copy" in result.stdout and "machine:" in result.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["isa"] for r in rows} == set(gn.config()["isa_available"])
    assert {(r["pass"], r["threads"]) for r in rows} == {(p, t) for p in ("forward", "backward") for t in (1, 2)}
    for r in rows:
        assert r["case"] == "2x8x4x4-g2" and r["layout"] == "NCHW" and r["dtype"] == "f32"
        assert r["reps"] == 3 and r["median_us"] > 0 and r["copy_us"] > 0 and r["gbps"] > 0
        assert r["bytes"] == (2 if r["pass"] == "forward" else 3) * 2 * 8 * 4 * 4 * 4
        assert r["over_copy"] == pytest.approx(r["median_us"] / r["copy_us"], rel=1e-3)
    assert data["header"]["isa_best"] in gn.config()["isa_available"]


def test_cpp_bench_quick_and_options(bench_exe, tmp_path):
    out = tmp_path / "quick.json"
    result = subprocess.run([str(bench_exe), "--quick", "--reps", "2", "--isa", "scalar", "--threads", "1",
                             "--dtype", "f64", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["layout"]) for r in rows] == [
        ("4x256x28x28-g32", "NCHW"), ("1x320x64x64-g32", "NHWC"), ("16x32-g4", "NCHW")]
    assert all(r["isa"] == "scalar" and r["dtype"] == "f64" and r["threads"] == 1 for r in rows)

    bad = subprocess.run([str(bench_exe), "--shape", "2,8,4,4", "--groups", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--groups must divide C" in bad.stderr


def test_cpp_bench_half_dtypes(bench_exe, tmp_path):
    out = tmp_path / "half.json"
    result = subprocess.run([str(bench_exe), "--shape", "2,8,4,4", "--groups", "2", "--dtype", "f16,bf16", "--reps",
                             "2", "--min-batch-ms", "0.05", "--threads", "1", "--layout", "nhwc", "--backward",
                             "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    isas = gn.config()["isa_available"]
    assert [(r["dtype"], r["isa"], r["pass"]) for r in rows] == [
        (d, i, p) for d in ("f16", "bf16") for i in isas for p in ("forward", "backward")]
    elements = 2 * 8 * 4 * 4
    for r in rows:
        assert r["layout"] == "NHWC" and r["elements"] == elements
        # The minimal traffic and so the copy floor count two bytes per element.
        assert r["bytes"] == (2 if r["pass"] == "forward" else 3) * elements * 2
        assert r["median_us"] > 0 and r["copy_us"] > 0
        assert r["over_copy"] == pytest.approx(r["median_us"] / r["copy_us"], rel=1e-3)
    assert " f16 " in result.stdout and " bf16 " in result.stdout


def test_cpp_bench_dtype_lists(bench_exe, tmp_path):
    out = tmp_path / "all.json"
    result = subprocess.run([str(bench_exe), "--shape", "16,32", "--groups", "4", "--dtype", "all,f16", "--reps", "1",
                             "--min-batch-ms", "0.02", "--threads", "1", "--isa", "scalar", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["dtype"] for r in json.loads(out.read_text())["rows"]] == ["f32", "f64", "f16", "bf16"]

    bad = subprocess.run([str(bench_exe), "--dtype", "f16,f8"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--dtype" in bad.stderr and "'f16,f8'" in bad.stderr


def run_bench_forward(*args):
    """python -W error bench/bench_forward.py ARGS in a subprocess (it sets torch's and groupnorm's threads)."""
    if not BENCH_FORWARD.exists():
        pytest.skip("needs the source tree")
    result = subprocess.run([sys.executable, "-W", "error", str(BENCH_FORWARD), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def check_forward_rows(rows):
    """The ratios in every row follow from its medians, and groupnorm matched torch on the same memory."""
    for r in rows:
        assert r["check"]["ok"] and r["check"]["torch_shares_memory"], r["check"]
        assert r["gn_out_over_copy"] == pytest.approx(r["gn_out_us"] / r["copy_us"])
        assert r["speedup"] == pytest.approx(r["torch_us"] / r["gn_alloc_us"])


@needs_torch
def test_bench_forward_half(tmp_path):
    pytest.importorskip("ml_dtypes")
    out, md = tmp_path / "half.json", tmp_path / "half.md"
    result = run_bench_forward("--dtype", "half", "--cases", "16x32-g4,1x320x64x64-g32", "--rounds", "1",
                               "--min-batch-ms", "0.01", "--json", str(out), "--markdown", str(md))
    data = json.loads(out.read_text())
    rows = data["rows"]
    cases = [("1x320x64x64-g32", "NCHW"), ("1x320x64x64-g32", "NHWC"), ("16x32-g4", "NC")]  # the list's order
    assert [(r["dtype"], r["case"], r["layout"]) for r in rows] == [
        (d, c, layout) for d in ("float16", "bfloat16") for c, layout in cases]
    check_forward_rows(rows)
    for r in rows:
        assert r["bytes_read"] == 2 * r["elements"]  # the copy floor moves the 16-bit bytes
        assert r["in_issue"] == (r["case"] == "1x320x64x64-g32")  # issue 4 lists this case in both layouts
    assert data["header"]["dtype"] == "float16,bfloat16"
    text = md.read_text()
    for dtype in ("float16", "bfloat16"):
        summary = data["summaries"][dtype]
        issue_rows = [r for r in rows if r["dtype"] == dtype and r["in_issue"]]
        assert summary["targets"] == {
            "half_within_1p3x_copy": all(r["gn_out_over_copy"] <= 1.3 for r in issue_rows),
            "half_speedup_4x": all(r["speedup"] >= 4.0 for r in issue_rows),
        }
        assert f"== {dtype} ==" in result.stdout and f"### {dtype}" in text
    assert list(data["summaries"]) == ["float16", "bfloat16"]
    for line in ("within 1.3x of the copy on [1,320,64,64] G32", ">= 4x faster than torch on [1,320,64,64] G32"):
        verdicts = [v for v in result.stdout.splitlines() if line in v]
        assert len(verdicts) == 2 and all(v.split()[0] in ("PASS", "FAIL") for v in verdicts), verdicts
    assert "MISMATCH" not in result.stdout + result.stderr


@needs_torch
def test_bench_forward_float32_default(tmp_path):
    out = tmp_path / "f32.json"
    result = run_bench_forward("--cases", "16x32-g4,1x64x32x32-g8:nhwc", "--rounds", "1", "--min-batch-ms", "0.01",
                               "--json", str(out))
    data = json.loads(out.read_text())
    assert [(r["dtype"], r["case"], r["layout"], r["in_issue"]) for r in data["rows"]] == [
        ("float32", "1x64x32x32-g8", "NHWC", False), ("float32", "16x32-g4", "NC", True)]
    check_forward_rows(data["rows"])
    assert all(r["bytes_read"] == 4 * r["elements"] for r in data["rows"])
    assert list(data["summaries"]) == ["float32"]
    assert set(data["summaries"]["float32"]["targets"]) == {
        "never_slower_than_torch", "geomean_speedup_2x", "out_within_1p3x_copy", "tiny_call_2us"}
    assert "==" not in result.stdout and "[16,32] G4 call <= 2 us" in result.stdout


@needs_torch
def test_bench_forward_rejects_unknown_dtype():
    if not BENCH_FORWARD.exists():
        pytest.skip("needs the source tree")
    bad = subprocess.run([sys.executable, str(BENCH_FORWARD), "--dtype", "float16,int8"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "'int8' is not one of" in bad.stderr


def run_cli(*args):
    """python -W error -m groupnorm.bench ARGS in a subprocess, so its thread settings stay there."""
    result = subprocess.run([sys.executable, "-W", "error", "-m", "groupnorm.bench", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_cli_quick_json(tmp_path):
    out = tmp_path / "peers.json"
    result = run_cli("--quick", "--threads", "2", "--json", str(out))
    data = json.loads(out.read_text())
    peers = data["header"]["peers"]
    assert peers == bench.available_peers()
    assert "groupnorm" in peers and "numpy" in peers
    expected = {(s[0], s[3]) for s in bench.all_case_specs(bench.QUICK_SPECS)}
    rows = data["rows"]
    assert {(r["case"], r["layout"]) for r in rows if r["pass"] == "forward"} == expected
    assert {(r["case"], r["layout"]) for r in rows if r["pass"] == "train"} == expected
    for r in rows:
        assert r["rounds"] == 2 and r["copy_us"] > 0 and r["copy_fraction"] > 0
        assert r["median_us"]["groupnorm"] > 0
        for peer, us in r["median_us"].items():
            if peer != "groupnorm":
                assert r["speedup"][peer] == pytest.approx(us / r["median_us"]["groupnorm"])
        if r["pass"] == "forward":
            assert "numpy" in r["median_us"]
            assert all(err < r["tolerance"] for err in r["max_rel_err"].values()), r["max_rel_err"]
        if "torch" in peers:
            assert "torch" in r["median_us"]
    for row in rows:
        assert row["case"] in result.stdout
    assert "MISMATCH" not in result.stdout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_cli_dtypes(tmp_path, dtype):
    """Every peer runs where it supports the dtype and is absent, with a reason, where it does not; the copy
    floor moves the dtype's bytes."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    out = tmp_path / "peers.json"
    run_cli("--quick", "--dtype", dtype, "--no-progress", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["header"]["dtype"] == dtype
    peers = data["header"]["peers"]
    itemsize = {"float16": 2, "bfloat16": 2, "float64": 8}[dtype]
    expected = {(s[0], s[3]) for s in bench.all_case_specs(bench.QUICK_SPECS)}
    for pass_name in bench.PASSES:
        assert {(r["case"], r["layout"]) for r in data["rows"] if r["pass"] == pass_name} == expected
    for r in data["rows"]:
        assert r["dtype"] == dtype and r["tolerance"] == bench.TOLERANCE[dtype]
        assert r["bytes"] == r["elements"] * itemsize * bench.PASS_TRAFFIC[r["pass"]]
        # Each installed peer has either a figure or a reason, never both.
        for peer in peers:
            assert (peer in r["median_us"]) != (peer in r["absent"]), (peer, r["median_us"], r["absent"])
        assert all(isinstance(reason, str) and reason for reason in r["absent"].values())
        assert all(err <= r["tolerance"] for err in r["max_rel_err"].values()), r["max_rel_err"]
        if r["pass"] == "forward":
            assert "numpy" in r["median_us"]
        else:
            assert r["absent"]["numpy"] == bench.NO_BACKWARD["numpy"]
        if "torch" in peers:
            assert "torch" in r["median_us"]
        if "onnxruntime" in peers and r["layout"] == "NHWC":
            assert "(N, C, *)" in r["absent"]["onnxruntime"]
        if "jax" in peers and dtype == "float64":
            assert "jax_enable_x64" in r["absent"]["jax"]


@needs_flax
def test_flax_peer_matches_groupnorm():
    """Flax's GroupNorm, through either API, computes what groupnorm does (same epsilon, weight and bias, biased
    variance) on channels-last data, in float32 and float16."""
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float16):
        case = bench.CaseData("2x32x8x8-g8", (2, 32, 8, 8), 8, "NHWC", np.dtype(dtype), rng)
        expected = gn.group_norm(case.x, 8, case.weight_compute, case.bias_compute, bench.EPS).astype(np.float64)
        apis = ["linen"] + (["nnx"] if importlib.util.find_spec("flax.nnx") is not None else [])
        for api in apis:
            name, params, apply = bench.flax_group_norm(case, api)
            assert name == api
            y = np.moveaxis(np.asarray(apply(case.storage, params)).astype(np.float64), -1, 1)
            assert np.max(np.abs(y - expected)) <= bench.TOLERANCE[np.dtype(dtype).name] * np.max(np.abs(expected))


@needs_flax
def test_cli_flax_rows(tmp_path):
    """The Flax peer runs on channels-last and 2-D cases only, forward and forward+backward."""
    out = tmp_path / "flax.json"
    run_cli("--quick", "--peers", "flax", "--no-progress", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["header"]["peers"] == ["groupnorm", "flax"] and "flax" in data["header"]["versions"]
    for r in data["rows"]:
        if r["layout"] in ("NHWC", "NC"):
            assert "flax" in r["median_us"] and not r["absent"]
            if r["pass"] == "forward":
                assert r["max_rel_err"]["flax"] <= r["tolerance"]
        else:
            assert "channels-last" in r["absent"]["flax"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_cli_plot_and_markdown(tmp_path):
    png, md = tmp_path / "plots" / "peers.png", tmp_path / "peers.md"
    png.parent.mkdir()
    run_cli("--quick", "--forward-only", "--cases", "16x32-g4,2x32x8x8-g8:nhwc", "--no-progress",
            "--plot", str(png), "--markdown", str(md))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("## Peers, float32, ") and "| 16x32-g4 | NC | forward |" in text
    assert "](plots/peers.png)" in text  # the plot embedded by its path relative to the markdown file


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    real_installed = bench._installed
    monkeypatch.setattr(bench, "_installed", lambda *m: "matplotlib" not in m and real_installed(*m))
    with pytest.raises(SystemExit) as excinfo:
        bench.parse_args(["--quick", "--plot", "x.png"])
    assert excinfo.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_cli_rejects_unknown_case(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "3x3-g1"])
    assert "unknown case" in capsys.readouterr().err


def test_plain_progress_bar(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_installed", lambda *m: False)
    progress = bench.Progress(4, enabled=True)
    for _ in range(4):
        progress.update("step")
    progress.close()
    err = capsys.readouterr().err
    assert "4/4" in err and "#" * 30 in err


@pytest.mark.asan_heavy
def test_regenerate_quick(bench_exe, tmp_path):
    """bench/regenerate.py --quick in this interpreter writes a RESULTS.md with every section: the header, the
    targets, and one section per benchmark, each with its command and either its tables or why it was skipped."""
    if not REGENERATE.exists():
        pytest.skip("needs the source tree")
    result = subprocess.run([sys.executable, "-W", "error", str(REGENERATE), "--quick", "--no-venv", "--work",
                             str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--cpp-bench", str(bench_exe)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    sys.path.insert(0, str(REGENERATE.parent))
    import regenerate

    assert text.startswith("# Benchmark results (--quick")
    for field in ("machine", "threads", "date", "commit", "command", "1-minute load average"):
        assert f"\n- {field}: " in text, field
    assert "--quick --no-venv" in text and "[NOTES.md](NOTES.md)" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Targets"] + [f"## {heading}" for _name, heading, _step in regenerate.STEPS]
    sections = dict(zip(headings, text.split("\n## ")[1:]))
    has_torch = importlib.util.find_spec("torch") is not None
    for name, heading, _step in regenerate.STEPS:
        body = sections[f"## {heading}"]
        if name in ("forward", "half", "training", "training-float16", "training-bfloat16", "training-silu",
                    "compile") and not has_torch:
            assert "Skipped: torch" in body
        elif name in ("peers-bfloat16", "training-bfloat16") and importlib.util.find_spec("ml_dtypes") is None:
            assert "Skipped: ml_dtypes" in body
        else:
            assert "\n`" in body and "|---|" in body, body[:2000]  # its command, then its tables
    targets = sections["## Targets"]
    if has_torch:
        verdicts = [line for line in targets.splitlines() if line.startswith("- bench_")]
        assert len(verdicts) == 4 + 2 + 2 + 3 * 4  # float32, float16, bfloat16 forward; training in all three
        assert all(line.split(": ", 1)[1].split()[0] in ("PASS", "FAIL", "N/A") for line in verdicts)
    if importlib.util.find_spec("matplotlib") is not None:
        assert "](peers.png)" in text and (tmp_path / "out" / "peers.png").exists()
    assert {"cpp.json", "peers.json"} <= {p.name for p in (tmp_path / "work" / "results").iterdir()}


@needs_torch
def test_bench_cuda_script_on_the_cpu(capsys, tmp_path):
    """bench/bench_cuda.py's own logic (cases, the check against float64, interleaved timing, the table, the
    targets and --write), run on the CPU kernels with wall-clock timers: the GPU run cannot be tested here, but a
    broken script must not wait for one to show it."""
    spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "bench" / "bench_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## GPU: old\n\nold table\n\n## Later section\n\nkept\n")
    rows = module.main(["--device", "cpu", "--quick", "--rounds", "2", "--write", "--results", str(results)])
    assert [module.case_name(r["case"]) for r in rows] == ["2x32x16x16 G8 float32 nchw", "2x32x16x16 G8 float16 nhwc"]
    for row in rows:
        assert all(row[k] > 0 for k in ("fwd_copy", "fwd_torch", "fwd_gn", "bwd_floor", "bwd_torch", "bwd_gn"))
        assert all(row[f"host_{k}"] > 0 for k in ("fwd_torch", "fwd_gn", "bwd_torch", "bwd_gn"))
        assert "fwd_gn_cupy" not in row  # CuPy runs on a GPU only
    text = capsys.readouterr().out
    assert "| 2x32x16x16 G8 float16 nhwc |" in text and "never slower than torch" in text
    written = results.read_text()
    assert "old table" not in written and "## Later section\n\nkept" in written
    assert written.rstrip().endswith(text.rstrip().splitlines()[-1])


@needs_torch
def test_bench_cuda_check_catches_a_wrong_kernel(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "bench" / "bench_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x, dy, w, b = module.build((2, 8, 4, 4), 2, "float32", "nchw", "cpu")
    module.check(x, dy, w, b, 2)
    real = gn.group_norm_backward
    monkeypatch.setattr(module.gn, "group_norm_backward", lambda *a: tuple(r * 1.01 for r in real(*a)))
    with pytest.raises(AssertionError, match="dx: error"):
        module.check(x, dy, w, b, 2)


def test_regenerate_keeps_the_gpu_section(tmp_path):
    """regenerate.py rewrites RESULTS.md on a machine without a GPU: the GPU section bench_cuda.py wrote stays."""
    spec = importlib.util.spec_from_file_location("regenerate", REGENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "RESULTS.md"
    assert module.gpu_section(path) == []
    path.write_text("# Results\n\n## Forward\n\nrows\n")
    assert module.gpu_section(path) == []
    path.write_text("# Results\n\n## GPU: NVIDIA H100\n\n| a |\n\n- PASS\n\n## Later\n\nx\n")
    assert module.gpu_section(path) == ["## GPU: NVIDIA H100", "", "| a |", "", "- PASS", ""]
