"""groupnorm.torch: PyTorch drop-ins on groupnorm's kernels, with autograd.

``group_norm`` has the signature of ``torch.nn.functional.group_norm`` and runs as a ``torch.autograd.Function``
when a gradient is wanted (the kernel alone otherwise);
``GroupNorm`` is an ``nn.Module`` that replaces ``torch.nn.GroupNorm`` (same constructor, parameters,
``state_dict`` keys, ``reset_parameters`` and ``extra_repr``). Tensors cross into the kernels without a
copy, as NumPy views of their memory (the exchange DLPack makes, without its per-call cost), and results come
back the same way, in the input's memory format (a channels_last tensor stays channels_last). Calls that torch
traces into a graph (torch.compile, torch.export, make_fx, torch.jit.trace) go through the custom operators
``torch.ops.groupnorm.group_norm_forward`` and ``group_norm_backward`` instead (as does ``GroupNorm`` compiled by
torch.jit.script), and calls inside torch.func transforms (grad, vmap, jacrev, ...) through an autograd.Function on
those operators, which carry vmap rules. Under torch.onnx.export they are torch's own group_norm (and silu), and
``decompositions()`` writes the operators in torch's own for graphs that already hold them (an ExportedProgram).
Importing this module imports torch and registers those operators; the rest of groupnorm never imports torch.
"""
import ctypes
import inspect
import os
import pathlib

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _core, _dlpack, _gpu

try:  # the functorch transforms active (torch >= 2.1)
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_interpreters
except ImportError:  # pragma: no cover - older torch
    _functorch_interpreters = None

__all__ = ["group_norm", "GroupNorm", "convert_group_norms", "decompositions", "cpp_node"]

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
    _check_dtype(name, tensor)
    return _dlpack.from_torch(tensor)


def _check_dtype(name, tensor):
    if tensor.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; groupnorm.torch supports torch.float16, torch.bfloat16, "
                        f"torch.float32 and torch.float64")


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


def _tensor(array):
    """A NumPy result as a tensor on its memory (torch.from_numpy: 1.3 us less than torch.as_tensor on a 2-core
    Zen 3 VM); the GPU path's results are tensors already."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(array)


def _param_grad(grad, dtype):
    """A parameter's gradient (float32 for half data; NumPy on the CPU) as a tensor of the parameter's dtype."""
    tensor = _tensor(grad)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _arrays(input, weight, bias):
    """The NumPy views of the forward's three tensors, after the tensor-level checks."""
    views = _dlpack.torch_views(input, weight, bias)  # plain CPU tensors of kernel dtypes: the common call
    if views is None:  # anything else meets the checks that raise (or, for a negated view, resolve)
        views = (_as_array(input, "input"), None if weight is None else _as_array(weight, "weight"),
                 None if bias is None else _as_array(bias, "bias"))
    _check_param_dtype("weight", weight, input)
    _check_param_dtype("bias", bias, input)
    return views


def _differentiable(input, weight, bias):
    """Whether autograd must see this call: a tensor requiring grad while grad mode is on, or any call inside a
    forward-AD dual level (which group_norm gives the operators' node where torch has them; without them the
    Function says that it has no jvp, rather than dropping the tangent)."""
    if _forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    return (isinstance(input, torch.Tensor) and input.requires_grad
            or isinstance(weight, torch.Tensor) and weight.requires_grad
            or isinstance(bias, torch.Tensor) and bias.requires_grad)


def _run_forward(input, num_groups, weight, bias, eps, activation):
    """(y, mean, rstd) of a checked call: y a tensor; the statistics NumPy arrays on the CPU (private to the
    autograd node: no tensor round trip), the framework's arrays on the GPU."""
    if _on_gpu(input):
        _check_param_dtype("weight", weight, input)
        _check_param_dtype("bias", bias, input)
        return _gpu.group_norm_forward(input, num_groups, weight, bias, eps, None, activation)
    x, w, b = _arrays(input, weight, bias)
    y, mean, rstd = _core.group_norm_forward(x, num_groups, w, b, eps, activation=activation)
    return _dlpack.as_torch(y), mean, rstd


def _run_backward(grad_output, input, mean, rstd, num_groups, weight, bias, activation):
    """(grad_input, grad_weight, grad_bias) from the forward's statistics: grad_input a tensor, the parameter
    gradients (of the compute dtype) NumPy arrays on the CPU. bias is read only with an activation."""
    if input.is_cuda:
        return _gpu.group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, None, bias, activation)
    b = None if bias is None or activation is None else _dlpack.from_torch(bias)
    dx, dw, db = _core.group_norm_backward(_dlpack.from_torch(grad_output), _dlpack.from_torch(input), mean, rstd,
                                           num_groups, None if weight is None else _dlpack.from_torch(weight),
                                           bias=b, activation=activation)
    return _dlpack.as_torch(dx), dw, db


