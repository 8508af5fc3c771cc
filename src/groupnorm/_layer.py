"""GroupNorm: a layer object in the manner of ``torch.nn.GroupNorm``, with NumPy parameters and an explicit
backward pass built on :func:`group_norm_forward` and :func:`group_norm_backward`."""
import numbers

import numpy as np

from ._core import _check_activation, _index, group_norm_backward, group_norm_forward


_MAX_ELEMENTS = 2**57  # the C++ entry points' limit on a tensor's size (cpp/dispatch.cpp, kMaxElements)


def _positive_int(value, name):
    count = _index(value, name)
    if count <= 0:
        raise ValueError(f"{name}={count} must be positive")
    return count


class GroupNorm:
    """Group Normalization layer: ``y = group_norm(x, num_groups, weight, bias, eps)`` (then, with
    ``activation='silu'``, ``y * sigmoid(y)`` fused into it) with a backward pass.

    Parameters
    ----------
    num_groups : int
        Number of groups G; it must divide ``num_channels``.
    num_channels : int
        Number of channels C the layer expects on axis 1 of its input.
    eps : float, default 1e-5
        Added to the (biased) variance; non-negative.
    affine : bool, default True
        Give the layer a learnable ``weight`` (ones) and ``bias`` (zeros), NumPy arrays of shape (C,).
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        The parameters' dtype.
    activation : {None, 'silu'}, optional (keyword only)
        ``'silu'``: the layer is GroupNorm then SiLU, forward and backward in the same kernels (the
        backward recomputes the SiLU's input rather than keeping it).

    Attributes
    ----------
    weight, bias : numpy.ndarray or None
        The parameters (None when ``affine`` is False); update them in place or assign new arrays.
    grad_weight, grad_bias : numpy.ndarray or None
        Set by :meth:`backward` when ``affine`` (overwritten, not accumulated); None before.

    Notes
    -----
    :meth:`forward` keeps a reference to its input, its mean and rstd for :meth:`backward`; do not modify
    the input in between.

    Examples
    --------
    >>> import numpy as np, groupnorm as gn
    >>> layer = gn.GroupNorm(2, 4)
    >>> layer
    GroupNorm(2, 4, eps=1e-05, affine=True)
    >>> x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    >>> y = layer(x)
    >>> dx = layer.backward(np.ones_like(y))     # the gradient of y.sum()
    >>> layer.grad_bias
    array([15., 15., 15., 15.], dtype=float32)
    >>> bool(np.abs(dx).max() < 1e-5)
    True
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32, *, activation=None):
        self.num_groups = _positive_int(num_groups, "num_groups")
        self.num_channels = _positive_int(num_channels, "num_channels")
        if self.num_channels > _MAX_ELEMENTS:
            raise ValueError(f"num_channels={self.num_channels} is more than the {_MAX_ELEMENTS} (2**57) elements "
                             f"an array may have here")
        if self.num_channels % self.num_groups != 0:
            raise ValueError(f"num_groups={self.num_groups} must divide num_channels={self.num_channels}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps={eps!r} must be a real number")
        try:
            eps_value = float(eps)
        except OverflowError:
            raise ValueError(f"eps={eps!r} is too large to convert to a float") from None
        if not eps_value >= 0:
            raise ValueError(f"eps={eps!r} must be non-negative (and not NaN)")
        if not isinstance(affine, (bool, np.bool_)):
            raise TypeError(f"affine={affine!r} must be a bool")
        try:
            param_dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype={dtype!r} is not a NumPy dtype; use numpy.float32 or numpy.float64") from None
        if param_dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype={param_dtype} is not supported; use numpy.float32 or numpy.float64")
        _check_activation(activation)
        self.activation = activation
        self.eps = eps_value
        self.affine = bool(affine)
        self.dtype = param_dtype
        self.weight = np.ones(self.num_channels, param_dtype) if self.affine else None
        self.bias = np.zeros(self.num_channels, param_dtype) if self.affine else None
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None

    def forward(self, x):
        """Normalise x of shape (N, C, *); keeps what :meth:`backward` needs."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as e:  # a ragged nested list, ...
                raise (TypeError if isinstance(e, TypeError) else ValueError)(
                    f"input cannot be converted to an array: {e}") from None
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"input has shape {x.shape}; {self!r} expects (N, {self.num_channels}, *)")
        y, mean, rstd = group_norm_forward(x, self.num_groups, self.weight, self.bias, self.eps,
                                           activation=self.activation)
        self._saved = (x, mean, rstd, self.weight, self.bias)
        return y

    __call__ = forward

    def backward(self, grad_output):
        """grad_input for grad_output (the gradient of the loss with respect to the last forward's result);
        sets ``grad_weight`` and ``grad_bias`` when the layer is affine."""
        if self._saved is None:
            raise RuntimeError("GroupNorm.backward() needs a forward() call first")
        x, mean, rstd, weight, bias = self._saved
        grad_input, grad_weight, grad_bias = group_norm_backward(grad_output, x, mean, rstd, self.num_groups,
                                                                 weight, bias=bias, activation=self.activation)
        if self.affine:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias
        return grad_input

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}{act})"
