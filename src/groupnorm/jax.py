"""groupnorm.jax: Group Normalization for JAX arrays as XLA custom calls, under ``jax.jit`` and ``jax.grad``.

The kernels run inside JAX's own computation: XLA allocates the results, and on a GPU lends its stream and the
kernels' workspace, so they compose with jit, grad and jvp (a custom JVP whose tangent transposes to groupnorm's
backward kernels; higher orders through JVP rules of both calls written in jax.numpy, on the arrays as they lie)
and vmap (the forward folds the mapped axis into N, one call for the batch, where weight and bias are shared, and
so does the gradient of a vmapped call; otherwise, and for vmap of a gradient, one call per element). On the CPU
the custom calls run groupnorm's SIMD kernels (the ISA level and thread count of groupnorm.set_isa /
set_num_threads); on a GPU the CUDA kernels, where the build has them.

It needs a groupnorm built with the custom calls (``groupnorm.config()["jax"]``): a build that found jaxlib's FFI
headers, that is ``pip install --no-build-isolation .`` where jax is installed (README, section JAX). Importing
this module imports jax; the rest of groupnorm never does. Eager ``groupnorm.group_norm`` calls on JAX arrays in
GPU memory come here; JAX arrays in CPU memory go through DLPack without a copy.
"""
import ctypes
import functools
import math
import pathlib
import threading

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, custom_derivatives
from jax.interpreters import ad, batching, mlir

from . import _core, _gpu

__all__ = ["group_norm", "group_norm_forward", "group_norm_backward", "export_checks"]

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


def export_checks():
    """The safety checks ``jax.export`` must skip to serialize a computation that holds groupnorm's custom calls:
    ``jax.export.export(jax.jit(f), disabled_checks=groupnorm.jax.export_checks())``. JAX refuses custom calls it
    gives no compatibility guarantee for; groupnorm gives none across its versions either, so a serialized module
    runs where the same groupnorm is installed and its custom calls are registered (``available()`` registers them:
    call it before running a deserialized module in a fresh process)."""
    from jax import export
    return [export.DisabledSafetyCheck.custom_call(f"groupnorm_{name}") for name in ("forward", "backward")]


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
            stats = (axis_size, x.shape[1], groups)  # (not -1: the batch or N may be empty)
            return (y.reshape(x.shape), mean.reshape(stats), rstd.reshape(stats)), (True, True, True)
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

class _View:
    """A group norm's arrays seen by group, as reshapes (no transpose): (N, G, D, S) channels first, (N, S, G, D)
    channels last, with D channels a group and S positions a channel, in the compute dtype. A group reduces over
    `axes`, a channel (over N and S) over `param_axes`; `stat` shapes (N, G) statistics and `chan` (C,) parameters
    to broadcast against the view. (With channels moved to axis 1 instead, XLA transposed every channels-last array:
    a Hessian-vector product took 4x Flax's own.)"""

    def __init__(self, x, groups, channels_last):
        n, c = x.shape[0], x.shape[-1] if channels_last else x.shape[1]
        d, s = c // groups, math.prod(x.shape[1:-1] if channels_last else x.shape[2:])
        self.shape, self.dtype, self.channels = x.shape, _compute_dtype(x), c
        self.grouped = (n, s, groups, d) if channels_last else (n, groups, d, s)
        self.axes = (1, 3) if channels_last else (2, 3)
        self.param_axes = (0, 1) if channels_last else (0, 3)
        self.param_shape = (1, 1, groups, d) if channels_last else (1, groups, d, 1)
        self.stat_index = (slice(None), None, slice(None), None) if channels_last else (Ellipsis, None, None)

    def of(self, a):
        return a.astype(self.dtype).reshape(self.grouped)

    def back(self, a, dtype):
        return a.astype(dtype).reshape(self.shape)

    def stat(self, s):
        return s[self.stat_index]

    def chan(self, p):
        return p.reshape(self.param_shape)

    def channel_sums(self, a):
        return a.sum(self.param_axes).reshape(self.channels)

    def normalised(self, x, mean, rstd):
        return (self.of(x) - self.stat(mean)) * self.stat(rstd)

    def affine(self, xhat, w, b, has_weight, has_bias):
        u = xhat * self.chan(w) if has_weight else xhat
        return u + self.chan(b) if has_bias else u


