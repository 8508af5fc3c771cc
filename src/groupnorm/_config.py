"""Build and runtime configuration: version, SIMD levels, OpenMP threads, CUDA availability, JAX custom calls."""
from . import _core


def config():
    """The build and runtime configuration as a dict.

    Keys: ``version``; ``isa`` (the SIMD level calls run at); ``isa_compiled``, ``isa_supported``
    (what the CPU can run) and ``isa_available`` (both); ``openmp``, ``num_threads`` and ``fork_serial`` (this
    process is a fork of one that uses GNU OpenMP, so calls run on one thread); ``cuda`` (whether GPU
    arrays run here) and ``cuda_reason`` (why not); a build with the CUDA backend adds ``cuda_devices``,
    ``cuda_runtime`` and ``cuda_driver``; ``jax`` (whether the build has groupnorm.jax's custom calls) and
    ``jax_reason`` (why not); ``torch_node`` (whether the build has groupnorm.torch's C++ autograd node,
    ``groupnorm.torch.cpp_node()``) and ``torch_node_reason`` (why not, or the torch version it was built for).

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
        "fork_serial": _core.fork_serial(),
        **_cuda_config(),
        "jax": _core.JAX_BUILD_NOTE == "built",
        "jax_reason": "" if _core.JAX_BUILD_NOTE == "built" else _core.JAX_BUILD_NOTE,
        "torch_node": _core.TORCH_BUILD_NOTE.startswith("built"),
        "torch_node_reason": _core.TORCH_BUILD_NOTE,
    }


def _cuda_config():
    """``cuda`` (GPU arrays can run here), ``cuda_reason`` (why not, else empty), and with a CUDA build the
    runtime's ``cuda_devices`` and ``cuda_runtime`` / ``cuda_driver`` versions ("13.0"; "none" without a driver)."""
    from . import _gpu
    usable, reason = _gpu.availability()
    info = {"cuda": usable, "cuda_reason": reason or ""}
    if _core.CUDA_BUILD_NOTE == "built":
        from . import _cuda
        count, _ = _cuda.device_count()
        runtime, driver = _cuda.versions()
        info["cuda_devices"] = count
        info["cuda_runtime"] = _version(runtime)
        info["cuda_driver"] = _version(driver)
    return info


def _version(code):
    return f"{code // 1000}.{code % 1000 // 10}" if code else "none"


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
