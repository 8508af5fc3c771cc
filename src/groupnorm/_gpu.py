"""groupnorm._gpu: GPU arrays on the CUDA kernels of groupnorm._cuda (cpp/cuda).

groupnorm._interop sends a call here when one of its arrays lives in CUDA memory, and groupnorm.torch when a
tensor is on a CUDA device. The caller's framework provides the memory and the stream: results and the kernels'
workspace come from torch's caching allocator (no cudaMalloc a call), and the kernels are queued on torch's
current stream of the tensor's device (or on the stream that the caller's ``stream=`` names), with no
synchronisation. torch CUDA tensors are served; other producers' GPU arrays (CuPy, JAX) get a ValueError that says so.

A call's checks depend on its tensors' metadata (shape, strides, dtype, device, flags) and its scalar arguments,
not on their memory. Once a call has passed them, its plan (the checked kernel problem, the layout) is kept under
that metadata, and a later call with the same metadata goes straight to the allocations and the kernels: about
half of what the first call costs in Python, which decides the time of small GPU calls.

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


def _current_stream(torch, device):
    """The raw cudaStream_t of torch's current stream on CUDA device `device` (an index)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch's own compiled kernels ask (no object)
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def stream_handle(stream):
    """The cudaStream_t (an integer) that a ``stream=`` argument names: an integer handle as DLPack passes them (0
    the default stream, 1 the legacy default stream, 2 the per-thread default stream, else a cudaStream_t), an object
    with the ``__cuda_stream__`` protocol, a torch.cuda.Stream (``cuda_stream``) or a CuPy stream (``ptr``)."""
    handle = stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        pair = protocol()
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"stream.__cuda_stream__() returned {pair!r}; it must return (version, handle)")
        handle = pair[1]
    elif not isinstance(stream, int):
        for attribute in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            if hasattr(stream, attribute):
                handle = getattr(stream, attribute)
                break
    if not isinstance(handle, int) or isinstance(handle, bool):
        raise TypeError(f"stream={stream!r} must be None (the current stream), an integer cudaStream_t, a "
                        f"torch.cuda.Stream, a CuPy stream or an object with __cuda_stream__"
                        + ("" if handle is stream else f"; its handle is {handle!r}"))
    if handle < 0:
        raise ValueError(f"stream={stream!r} names the handle {handle}; a cudaStream_t is non-negative (0, 1 and 2 "
                         f"are the default, legacy default and per-thread default streams)")
    return int(handle)


def _stream_scope(torch, stream, device):
    """(handle, context): the cudaStream_t of an explicit ``stream=`` and a context in which torch allocates on it
    (the results and the workspace are then that stream's memory, as if the call ran under torch.cuda.stream)."""
    handle = stream_handle(stream)
    cuda = torch.cuda
    if isinstance(stream, cuda.Stream):
        if stream.device_index != device:
            raise ValueError(f"stream is a stream of cuda:{stream.device_index} but the input is on cuda:{device}")
        return handle, cuda.stream(stream)
    if handle in (0, 1):
        return handle, cuda.stream(cuda.default_stream(device))
    return handle, cuda.stream(cuda.ExternalStream(handle, device=device))


# ------------------------------------------------------------------------------------------------ forward