def _silu_slope(u):
    """The SiLU's derivative at u: s * (1 + u * (1 - s)), s = sigmoid(u)."""
    s = jax.nn.sigmoid(u)
    return s * (1 + u * (1 - s))


def _forward_as_ops(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    """(y, mean, rstd) of the forward call, in jax.numpy."""
    v = _View(x, groups, channels_last)
    g = v.of(x)
    mean = g.mean(v.axes)
    centred = g - v.stat(mean)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(v.axes) + eps)
    y = v.affine(centred * v.stat(rstd), w, b, has_weight, has_bias)
    if silu:
        y = y * jax.nn.sigmoid(y)
    return v.back(y, x.dtype), mean, rstd


def _backward_as_ops(dy, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu):
    """(dx, dw, db) of the backward call, in jax.numpy, from the statistics given."""
    v = _View(x, groups, channels_last)
    dz = v.of(dy)
    xhat = v.normalised(x, mean, rstd)
    if silu:  # dy is the SiLU's output's gradient
        dz = dz * _silu_slope(v.affine(xhat, w, b, has_weight, has_bias))
    db = v.channel_sums(dz)
    dw = v.channel_sums(dz * xhat)
    gz = dz * v.chan(w) if has_weight else dz
    dx = v.stat(rstd) * (gz - gz.mean(v.axes, keepdims=True) - xhat * (gz * xhat).mean(v.axes, keepdims=True))
    return v.back(dx, x.dtype), dw, db


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


# ------------------------------------------------------------------------------------ the tangent primitive
# group_norm is a custom JVP: its rule runs the forward call for (y, mean, rstd) and gives y's tangent as
# groupnorm_tangent, a primitive linear in the tangents of x, weight and bias. Reverse mode (grad, vjp) transposes
# it, and its transpose is the backward custom call, so a gradient runs the two kernels and nothing else, as a custom
# VJP would (which jax.jvp refuses). Forward mode (jax.jvp, jacfwd) evaluates it, on the backward call as well:
# without weight, bias or activation the backward's dx of a gradient t is rstd * (t - mean(t) - xhat * mean(xhat *
# t)) over each group, which is also xhat's tangent for a tangent t of x; weight, bias, their tangents and the SiLU
# then act elementwise. (The same in jax.numpy took 25x the time on [1,320,64,64]: XLA's CPU reductions.) Its own
# JVP, for derivatives of the tangent, differentiates the jax.numpy form. A tangent JAX knows to be zero (that of an
# input not differentiated) is left out of the call (in_tangents), rather than made an array of zeros.

_TANGENT_PARAMS = ("groups", "channels_last", "has_weight", "has_bias", "silu", "in_tangents")

_tangent_p = jax.extend.core.Primitive("groupnorm_tangent")


def _tangent(x, mean, rstd, w, b, tx, tw, tb, *, groups, channels_last, has_weight, has_bias, silu, in_tangents,
             by_kernel=True):
    """y's tangent for the tangents (tx, tw, tb) of (x, w, b) given the statistics: with xhat = (x - mean) * rstd,
    xhat's tangent is rstd * (tx - mean(tx) - xhat * mean(xhat * tx)) over each group, and u = xhat * w + b (then
    y = silu(u)) carries it on. A tangent left out (in_tangents False) is zero. by_kernel: xhat's tangent from the
    backward call (in the compute dtype: 16-bit data is widened first, so that y's tangent is rounded once), else
    in jax.numpy, which the tangent's own JVP differentiates."""
    v = _View(x, groups, channels_last)
    xhat = v.normalised(x, mean, rstd)  # XLA leaves it out where nothing below reads it
    tu = jnp.zeros(v.grouped, v.dtype)
    if in_tangents[0]:
        if by_kernel:
            none = jnp.zeros((0,), v.dtype)
            txhat = v.of(_backward_call(tx.astype(v.dtype), x.astype(v.dtype), mean, rstd, none, none, groups,
                                        channels_last, False, False, False)[0])
        else:
            t = v.of(tx)
            txhat = v.stat(rstd) * (t - t.mean(v.axes, keepdims=True) - xhat * (xhat * t).mean(v.axes, keepdims=True))
        tu = txhat * v.chan(w) if has_weight else txhat
    if has_weight and in_tangents[1]:
        tu = tu + xhat * v.chan(tw)
    if has_bias and in_tangents[2]:
        tu = tu + v.chan(tb)
    if silu:  # y = u * s(u)
        tu = tu * _silu_slope(v.affine(xhat, w, b, has_weight, has_bias))
    return v.back(tu, x.dtype)