def _backward(ctx, grad_output, with_graph=False):
    """The gradients of _GroupNormFunction's inputs from its saved state: computed without autograd, or, with_graph
    (create_graph=True), the same kernels through the backward operator, whose autograd node differentiates the
    gradients again (_OperatorBackward)."""
    # Autograd hands back a gradient of the output's dtype and device; the inputs were checked in forward.
    saved = ctx.saved_tensors  # (input, weight), and bias with an activation
    input, weight, activation = saved[0], saved[1], ctx.activation
    bias = saved[2] if activation is not None else None
    if with_graph:
        dx, dw, db = _OperatorBackward.apply(grad_output, input, _tensor(ctx.mean), _tensor(ctx.rstd),
                                             ctx.num_groups, weight, bias, activation)
    else:
        dx, dw, db = _run_backward(grad_output, input, ctx.mean, ctx.rstd, ctx.num_groups, weight, bias, activation)
    needs_input_grad = ctx.needs_input_grad
    return (dx if needs_input_grad[0] else None, None,
            _param_grad(dw, weight.dtype) if needs_input_grad[2] else None,
            _param_grad(db, ctx.bias_dtype) if needs_input_grad[3] else None, None, None)


class _GroupNormFunction(torch.autograd.Function):
    """y = group_norm(x) (then SiLU with activation='silu') with the backward pass of groupnorm's kernels;
    differentiable again under create_graph=True (_backward's with_graph)."""

    @staticmethod
    def forward(ctx, input, num_groups, weight, bias, eps, activation):
        ctx.num_groups = num_groups
        ctx.activation = activation
        if activation is None:
            ctx.save_for_backward(input, weight)
        else:  # the SiLU's gradient recomputes its input from bias too
            ctx.save_for_backward(input, weight, bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        y, ctx.mean, ctx.rstd = _run_forward(input, num_groups, weight, bias, eps, activation)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph: gradients that autograd can differentiate again
            if _ops is None:  # torch < 2.4: no operators; a second derivative is refused rather than taken as zero
                return torch.autograd.function.once_differentiable(_backward)(ctx, grad_output)
            return _backward(ctx, grad_output, with_graph=True)
        return _backward(ctx, grad_output)


# --------------------------------------------------------------------------------------------- traced graphs
# torch.compile (Dynamo and AOTAutograd), torch.export, make_fx and torch.jit.trace build graphs from the call: they
# run it on fake or proxy tensors, which have no memory for the kernels to read, and the autograd.Function above,
# which crosses into NumPy, would break the graph or be recorded as constants. Those calls go through two custom
# operators instead, which the tracers keep as one node each: groupnorm::group_norm_forward (y, mean, rstd) and
# groupnorm::group_norm_backward (the gradients), with shape functions for fake tensors, Autograd kernels and
# vmap rules. Eager calls keep the paths above: the dispatcher's way into the Python kernels and out costs
# about 12 us a call on a 2-core Zen 3 VM.

def _like_input(result, input):
    """`result` in the strides torch.empty_like(input) has (the fake functions' promise, which compiled code may
    assert): the input's own strides when it is dense, as the kernels' results are; else a copy into empty_like."""
    if result.stride() == input.stride():
        return result
    return torch.empty_like(input).copy_(result)


def _stats_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _check_fake(input, num_groups, params):
    """The checks the kernels make, on tensors without data (what the custom operators' fake functions see), so that
    tracing fails with the eager call's error rather than a shape error later in the graph."""
    _check_dtype("input", input)
    _gpu.check_rank("input", input.shape)
    channels = input.shape[1]
    _gpu.check_groups(num_groups, channels)
    for name, param in params.items():
        if param is not None:
            _gpu.check_param_shape(name, param.shape, channels)
        _check_param_dtype(name, param, input)


def _op_forward_impl(input, num_groups, weight, bias, eps, activation=None):
    y, mean, rstd = _run_forward(input, num_groups, weight, bias, eps, activation)
    return _like_input(y, input), _tensor(mean), _tensor(rstd)


def _op_forward_fake(input, num_groups, weight, bias, eps, activation=None):
    _check_fake(input, num_groups, {"weight": weight, "bias": bias})
    _core._check_eps_value(eps)
    _core._check_activation(activation)
    stats = input.new_empty((input.shape[0], num_groups), dtype=_stats_dtype(input))
    return torch.empty_like(input), stats, torch.empty_like(stats)


def _op_backward_impl(grad_output, input, mean, rstd, num_groups, weight, bias=None, activation=None):
    if not input.is_cuda:
        mean, rstd = _as_array(mean, "mean"), _as_array(rstd, "rstd")
    dx, dw, db = _run_backward(grad_output, input, mean, rstd, num_groups, weight, bias, activation)
    return _like_input(dx, input), _tensor(dw), _tensor(db)


def _op_backward_fake(grad_output, input, mean, rstd, num_groups, weight, bias=None, activation=None):
    _check_fake(input, num_groups, {"weight": weight, "bias": bias})
    _core._check_activation(activation)
    if grad_output.shape != input.shape:  # group_norm_backward's messages (groupnorm._core)
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)}; it must match the input's shape "
                         f"{tuple(input.shape)}")
    if grad_output.dtype != input.dtype:
        raise ValueError(f"grad_output has dtype {grad_output.dtype}; it must match the input's dtype {input.dtype}")
    grad_param = input.new_empty((input.shape[1],), dtype=_stats_dtype(input))
    return torch.empty_like(input), grad_param, torch.empty_like(grad_param)


