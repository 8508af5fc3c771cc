"""groupnorm.jax: Group Normalization for JAX arrays as XLA custom calls, under ``jax.jit`` and ``jax.grad``.

The kernels run inside JAX's own computation: XLA allocates the results, and on a GPU lends its stream and the
kernels' workspace, so they compose with jit, grad (a custom VJP on groupnorm's backward kernels; higher orders
through JVP rules of both calls written in jax.numpy) and vmap
(the forward folds the mapped axis into N, one call for the batch, where weight and bias are shared; otherwise,
and for the backward, one call per element). On the CPU the custom calls run groupnorm's SIMD kernels (the ISA
level and thread count of groupnorm.set_isa / set_num_threads); on a GPU the CUDA kernels, where the build has
them.

It needs a groupnorm built with the custom calls (``groupnorm.config()["jax"]``): a build that found jaxlib's FFI
headers, that is ``pip install --no-build-isolation .`` where jax is installed (README, section JAX). Importing
this module imports jax; the rest of groupnorm never does. Eager ``groupnorm.group_norm`` calls on JAX arrays in
GPU memory come here; JAX arrays in CPU memory go through DLPack without a copy.
"""
import ctypes
import functools
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from . import _core, _gpu

__all__ = ["group_norm", "group_norm_forward", "group_norm_backward"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")
_state = None  # True once the custom calls are registered, else the reason they cannot be
_platforms = []  # the platforms registered: "cpu", and "CUDA" where the build has the CUDA backend
_lock = threading.Lock()  # one registration, whichever thread calls first


def available():
    """``(True, None)`` when the custom calls are registered (they are on the first call), else ``(False, why)``."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _register()
    return (True, None) if _state is True else (False, _state)


def has_cuda():
    """Whether the custom calls serve JAX arrays in GPU memory (a build with the CUDA backend)."""
    return available()[0] and "CUDA" in _platforms


def _require():
    usable, reason = available()
    if not usable:
        raise RuntimeError(f"groupnorm.jax cannot run: {reason}")


def _register():
    if _core.JAX_BUILD_NOTE != "built":
        return f"this groupnorm build has no JAX custom calls ({_core.JAX_BUILD_NOTE}; README, section JAX)"
    path = next(iter(sorted(pathlib.Path(__file__).parent.glob("_jax_ffi*"))), None)
    if path is None:  # pragma: no cover - a broken installation
        return "groupnorm/_jax_ffi is missing from this installation"
    library = ctypes.CDLL(str(path))
    forward, backward = _core._cpu_entry_points()
    library.gn_jax_bind_core(ctypes.c_void_p(forward), ctypes.c_void_p(backward))
    platforms = [("cpu", "Cpu")] + ([("CUDA", "Cuda")] if library.gn_jax_has_cuda() else [])
    for platform, suffix in platforms:
        for name in ("Forward", "Backward"):
            handler = jax.ffi.pycapsule(getattr(library, f"Gn{name}{suffix}"))
            jax.ffi.register_ffi_target(f"groupnorm_{name.lower()}", handler, platform=platform)
        _platforms.append(platform)
    return True


# ------------------------------------------------------------------------------------------------ checks

def _array(value, name):
    if not isinstance(value, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be a jax.Array (or a NumPy array), got {type(value).__name__}")
    return jnp.asarray(value)


def _check_input(x, name="input"):
    x = _array(x, name)
    if x.dtype.name not in _DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; groupnorm supports float16, bfloat16, float32 and float64")
    _gpu.check_rank(name, x.shape)
    return x


def _real(dtype):
    """float (bfloat16 among them) or integer, not bool or complex."""
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def _compute_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _param(value, name, channels):
    """weight or bias checked: None, or a (C,) array of real numbers."""
    if value is None:
        return None
    value = _array(value, name)
    _gpu.check_param_shape(name, value.shape, channels)
    if not _real(value.dtype):
        raise TypeError(f"{name} has dtype {value.dtype}; it must hold real numbers (float or integer)")
    return value


def _as_param(value, x):
    """(the kernels' parameter, whether it was given): the compute dtype, or an empty array for None."""
    dtype = _compute_dtype(x)
    return (jnp.zeros((0,), dtype), False) if value is None else (value.astype(dtype), True)


# ------------------------------------------------------------------------------------------------ custom calls

def _forward_call(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    """(y, mean, rstd) of the forward custom call; under vmap, see _forward_op."""
    return _forward_op(groups, eps, channels_last, has_weight, has_bias, silu)(x, w, b)


def _ffi_forward(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    stats = jax.ShapeDtypeStruct((x.shape[0], groups), _compute_dtype(x))
    call = jax.ffi.ffi_call("groupnorm_forward", (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats),
                            vmap_method="sequential")
    return call(x, w, b, groups=np.int64(groups), eps=np.float64(eps), channels_last=bool(channels_last),
                has_weight=bool(has_weight), has_bias=bool(has_bias), silu=bool(silu))


@functools.lru_cache(maxsize=None)
def _forward_op(groups, eps, channels_last, has_weight, has_bias, silu):
    """The forward custom call as a function of (x, w, b) for one set of static arguments, batched by jax.vmap with
    the mapped axis folded into N (one call for the whole batch) when the weight and bias are the same for every
    element, and one call per element otherwise."""
    def call(x, w, b):
        return tuple(_ffi_forward(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu))

    op = custom_batching.custom_vmap(call)

    @op.def_vmap
    def batched(axis_size, in_batched, x, w, b):
        x_batched, w_batched, b_batched = in_batched
        if x_batched and not w_batched and not b_batched:
            y, mean, rstd = op(x.reshape((axis_size * x.shape[1],) + x.shape[2:]), w, b)
            return (y.reshape(x.shape), mean.reshape(axis_size, -1, groups),
                    rstd.reshape(axis_size, -1, groups)), (True, True, True)
        args = (x, w, b)
        mapped = tuple(a for a, is_batched in zip(args, in_batched) if is_batched)

        def one(sliced):
            parts = iter(sliced)
            return op(*[next(parts) if is_batched else a for a, is_batched in zip(args, in_batched)])

        return jax.lax.map(one, mapped), (True, True, True)

    return op


def _backward_call(dy, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu):
    """(dx, dw, db) of the backward custom call; with silu, dy is the activated output's gradient and the kernels
    fuse the SiLU's gradient (recomputed from x, the statistics, w and b) into their passes."""
    channels = x.shape[-1 if channels_last else 1]
    grads = jax.ShapeDtypeStruct((channels,), _compute_dtype(x))
    call = jax.ffi.ffi_call("groupnorm_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), grads, grads),
                            vmap_method="sequential")
    return call(dy, x, mean, rstd, w, b, groups=np.int64(groups), channels_last=bool(channels_last),
                has_weight=bool(has_weight), has_bias=bool(has_bias), silu=bool(silu))


# ----------------------------------------------------------------------------------- higher derivatives
# The custom calls give every value, and the backward call the first derivatives. The derivatives of those (grad of
# grad, jacrev of jacrev, hessian) come from the same computations written in jax.numpy, as JVP rules of the two
# calls: the backward as a function of (dy, x, mean, rstd, w, b), so that the chain rule through the forward's
# statistics (whose tangents the forward's rule gives) is exact.

def _grouped(x, groups, channels_last):
    """x with channels on axis 1, and its view (N, G, rest) in the compute dtype."""
    if channels_last:
        x = jnp.moveaxis(x, -1, 1)
    return x, x.astype(_compute_dtype(x)).reshape(x.shape[0], groups, -1)


def _per_channel(p, x):
    return p.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))


def _forward_as_ops(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    """(y, mean, rstd) of the forward call, in jax.numpy."""
    moved, g = _grouped(x, groups, channels_last)
    mean = g.mean(-1)
    centred = g - mean[..., None]
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1) + eps)
    y = (centred * rstd[..., None]).reshape(moved.shape)
    if has_weight:
        y = y * _per_channel(w, moved)
    if has_bias:
        y = y + _per_channel(b, moved)
    if silu:
        y = y * jax.nn.sigmoid(y)
    y = y.astype(x.dtype)
    return (jnp.moveaxis(y, 1, -1) if channels_last else y), mean, rstd


def _backward_as_ops(dy, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu):
    """(dx, dw, db) of the backward call, in jax.numpy, from the statistics given."""
    moved, g = _grouped(x, groups, channels_last)
    dz = (jnp.moveaxis(dy, -1, 1) if channels_last else dy).astype(g.dtype)
    xhat = ((g - mean[..., None]) * rstd[..., None]).reshape(moved.shape)
    if silu:  # the SiLU's input u and its derivative s * (1 + u * (1 - s))
        u = xhat * _per_channel(w, moved) if has_weight else xhat
        u = u + _per_channel(b, moved) if has_bias else u
        s = jax.nn.sigmoid(u)
        dz = dz * s * (1 + u * (1 - s))
    axes = (0,) + tuple(range(2, moved.ndim))
    db = dz.sum(axes)
    dw = (dz * xhat).sum(axes)
    gz = (dz * _per_channel(w, moved) if has_weight else dz).reshape(g.shape)
    xg = xhat.reshape(g.shape)
    dx = rstd[..., None] * (gz - gz.mean(-1, keepdims=True) - xg * (gz * xg).mean(-1, keepdims=True))
    dx = dx.reshape(moved.shape).astype(x.dtype)
    return (jnp.moveaxis(dx, 1, -1) if channels_last else dx), dw, db


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _forward_differentiable(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    return _forward_call(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu)


@_forward_differentiable.defjvp
def _forward_jvp(groups, eps, channels_last, has_weight, has_bias, silu, primals, tangents):
    static = (groups, eps, channels_last, has_weight, has_bias, silu)
    _, tangents_out = jax.jvp(lambda *p: _forward_as_ops(*p, *static), primals, tangents)
    return _forward_differentiable(*primals, *static), tangents_out  # itself: the rule is differentiated again


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9, 10))
def _backward_differentiable(dy, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu):
    return tuple(_backward_call(dy, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu))


