"""groupnorm._gpu: GPU arrays on the CUDA kernels of groupnorm._cuda (cpp/cuda).

groupnorm._interop sends a call here when one of its arrays lives in CUDA memory, and groupnorm.torch when a
tensor is on a CUDA device. The caller's framework provides the memory and the stream: results and the kernels'
workspace come from torch's caching allocator (no cudaMalloc a call), and the kernels are queued on torch's
current stream of the tensor's device, with no synchronisation. torch CUDA tensors are served; other producers'
GPU arrays (CuPy, JAX) get a ValueError that says so.

Importing this module imports neither torch nor groupnorm._cuda; both are imported when a GPU array arrives.
"""
import math
import sys

from . import _core

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_DEVICE_NAMES = {2: "kDLCUDA", 13: "kDLCUDAManaged"}
_availability = None  # (module or None, reason or None), once known


def availability():
    """``(True, None)`` when GPU arrays can run here, else ``(False, why not)``."""
    module, reason = _load()
    return module is not None, reason


def _load():
    global _availability
    if _availability is None:
        _availability = _find_backend()
    return _availability


def _find_backend():
    if _core.CUDA_BUILD_NOTE != "built":
        return None, (f"this groupnorm build has no CUDA backend ({_core.CUDA_BUILD_NOTE}); reinstall it where "
                      f"nvcc is on PATH (README, section GPU)")
    try:
        from . import _cuda
    except ImportError as exc:  # pragma: no cover - a broken installation
        return None, f"groupnorm's CUDA backend does not import: {exc}"
    count, error = _cuda.device_count()
    runtime, driver = _cuda.versions()
    if driver == 0:
        return None, (f"groupnorm's CUDA backend finds no CUDA driver on this machine (its runtime is "
                      f"{runtime // 1000}.{runtime % 1000 // 10})")
    if error is not None:
        return None, f"groupnorm's CUDA backend finds no usable GPU: {error}"
    if count == 0:
        return None, "groupnorm's CUDA backend finds no GPU"
    return _cuda, None


def gpu_device(obj):
    """The ``kDLCUDA:0``-style name of obj's device when obj is an array in CUDA memory, else None."""
    if obj is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return f"kDLCUDA:{obj.device.index}" if obj.is_cuda else None
    device = getattr(obj, "__dlpack_device__", None)
    if device is None:
        return None
    try:
        device_type, device_id = device()
    except Exception:  # the CPU path reports a producer whose device cannot be read
        return None
    if int(device_type) not in _DLPACK_CUDA:
        return None
    return f"{_DEVICE_NAMES[int(device_type)]}:{device_id}"


def _backend(name, device):
    module, reason = _load()
    if module is None:
        raise ValueError(f"{name} lives on device {device}; {reason}; or move the array to the CPU")
    return module


def _torch_of(name, obj, device):
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        raise ValueError(f"{name} lives on device {device} as a {type(obj).__module__}.{type(obj).__name__}; "
                         f"groupnorm's CUDA backend serves torch CUDA tensors only so far (CuPy and JAX arrays "
                         f"can be passed through torch.from_dlpack)")
    return torch


# ------------------------------------------------------------------------------------------------ checks

_NAMES = {}  # torch dtype -> kernel dtype name, filled on first use


def _dtype_name(torch, dtype):
    if not _NAMES:
        _NAMES.update({torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                       torch.bfloat16: "bfloat16"})
    return _NAMES.get(dtype)


def _check_tensor(torch, tensor, name, device):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor on {device}, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on device {tensor.device} but input is on {device}; all tensors of a call must "
                         f"be on one device")
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad; call groupnorm.torch.group_norm for autograd, or pass "
                         f"{name}.detach()")
    return tensor.resolve_neg() if tensor.is_neg() else tensor


def _layout(tensor, channel_axis):
    """1 when the tensor is dense with channels last in memory, 0 when dense with channels right after the batch
    axis (the channels-first kernels' order), None otherwise."""
    shape, stride, ndim = tensor.shape, tensor.stride(), tensor.dim()
    spatial = [a for a in range(1, ndim) if a != channel_axis]
    for code, order in ((0, [0, channel_axis] + spatial), (1, [0] + spatial + [channel_axis])):
        expected = 1
        for axis in reversed(order):
            if shape[axis] != 1 and stride[axis] != expected:
                break
            expected *= shape[axis]
        else:
            return code
    return None


def _dense(tensor, channel_axis):
    """(tensor, layout): the tensor itself when it is dense in a kernel's order, else a channels-first copy."""
    layout = _layout(tensor, channel_axis)
    if layout is not None:
        return tensor, layout
    order = [0, channel_axis] + [a for a in range(1, tensor.dim()) if a != channel_axis]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return tensor.permute(order).contiguous().permute(inverse), 0