def _batch_first(value, dim, batch_size):
    """A vmapped tensor with its batch dimension first; an unbatched one repeated as a view."""
    return value.movedim(dim, 0) if dim is not None else value.expand(batch_size, *value.shape)


def _into_channels(value, dim, batch_size):
    """A vmapped tensor of shape (N, K, *) per batch element as one (N, B*K, *) tensor: the batch folded into
    axis 1 (channels, or a statistic's groups), element b's K entries at b*K. A free view where N is 1."""
    return _batch_first(value, dim, batch_size).movedim(0, 1).flatten(1, 2)


def _params_into_channels(value, dim, batch_size):
    """A vmapped per-channel parameter (C,) as (B*C,), or None."""
    return None if value is None else _batch_first(value, dim, batch_size).flatten()


def _forward_vmap(info, in_dims, input, num_groups, weight, bias, eps, activation=None):
    """vmap of group_norm_forward, one call whatever is batched. Every group of every sample is normalised on its
    own (and the activation is elementwise), so the batch folds into N where the parameters are shared, and into
    the channels (B*C channels in B*G groups, each element's parameters on its own channels) where they are
    batched."""
    x_dim, _, w_dim, b_dim = in_dims[:4]
    batch = info.batch_size
    if w_dim is None and b_dim is None and x_dim is not None:
        x = input.movedim(x_dim, 0)
        n = x.shape[1]
        y, mean, rstd = _ops.group_norm_forward(x.flatten(0, 1), num_groups, weight, bias, eps, activation)
        stats = (batch, n, num_groups)
        return (y.unflatten(0, (batch, n)), mean.reshape(stats), rstd.reshape(stats)), (0, 0, 0)
    y, mean, rstd = _ops.group_norm_forward(
        _into_channels(input, x_dim, batch), batch * num_groups, _params_into_channels(weight, w_dim, batch),
        _params_into_channels(bias, b_dim, batch), eps, activation)
    return (y.unflatten(1, (batch, -1)), mean.unflatten(1, (batch, -1)), rstd.unflatten(1, (batch, -1))), (1, 1, 1)


def _backward_vmap(info, in_dims, grad_output, input, mean, rstd, num_groups, weight, bias=None, activation=None):
    """vmap of group_norm_backward, one call: the batch folded into the channels, so that the parameter
    gradients, sums over N and the positions, come out per batch element (per-sample gradients)."""
    batch = info.batch_size
    dy_dim, x_dim, mean_dim, rstd_dim, _, w_dim = in_dims[:6]
    b_dim = in_dims[6] if len(in_dims) > 6 else None  # the operator's defaults are not passed here
    dx, dw, db = _ops.group_norm_backward(
        _into_channels(grad_output, dy_dim, batch), _into_channels(input, x_dim, batch),
        _into_channels(mean, mean_dim, batch), _into_channels(rstd, rstd_dim, batch), batch * num_groups,
        _params_into_channels(weight, w_dim, batch), _params_into_channels(bias, b_dim, batch), activation)
    return (dx.unflatten(1, (batch, -1)), dw.unflatten(0, (batch, -1)), db.unflatten(0, (batch, -1))), (1, 0, 0)


# Derivatives beyond the first: group_norm written in torch operations, which autograd and torch.func differentiate
# to any order and in either mode. The kernels give every call's values, first derivatives and forward-mode tangents
# (_tangent_by_kernels); these give the derivatives of those (a gradient penalty, a Hessian-vector product, the
# backward operator's tangent), and the whole call under nested forward mode (_nested_forward_mode).

