"""Checks groupnorm's CUDA kernels (cpp/cuda) without a GPU: tests/cuda_emu/cuda_emu.h emulates the slice of CUDA
that the kernels use (threads of a block as fibers switched at __syncthreads, blocks in a shuffled order, poisoned
shared memory), so the very kernel sources that nvcc builds compile with the system C++ compiler and run here.

Two programs, compiled into a temporary directory and run:
- emu_selftest: the emulator itself, with kernels of its own (a tree reduction, barriers that only some threads
  reach, the launch limits, block and thread orders, fault reports).
- cuda_emu_check --quick: gn_cuda_forward and gn_cuda_backward against a long double reference for every dtype and
  layout, with poisoned outputs in guard zones, exact-size workspaces, misaligned pointers, in-place calls, bitwise
  determinism under two block orders, and the invalid problems of groupnorm_cuda.h. CUDA_EMU_CHECK_SEED=N replays a
  seed; the failing run prints its own.

Skipped without the source tree or a C++ compiler, and where the emulator cannot run (it needs POSIX ucontext or
x86-64, mmap and fork).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="the emulator needs POSIX fibers, mmap and fork"),
              pytest.mark.own_build]


def _compiler():
    """The C++ compiler: $CXX when it is on PATH, else c++ or g++; None without one."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(tmp_path_factory, source, name, includes, defines=()):
    """Compiles one C++ source into a temporary directory; skips without the source or a compiler."""
    if not source.exists():
        pytest.skip(f"needs the source tree ({source.relative_to(ROOT)})")
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("cuda_emu") / name
    # -O1: the check program compiled in 9 s instead of 14 s at -O2 and ran as fast (most of its time is the
    # emulator's fiber switches and the long double reference).
    command = [compiler, "-O1", "-std=c++17", "-fno-strict-aliasing", *defines,
               *[f"-I{path}" for path in includes], str(source), "-o", str(exe)]
    if sys.platform.startswith("linux"):
        command.append("-ldl")  # dladdr, in libc itself only from glibc 2.34
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-6000:]}"
    return exe


def _clip(text, head=6000, tail=4000):
    """The start (the first failures) and the end (the summary) of a long output."""
    return text if len(text) <= head + tail else text[:head] + "\n[...]\n" + text[-tail:]


def _run(exe, *args, timeout):
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(result.stdout[-3000:])
    output = _clip(result.stdout) + "\n--- stderr ---\n" + _clip(result.stderr, 2000, 2000)
    assert result.returncode == 0, f"{exe.name} {' '.join(args)} exited with {result.returncode}\n{output}"
    summary = re.search(r"^(\d+) passed, (\d+) failed$", result.stdout, re.MULTILINE)
    assert summary and int(summary.group(1)) > 0 and int(summary.group(2)) == 0, output


def test_emulator_selftest(tmp_path_factory):
    exe = _build(tmp_path_factory, EMU / "emu_selftest.cpp", "emu_selftest", [EMU])
    _run(exe, timeout=120)


def test_emulator_selftest_ucontext(tmp_path_factory):
    """The portable ucontext switch, which hosts other than x86-64 use."""
    exe = _build(tmp_path_factory, EMU / "emu_selftest.cpp", "emu_selftest_ucontext", [EMU],
                 ["-DGN_EMU_UCONTEXT"])
    _run(exe, timeout=120)


def test_cuda_kernels_emulated(tmp_path_factory):
    if not (ROOT / "cpp" / "cuda" / "groupnorm_cuda_impl.cuh").exists():
        pytest.skip("the CUDA kernels (cpp/cuda/groupnorm_cuda_impl.cuh) are not in this tree")
    exe = _build(tmp_path_factory, EMU / "cuda_emu_check.cpp", "cuda_emu_check",
                 [ROOT / "cpp" / "cuda", ROOT / "cpp" / "include", EMU], ["-DGN_CUDA_EMULATE"])
    seed = os.environ.get("CUDA_EMU_CHECK_SEED")
    # About 15 s on two cores; generous for a slow or sanitized host.
    _run(exe, "--quick", *([f"--seed={seed}"] if seed else []), timeout=600)
