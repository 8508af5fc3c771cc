"""_interop.py — the public functions for arrays of any DLPack producer (torch, JAX, CuPy, a bare object).

Each argument that speaks DLPack becomes a zero-copy NumPy view (groupnorm._dlpack.as_ndarray), the NumPy
function runs on the views with all of its checks, and every result goes back as the kind of array the caller
passed as `input` (torch in, torch out; JAX in, JAX out; another producer, an object with ``__dlpack__``).
_core routes a call here only when one of its array arguments is such an object, so NumPy calls never pay. A call
whose input lives in CUDA memory goes on to groupnorm._gpu (the CUDA backend, where this build and machine have
one); an argument in CUDA memory beside a CPU input gets the CPU path's error for it.
"""
import numpy as np

from . import _core, _dlpack, _gpu


def is_foreign(obj):
    """obj is an array of another framework that speaks DLPack (not a NumPy array)."""
    return not isinstance(obj, np.ndarray) and hasattr(type(obj), "__dlpack__")


def _view(obj, name, writable=False):
    return _dlpack.as_ndarray(obj, name, writable=writable) if obj is not None and is_foreign(obj) else obj


def _aligned_empty(like):
    """An empty C-contiguous array of like's shape and dtype whose data is 64-byte aligned: JAX imports such
    memory without a copy (and copies anything less aligned)."""
    nbytes = like.size * like.dtype.itemsize
    buffer = np.empty(nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + nbytes].view(like.dtype).reshape(like.shape)


def group_norm(input, num_groups, weight, bias, eps, activation, channel_axis, out, stream):
    if _gpu.gpu_device(input) is not None:
        return _gpu.group_norm(input, num_groups, weight, bias, eps, activation, channel_axis, out, stream)
    if stream is not None:
        _core._refuse_stream(stream, input)
    x = _view(input, "input")
    target = _view(out, "out", writable=True)
    if target is None and _dlpack.is_jax_array(input) and isinstance(x, np.ndarray) and x.flags.c_contiguous:
        target = _aligned_empty(x)
    y = _core.group_norm(x, num_groups, _view(weight, "weight"), _view(bias, "bias"), eps,
                         activation=activation, channel_axis=channel_axis, out=target)
    return out if out is not None else _dlpack.wrap_like(y, input)


def group_norm_forward(input, num_groups, weight, bias, eps, activation, stream):
    if _gpu.gpu_device(input) is not None:
        return _gpu.group_norm_forward(input, num_groups, weight, bias, eps, stream, activation)
    if stream is not None:
        _core._refuse_stream(stream, input)
    results = _core.group_norm_forward(_view(input, "input"), num_groups, _view(weight, "weight"),
                                       _view(bias, "bias"), eps, activation=activation)
    return tuple(_dlpack.wrap_like(r, input) for r in results)


def group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, bias, activation, stream):
    if _gpu.gpu_device(input) is not None:
        return _gpu.group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, stream, bias, activation)
    if stream is not None:
        _core._refuse_stream(stream, input)
    results = _core.group_norm_backward(_view(grad_output, "grad_output"), _view(input, "input"),
                                        _view(mean, "mean"), _view(rstd, "rstd"), num_groups,
                                        _view(weight, "weight"), bias=_view(bias, "bias"), activation=activation)
    like = input if is_foreign(input) else grad_output
    return tuple(_dlpack.wrap_like(r, like) for r in results)