def _device_checked(input, others):
    """(cuda module, torch, device index) once the input is a torch CUDA tensor on a machine that can run it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(input, torch.Tensor) and input.is_cuda:
        cuda = _availability[0] if _availability is not None else None
        if cuda is not None:
            return cuda, torch, input.get_device()
    device = gpu_device(input) or next((d for d in map(gpu_device, others) if d is not None), None)
    cuda = _backend("input", device)
    torch = _torch_of("input", input, device)
    if not input.is_cuda:
        raise ValueError(f"input is on device {input.device} but another argument lives on {device}; all arrays "
                         f"of a call must be on one device")
    return cuda, torch, input.get_device()


def _on_stream(run, torch, device, stream, *args):
    """run(*args, device, stream handle) on torch's current stream, or on the explicit `stream` with torch's
    allocations made for it."""
    if stream is None:
        return run(*args, device, _current_stream(torch, device))
    handle, scope = _stream_scope(torch, stream, device)
    with scope:
        return run(*args, device, handle)


def _forward(input, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats, stream):
    cuda, torch, device = _device_checked(input, (out, weight, bias))
    return _on_stream(run_forward, torch, device, stream, cuda, torch, input, num_groups, weight, bias, eps,
                      activation, channel_axis, out, want_stats)


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


class _Plan:
    """What a call's checks decided, kept for later calls with the same metadata: the kernels' checked problem (None
    for an empty tensor), the layout (0 channels first, 1 channels last), the statistics' shape and dtype, and for
    the forward whether an out= of that metadata can be written directly."""
    __slots__ = ("problem", "layout", "stats_shape", "stats_dtype", "out_direct")

    def __init__(self, problem, layout, stats_shape, stats_dtype, out_direct=False):
        self.problem, self.layout, self.stats_shape, self.stats_dtype = problem, layout, stats_shape, stats_dtype
        self.out_direct = out_direct


_plans = {}  # call metadata -> _Plan, for calls that needed no copy or conversion
_PLANS_KEPT = 256  # distinct metadata kept before the cache starts afresh


def _meta(tensor):
    """The metadata of a tensor (or None) that a call's checks read; an AttributeError for anything else."""
    if tensor is None:
        return None
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device, tensor.requires_grad, tensor.is_neg()


def _plan_key(cuda, torch, tensors, scalars):
    """The cache key of a call: its tensors' metadata, its scalars with their types (True == 1 and 2.0 == 2, but
    num_groups=True and num_groups=2.0 are errors), the grad mode and the backend (whose problems the plan holds);
    None when a scalar is of another type (a NumPy
    integer, say) or an argument is not a tensor, whose call then takes the checks every time."""
    types = tuple(map(type, scalars))
    for kind in types:
        if kind not in _KEY_SCALARS:
            return None
    try:
        return tuple(map(_meta, tensors)) + scalars + types + (torch.is_grad_enabled(), cuda)
    except AttributeError:
        return None


_KEY_SCALARS = frozenset((int, float, str, type(None), bool))


def _keep(key, plan):
    if key is not None:
        if len(_plans) >= _PLANS_KEPT:
            _plans.clear()
        _plans[key] = plan


def run_forward(cuda, torch, x, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats, device,
                stream):
    """The forward on `cuda` (groupnorm._cuda, or a stand-in with its functions) for a tensor x of x.device, with
    the other tensors checked against it; the kernels run on `stream` of CUDA device `device`."""
    key = _plan_key(cuda, torch, (x, weight, bias, out),
                    ("forward", num_groups, eps, activation, channel_axis, want_stats))
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan, x, weight, bias, out, cacheable = _forward_plan(cuda, torch, x, num_groups, weight, bias, eps,
                                                              activation, channel_axis, out)
        if cacheable:
            _keep(key, plan)
    mean = rstd = None
    if want_stats:
        mean = torch.empty(plan.stats_shape, dtype=plan.stats_dtype, device=x.device)
        rstd = torch.empty(plan.stats_shape, dtype=plan.stats_dtype, device=x.device)
    # Straight into out when it has the kernels' layout and cannot clobber x before it is read (the forward reads
    # all of x before it writes y; in place, y is x, is fine, as element i of y is written after x[i] is read).
    direct = out is not None and plan.out_direct and (
        not _overlap(out, x) or (out.data_ptr() == x.data_ptr() and out.stride() == x.stride()))
    y = out if direct else torch.empty_like(x)
    if plan.problem is not None:
        workspace = torch.empty(plan.problem.forward_workspace, dtype=torch.uint8, device=x.device)
        cuda.forward(plan.problem, device, x.data_ptr(), _ptr(weight), _ptr(bias), y.data_ptr(), _ptr(mean),
                     _ptr(rstd), workspace.data_ptr(), stream)
    elif want_stats and plan.stats_shape[0]:
        mean.fill_(math.nan)
        rstd.fill_(math.nan)
    if out is not None and not direct:
        out.copy_(y)
        y = out
    return (y, mean, rstd) if want_stats else y