def _problem(torch, x, num_groups, channel_axis, eps, silu, param_dtype, layout):
    shape = tuple(x.shape)  # at least 2 dimensions: _check_input saw to it
    c = shape[channel_axis]
    groups = _core._index(num_groups, "num_groups")
    if groups <= 0:
        raise ValueError(f"num_groups={groups} must be positive")
    if c % groups != 0:
        raise ValueError(f"num_groups={groups} must divide the number of channels ({c})")
    s = math.prod(shape) // max(1, shape[0] * c)
    dtype = _dtype_name(torch, x.dtype)
    return (shape[0], c, s, groups, layout == 1, dtype, param_dtype or dtype, silu, eps)


def _stats_dtype(torch, dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param(torch, value, name, c, x):
    """weight or bias as a contiguous (C,) tensor of x's dtype, or float32 for 16-bit x when it is float32."""
    if value is None:
        return None
    value = _check_tensor(torch, value, name, x.device)
    if tuple(value.shape) != (c,):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; it must be ({c},), one value per channel")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {value.dtype}; it must hold real numbers (float or integer)")
    half = x.dtype in (torch.float16, torch.bfloat16)
    if value.dtype != x.dtype and not (half and value.dtype == torch.float32):
        value = value.to(torch.float32 if half else x.dtype)
    return value.contiguous()


def _params_dtype(torch, x, weight, bias):
    """The parameters' kernel dtype: float32 when either is float32 with 16-bit x (both then float32)."""
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        return "float32"
    return None


def _channel_axis(value, ndim):
    axis = _core._index(value, "channel_axis")
    if axis < -ndim or axis >= ndim:
        raise ValueError(f"channel_axis={axis} is out of range for an input of {ndim} dimensions")
    axis %= ndim
    if axis == 0:
        raise ValueError(f"channel_axis={value} names the batch axis 0; channels must be on another axis")
    return axis


def _ptr(tensor):
    return 0 if tensor is None else tensor.data_ptr()


def _stream(torch, device):
    return torch.cuda.current_stream(device).cuda_stream


# ------------------------------------------------------------------------------------------------ forward

def _device_checked(input, others):
    """(cuda module, torch, input) once the input is a torch CUDA tensor on a machine that can run it."""
    device = gpu_device(input) or next((d for d in map(gpu_device, others) if d is not None), None)
    cuda = _backend("input", device)
    torch = _torch_of("input", input, device)
    if not input.is_cuda:
        raise ValueError(f"input is on device {input.device} but another argument lives on {device}; all arrays "
                         f"of a call must be on one device")
    return cuda, torch, input


def _forward(input, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats):
    cuda, torch, x = _device_checked(input, (out, weight, bias))
    return run_forward(cuda, torch, x, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats,
                       x.device.index, _stream(torch, x.device))


def _check_input(torch, input):
    x = _check_tensor(torch, input, "input", input.device)
    if _dtype_name(torch, x.dtype) is None:
        raise TypeError(f"input has dtype {x.dtype}; groupnorm supports torch.float16, torch.bfloat16, "
                        f"torch.float32 and torch.float64")
    if x.dim() < 2:
        raise ValueError(f"input has shape {tuple(x.shape)} ({x.dim()} dimension(s)); it needs at least 2: "
                         f"(N, C, *)")
    return x


def _span(tensor):
    """[first, last) byte addresses of a dense tensor's memory."""
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def _overlap(a, b):
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def run_forward(cuda, torch, x, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats, device,
                stream):
    """The forward on `cuda` (groupnorm._cuda, or a stand-in with its functions) for a tensor x of x.device, with
    the other tensors checked against it; the kernels run on `stream` of CUDA device `device`."""
    x = _check_input(torch, x)
    axis = _channel_axis(channel_axis, x.dim())
    eps = _core._check_eps_value(eps)
    silu = _core._check_activation(activation)
    c = x.shape[axis]
    w = _param(torch, weight, "weight", c, x)
    b = _param(torch, bias, "bias", c, x)
    if w is not None and b is not None and w.dtype != b.dtype:  # one kernel dtype for both
        w, b = w.to(torch.float32), b.to(torch.float32)
    if out is not None:
        out = _check_out(torch, out, x)
    x_dense, layout = _dense(x, axis)
    problem = _problem(torch, x_dense, num_groups, axis, eps, silu, _params_dtype(torch, x, w, b), layout)
    n, _, _, groups = problem[:4]
    stats = _stats_dtype(torch, x.dtype)
    mean = torch.empty((n, groups), dtype=stats, device=x.device) if want_stats else None
    rstd = torch.empty((n, groups), dtype=stats, device=x.device) if want_stats else None
    # Straight into out when it has the kernels' layout and cannot clobber x before it is read (the forward reads
    # all of x before it writes y; in place, y is x, is fine, as element i of y is written after x[i] is read).
    direct = out is not None and _layout(out, axis) == layout and (
        not _overlap(out, x_dense) or (out.data_ptr() == x_dense.data_ptr() and out.stride() == x_dense.stride()))
    y = out if direct else torch.empty_like(x_dense)
    if x.numel():
        workspace = torch.empty(cuda.forward_workspace(problem), dtype=torch.uint8, device=x.device)
        cuda.forward(problem, device, x_dense.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), _ptr(mean), _ptr(rstd),
                     workspace.data_ptr(), stream)
    elif want_stats and n:
        mean.fill_(math.nan)
        rstd.fill_(math.nan)
    if out is not None and not direct:
        out.copy_(y)
        y = out
    return (y, mean, rstd) if want_stats else y


