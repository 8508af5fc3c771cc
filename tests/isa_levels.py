# isa_levels.py — the ISA level names, why one cannot run here, pytest params that skip the absent ones with that
# reason, and use_isa(): select a level, assert it is in force before and after the block, restore the default.
import contextlib

import pytest

import groupnorm as gn
from groupnorm import _core

ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16", "neon")
DEFAULT_ISA = _core.get_isa()  # the level chosen at import (GROUPNORM_ISA or the best available)


def isa_unavailable_reason(name):
    """Why level `name` cannot run here, or None when it can."""
    cfg = gn.config()
    if name in cfg["isa_available"]:
        return None
    if name not in cfg["isa_compiled"]:
        return f"ISA level {name!r}: not compiled into this build"
    return f"ISA level {name!r}: CPU lacks it"


# pytest.param with a skip mark: usable by fixtures and by @pytest.mark.parametrize under @given alike.
ISA_PARAMS = [
    pytest.param(name, id=name,
                 marks=pytest.mark.skipif(isa_unavailable_reason(name) is not None,
                                          reason=str(isa_unavailable_reason(name))))
    for name in ISA_LEVELS
]


@contextlib.contextmanager
def use_isa(name):
    """Run the block at ISA level `name` (skipping if absent), checked before and after, then restore."""
    reason = isa_unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    _core.set_isa(name)
    try:
        assert _core.get_isa() == name, f"set_isa({name!r}) left get_isa() == {_core.get_isa()!r}"
        yield name
        assert _core.get_isa() == name, f"the level changed from {name!r} to {_core.get_isa()!r} during the test"
    finally:
        _core.set_isa(DEFAULT_ISA)