def _normalised_as_ops(input, num_groups, rstd=None, eps=None):
    """((x - mean) * rstd in the input's shape, mean and rstd per group (N, G, 1), the view shape (N, G, size)), in
    float32 (float64 for float64 data). rstd from eps, or the forward's rstd: its value kept and its derivatives
    taken from the variance it was made of, rstd = (var + e)^(-1/2) with e = 1/rstd^2 - var held constant (eps, up
    to the rounding of the two), for the backward operator, which has no eps."""
    compute = _stats_dtype(input)
    n = input.shape[0]
    grouped = (n, num_groups, input.numel() // max(n * num_groups, 1))
    x = input.to(compute).reshape(grouped)
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    var = centred.square().mean(-1, keepdim=True)
    if rstd is None:
        r = (var + eps).rsqrt()
    else:
        held = rstd.to(compute).reshape(n, num_groups, 1)
        r = (var + (held.reciprocal().square() - var).detach()).rsqrt()
    return (centred * r).reshape(input.shape), mean, r, grouped


def _per_channel(param, input):
    """A (C,) parameter in the compute dtype, shaped to broadcast over the input (None stays None)."""
    if param is None:
        return None
    return param.to(_stats_dtype(input)).reshape((1, input.shape[1]) + (1,) * (input.dim() - 2))


def _affine(xhat, w, b):
    y = xhat if w is None else xhat * w
    return y if b is None else y + b


def _forward_decomposition(input, num_groups, weight, bias, eps, activation=None):
    """The forward operator's (y, mean, rstd) in torch's operators: y (group_norm, then SiLU) in the input's dtype,
    the statistics (N, G) in the compute dtype, as the kernels give them."""
    xhat, mean, rstd, grouped = _normalised_as_ops(input, num_groups, eps=eps)
    y = _affine(xhat, _per_channel(weight, input), _per_channel(bias, input))
    if activation is not None:
        y = y * torch.sigmoid(y)
    return y.to(input.dtype), mean.reshape(grouped[:2]), rstd.reshape(grouped[:2])


def _forward_as_ops(input, num_groups, weight, bias, eps, activation):
    """group_norm (then SiLU) of the forward operator, in the input's dtype."""
    return _forward_decomposition(input, num_groups, weight, bias, eps, activation)[0]


def _silu_slope(u):
    """The SiLU's derivative at u: s * (1 + u * (1 - s)), s = sigmoid(u)."""
    s = torch.sigmoid(u)
    return s * (1 + u * (1 - s))


def _gradients_as_ops(grad_output, input, rstd, num_groups, weight, bias, activation):
    """group_norm's gradients (grad_input, grad_weight, grad_bias), as the backward operator returns them (grad_input
    in the input's dtype, the others in the compute dtype). bias is read with an activation only."""
    xhat, _, r, grouped = _normalised_as_ops(input, num_groups, rstd=rstd)
    w = _per_channel(weight, input)
    dz = grad_output.to(xhat.dtype)
    if activation is not None:  # dz is the SiLU's output's gradient
        dz = dz * _silu_slope(_affine(xhat, w, _per_channel(bias, input)))
    dims = [0] + list(range(2, input.dim()))
    grad_bias = dz.sum(dims)
    grad_weight = (dz * xhat).sum(dims)
    g = (dz if w is None else dz * w).reshape(grouped)
    xhat = xhat.reshape(grouped)
    grad_input = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return grad_input.reshape(input.shape).to(input.dtype), grad_weight, grad_bias


def _gradients_as_op_outputs(grad_output, input, mean, rstd, num_groups, weight, bias=None, activation=None):
    """The backward operator's (grad_input, grad_weight, grad_bias) in torch's operators (mean is recomputed)."""
    return _gradients_as_ops(grad_output, input, rstd, num_groups, weight, bias, activation)


def _of_tensors(call, inputs):
    """(`call` as a function of the tensors among `inputs`, those tensors as (slot, tensor) pairs). `inputs` are an
    operator's (input slot, tensor or None) pairs (weight and bias may be None); `call` gets a dict of the tensors by
    slot."""
    pairs = [(slot, t) for slot, t in inputs if t is not None]
    slots = [slot for slot, _ in pairs]
    return (lambda *tensors: call(dict(zip(slots, tensors)))), pairs


def _vjp_in(function, pairs, cotangents, needs):
    """The cotangents of `function`'s tensor inputs (pairs of (input slot, tensor)), in the operator's input slots."""
    _, vjp = torch.func.vjp(function, *[t for _, t in pairs])
    result = [None] * len(needs)
    for (slot, _), cotangent in zip(pairs, vjp(cotangents)):
        if needs[slot]:
            result[slot] = cotangent
    return tuple(result)


def _jvp_of(function, pairs, tangents):
    """`function`'s output tangents from its tensor inputs' (pairs of (input slot, tensor)); a missing tangent is
    zero. By torch.func.jvp under torch.func's transforms (a Hessian-vector product, jvp of grad: 2.2x faster on
    [1,320,64,64]); inside torch.autograd.forward_ad's dual level, where torch cannot open another, through two
    vector-Jacobian products (the transpose of the transpose)."""
    primals = tuple(t for _, t in pairs)
    given = tuple(torch.zeros_like(t) if tangents[slot] is None else tangents[slot] for slot, t in pairs)
    if torch._C._functorch.peek_interpreter_stack() is not None:  # under torch.func: jvp itself, in one pass
        return torch.func.jvp(function, primals, given)[1]
    outputs, vjp = torch.func.vjp(function, *primals)
    single = isinstance(outputs, torch.Tensor)
    zeros = (torch.zeros_like(outputs),) if single else tuple(torch.zeros_like(o) for o in outputs)
    _, transposed = torch.func.vjp(lambda *u: vjp(u[0] if single else u), *zeros)
    result = transposed(given)
    return result[0] if single else result


class _OperatorBackward(torch.autograd.Function):
    """The backward operator's autograd node, for second and higher derivatives of group_norm: the vector-Jacobian
    product of _gradients_as_ops, taken by torch.func.vjp (so it composes with autograd and with torch.func's
    transforms, and its own result is differentiable again)."""

    generate_vmap_rule = True  # forward calls only the operators, which carry vmap rules

    @staticmethod
    def forward(grad_output, input, mean, rstd, num_groups, weight, bias=None, activation=None):
        return _ops.group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, bias, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, _mean, rstd, num_groups, weight = inputs[:6]
        bias = inputs[6] if len(inputs) > 6 else None  # the dispatcher passes the defaults it was given
        ctx.activation = inputs[7] if len(inputs) > 7 else None
        ctx.num_groups = num_groups
        ctx.save_for_backward(grad_output, input, rstd, weight, bias)
        ctx.save_for_forward(grad_output, input, rstd, weight, bias)

    @staticmethod
    def _function(ctx):
        """The operator as a function of its tensor inputs, and those inputs as (slot, tensor) pairs: grad_output,
        input, weight, and bias where the activation reads it (the statistics are not differentiated in)."""
        grad_output, input, rstd, weight, bias = ctx.saved_tensors
        return _of_tensors(lambda t: _gradients_as_ops(t[0], t[1], rstd, ctx.num_groups, t.get(5), t.get(6),
                                                       ctx.activation),
                           [(0, grad_output), (1, input), (5, weight), (6, bias)])

    @staticmethod
    def backward(ctx, grad_dx, grad_dw, grad_db):
        function, pairs = _OperatorBackward._function(ctx)
        compute = _stats_dtype(pairs[1][1])
        return _vjp_in(function, pairs, (grad_dx, grad_dw.to(compute), grad_db.to(compute)), ctx.needs_input_grad)

    @staticmethod
    def jvp(ctx, *tangents):
        function, pairs = _OperatorBackward._function(ctx)
        return _jvp_of(function, pairs, tangents)


class _OperatorFunction(torch.autograd.Function):
    """The forward operator's autograd node, in the setup_context form that torch.func transforms (grad, vjp,
    jacrev, vmap and their compositions) take; group_norm calls it directly inside a transform."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, num_groups, weight, bias, eps, activation=None):
        return _ops.group_norm_forward(input, num_groups, weight, bias, eps, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, num_groups, weight, bias = inputs[:4]
        activation = inputs[5] if len(inputs) > 5 else None  # the dispatcher passes the defaults it was given
        _, mean, rstd = output
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.save_for_forward(input, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)  # tangents and gradients known to be zero come as None, not zeros
        ctx.num_groups = num_groups
        ctx.eps = inputs[4]
        ctx.activation = activation
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def jvp(ctx, *tangents):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        return _tangent_by_kernels(input, mean, rstd, ctx.num_groups, ctx.eps, weight, bias, ctx.activation,
                                   tangents[0], tangents[2], tangents[3]), None, None

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_rstd):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        nones = (None,) * (len(needs) - 4)  # eps, and activation where it was passed
        if grad_output is None:
            return (None, None, None, None) + nones
        dx, dw, db = _OperatorBackward.apply(grad_output, input, mean, rstd, ctx.num_groups, weight,
                                             bias if ctx.activation is not None else None, ctx.activation)
        # dw and db are float32 for half data; autograd casts each gradient to its input's dtype.
        return (dx if needs[0] else None, None, dw if needs[2] else None, db if needs[3] else None) + nones


def _tangent_by_kernels(input, mean, rstd, num_groups, eps, weight, bias, activation, tx, tw, tb):
    """y's tangent for the tangents (tx, tw, tb) of (input, weight, bias), None where zero, on the kernels: with
    xhat = (x - mean) * rstd, xhat's tangent for tx is rstd * (tx - mean(tx) - xhat * mean(xhat * tx)) over each
    group, which is the backward's grad_input of tx without parameters; weight, bias, their tangents and the SiLU
    then act elementwise. (The same through torch.func in torch's operations took 60x the forward's time on
    [1,320,64,64].) Both calls are the operators' nodes, so the tangent is differentiable again, in either mode.
    16-bit data is widened first, so that the tangent is rounded once."""
    compute = _stats_dtype(input)
    wide = input.to(compute)
    w, b = _per_channel(weight, input), _per_channel(bias, input)
    tu = None  # zero
    if tx is not None:
        tu = _OperatorBackward.apply(tx.to(compute), wide, mean, rstd, num_groups, None)[0]
        tu = tu if w is None else tu * w
    if tw is not None or activation is not None:
        xhat = _OperatorFunction.apply(wide, num_groups, None, None, eps)[0]
        if tw is not None:
            term = xhat * _per_channel(tw, input)
            tu = term if tu is None else tu + term
    if tb is not None:
        tu = (torch.zeros_like(wide) if tu is None else tu) + _per_channel(tb, input)
    if tu is None:  # no tangent at all
        return torch.zeros_like(input)
    if activation is not None:  # y = u * s(u)
        tu = tu * _silu_slope(_affine(xhat, w, b))
    return tu.to(input.dtype)


def _autograd_kernel(function, op):
    """The operator's kernel for the Autograd dispatch key: `function`'s node where a gradient is wanted, else
    straight below autograd. What torch.library.register_autograd installs, without its per-call Python
    wrappers: the way from the dispatcher to the kernel and back costs about 12 us a call on a 2-core Zen 3 VM
    with this kernel, 20 with register_autograd's."""
    def kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args) or _has_tangent(args):
            if torch._C._functorch.peek_interpreter_stack() is not None:  # a node cannot be made from inside here
                raise RuntimeError(f"{op} was called directly inside a torch.func transform, which needs its "
                                   f"gradient; call groupnorm.torch.group_norm (or GroupNorm) there instead")
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return kernel


