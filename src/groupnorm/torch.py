"""groupnorm.torch: PyTorch drop-ins on groupnorm's kernels, with autograd.

``group_norm`` has the signature of ``torch.nn.functional.group_norm`` and runs as a ``torch.autograd.Function``
when a gradient is wanted (the kernel alone otherwise);
``GroupNorm`` is an ``nn.Module`` that replaces ``torch.nn.GroupNorm`` (same constructor, parameters,
``state_dict`` keys, ``reset_parameters`` and ``extra_repr``). Tensors cross into the kernels without a
copy, as NumPy views of their memory (the exchange DLPack makes, without its per-call cost), and results come
back the same way, in the input's memory format (a channels_last tensor stays channels_last). Importing this
module imports torch; the rest of groupnorm never does.
"""
import inspect

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _core, _dlpack, _gpu

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
        raise RuntimeError(_device_message(name, tensor))
    if tensor.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; groupnorm.torch supports torch.float16, torch.bfloat16, "
                        f"torch.float32 and torch.float64")
    return _dlpack.from_torch(tensor)


def _device_message(name, tensor):
    if tensor.is_cuda:
        usable, reason = _gpu.availability()
        if usable:
            return (f"{name} is on device {tensor.device} but the input is on the CPU; all tensors of a call must be "
                    f"on one device")
        return f"{name} is on device {tensor.device}; {reason}: move it with .cpu() or use torch.nn.GroupNorm there"
    return (f"{name} is on device {tensor.device}; groupnorm's kernels serve CPU and CUDA tensors only: move it with "
            f".cpu() or use torch.nn.GroupNorm there")


def _on_gpu(input):
    """The call runs on the CUDA backend: the input is a CUDA tensor (checked further by groupnorm._gpu), and the
    backend can run here (else the CPU path's checks raise the device error)."""
    return isinstance(input, torch.Tensor) and input.is_cuda and _gpu.availability()[0]


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


def _arrays(input, weight, bias):
    """The NumPy views of the forward's three tensors, after the tensor-level checks."""
    x = _as_array(input, "input")
    w = None if weight is None else _as_array(weight, "weight")
    b = None if bias is None else _as_array(bias, "bias")
    _check_param_dtype("weight", weight, input)
    _check_param_dtype("bias", bias, input)
    return x, w, b


def _differentiable(input, weight, bias):
    """Whether autograd must see this call: a tensor requiring grad while grad mode is on, or any call inside a
    forward-AD dual level (where the Function says that it has no jvp, rather than dropping the tangent)."""
    if _forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    return (isinstance(input, torch.Tensor) and input.requires_grad
            or isinstance(weight, torch.Tensor) and weight.requires_grad
            or isinstance(bias, torch.Tensor) and bias.requires_grad)


def _backward(ctx, grad_output):
    """The gradients of _GroupNormFunction's inputs from its saved state, computed without autograd."""
    # Autograd hands back a gradient of the output's dtype and device; the inputs were checked in forward.
    input, weight = ctx.saved_tensors
    needs_input_grad = ctx.needs_input_grad
    if input.is_cuda:
        dx, dw, db = _gpu.group_norm_backward(grad_output, input, ctx.mean, ctx.rstd, ctx.num_groups, weight)
        return (dx if needs_input_grad[0] else None, None,
                dw.to(weight.dtype) if needs_input_grad[2] else None,
                db.to(ctx.bias_dtype) if needs_input_grad[3] else None, None)
    dx, dw, db = _core.group_norm_backward(_dlpack.from_torch(grad_output), _dlpack.from_torch(input),
                                           ctx.mean, ctx.rstd, ctx.num_groups,
                                           None if weight is None else _dlpack.from_torch(weight))
    return (_dlpack.as_torch(dx) if needs_input_grad[0] else None, None,
            _param_grad(dw, weight.dtype) if needs_input_grad[2] else None,
            _param_grad(db, ctx.bias_dtype) if needs_input_grad[3] else None, None)


_backward_once_differentiable = torch.autograd.function.once_differentiable(_backward)


class _GroupNormFunction(torch.autograd.Function):
    """y = group_norm(x) with the backward pass of groupnorm's kernels; not twice differentiable."""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps):
        ctx.num_groups = num_groups
        ctx.save_for_backward(input, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        if _on_gpu(input):
            _check_param_dtype("weight", weight, input)
            _check_param_dtype("bias", bias, input)
            y, ctx.mean, ctx.rstd = _gpu.group_norm_forward(input, num_groups, weight, bias, eps)
            return y
        x, w, b = _arrays(input, weight, bias)
        y, mean, rstd = _core.group_norm_forward(x, num_groups, w, b, eps)
        ctx.mean, ctx.rstd = mean, rstd  # private to this node: plain arrays, no tensor round trip
        return _dlpack.as_torch(y)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph: the gradients must refuse a second derivative, not fake one
            return _backward_once_differentiable(ctx, grad_output)
        return _backward(ctx, grad_output)  # the usual backward: once_differentiable's no_grad would cost 1.7 us


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` on groupnorm's kernels, differentiable in input, weight and bias.

    Parameters
    ----------
    input : torch.Tensor, shape (N, C, *)
        A CPU tensor of float16, bfloat16, float32 or float64, contiguous, channels_last or any other layout.
        Half-precision data computes in float32. A CUDA tensor runs on groupnorm's CUDA backend where this
        build has one (``groupnorm.config()["cuda"]``), on torch's current stream.
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
    if _differentiable(input, weight, bias):
        return _GroupNormFunction.apply(input, num_groups, weight, bias, eps)
    # Inference (no_grad, or nothing that requires grad): the kernel alone, as torch's own group_norm does,
    # without autograd.Function's cost (about 5 us a call) or the statistics that only a backward reads.
    if _on_gpu(input):
        _check_param_dtype("weight", weight, input)
        _check_param_dtype("bias", bias, input)
        return _gpu.group_norm(input, num_groups, weight, bias, eps, None, 1, None)
    x, w, b = _arrays(input, weight, bias)
    return _dlpack.as_torch(_core.group_norm(x, num_groups, w, b, eps))


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