def _forward_plan(cuda, torch, x, num_groups, weight, bias, eps, activation, channel_axis, out):
    """Every check of a forward call: (plan, x in a kernel layout, weight, bias, out, whether the plan may be kept
    for the call's metadata: no copy or conversion was needed)."""
    x0, w0, b0 = x, weight, bias
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
    spec = _problem(torch, x_dense, num_groups, axis, eps, silu, _params_dtype(torch, x, w, b), layout)
    problem = cuda.problem(spec) if x.numel() else None
    out_direct = out is not None and _layout(out, axis) == layout
    plan = _Plan(problem, layout, (spec[0], spec[3]), _stats_dtype(torch, x.dtype), out_direct)
    cacheable = problem is not None and x_dense is x0 and w is w0 and b is b0
    return plan, x_dense, w, b, out, cacheable


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


def group_norm(input, num_groups, weight, bias, eps, activation, channel_axis, out, stream=None):
    """groupnorm.group_norm for GPU arrays (see there)."""
    return _forward(input, num_groups, weight, bias, eps, activation, channel_axis, out, False, stream)


def group_norm_forward(input, num_groups, weight, bias, eps, stream=None):
    """groupnorm.group_norm_forward for GPU arrays: (y, mean, rstd)."""
    return _forward(input, num_groups, weight, bias, eps, None, 1, None, True, stream)


# ------------------------------------------------------------------------------------------------ backward

def group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, stream=None):
    """groupnorm.group_norm_backward for GPU arrays: (grad_input, grad_weight, grad_bias)."""
    cuda, torch, device = _device_checked(input, (grad_output, mean, rstd, weight))
    return _on_stream(run_backward, torch, device, stream, cuda, torch, grad_output, input, mean, rstd, num_groups,
                      weight)


def run_backward(cuda, torch, grad_output, x, mean, rstd, num_groups, weight, device, stream):
    """The backward on `cuda` for tensors of x.device (see run_forward)."""
    key = _plan_key(cuda, torch, (grad_output, x, mean, rstd, weight), ("backward", num_groups))
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan, grad_output, x, mean, rstd, weight, cacheable = _backward_plan(cuda, torch, grad_output, x, mean, rstd,
                                                                             num_groups, weight)
        if cacheable:
            _keep(key, plan)
    c = x.shape[1]
    dx = torch.empty_like(x)
    grad_weight = torch.empty(c, dtype=plan.stats_dtype, device=x.device)
    grad_bias = torch.empty(c, dtype=plan.stats_dtype, device=x.device)
    if plan.problem is not None:
        workspace = torch.empty(plan.problem.backward_workspace, dtype=torch.uint8, device=x.device)
        cuda.backward(plan.problem, device, grad_output.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                      _ptr(weight), 0, dx.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(),
                      workspace.data_ptr(), stream)
    else:
        grad_weight.zero_()
        grad_bias.zero_()
    return dx, grad_weight, grad_bias


def _backward_plan(cuda, torch, grad_output, x, mean, rstd, num_groups, weight):
    """Every check of a backward call: (plan, grad_output and x in one kernel layout, mean, rstd, weight, whether
    the plan may be kept: no copy or conversion was needed)."""
    originals = (grad_output, x, mean, rstd, weight)
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
    spec = _problem(torch, x_dense, num_groups, 1, 1.0, False, _params_dtype(torch, x, w, None), layout)
    n, _, _, groups = spec[:4]
    stats = _stats_dtype(torch, x.dtype)
    m = _stat(torch, mean, "mean", (n, groups), stats, x)
    r = _stat(torch, rstd, "rstd", (n, groups), stats, x)
    dy_dense = dy if _layout(dy, 1) == layout else (
        dy.contiguous() if layout == 0 else _dense_like(torch, dy, x_dense))
    problem = cuda.problem(spec) if x.numel() else None
    plan = _Plan(problem, layout, (n, groups), stats)
    cacheable = problem is not None and all(a is b for a, b in zip((dy_dense, x_dense, m, r, w), originals))
    return plan, dy_dense, x_dense, m, r, w, cacheable


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