def _has_tangent(args):
    """Whether a tensor among args carries a forward-mode tangent at the current dual level: the node's jvp must
    see the call (below autograd the tangent would be dropped, a derivative of zero). Inside the node's forward
    the tensors are primals again, so its own call of the operator goes below autograd."""
    return _forward_ad._current_level >= 0 and any(
        isinstance(arg, torch.Tensor) and _forward_ad.unpack_dual(arg).tangent is not None for arg in args)


_LIBRARY = None  # the torch.library.Library that holds the operators (it must outlive them)


def _define_ops():
    """The two operators, or None where torch lacks register_fake (before 2.4): there traced
    calls run the eager paths, as they did before these operators existed. They are defined through
    torch.library.Library rather than torch.library.custom_op, whose own Python wrappers cost about 10 us more a
    call on a 2-core Zen 3 VM."""
    global _LIBRARY
    library = getattr(torch, "library", None)
    if library is None or not hasattr(library, "register_fake"):
        return None
    _LIBRARY = library.Library("groupnorm", "DEF")
    _LIBRARY.define("group_norm_forward(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, "
                    "str? activation=None) -> (Tensor, Tensor, Tensor)")
    _LIBRARY.define("group_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, "
                    "int num_groups, Tensor? weight, Tensor? bias=None, str? activation=None) "
                    "-> (Tensor, Tensor, Tensor)")
    for device in ("CPU", "CUDA"):  # through the module's names at call time, so that tests can count the calls
        _LIBRARY.impl("group_norm_forward", lambda *args: _op_forward_impl(*args), device)
        _LIBRARY.impl("group_norm_backward", lambda *args: _op_backward_impl(*args), device)
    library.register_fake("groupnorm::group_norm_forward", _op_forward_fake, lib=_LIBRARY)
    library.register_fake("groupnorm::group_norm_backward", _op_backward_fake, lib=_LIBRARY)
    ops = torch.ops.groupnorm
    _LIBRARY.impl("group_norm_forward", _autograd_kernel(_OperatorFunction, ops.group_norm_forward.default),
                  "Autograd")
    _LIBRARY.impl("group_norm_backward", _autograd_kernel(_OperatorBackward, ops.group_norm_backward.default),
                  "Autograd")
    if hasattr(library, "register_vmap"):
        library.register_vmap("groupnorm::group_norm_forward", _forward_vmap, lib=_LIBRARY)
        library.register_vmap("groupnorm::group_norm_backward", _backward_vmap, lib=_LIBRARY)
    return ops


