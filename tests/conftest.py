# conftest.py — shared fixtures: every ISA level (skipped with a reason where absent), fresh random data
# whose seed is reported on failure (GROUPNORM_TEST_SEED=... replays it), and a thread-count reset.
# The ISA fixture asserts the level really is in force, so no test can pass on a level it did not run.
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from reference import ...` in any import mode

# OpenMP threads that finish a parallel region sleep at once instead of spinning (libgomp spins up to 300,000
# iterations first): pytest-xdist runs one worker a core, and every spinning thread takes a core from the other
# worker. It changes no result, only who gets the CPU: the README's pytest took 250 s instead of 292 s on the
# 2-core VM, kernel_check (which inherits it, as every subprocess does) 68 s instead of 105 s. libgomp reads it
# when it loads, so it is set before groupnorm (and torch) are imported; a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import groupnorm as gn  # noqa: E402
from groupnorm import _core  # noqa: E402
from isa_levels import DEFAULT_ISA, ISA_PARAMS, use_isa  # noqa: E402
from xdist_groups import pytest_collection_modifyitems  # noqa: E402,F401  (a hook: pytest finds it here)


@pytest.fixture(params=ISA_PARAMS)
def isa(request):
    """Every ISA level name; the test body runs with that level selected. A test of one dtype other than
    bfloat16 skips the avx512_bf16 level, which runs the avx512 level's own kernels for those dtypes (the same
    functions: GROUPNORM_DEFINE_BF16_KERNEL_TABLE in cpp/kernels/kernel_table.h); test_isa.py checks that."""
    if request.param == "avx512_bf16" and _one_dtype_besides_bfloat16(request.node):
        pytest.skip("avx512_bf16 runs the avx512 level's kernels for every dtype but bfloat16")
    with use_isa(request.param) as name:
        yield name


def _one_dtype_besides_bfloat16(item):
    """Whether test `item` is parametrized on one dtype (a `dtype` parameter) and it is not bfloat16."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "dtype" not in callspec.params:
        return False
    value = callspec.params["dtype"]
    try:
        name = np.dtype(value).name
    except TypeError:  # a torch dtype or a label such as "ml_bfloat16"
        name = str(value)
    return "bfloat16" not in name


_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed in the report of a failing test."""
    env_seed = os.environ.get("GROUPNORM_TEST_SEED")
    seed = int(env_seed) if env_seed else int.from_bytes(os.urandom(8), "little")
    request.node.stash[_SEED_KEY] = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(("random seed", f"replay with GROUPNORM_TEST_SEED={seed}"))
    return report


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test starts and ends at the default thread count and the import-time ISA level."""
    gn.set_num_threads(0)
    yield
    gn.set_num_threads(0)
    leaked = _core.get_isa()
    _core.set_isa(DEFAULT_ISA)
    assert leaked == DEFAULT_ISA, f"a test left ISA level {leaked!r} selected"
