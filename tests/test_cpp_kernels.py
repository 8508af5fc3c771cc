"""Builds tests/cpp/kernel_check through CMake (the same flags as the extension) and runs it: every compiled
ISA level, both layouts, float and double, against a long double reference, with guard zones around the
output."""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prebuilt_core import ROOT, prebuilt_core

ARM64 = platform.machine().lower() in ("aarch64", "arm64")

try:
    import fcntl
except ImportError:  # no POSIX locks (Windows): each xdist worker then builds in its own directory
    fcntl = None


def _cmake():
    exe = shutil.which("cmake")
    if exe is None:
        try:
            import cmake  # the PyPI package ships the binary
        except ImportError:
            return None
        exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    return exe


# The CMake option that adds each C++ target the tests run.
TARGET_OPTIONS = {"groupnorm_kernel_check": "GROUPNORM_BUILD_TESTS", "groupnorm_bench": "GROUPNORM_BUILD_BENCH"}


def shared_build_dir(tmp_path_factory) -> Path:
    """Where the session's one C++ build goes: beside the xdist workers' temp directories, so that every worker
    uses the same build (under build_target's lock), or in this process's own temp directory without xdist or
    without a lock."""
    base = tmp_path_factory.getbasetemp()
    shared = os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None
    return (base.parent if shared else base) / "cpp-build"