_ops = _define_ops()


# --------------------------------------------------------------------------------------- the C++ autograd node
# An autograd.Function costs its Python: a training step of [16,32] spent about 20 us in this module's glue and
# [1,64,32,32] about 50, where torch's own GroupNorm runs its node in C++. groupnorm/_torch_node.so (cpp/torch, built
# where torch is importable at build time) holds the same node in C++, as the operator groupnorm_node::group_norm,
# on the same kernels: the eager differentiable calls it serves (CPU tensors under 1 MiB of the common dtypes,
# contiguous or channels_last) give the same values and gradients, bit for bit, in less time; it answers [] for any
# other call, which then takes the Python node.

def _load_node():
    """(groupnorm_node::group_norm, "") where this installation has the C++ node for this torch, else (None, why
    not). GROUPNORM_TORCH_NODE=0 in the environment leaves it unloaded."""
    if os.environ.get("GROUPNORM_TORCH_NODE", "1") == "0":
        return None, "GROUPNORM_TORCH_NODE=0 in the environment"
    if not _core.TORCH_BUILD_NOTE.startswith("built"):
        return None, _core.TORCH_BUILD_NOTE
    if _ops is None:  # its second derivatives run through groupnorm::group_norm_backward
        return None, f"torch {torch.__version__} lacks torch.library.register_fake (2.4 and later have it)"
    here = pathlib.Path(__file__).parent
    path = next(iter(sorted(here.glob("_torch_node*.so"))), None)
    version_file = here / "_torch_node.txt"
    if path is None or not version_file.is_file():
        return None, "groupnorm/_torch_node.so or its _torch_node.txt is missing from this installation"
    built_for = version_file.read_text().strip()
    if built_for != torch.__version__:  # a C++ extension runs only under the torch whose headers it saw
        return None, f"it was built for torch {built_for}, and this is torch {torch.__version__}"
    try:
        torch.ops.load_library(str(path))
        forward, backward = _core._cpu_entry_points()
        ctypes.CDLL(str(path)).gn_torch_bind_core(ctypes.c_void_p(forward), ctypes.c_void_p(backward))
    except (OSError, RuntimeError) as error:
        return None, f"loading {path.name} failed: {error}"
    return torch.ops.groupnorm_node.group_norm.default, ""


_node, _NODE_REASON = _load_node()
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def cpp_node():
    """``(True, "")`` where eager training calls can run on groupnorm.torch's C++ autograd node, else ``(False,
    reason)``.

    The node exists in builds made where torch was importable (``pip install --no-build-isolation`` with torch
    installed; ``groupnorm.config()["torch_node"]``), and loads under the torch version it was built for. It serves
    the differentiable calls on CPU tensors under 1 MiB (float32, float64, float16, bfloat16; contiguous or
    channels_last; parameters of the input's dtype, or float32 with 16-bit input), where Python's
    autograd.Function would cost as much as the kernels; other calls take the Python node. Both run the same
    kernels, with the same results to the bit. ``GROUPNORM_TORCH_NODE=0`` in the environment keeps it unloaded.

    Examples
    --------
    >>> import groupnorm.torch as gnt
    >>> available, reason = gnt.cpp_node()
    >>> available == (reason == "")
    True
    """
    return _node is not None, _NODE_REASON


