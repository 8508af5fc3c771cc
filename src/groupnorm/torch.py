"""groupnorm.torch: PyTorch drop-ins on groupnorm's kernels, with autograd.

``group_norm`` is a ``torch.autograd.Function`` with the signature of ``torch.nn.functional.group_norm``;
``GroupNorm`` is an ``nn.Module`` that replaces ``torch.nn.GroupNorm`` (same constructor, parameters,
``state_dict`` keys, ``reset_parameters`` and ``extra_repr``). Tensors cross into the kernels without a
copy, as NumPy views of their memory (the exchange DLPack makes, without its per-call cost), and results come
back the same way, in the input's memory format (a channels_last tensor stays channels_last). Importing this
module imports torch; the rest of groupnorm never does.
"""
import inspect

import numpy as np
import torch

from . import _core, _dlpack

__all__ = ["group_norm", "GroupNorm"]

# torch.nn.GroupNorm grew a keyword-only `bias` flag (and shows it in its repr); mirror the installed torch.
_TORCH_GROUPNORM_HAS_BIAS_FLAG = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _as_array(tensor, name):
    """A NumPy view of a CPU tensor (no copy), or a clear error for tensors the kernels cannot serve."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise RuntimeError(
            f"{name} is on device {tensor.device}; groupnorm's kernels serve CPU tensors only "
            f"(this build has no CUDA backend): move it with .cpu() or use torch.nn.GroupNorm there")
    if tensor.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; groupnorm.torch supports torch.float16, torch.bfloat16, "
                        f"torch.float32 and torch.float64")
    return _view(tensor)


def _view(tensor):
    """The NumPy view of a validated CPU tensor's memory: what np.from_dlpack gives, at a third of its cost
    (torch's Python-level __dlpack__ dominates a small call)."""
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: view the bits
        return tensor.detach().view(torch.int16).numpy().view(_dlpack.bfloat16_dtype())
    return tensor.numpy(force=True)  # detaches; a real CPU tensor is not copied (only a lazy negation would be)


def _tensor(array, dtype):
    """The tensor of dtype `dtype` over a kernel result's memory (no copy)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _check_param_dtype(name, param, input):
    """Parameters of the input's dtype, or float32 ones with float16/bfloat16 input (torch's mixed rule)."""
    if param is not None and param.dtype != input.dtype and not (
            param.dtype == torch.float32 and input.dtype in _HALF_DTYPES):
        raise TypeError(f"{name} has dtype {param.dtype} but input has {input.dtype}; they must match (or be "
                        f"torch.float32 with float16/bfloat16 input)")


def _param_grad(grad, dtype):
    """A parameter's gradient (float32 for half data) as a tensor of the parameter's dtype."""
    tensor = torch.from_numpy(grad)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _GroupNormFunction(torch.autograd.Function):
    """y = group_norm(x) with the backward pass of groupnorm's kernels; not twice differentiable."""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps):
        x = _as_array(input, "input")
        w = None if weight is None else _as_array(weight, "weight")
        b = None if bias is None else _as_array(bias, "bias")
        _check_param_dtype("weight", weight, input)
        _check_param_dtype("bias", bias, input)
        y, mean, rstd = _core.group_norm_forward(x, num_groups, w, b, eps)
        ctx.num_groups = num_groups
        ctx.mean, ctx.rstd = mean, rstd  # private to this node: plain arrays, no tensor round trip
        ctx.save_for_backward(input, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _tensor(y, input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # Autograd hands back a gradient of the output's dtype and device; the inputs were checked in forward.
        input, weight = ctx.saved_tensors
        dx, dw, db = _core.group_norm_backward(_view(grad_output), _view(input), ctx.mean, ctx.rstd,
                                               ctx.num_groups, None if weight is None else _view(weight))
        needs_input_grad = ctx.needs_input_grad
        return (_tensor(dx, input.dtype) if needs_input_grad[0] else None, None,
                _param_grad(dw, weight.dtype) if needs_input_grad[2] else None,
                _param_grad(db, ctx.bias_dtype) if needs_input_grad[3] else None, None)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` on groupnorm's kernels, differentiable in input, weight and bias.

    Parameters
    ----------
    input : torch.Tensor, shape (N, C, *)
        A CPU tensor of float16, bfloat16, float32 or float64, contiguous, channels_last or any other layout.
        Half-precision data computes in float32.
    num_groups : int
        Number of groups; it must divide C.
    weight, bias : torch.Tensor, shape (C,), optional
        Per-channel scale and shift, of the input's dtype (or float32 with float16/bfloat16 input).
    eps : float, default 1e-5

    Returns
    -------
    torch.Tensor
        Same shape, dtype and memory format as ``input``.

    Examples
    --------
    >>> import torch, groupnorm.torch as gnt
    >>> x = torch.randn(2, 4, 3, 3, requires_grad=True)
    >>> y = gnt.group_norm(x, 2)
    >>> torch.allclose(y, torch.nn.functional.group_norm(x, 2), atol=1e-6)
    True
    >>> y.sum().backward(); x.grad.shape
    torch.Size([2, 4, 3, 3])
    """
    return _GroupNormFunction.apply(input, num_groups, weight, bias, eps)


class GroupNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.GroupNorm`` running groupnorm's kernels.

    Parameters
    ----------
    num_groups : int
        Number of groups to separate the channels into; it must divide ``num_channels``.
    num_channels : int
        Number of channels C expected in the input of shape (N, C, *).
    eps : float, default 1e-5
    affine : bool, default True
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    device, dtype
        As for ``torch.nn.GroupNorm``.
    bias : bool, default True, keyword-only
        With ``affine``, also learn the ``bias`` (else it is None), as ``torch.nn.GroupNorm(..., bias=)``.

    Examples
    --------
    >>> import torch, groupnorm.torch as gnt
    >>> m = gnt.GroupNorm(2, 4)
    >>> repr(m) == repr(torch.nn.GroupNorm(2, 4))
    True
    >>> sorted(m.state_dict()) == sorted(torch.nn.GroupNorm(2, 4).state_dict())
    True
    >>> m(torch.randn(3, 4, 5)).shape
    torch.Size([3, 4, 5])
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} must be divisible by num_groups={num_groups}")
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = torch.nn.Parameter(torch.empty(num_channels, **factory))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.affine:
            torch.nn.init.ones_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        if _TORCH_GROUPNORM_HAS_BIAS_FLAG:
            text += f", bias={self.bias is not None}"
        return text