@_backward_differentiable.defjvp
def _backward_jvp(groups, channels_last, has_weight, has_bias, silu, primals, tangents):
    static = (groups, channels_last, has_weight, has_bias, silu)
    _, tangents_out = jax.jvp(lambda *p: _backward_as_ops(*p, *static), primals, tangents)
    return _backward_differentiable(*primals, *static), tangents_out  # (as the forward's rule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _group_norm(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    return _forward_call(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu)[0]


def _group_norm_fwd(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    y, mean, rstd = _forward_differentiable(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu)
    return y, (x, w, b, mean, rstd)


def _group_norm_bwd(groups, eps, channels_last, has_weight, has_bias, silu, saved, dy):
    x, w, b, mean, rstd = saved
    dx, dw, db = _backward_differentiable(dy, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu)
    return dx, (dw if has_weight else jnp.zeros_like(w)), (db if has_bias else jnp.zeros_like(b))


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


# ------------------------------------------------------------------------------------------------ public

def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, channel_axis=1):
    """``torch.nn.functional.group_norm`` for JAX arrays, as an XLA custom call: under jit, grad and vmap.

    Parameters
    ----------
    input : jax.Array, shape (N, C, *) or channels on `channel_axis`
        float16, bfloat16, float32 or float64; 16-bit data computes in float32.
    num_groups : int
        Number of groups G; it must divide C.
    weight, bias : jax.Array, shape (C,), optional
        Per-channel scale and shift (computed in float32, or float64 for float64 input; their gradients come back
        in their own dtype).
    eps : float, default 1e-5
        Added to the (biased) variance; a Python number, non-negative.
    activation : {None, 'silu'}, optional
        ``'silu'`` fuses ``y * sigmoid(y)`` into the kernels, forward and backward (the backward call recomputes y
        from x and the statistics).
    channel_axis : int, default 1
        The axis of C: 1, or -1 for channels-last (N, *, C) arrays, which the kernels read as they are; any other
        axis is moved to 1 and back by XLA.

    Returns
    -------
    jax.Array
        The input's shape and dtype.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, groupnorm.jax as gnj  # doctest: +SKIP
    >>> x = jnp.arange(16.0).reshape(2, 4, 2)  # doctest: +SKIP
    >>> jax.jit(lambda x: gnj.group_norm(x, 2))(x).shape  # doctest: +SKIP
    (2, 4, 2)
    """
    _require()
    x = _check_input(input)
    axis = _gpu.channel_axis_of(channel_axis, x.ndim)
    eps = _core._check_eps_value(eps)
    silu = _core._check_activation(activation)
    channels = x.shape[axis]
    groups = _gpu.check_groups(num_groups, channels)
    return _apply(x, _param(weight, "weight", channels), _param(bias, "bias", channels), groups=groups, eps=eps,
                  axis=axis, silu=silu)


