"""Builds tests/cpp/kernel_check through CMake (the same flags as the extension) and runs it: every compiled
ISA level, both layouts, float and double, against a long double reference, with guard zones around the
output."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmake():
    exe = shutil.which("cmake")
    if exe is None:
        try:
            import cmake  # the PyPI package ships the binary
        except ImportError:
            return None
        exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    return exe


@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree")
def test_kernel_check(tmp_path):
    cmake = _cmake()
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("cmake or a C++ compiler is not available")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DGROUPNORM_BUILD_TESTS=ON",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run([cmake, "--build", str(build), "--target", "groupnorm_kernel_check", "-j", "2"],
                   check=True, capture_output=True, text=True)
    exe = next(build.rglob("groupnorm_kernel_check"))
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    sys.stdout.write(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = re.search(r"^(\d+) passed, (\d+) failed", result.stdout, re.MULTILINE)
    assert summary, "kernel_check printed no summary line"
    assert int(summary.group(1)) > 0 and int(summary.group(2)) == 0
