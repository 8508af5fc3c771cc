"""The wheel build's C++ core, for C++ builds that would otherwise compile it a second time.

`python3 tests/prebuilt_core.py` prints the library and the compiler on one line (nothing when there is none):
.ci/memcheck builds its extension against them. tests/test_cpp_kernels.py builds kernel_check and the benchmark
against them. Standard library only: .ci/memcheck runs it before anything is installed."""
import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cache_entries(cache: Path) -> dict:
    """NAME -> value of a CMakeCache.txt."""
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        match = re.match(r"([A-Za-z_][\w.-]*):[A-Z]+=(.*)$", line)
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def prebuilt_core(root: Path = ROOT):
    """The (library, C++ compiler) of the wheel's own build of the tree at `root`, when pip left one that the C++ tests can
    link instead of compiling the core a second time (about 100 CPU-seconds): scikit-build-core's build directory
    (build/<wheel tag>, pyproject.toml), a release build of this very source directory with the same compiler as
    CXX, not sanitized, its libgroupnorm_core.a newer than every file under cpp/. (Not CMakeLists.txt: an edit
    there that changes the core's flags recompiles it at the next pip install, and one that does not leaves the
    library as it was, current but older.) Else None."""
    newest_source = max(f.stat().st_mtime for f in (root / "cpp").rglob("*") if f.is_file())
    wanted = shutil.which(os.environ.get("CXX", "c++"))
    for cache in sorted((root / "build").glob("*/CMakeCache.txt")):
        library = cache.parent / "libgroupnorm_core.a"
        entries = _cache_entries(cache)
        compiler = entries.get("CMAKE_CXX_COMPILER", "")
        if (library.is_file() and library.stat().st_mtime > newest_source
                and "SKBUILD" in entries and entries.get("CMAKE_BUILD_TYPE") == "Release"
                and entries.get("GROUPNORM_SANITIZE", "OFF") == "OFF" and not entries.get("GROUPNORM_PREBUILT_CORE")
                and Path(entries.get("groupnorm_SOURCE_DIR", "")).resolve() == root.resolve()
                and wanted is not None and compiler and Path(compiler).resolve() == Path(wanted).resolve()):
            return library, compiler
    return None


if __name__ == "__main__":
    found = prebuilt_core()
    if found is not None:
        print(*found)