# Jitted past the checks, so that an eager call runs one compiled computation (cached by shape) rather than
# dispatching each of its operations; inside a caller's jit they are inlined.
@functools.partial(jax.jit, static_argnames=("groups", "eps", "axis", "silu"))
def _apply(x, weight, bias, *, groups, eps, axis, silu):
    w, has_weight = _as_param(weight, x)
    b, has_bias = _as_param(bias, x)
    channels_last = axis == x.ndim - 1 and x.ndim > 2
    moved = not channels_last and axis != 1
    if moved:
        x = jnp.moveaxis(x, axis, 1)
    y = _group_norm(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu)
    return jnp.moveaxis(y, 1, axis) if moved else y


def group_norm_forward(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """``groupnorm.group_norm_forward`` for JAX arrays (channels on axis 1): ``(y, mean, rstd)``, with mean and rstd
    of shape (N, G) in float32 (float64 for float64 input). Not differentiable: use :func:`group_norm` for that."""
    _require()
    x = _check_input(input)
    eps = _core._check_eps_value(eps)
    silu = _core._check_activation(activation)
    groups = _gpu.check_groups(num_groups, x.shape[1])
    return _forward_apply(x, _param(weight, "weight", x.shape[1]), _param(bias, "bias", x.shape[1]), groups=groups,
                          eps=eps, silu=silu)


@functools.partial(jax.jit, static_argnames=("groups", "eps", "silu"))
def _forward_apply(x, weight, bias, *, groups, eps, silu):
    w, has_weight = _as_param(weight, x)
    b, has_bias = _as_param(bias, x)
    return _forward_call(x, w, b, groups, eps, False, has_weight, has_bias, silu)


def group_norm_backward(grad_output, input, mean, rstd, num_groups, weight=None, *, bias=None, activation=None):
    """``groupnorm.group_norm_backward`` for JAX arrays (channels on axis 1): ``(grad_input, grad_weight,
    grad_bias)``, the parameter gradients of shape (C,) in the compute dtype whether or not weight was given. With
    ``activation='silu'`` grad_output is the activated output's gradient (bias is then the forward's)."""
    _require()
    x = _check_input(input)
    dy = _check_input(grad_output, "grad_output")
    if dy.shape != x.shape:
        raise ValueError(f"grad_output has shape {dy.shape}; it must match the input's shape {x.shape}")
    if dy.dtype != x.dtype:
        raise ValueError(f"grad_output has dtype {dy.dtype}; it must match the input's dtype {x.dtype}")
    groups = _gpu.check_groups(num_groups, x.shape[1])
    silu = _core._check_activation(activation)
    w = _param(weight, "weight", x.shape[1])
    b = _param(bias, "bias", x.shape[1])
    stats = []
    for value, name in ((mean, "mean"), (rstd, "rstd")):
        value = _array(value, name)
        if value.shape != (x.shape[0], groups):
            raise ValueError(f"{name} has shape {value.shape}; it must be {(x.shape[0], groups)}, one value per "
                             f"sample and group (N, num_groups)")
        if not _real(value.dtype):
            raise TypeError(f"{name} has dtype {value.dtype}; it must hold real numbers (float or integer)")
        stats.append(value)
    return _backward_apply(dy, x, stats[0], stats[1], w, b, groups=groups, silu=silu)


@functools.partial(jax.jit, static_argnames=("groups", "silu"))
def _backward_apply(dy, x, mean, rstd, weight, bias, *, groups, silu):
    w, has_weight = _as_param(weight, x)
    b, has_bias = _as_param(bias, x)
    dtype = _compute_dtype(x)
    mean, rstd = mean.astype(dtype), rstd.astype(dtype)
    return tuple(_backward_call(dy, x, mean, rstd, w, b, groups, False, has_weight, has_bias, silu))
