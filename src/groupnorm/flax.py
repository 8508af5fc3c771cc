"""groupnorm.flax: drop-ins for Flax's GroupNorm (``flax.linen.GroupNorm`` and ``flax.nnx.GroupNorm``) on
groupnorm's kernels.

Each is a subclass of Flax's own: the same constructor, fields, parameters (``scale`` and ``bias``, with the same
initialisers and dtypes) and results, so a model swaps one name and keeps its checkpoints. The call runs
``groupnorm.jax.group_norm`` on the channels-last input as it is (one XLA custom call forward, one backward, under
jit, grad and vmap), with Flax's dtype rules: the result has the promoted dtype of the input and the parameters (or
``dtype``), computed from statistics in float32 at least. What the kernels do not take goes to Flax's own code
unchanged: a ``mask``, an ``axis_name`` (statistics across devices), ``reduction_axes`` other than all but the
batch axis, inputs without a batch axis, and integer inputs. ``use_fast_variance`` and ``force_float32_reductions``
have no effect on the kernels' path, whose variance is the stable one, in float32 or wider. Importing this module
imports jax and flax, which the rest of groupnorm never does.
"""
import jax.numpy as jnp
from flax import linen as _linen
from flax import nnx as _nnx

from . import jax as _gnj

__all__ = ["GroupNorm", "NnxGroupNorm"]


def _kernel_axes(ndim, reduction_axes):
    """Whether Flax would reduce over every axis but the batch one (its default), which the kernels compute."""
    if ndim < 2:
        return False
    if reduction_axes is None:
        return True
    axes = (reduction_axes,) if isinstance(reduction_axes, int) else tuple(reduction_axes)
    return sorted(a % ndim for a in axes) == list(range(1, ndim))


def _normalized(x, num_groups, scale, bias, epsilon, out_dtype):
    """Flax's GroupNorm result from the kernels: x in the result's dtype where that is wider (the kernels compute
    16-bit data in float32 and round once), the parameters as they are (the kernels take them in the compute dtype
    and return their gradients in their own)."""
    if jnp.finfo(out_dtype).bits > jnp.finfo(x.dtype).bits:
        x = x.astype(out_dtype)
    return _gnj.group_norm(x, num_groups, scale, bias, epsilon, channel_axis=-1).astype(out_dtype)


def _result_dtype(x, scale, bias, dtype):
    """Flax's canonicalize_dtype: ``dtype`` where given, else the inputs' promoted type."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*[a for a in (x, scale, bias) if a is not None])


def _fast_path(x, mask, axis_name, reduction_axes):
    return (mask is None and axis_name is None and jnp.issubdtype(x.dtype, jnp.floating)
            and _kernel_axes(x.ndim, reduction_axes))


class GroupNorm(_linen.GroupNorm):
    """``flax.linen.GroupNorm`` on groupnorm's kernels: the same fields, parameters and results.

    Examples
    --------
    >>> import jax, groupnorm.flax as gnf  # doctest: +SKIP
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))  # doctest: +SKIP
    >>> layer = gnf.GroupNorm(num_groups=32)  # doctest: +SKIP
    >>> variables = layer.init(jax.random.key(1), x)  # doctest: +SKIP
    >>> layer.apply(variables, x).shape  # doctest: +SKIP
    (2, 8, 8, 64)
    """

    @_linen.compact
    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x)
        if not _fast_path(x, mask, self.axis_name, self.reduction_axes):
            return super().__call__(x, mask=mask)
        channels = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError("Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
                             "specified, pass `num_groups=None` as argument to override the default `num_groups` "
                             "value of 32.")
        if self.group_size is not None:
            if channels % self.group_size != 0:
                raise ValueError(f"Number of channels ({channels}) is not multiple of the group size "
                                 f"({self.group_size}).")
            num_groups = channels // self.group_size
        else:
            num_groups = self.num_groups
        if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups != 0:
            raise ValueError(f"Number of groups ({num_groups}) does not divide the number of channels ({channels}).")
        scale = self.param("scale", self.scale_init, (channels,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (channels,), self.param_dtype) if self.use_bias else None
        return _normalized(x, num_groups, scale, bias, self.epsilon, _result_dtype(x, scale, bias, self.dtype))


class NnxGroupNorm(_nnx.GroupNorm):
    """``flax.nnx.GroupNorm`` on groupnorm's kernels: the same constructor, parameters and results.

    Examples
    --------
    >>> import jax, flax.nnx as nnx, groupnorm.flax as gnf  # doctest: +SKIP
    >>> layer = gnf.NnxGroupNorm(64, num_groups=32, rngs=nnx.Rngs(0))  # doctest: +SKIP
    >>> layer(jax.random.normal(jax.random.key(0), (2, 8, 8, 64))).shape  # doctest: +SKIP
    (2, 8, 8, 64)
    """

    def __call__(self, x, *, mask=None):
        x = jnp.asarray(x)
        if not _fast_path(x, mask, self.axis_name, self.reduction_axes):
            return super().__call__(x, mask=mask)
        scale = self.scale[...] if self.scale else None
        bias = self.bias[...] if self.bias else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        return _normalized(x, self.num_groups, scale, bias, self.epsilon, _result_dtype(x, scale, bias, self.dtype))
