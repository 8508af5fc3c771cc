"""The suite's --dist loadgroup groups hold (the README's pytest command): every test of an xdist_group runs on one
worker. test_huge.py relies on it to run its 9 GiB tests one at a time, test_gpu_path.py to compile its library
once. pytest 9.2 silently broke it (pytest-dev/pytest-xdist#1386); xdist_groups.py's hook repairs it, and this
runs a small suite with that hook in a pytest subprocess on two workers to check."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

HERE = Path(__file__).resolve().parent

SUITE = """
import time
import pytest

@pytest.mark.xdist_group("first")
@pytest.mark.parametrize("i", range(6))
def test_first(i):
    time.sleep(0.02)

@pytest.mark.xdist_group("second")
@pytest.mark.parametrize("i", range(6))
def test_second(i):
    time.sleep(0.02)

@pytest.mark.parametrize("i", range(12))
def test_free(i):
    time.sleep(0.02)
"""


def test_each_group_runs_on_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
        "from xdist_groups import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_grouped.py").write_text(SUITE)
    result = subprocess.run([sys.executable, "-m", "pytest", "-v", "-n", "2", "--dist", "loadgroup", "-p",
                             "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    workers = {}
    for worker, name in re.findall(r"^\[(gw\d+)\].*PASSED .*::(test_\w+)\[", result.stdout, re.MULTILINE):
        workers.setdefault(name, set()).add(worker)
    assert set(workers) == {"test_first", "test_second", "test_free"}, result.stdout[-3000:]
    assert len(workers["test_first"]) == 1 and len(workers["test_second"]) == 1, workers