def _traced(input):
    """Whether the call is being traced into a graph by other means than Dynamo (make_fx, torch.export's
    non-strict mode, torch.jit.trace), or holds a tensor subclass (a Parameter, a FakeTensor, a FunctionalTensor)
    whose behaviour the NumPy crossing would skip."""
    return (isinstance(input, torch.Tensor) and type(input) is not torch.Tensor
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_tracing())


def _onnx_graph(input, num_groups, weight, bias, eps, activation):
    """The call as torch's own group_norm (and silu), for torch.onnx.export: an ONNX graph cannot call groupnorm's
    kernels, and torch's operators have ONNX translations, which ONNX Runtime then runs on its own kernels."""
    _core._check_activation(activation)
    output = torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    return torch.nn.functional.silu(output) if activation == "silu" else output


def decompositions():
    """groupnorm's operators written in torch's own, as a decomposition table: ``{operator: function}`` for
    ``torch.ops.groupnorm.group_norm_forward`` and ``group_norm_backward``.

    A graph that recorded groupnorm.torch's calls holds those operators, which only a process with groupnorm can
    run. Decomposed, it needs torch alone: ``ep.run_decompositions(gnt.decompositions())`` rewrites an
    ``ExportedProgram`` (from ``torch.export.export``) so that ``torch.onnx.export(ep)`` converts it, and
    ``make_fx(f, decomposition_table=gnt.decompositions())`` traces a function without them. The functions compute
    the kernels' formulas, in float32 for float16/bfloat16 data (float64 for float64): the forward's output, mean
    and rstd, and the backward's three gradients (to rounding; without the kernels' wider fallback for groups whose
    squares leave float32's range, as torch's own group_norm). Merge the table into
    ``torch.export.default_decompositions()`` to decompose everything else to core ATen as well. Empty with
    torch < 2.4, which records no such operators.

    Examples
    --------
    >>> import torch, groupnorm.torch as gnt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), gnt.GroupNorm(2, 8))
    >>> ep = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    >>> ep = ep.run_decompositions(gnt.decompositions())
    >>> any("groupnorm" in str(node.target) for node in ep.graph.nodes)
    False
    """
    if _ops is None:
        return {}
    return {torch.ops.groupnorm.group_norm_forward.default: _forward_decomposition,
            torch.ops.groupnorm.group_norm_backward.default: _gradients_as_op_outputs}