def _tangent_abstract(x, *operands, **params):
    return jax.core.ShapedArray(x.shape, x.dtype)


def _tangent_jvp(primals, tangents, **params):
    """The tangent's own tangent (second derivatives through forward mode), from its jax.numpy form."""
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, t_out = jax.jvp(functools.partial(_tangent, **params, by_kernel=False), tuple(primals), tuple(tangents))
    return _tangent_p.bind(*primals, **params), t_out


def _tangent_transpose(ct, x, mean, rstd, w, b, tx, tw, tb, *, groups, channels_last, has_weight, has_bias, silu,
                       in_tangents):
    """The transpose in (tx, tw, tb): the backward custom call, with ct as the output's gradient."""
    if any(ad.is_undefined_primal(v) for v in (x, mean, rstd, w, b)):  # pragma: no cover - never linear in these
        raise NotImplementedError("groupnorm_tangent is linear in its tangents only")
    linear = (tx, tw, tb)
    if type(ct) is ad.Zero:
        grads = (None, None, None)
    else:
        grads = _backward_differentiable(ct, x, mean, rstd, w, b, groups, channels_last, has_weight, has_bias, silu)
        grads = (grads[0], grads[1] if has_weight else None, grads[2] if has_bias else None)
    return (None,) * 5 + tuple((ad.Zero(t.aval) if g is None else g) if ad.is_undefined_primal(t) else None
                               for t, g in zip(linear, grads))


def _tangent_batch(args, dims, **params):
    """vmap: the mapped axis folded into N when weight, bias and their tangents are shared (one call), else one
    call per element."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    per_sample = (0, 1, 2, 5)  # x, mean, rstd, tx: N is their first axis
    if all(dims[i] is None for i in range(len(args)) if i not in per_sample):
        folded = list(args)
        for i in per_sample:
            a = args[i] if dims[i] is not None else jnp.broadcast_to(args[i], (size,) + args[i].shape)
            folded[i] = a.reshape((size * a.shape[1],) + a.shape[2:]) if a.ndim > 1 else a  # tx left out: (0,)
        out = _tangent_p.bind(*folded, **params)
        return out.reshape((size,) + args[0].shape[-out.ndim:]), 0
    args = [a if d is not None else jnp.broadcast_to(a, (size,) + a.shape) for a, d in zip(args, dims)]
    return jax.lax.map(lambda sliced: _tangent_p.bind(*sliced, **params), tuple(args)), 0


_tangent_p.def_impl(jax.jit(_tangent, static_argnames=_TANGENT_PARAMS))
_tangent_p.def_abstract_eval(_tangent_abstract)
ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_tangent_p] = _tangent_batch
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent, multiple_results=False))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _group_norm(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu):
    return _forward_call(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu)[0]


def _group_norm_jvp(groups, eps, channels_last, has_weight, has_bias, silu, primals, tangents):
    x, w, b = primals
    y, mean, rstd = _forward_differentiable(x, w, b, groups, eps, channels_last, has_weight, has_bias, silu)
    given = tuple(not isinstance(t, custom_derivatives.SymbolicZero) for t in tangents)
    operands = [t if known else jnp.zeros((0,), p.dtype) for p, t, known in zip(primals, tangents, given)]
    ty = _tangent_p.bind(x, mean, rstd, w, b, *operands, groups=groups, channels_last=channels_last,
                         has_weight=has_weight, has_bias=has_bias, silu=silu, in_tangents=given)
    return y, ty


_group_norm.defjvp(_group_norm_jvp, symbolic_zeros=True)


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