def _check_out(torch, out, x):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor on {x.device}, got {type(out).__name__}")
    if out.device != x.device:
        raise ValueError(f"out is on device {out.device} but input is on {x.device}; all tensors of a call must be "
                         f"on one device")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; it must match the input's shape {tuple(x.shape)}")
    if out.dtype != x.dtype:
        raise ValueError(f"out has dtype {out.dtype}; it must match the input's dtype {x.dtype}")
    if out.is_neg():
        raise ValueError("out is a lazily negated view (is_neg()); it cannot be written in place")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out requires grad; pass out.detach()")
    return out


def group_norm(input, num_groups, weight, bias, eps, activation, channel_axis, out):
    """groupnorm.group_norm for GPU arrays (see there)."""
    return _forward(input, num_groups, weight, bias, eps, activation, channel_axis, out, False)


def group_norm_forward(input, num_groups, weight, bias, eps):
    """groupnorm.group_norm_forward for GPU arrays: (y, mean, rstd)."""
    return _forward(input, num_groups, weight, bias, eps, None, 1, None, True)


# ------------------------------------------------------------------------------------------------ backward

def group_norm_backward(grad_output, input, mean, rstd, num_groups, weight):
    """groupnorm.group_norm_backward for GPU arrays: (grad_input, grad_weight, grad_bias)."""
    cuda, torch, x = _device_checked(input, (grad_output, mean, rstd, weight))
    return run_backward(cuda, torch, grad_output, x, mean, rstd, num_groups, weight, x.device.index,
                        _stream(torch, x.device))


def run_backward(cuda, torch, grad_output, x, mean, rstd, num_groups, weight, device, stream):
    """The backward on `cuda` for tensors of x.device (see run_forward)."""
    x = _check_input(torch, x)
    dy = _check_tensor(torch, grad_output, "grad_output", x.device)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"grad_output has shape {tuple(dy.shape)}; it must match the input's shape "
                         f"{tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise ValueError(f"grad_output has dtype {dy.dtype}; it must match the input's dtype {x.dtype}")
    c = x.shape[1]
    w = _param(torch, weight, "weight", c, x)
    x_dense, layout = _dense(x, 1)
    problem = _problem(torch, x_dense, num_groups, 1, 1.0, False, _params_dtype(torch, x, w, None), layout)
    n, _, _, groups = problem[:4]
    stats = _stats_dtype(torch, x.dtype)
    m = _stat(torch, mean, "mean", (n, groups), stats, x)
    r = _stat(torch, rstd, "rstd", (n, groups), stats, x)
    dy_dense = dy if _layout(dy, 1) == layout else (
        dy.contiguous() if layout == 0 else _dense_like(torch, dy, x_dense))
    dx = torch.empty_like(x_dense)
    grad_weight = torch.empty(c, dtype=stats, device=x.device)
    grad_bias = torch.empty(c, dtype=stats, device=x.device)
    if x.numel():
        workspace = torch.empty(cuda.backward_workspace(problem), dtype=torch.uint8, device=x.device)
        cuda.backward(problem, device, dy_dense.data_ptr(), x_dense.data_ptr(), m.data_ptr(), r.data_ptr(), _ptr(w),
                      0, dx.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(), workspace.data_ptr(), stream)
    else:
        grad_weight.zero_()
        grad_bias.zero_()
    return dx, grad_weight, grad_bias


def _dense_like(torch, tensor, like):
    """tensor copied into like's (channels-last) memory order."""
    copy = torch.empty_like(like)
    copy.copy_(tensor)
    return copy


def _stat(torch, value, name, shape, dtype, x):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape} on {x.device} as group_norm_forward "
                        f"returns it, got {type(value).__name__}")
    value = _check_tensor(torch, value, name, x.device)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; it must be {shape}, one value per sample and "
                         f"group (N, num_groups)")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {value.dtype}; it must hold real numbers (float or integer)")
    return value.to(dtype).contiguous()