def _nested_forward_mode():
    """Whether two or more torch.func forward-mode levels are active (jvp of jvp, jacfwd of jacfwd). There torch
    drops the outer levels' derivatives of anything an autograd.Function's jvp computes (pytorch/pytorch#197867:
    silently zero), so group_norm runs in torch's operations instead, which torch differentiates at every level."""
    if _functorch_interpreters is None:
        return False
    jvp = torch._C._functorch.TransformType.Jvp
    return sum(interpreter.key() == jvp for interpreter in _functorch_interpreters()) >= 2


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """``torch.nn.functional.group_norm`` on groupnorm's kernels, differentiable in input, weight and bias;
    with ``activation='silu'``, ``silu(group_norm(...))`` in the same kernels, forward and backward.

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
    activation : {None, 'silu'}, optional (keyword only)
        ``'silu'`` applies ``y * sigmoid(y)`` to the normalised ``y`` in the same pass; its gradient is
        taken in the backward's kernels from the input and the statistics (nothing more is kept).

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
    if _ops is not None:  # graphs and transforms (about 0.3 us to rule out in an eager call)
        if torch.compiler.is_compiling():  # Dynamo: constant, so it looks no further
            if torch.onnx.is_in_onnx_export():  # torch.onnx.export(..., dynamo=True)
                return _onnx_graph(input, num_groups, weight, bias, eps, activation)
            return _ops.group_norm_forward(input, num_groups, weight, bias, eps, activation)[0]
        if torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0:
            if _nested_forward_mode():
                return _forward_as_ops(input, num_groups, weight, bias, eps, activation)
            # inside a torch.func transform, or a forward-mode AD dual level: the operators' node, which has a jvp
            return _OperatorFunction.apply(input, num_groups, weight, bias, eps, activation)[0]
        if _traced(input):
            if torch.onnx.is_in_onnx_export():  # torch.onnx.export(..., dynamo=False): TorchScript's tracer
                return _onnx_graph(input, num_groups, weight, bias, eps, activation)
            return _ops.group_norm_forward(input, num_groups, weight, bias, eps, activation)[0]
    if _differentiable(input, weight, bias):
        if (_node is not None and type(input) is torch.Tensor and type(eps) is float and type(num_groups) is int
                and 0 < num_groups < 1 << 62 and (weight is None or type(weight) in _PLAIN_TENSORS)
                and (bias is None or type(bias) in _PLAIN_TENSORS) and (activation is None or activation == "silu")):
            served = _node(input, num_groups, weight, bias, eps, activation)  # [] for a call it leaves to Python
            if served:
                return served[0]
        return _GroupNormFunction.apply(input, num_groups, weight, bias, eps, activation)
    # Inference (no_grad, or nothing that requires grad): the kernel alone, as torch's own group_norm does,
    # without autograd.Function's cost (about 5 us a call) or the statistics that only a backward reads.
    if _on_gpu(input):
        _check_param_dtype("weight", weight, input)
        _check_param_dtype("bias", bias, input)
        return _gpu.group_norm(input, num_groups, weight, bias, eps, activation, 1, None)
    x, w, b = _arrays(input, weight, bias)
    return _dlpack.as_torch(_core.group_norm(x, num_groups, w, b, eps, activation=activation))


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
    activation : {None, 'silu'}, default None, keyword-only
        ``'silu'`` makes the module GroupNorm followed by SiLU (``torch.nn.SiLU``), fused into the same kernels
        forward and backward; ``extra_repr`` then shows it. The parameters and ``state_dict`` are unchanged.

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

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True,
                 activation=None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} must be divisible by num_groups={num_groups}")
        _core._check_activation(activation)
        self.activation = activation
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
        if torch.jit.is_scripting():  # torch.jit.script compiles this branch alone: the operator, with its autograd
            return torch.ops.groupnorm.group_norm_forward(input, self.num_groups, self.weight, self.bias, self.eps,
                                                          self.activation)[0]
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self):
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        if _TORCH_GROUPNORM_HAS_BIAS_FLAG:
            text += f", bias={self.bias is not None}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text


# Per-module hook tables of torch.nn.Module (those this torch has): a replacement takes over the very same tables,
# so hooks registered on the module it replaces keep running, and their handles keep removing them.
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _has_hooks(module):
    return any(getattr(module, name, None) for name in _HOOK_TABLES)


def _replacement(norm, activation):
    """A GroupNorm on groupnorm's kernels in `norm`'s place: its parameters (the same Parameter objects, so that an
    optimizer built on the model keeps updating them), eps, affine flag, training mode and hook tables (with the
    flag that says whether its backward hooks are full ones)."""
    new = GroupNorm(norm.num_groups, norm.num_channels, norm.eps, affine=False, activation=activation)
    new.affine = norm.affine
    new.weight = norm.weight
    new.bias = norm.bias
    for name in _HOOK_TABLES + ("_is_full_backward_hook",):
        if hasattr(norm, name):
            object.__setattr__(new, name, getattr(norm, name))
    return new.train(norm.training)


def convert_group_norms(module, *, fuse_silu=False):
    """Put :class:`GroupNorm` in the place of every ``torch.nn.GroupNorm`` in `module`, in place.

    Each replacement holds the same ``weight`` and ``bias`` Parameter objects (an optimizer built before the call
    keeps training them; ``state_dict`` is unchanged), the same ``eps``, training mode and hooks. Only modules of
    type ``torch.nn.GroupNorm`` itself are replaced: a subclass may change what ``forward`` does, so it stays.
    A module registered in several places gets one replacement, shared as the original was.

    Parameters
    ----------
    module : torch.nn.Module
        The model; its submodules are replaced in place.
    fuse_silu : bool, default False (keyword only)
        Also fuse each ``torch.nn.GroupNorm`` that a plain ``torch.nn.Sequential`` runs straight into a
        ``torch.nn.SiLU`` (a U-Net's pair): the GroupNorm becomes ``GroupNorm(..., activation='silu')`` and the SiLU
        an ``nn.Identity`` (the keys of ``state_dict`` stay). The Sequential's result is the same; the GroupNorm
        module called by itself then includes the SiLU. Pairs where either module has hooks, or the GroupNorm is
        registered anywhere else too, are not fused.

    Returns
    -------
    torch.nn.Module
        `module`, or its replacement where `module` is itself a ``torch.nn.GroupNorm``.

    Examples
    --------
    >>> import torch, groupnorm.torch as gnt
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    >>> weight = net[1].weight
    >>> net = gnt.convert_group_norms(net, fuse_silu=True)
    >>> type(net[1]).__module__, net[1].activation, type(net[2]).__name__, net[1].weight is weight
    ('groupnorm.torch', 'silu', 'Identity', True)
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if type(module) is torch.nn.GroupNorm:
        return _replacement(module, None)
    places = {}  # id of each torch.nn.GroupNorm -> how many (parent, name) slots hold it
    for parent in module.modules():
        for child in parent._modules.values():
            if type(child) is torch.nn.GroupNorm:
                places[id(child)] = places.get(id(child), 0) + 1
    done = {}  # id of a replaced GroupNorm -> its (unfused) replacement
    for parent in list(module.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            norm = parent._modules[name]
            if type(norm) is not torch.nn.GroupNorm:
                continue
            following = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            if (fuse_silu and type(parent) is torch.nn.Sequential and type(following) is torch.nn.SiLU
                    and places[id(norm)] == 1 and not _has_hooks(norm) and not _has_hooks(following)):
                parent._modules[name] = _replacement(norm, "silu")
                parent._modules[names[i + 1]] = torch.nn.Identity().train(following.training)
                continue
            if id(norm) not in done:
                done[id(norm)] = _replacement(norm, None)
            parent._modules[name] = done[id(norm)]
    return module
