"""Build and runtime configuration: version, SIMD levels, OpenMP threads, CUDA availability."""
from . import _core


def config():
    """The build and runtime configuration as a dict.

    Keys: ``version``; ``isa`` (the SIMD level calls run at); ``isa_compiled``, ``isa_supported``
    (what the CPU can run) and ``isa_available`` (both); ``openmp`` and ``num_threads``; ``cuda`` and
    ``cuda_reason``.

    Examples
    --------
    >>> import groupnorm as gn
    >>> cfg = gn.config()
    >>> cfg["isa"] in cfg["isa_available"]
    True
    """
    compiled = _core.compiled_isas()
    supported = _core.supported_isas()
    return {
        "version": _core.__version__,
        "isa": _core.get_isa(),
        "isa_compiled": compiled,
        "isa_supported": supported,
        "isa_available": [name for name in compiled if name in supported],
        "openmp": _core.openmp(),
        "num_threads": _core.get_num_threads(),
        "cuda": False,
        "cuda_reason": "this build has no CUDA backend (the CUDA translation unit is not part of it yet)",
    }


def show_config():
    """Print :func:`config`, one ``key: value`` line each.

    Examples
    --------
    >>> import groupnorm as gn
    >>> gn.show_config()  # doctest: +ELLIPSIS
    version: ...
    """
    for key, value in config().items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "(none)"
        print(f"{key}: {value}")