def build_target(build: Path, target: str) -> Path:
    """Configures the source tree into `build` with every C++ target of TARGET_OPTIONS on and builds `target`;
    skips the test when the source tree, cmake or a C++ compiler is missing. Returns the executable. The build is
    shared: a lock beside it lets one process configure and build at a time, so the core library compiles once
    and a later caller finds its target built; with the wheel's build of the core at hand (prebuilt_core), it
    compiles not at all. With GROUPNORM_CPP_BUILD_DIR set (.ci/sanitize sets it to its
    sanitized build), returns that build's `target` instead."""
    prebuilt = os.environ.get("GROUPNORM_CPP_BUILD_DIR")
    if prebuilt:
        exe = Path(prebuilt) / target
        option = TARGET_OPTIONS[target]
        assert exe.is_file(), f"GROUPNORM_CPP_BUILD_DIR={prebuilt} has no {target}; build it with {option}=ON"
        return exe
    if not (ROOT / "CMakeLists.txt").exists():
        pytest.skip("needs the source tree")
    cmake = _cmake()
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("cmake or a C++ compiler is not available")
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    configure += [f"-D{option}=ON" for option in TARGET_OPTIONS.values()]
    prebuilt_lib = prebuilt_core()
    if prebuilt_lib is not None:
        configure += [f"-DGROUPNORM_PREBUILT_CORE={prebuilt_lib[0]}", f"-DCMAKE_CXX_COMPILER={prebuilt_lib[1]}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    build.parent.mkdir(parents=True, exist_ok=True)
    with open(build.parent / (build.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        subprocess.run(configure, check=True, capture_output=True, text=True)
        subprocess.run([cmake, "--build", str(build), "--target", target, "-j", "2"],
                       check=True, capture_output=True, text=True)
    return next(build.rglob(target))


def test_kernel_check(tmp_path_factory):
    exe = build_target(shared_build_dir(tmp_path_factory), "groupnorm_kernel_check")
    # About 50 s in a release build with four x86 levels. A sanitized build (.ci/sanitize) runs several times
    # slower, beside the rest of the suite on both cores: there GROUPNORM_KERNEL_CHECK_QUICK=1 asks for --quick,
    # the same kinds of checks over a thinner sweep (every tail still, fewer shapes and seeds per tail).
    quick = os.environ.get("GROUPNORM_KERNEL_CHECK_QUICK") == "1"
    timeout = 1500 if os.environ.get("GROUPNORM_CPP_BUILD_DIR") else 300
    result = subprocess.run([str(exe)] + (["--quick"] if quick else []), capture_output=True, text=True,
                            timeout=timeout)
    sys.stdout.write(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = re.search(r"^(\d+) passed, (\d+) failed", result.stdout, re.MULTILINE)
    assert summary, "kernel_check printed no summary line"
    assert int(summary.group(1)) > 0 and int(summary.group(2)) == 0


def test_prebuilt_core_only_a_fresh_release_wheel_build_of_this_tree(tmp_path, monkeypatch):
    """prebuilt_core hands the C++ builds a core library only when it is the wheel build's, of these sources, as
    new as they are, unsanitized, in release, with the compiler the tests would use."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    monkeypatch.delenv("CXX", raising=False)
    if Path(compiler).name != "c++":
        monkeypatch.setenv("CXX", compiler)
    tree = tmp_path / "tree"
    (tree / "cpp").mkdir(parents=True)
    source = tree / "cpp" / "dispatch.cpp"
    source.write_text("// source\n")
    build = tree / "build" / "cp3-cp3-linux"
    build.mkdir(parents=True)
    library = build / "libgroupnorm_core.a"
    library.write_bytes(b"!<arch>\n")
    entries = {"SKBUILD:STRING": "2", "CMAKE_BUILD_TYPE:STRING": "Release", "GROUPNORM_SANITIZE:BOOL": "OFF",
               "groupnorm_SOURCE_DIR:STATIC": str(tree), "CMAKE_CXX_COMPILER:FILEPATH": compiler}

    def cache(extra="", **changes):  # changes: NAME=value, or NAME=None to leave the entry out
        lines = [f"{key}={changes.get(key.split(':')[0], value)}" for key, value in entries.items()
                 if changes.get(key.split(":")[0], value) is not None]
        (build / "CMakeCache.txt").write_text("# comment\n" + "\n".join(lines) + "\n" + extra)
        os.utime(source, (1_000_000, 1_000_000))
        os.utime(library, (2_000_000, 2_000_000))

    cache()
    assert prebuilt_core(tree) == (library, compiler)
    os.utime(source, (3_000_000, 3_000_000))  # a source edited after the build
    assert prebuilt_core(tree) is None
    for change in ({"CMAKE_BUILD_TYPE": "Debug"}, {"GROUPNORM_SANITIZE": "ON"}, {"SKBUILD": None},
                   {"groupnorm_SOURCE_DIR": str(tmp_path)}, {"CMAKE_CXX_COMPILER": "/nonexistent/c++"}):
        cache(**change)
        assert prebuilt_core(tree) is None, change
    cache(extra=f"GROUPNORM_PREBUILT_CORE:FILEPATH={library}\n")
    assert prebuilt_core(tree) is None  # a build that itself linked a prebuilt core
    cache()
    library.unlink()
    assert prebuilt_core(tree) is None


# The per-vector helpers of the vec headers (loads, stores, 16-bit widening and narrowing, and the pair and split forms
# that load or store two vectors at once), and forward_impl.h's wrappers over them, as the function an `nm -C` line
# names: the name, its template arguments (no parentheses in them), then its parameter list. The tails, which run
# once a run, and the headers' loops (the bfloat16 dot products) may keep bodies of their own.
PER_VECTOR = ("load|store|store_stream|widen|narrow|narrow_bf16_bits|bf16_lanes|bf16_rounded|load_split|store_split|"
              "store_split_stream|split_bits|split_bits_rounded|store_pair")
VECTOR_HELPER = re.compile(rf" (groupnorm::\w+::(?:Vec\w+::(?:{PER_VECTOR})|"
                           r"(?:load_split|store_split|store_pair|store_two|store_vector))(?:<[^()]*>)?)\(")


def out_of_line_vector_helpers(nm_output: str) -> list:
    """The demangled names (`nm -C` lines) of per-vector helpers that have a body of their own."""
    found = []
    for line in nm_output.splitlines():
        parts = line.split(" ", 2)
        match = VECTOR_HELPER.search(line) if len(parts) == 3 and parts[1] in ("t", "T", "w", "W") else None
        if match:
            found.append(match.group(1))
    return found


def test_out_of_line_vector_helpers_found():
    nm = ("0000000000001000 W void groupnorm::avx512_bf16::store_split<groupnorm::avx512_bf16::VecF32, false, false, "
          "groupnorm::BFloat16>(groupnorm::BFloat16*, groupnorm::avx512_bf16::VecF32, groupnorm::avx512_bf16::VecF32)\n"
          "0000000000002000 W long long __vector(8) groupnorm::avx512_bf16::VecF32::split_bits<true>(groupnorm::"
          "avx512_bf16::VecF32, groupnorm::avx512_bf16::VecF32)\n"
          "0000000000003000 W void groupnorm::avx2::VecF32::store_tail<groupnorm::BFloat16>(groupnorm::BFloat16*, "
          "groupnorm::avx2::VecF32, long)\n"
          "0000000000004000 W void groupnorm::avx512::column_apply<groupnorm::avx512::VecF32, 4>(float const*)\n"
          "0000000000005000 W void groupnorm::avx512_bf16::VecF32::store_stream<groupnorm::BFloat16>(groupnorm::"
          "BFloat16*, groupnorm::avx512_bf16::VecF32)\n"
          "0000000000006000 W void groupnorm::avx512_bf16::VecF32::dot_pair_sums_bf16(groupnorm::BFloat16 const*, "
          "long)\n"
          "                 U memcpy\n")
    assert out_of_line_vector_helpers(nm) == [
        "groupnorm::avx512_bf16::store_split<groupnorm::avx512_bf16::VecF32, false, false, groupnorm::BFloat16>",
        "groupnorm::avx512_bf16::VecF32::split_bits<true>",
        "groupnorm::avx512_bf16::VecF32::store_stream<groupnorm::BFloat16>"]


def test_vector_helpers_inlined(tmp_path_factory):
    """No vector load, store or conversion helper is left out of line in the release build's SIMD kernels. GCC once
    kept VecF32::store_split out of line in apply_pairs (a call per vector pair, the coefficients spilled around it):
    bfloat16 NCHW forwards took 1.8x the time, which only a benchmark shows, so the build's symbols are checked."""
    if os.environ.get("GROUPNORM_CPP_BUILD_DIR"):
        pytest.skip("a sanitized build inlines by other rules")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not available")
    exe = build_target(shared_build_dir(tmp_path_factory), "groupnorm_bench")
    listing = subprocess.run([nm, "-C", str(exe)], capture_output=True, text=True, check=True).stdout
    assert "groupnorm::" in listing, "the benchmark binary has no symbols to check"
    assert out_of_line_vector_helpers(listing) == []


def _clang_cxx():
    """A clang++ on PATH (plain, or with the version suffix Debian gives it), or None."""
    names = ["clang++"] + [f"clang++-{v}" for v in range(30, 9, -1)]
    return next((path for path in map(shutil.which, names) if path), None)


def _host_include_dirs(clang) -> list:
    """The host's #include <...> search list as clang prints it (libstdc++, clang's own headers, libc)."""
    listing = subprocess.run([clang, "-xc++", "-E", "-v", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True).stderr.splitlines()
    try:
        begin = listing.index("#include <...> search starts here:") + 1
        end = listing.index("End of search list.")
    except ValueError:
        return []
    return [line.strip() for line in listing[begin:end]]


@pytest.mark.parametrize("unit", ["neon", "scalar"])
def test_aarch64_translation_units_compile(unit):
    """The aarch64 build's kernel translation units (vec/neon.h under the shared templates, and the scalar level)
    pass clang's front end for an aarch64 target: NEON code runs only on aarch64, so on x86 this is what catches a
    template change that vec/neon.h does not follow. Without an aarch64 sysroot the host's C and C++ headers stand
    in (the same LP64 types; __x86_64__ defined only so that glibc's x86 headers pick their 64-bit definitions:
    these units test no architecture macro of their own), and every template the kernel table names is
    instantiated, as in a real build."""
    if ARM64:
        pytest.skip("an aarch64 machine compiles these units in its own build")
    clang = _clang_cxx()
    if clang is None:
        pytest.skip("clang++ is not available")
    dirs = _host_include_dirs(clang)
    if not dirs:
        pytest.skip("clang++ printed no include search list")
    source = ROOT / "cpp" / "kernels" / "isa" / f"{unit}.cpp"
    if not source.exists():
        pytest.skip("needs the source tree")
    command = [clang, "--target=aarch64-linux-gnu", "-std=c++17", "-fsyntax-only", "-Werror", "-nostdinc",
               "-nostdinc++", *[arg for d in dirs for arg in ("-isystem", d)], "-D__x86_64__",
               "-I", str(ROOT / "cpp" / "include"), "-I", str(ROOT / "cpp"), str(source)]
    probe = subprocess.run([clang, "--target=aarch64-linux-gnu", "-fsyntax-only", "-xc++", "-"], input="int x;\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{clang} has no aarch64 target: {probe.stderr.strip()[:200]}")
    with_openmp = subprocess.run(command + ["-fopenmp"], capture_output=True, text=True, timeout=300)
    result = with_openmp
    if with_openmp.returncode != 0 and "omp.h" in with_openmp.stderr:  # no OpenMP headers for clang here
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
