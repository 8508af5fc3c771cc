"""groupnorm._gpu: GPU arrays on the CUDA kernels of groupnorm._cuda (cpp/cuda).

groupnorm._interop sends a call here when one of its arrays lives in CUDA memory, and groupnorm.torch when a
tensor is on a CUDA device. torch CUDA tensors and CuPy arrays are served, each by its own framework: results and
the kernels' workspace come from its allocator (torch's caching allocator, CuPy's memory pool: no cudaMalloc a
call), and the kernels are queued on its current stream of the array's device (or on the stream that the caller's
``stream=`` names), with no synchronisation. JAX arrays go to groupnorm.jax, whose XLA custom calls get XLA's memory
and stream (where the build has them); other producers' GPU arrays get a ValueError that says how to pass them.

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


# ------------------------------------------------------------------------------------------------ frameworks
# What a call needs of the framework whose arrays it was given: their metadata, checks, memory and streams. Each
# framework is one object of these methods; the checks, plans and kernel calls below are written once against them.

_KERNEL_DTYPES = ("float32", "float64", "float16", "bfloat16")


class TorchArrays:
    """torch CUDA tensors: memory from torch's caching allocator, work on torch's current stream."""

    kind = "torch.Tensor"
    dtype_rule = "groupnorm supports torch.float16, torch.bfloat16, torch.float32 and torch.float64"

    def __init__(self, torch):
        self.torch = torch
        self.names = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                      torch.bfloat16: "bfloat16"}
        self.dtypes = {name: dtype for dtype, name in self.names.items()}
        self.dtypes["uint8"] = torch.uint8  # the workspace
        self.ptr = torch.Tensor.data_ptr  # ptr(tensor): the C method itself, called about ten times a call
        # The raw cudaStream_t of the current stream, as torch's own compiled kernels ask it (no Stream object);
        # looked up once, not on every call.
        self.raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    def is_array(self, obj):
        return isinstance(obj, self.torch.Tensor)

    def device(self, tensor):
        return tensor.device

    def meta(self, tensor):
        """What a plan depends on (None for None, an AttributeError for what is not a tensor)."""
        if tensor is None:
            return None
        return tensor.shape, tensor.stride(), tensor.dtype, tensor.device, tensor.requires_grad, tensor.is_neg()

    def mode(self):
        return self.torch.is_grad_enabled()

    def usable(self, tensor, name):
        """The tensor to read: refused when it requires grad in grad mode; a lazily negated view resolved."""
        if tensor.requires_grad and self.torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad; call groupnorm.torch.group_norm for autograd, or pass "
                             f"{name}.detach()")
        return tensor.resolve_neg() if tensor.is_neg() else tensor

    def writable(self, out):
        if out.is_neg():
            raise ValueError("out is a lazily negated view (is_neg()); it cannot be written in place")
        if out.requires_grad and self.torch.is_grad_enabled():
            raise ValueError("out requires grad; pass out.detach()")

    def dtype_name(self, tensor):
        return self.names.get(tensor.dtype)

    def real(self, tensor):
        return not (tensor.dtype.is_complex or tensor.dtype == self.torch.bool)

    def strides(self, tensor):
        return tensor.stride()

    def astype(self, tensor, name):
        return tensor.to(self.dtypes[name])

    def contiguous(self, tensor):
        return tensor.contiguous()

    def permuted_copy(self, tensor, order, inverse):
        return tensor.permute(order).contiguous().permute(inverse)

    def empty_like(self, tensor):
        return self.torch.empty_like(tensor)  # a dense tensor's strides are kept

    def empty(self, shape, name, like):
        return self.torch.empty(shape, dtype=self.dtypes[name], device=like.device)

    def copy(self, dst, src):
        dst.copy_(src)

    def fill(self, tensor, value):
        tensor.fill_(value)

    def nbytes(self, tensor):
        return tensor.numel() * tensor.element_size()

    def device_index(self, tensor):
        return tensor.get_device()

    def scope(self, device, stream):
        """(cudaStream_t, context or None): the stream a call runs on, and a context that makes the framework
        allocate for it (None: nothing to enter)."""
        torch = self.torch
        if stream is None:
            raw = self.raw_stream
            return (raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream), None
        handle = stream_handle(stream)
        cuda = torch.cuda
        if isinstance(stream, cuda.Stream):
            if stream.device_index != device:
                raise ValueError(f"stream is a stream of cuda:{stream.device_index} but the input is on "
                                 f"cuda:{device}")
            return handle, cuda.stream(stream)
        if handle in (0, 1):
            return handle, cuda.stream(cuda.default_stream(device))
        return handle, cuda.stream(cuda.ExternalStream(handle, device=device))


class NumpyLikeArrays:
    """Arrays with NumPy's interface (CuPy's): byte strides, astype, ascontiguousarray, copyto. The parts that
    touch a device (pointers, the device, streams) are CupyArrays'; tests/test_gpu_path.py runs the rest on NumPy
    arrays."""

    dtype_rule = "groupnorm supports float16, float32 and float64 here"

    def __init__(self, xp):
        self.xp = xp
        self.kind = f"{xp.__name__}.ndarray"

    def is_array(self, obj):
        return isinstance(obj, self.xp.ndarray)

    def meta(self, array):
        return None if array is None else (array.shape, array.strides, array.dtype, self.device(array))

    def mode(self):
        return None

    def usable(self, array, name):
        return array

    def writable(self, out):
        if not getattr(getattr(out, "flags", None), "writeable", True):  # CuPy's flags have no such field
            raise ValueError("out is read-only; it must be writeable")

    def dtype_name(self, array):
        name = array.dtype.name
        return name if name in _KERNEL_DTYPES and array.dtype.isnative else None

    def real(self, array):
        return array.dtype.kind in "fiu"

    def strides(self, array):
        """Strides in elements; a stride that is no whole number of elements makes the array dense in no order."""
        size = array.dtype.itemsize
        return tuple(s // size if s % size == 0 else 0.5 for s in array.strides)

    def astype(self, array, name):
        return array.astype(name)

    def contiguous(self, array):
        return self.xp.ascontiguousarray(array)

    def permuted_copy(self, array, order, inverse):
        return self.xp.ascontiguousarray(array.transpose(order)).transpose(inverse)

    def empty_like(self, array):
        """An empty array of array's shape and dtype with its memory order (array is dense)."""
        order = sorted(range(array.ndim), key=lambda a: -abs(array.strides[a]))
        inverse = sorted(range(array.ndim), key=order.__getitem__)
        return self.xp.empty([array.shape[a] for a in order], array.dtype).transpose(inverse)

    def empty(self, shape, name, like):
        return self.xp.empty(shape, name)

    def copy(self, dst, src):
        self.xp.copyto(dst, src)

    def fill(self, array, value):
        array.fill(value)

    def nbytes(self, array):
        return array.nbytes


class CupyArrays(NumpyLikeArrays):
    """CuPy arrays: memory from CuPy's memory pool on the array's device, work on CuPy's current stream."""

    def device(self, array):
        return array.device.id

    def ptr(self, array):
        return array.data.ptr

    def device_index(self, array):
        return array.device.id

    def scope(self, device, stream):
        cuda = self.xp.cuda
        if stream is None:
            with cuda.Device(device):
                handle = cuda.get_current_stream().ptr
            return handle, cuda.Device(device)
        handle = stream_handle(stream)
        if not isinstance(stream, (cuda.Stream, cuda.ExternalStream)):
            stream = cuda.ExternalStream(handle, device)
        elif getattr(stream, "device_id", device) not in (device, -1):
            raise ValueError(f"stream is a stream of cuda:{stream.device_id} but the input is on cuda:{device}")
        return handle, _Both(cuda.Device(device), stream)  # CuPy then allocates from that stream's pool


class _Both:
    """Two contexts entered in order and left in reverse."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)
        return False


_frameworks = {}  # module name -> its arrays' object
_FRAMEWORKS = (("torch", "Tensor", TorchArrays), ("cupy", "ndarray", CupyArrays))


def arrays_of(obj):
    """The framework object of obj's kind of array (torch tensors, CuPy arrays), or None. A framework is looked
    for only once it is imported (its arrays cannot exist before)."""
    for name, array_type, make in _FRAMEWORKS:
        module = sys.modules.get(name)
        if module is not None and isinstance(obj, getattr(module, array_type)):
            frame = _frameworks.get(name)
            if frame is None:
                frame = _frameworks[name] = make(module)
            return frame
    return None


def _served(name, obj, device):
    frame = arrays_of(obj)
    if frame is None:
        raise ValueError(f"{name} lives on device {device} as a {type(obj).__module__}.{type(obj).__name__}; "
                         f"groupnorm's CUDA backend serves torch CUDA tensors, CuPy arrays and (through "
                         f"groupnorm.jax) JAX arrays: pass other arrays through torch.from_dlpack or "
                         f"cupy.from_dlpack, which do not copy")
    return frame


# ------------------------------------------------------------------------------------------------ checks

def _on_device(frame, tensor, name, device):
    """The error unless tensor is an array of the frame's kind on `device`."""
    if not frame.is_array(tensor):
        raise TypeError(f"{name} must be a {frame.kind} on {_device_name(device)}, got {type(tensor).__name__}")
    if frame.device(tensor) != device:
        raise ValueError(f"{name} is on device {_device_name(frame.device(tensor))} but input is on "
                         f"{_device_name(device)}; all arrays of a call must be on one device")


def _check_tensor(frame, tensor, name, device):
    _on_device(frame, tensor, name, device)
    return frame.usable(tensor, name)


def _device_name(device):
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _layout(frame, tensor, channel_axis):
    """1 when the tensor is dense with channels last in memory, 0 when dense with channels right after the batch
    axis (the channels-first kernels' order), None otherwise."""
    shape, stride, ndim = tensor.shape, frame.strides(tensor), len(tensor.shape)
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


def _dense(frame, tensor, channel_axis):
    """(tensor, layout): the tensor itself when it is dense in a kernel's order, else a channels-first copy."""
    layout = _layout(frame, tensor, channel_axis)
    if layout is not None:
        return tensor, layout
    order = [0, channel_axis] + [a for a in range(1, len(tensor.shape)) if a != channel_axis]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return frame.permuted_copy(tensor, order, inverse), 0


def check_rank(name, shape):
    """An array's shape has the (N, C, *) dimensions group norm needs, else the error naming it (shared with
    groupnorm.jax and groupnorm.torch's shape functions)."""
    if len(shape) < 2:
        raise ValueError(f"{name} has shape {tuple(shape)} ({len(shape)} dimension(s)); it needs at least 2: (N, C, *)")


def check_param_shape(name, shape, channels):
    """A weight or bias has one value per channel, else the error naming it (shared as check_rank)."""
    if tuple(shape) != (channels,):
        raise ValueError(f"{name} has shape {tuple(shape)}; it must be ({channels},), one value per channel")


def check_groups(num_groups, channels):
    """num_groups as an int that divides the channels, else the error naming it (shared with groupnorm.jax)."""
    groups = _core._index(num_groups, "num_groups")
    if groups <= 0:
        raise ValueError(f"num_groups={groups} must be positive")
    if channels % groups != 0:
        raise ValueError(f"num_groups={groups} must divide the number of channels ({channels})")
    return groups


def _problem(frame, x, num_groups, channel_axis, eps, silu, param_dtype, layout):
    shape = tuple(x.shape)  # at least 2 dimensions: _check_input saw to it
    c = shape[channel_axis]
    groups = check_groups(num_groups, c)
    s = math.prod(shape) // max(1, shape[0] * c)
    dtype = frame.dtype_name(x)
    return (shape[0], c, s, groups, layout == 1, dtype, param_dtype or dtype, silu, eps)


def _stats_dtype(frame, x):
    return "float64" if frame.dtype_name(x) == "float64" else "float32"


def _param(frame, value, name, c, x):
    """weight or bias as a contiguous (C,) array of x's dtype, or float32 for 16-bit x when it is float32."""
    if value is None:
        return None
    value = _check_tensor(frame, value, name, frame.device(x))
    check_param_shape(name, value.shape, c)
    if not frame.real(value):
        raise TypeError(f"{name} has dtype {value.dtype}; it must hold real numbers (float or integer)")
    x_name, own = frame.dtype_name(x), frame.dtype_name(value)
    half = x_name in ("float16", "bfloat16")
    if own != x_name and not (half and own == "float32"):
        value = frame.astype(value, "float32" if half else x_name)
    return frame.contiguous(value)


def _params(frame, weight, bias, c, x):
    """weight and bias through _param, in one kernel dtype (float32 where they differ)."""
    w = _param(frame, weight, "weight", c, x)
    b = _param(frame, bias, "bias", c, x)
    if w is not None and b is not None and frame.dtype_name(w) != frame.dtype_name(b):
        w, b = frame.astype(w, "float32"), frame.astype(b, "float32")
    return w, b


def _params_dtype(frame, x, weight, bias):
    """The parameters' kernel dtype: float32 when either is float32 with 16-bit x (both then float32)."""
    x_name = frame.dtype_name(x)
    if any(p is not None and frame.dtype_name(p) != x_name for p in (weight, bias)):
        return "float32"
    return None


def channel_axis_of(value, ndim):
    """channel_axis as an axis in [1, ndim), else the error naming it (shared with groupnorm.jax)."""
    axis = _core._index(value, "channel_axis")
    if axis < -ndim or axis >= ndim:
        raise ValueError(f"channel_axis={axis} is out of range for an input of {ndim} dimensions")
    axis %= ndim
    if axis == 0:
        raise ValueError(f"channel_axis={value} names the batch axis 0; channels must be on another axis")
    return axis


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


# ------------------------------------------------------------------------------------------------ forward

def _device_checked(input, others):
    """(cuda module, the input's framework, its device index) once the input is an array in CUDA memory of a
    framework the backend serves, on a machine that can run it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(input, torch.Tensor) and input.is_cuda and _availability is not None:
        cuda = _availability[0]
        if cuda is not None:  # the common call, without the general checks below
            return cuda, arrays_of(input), input.get_device()
    device = gpu_device(input) or next((d for d in map(gpu_device, others) if d is not None), None)
    cuda = _backend("input", device)
    frame = _served("input", input, device)
    if gpu_device(input) is None:
        raise ValueError(f"input is on device {_device_name(frame.device(input))} but another argument lives on "
                         f"{device}; all arrays of a call must be on one device")
    return cuda, frame, frame.device_index(input)


def _on_stream(run, frame, device, stream, *args):
    """run(*args, device, stream handle) on the framework's current stream, or on the explicit `stream` with the
    framework's allocations made for it."""
    handle, scope = frame.scope(device, stream)
    if scope is None:
        return run(*args, device, handle)
    with scope:
        return run(*args, device, handle)


def _jax_path(input, out, stream):
    """groupnorm.jax when input is a JAX array (its custom calls serve JAX arrays in GPU memory, with XLA's memory
    and stream), else None; an error when the build has no custom calls or the call asks what JAX cannot give."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(input, jax.Array):
        return None
    if _core.JAX_BUILD_NOTE != "built":
        raise ValueError(f"input lives on device {gpu_device(input)} as a JAX array; this groupnorm build has no JAX "
                         f"custom calls ({_core.JAX_BUILD_NOTE}; README, section JAX), or pass it through "
                         f"torch.from_dlpack or cupy.from_dlpack")
    if out is not None:
        raise ValueError("out= cannot be a JAX array's memory (JAX arrays are immutable); leave out=None")
    if stream is not None:
        raise ValueError(f"stream={stream!r}: JAX arrays run on XLA's own stream; leave stream=None")
    from . import jax as gnj
    if not gnj.has_cuda():
        raise ValueError(f"input lives on device {gpu_device(input)} as a JAX array; this groupnorm build's JAX "
                         f"custom calls are for the CPU only (it was built without the CUDA backend: "
                         f"{_core.CUDA_BUILD_NOTE})")
    return gnj


def _forward(input, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats, stream):
    gnj = _jax_path(input, out, stream)
    if gnj is not None:
        if want_stats:
            return gnj.group_norm_forward(input, num_groups, weight, bias, eps, activation=activation)
        return gnj.group_norm(input, num_groups, weight, bias, eps, activation=activation, channel_axis=channel_axis)
    cuda, frame, device = _device_checked(input, (out, weight, bias))
    return _on_stream(run_forward, frame, device, stream, cuda, frame, input, num_groups, weight, bias, eps,
                      activation, channel_axis, out, want_stats)


def _check_input(frame, input):
    if not frame.is_array(input):
        raise TypeError(f"input must be a {frame.kind}, got {type(input).__name__}")
    x = frame.usable(input, "input")
    if frame.dtype_name(x) is None:
        raise TypeError(f"input has dtype {x.dtype}; {frame.dtype_rule}")
    check_rank("input", x.shape)
    return x


def _overlap(frame, a, b):
    """Whether the memory spans of two dense arrays overlap."""
    a0, b0 = frame.ptr(a), frame.ptr(b)
    return a0 < b0 + frame.nbytes(b) and b0 < a0 + frame.nbytes(a)


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
_KEY_SCALARS = frozenset((int, float, str, type(None), bool))


def _plan_key(cuda, frame, tensors, scalars):
    """The cache key of a call: its arrays' metadata, its scalars with their types (True == 1 and 2.0 == 2, but
    num_groups=True and num_groups=2.0 are errors), the framework's mode (torch's grad mode) and the backend (whose
    problems the plan holds); None when a scalar is of another type (a NumPy integer, say) or an argument is of
    another kind, whose call then takes the checks every time."""
    types = tuple(map(type, scalars))
    for kind in types:
        if kind not in _KEY_SCALARS:
            return None
    try:
        return tuple(map(frame.meta, tensors)) + scalars + types + (frame.mode(), cuda)
    except AttributeError:
        return None


def _keep(key, plan):
    if key is not None:
        if len(_plans) >= _PLANS_KEPT:
            _plans.clear()
        _plans[key] = plan


def run_forward(cuda, frame, x, num_groups, weight, bias, eps, activation, channel_axis, out, want_stats, device,
                stream):
    """The forward on `cuda` (groupnorm._cuda, or a stand-in with its functions) for an array x of `frame`'s kind
    (TorchArrays, CupyArrays), with the other arrays checked against it; the kernels run on `stream` of CUDA device
    `device`."""
    key = _plan_key(cuda, frame, (x, weight, bias, out),
                    ("forward", num_groups, eps, activation, channel_axis, want_stats))
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan, x, weight, bias, out, cacheable = _forward_plan(cuda, frame, x, num_groups, weight, bias, eps,
                                                              activation, channel_axis, out)
        if cacheable:
            _keep(key, plan)
    empty, ptr = frame.empty, frame.ptr
    mean = rstd = None
    if want_stats:
        mean = empty(plan.stats_shape, plan.stats_dtype, x)
        rstd = empty(plan.stats_shape, plan.stats_dtype, x)
    # Straight into out when it has the kernels' layout and cannot clobber x before it is read (the forward reads
    # all of x before it writes y; in place, y is x, is fine, as element i of y is written after x[i] is read).
    direct = out is not None and plan.out_direct and (
        not _overlap(frame, out, x) or (ptr(out) == ptr(x) and frame.strides(out) == frame.strides(x)))
    y = out if direct else frame.empty_like(x)
    problem = plan.problem
    if problem is not None:
        workspace = empty((problem.forward_workspace,), "uint8", x)
        cuda.forward(problem, device, ptr(x), 0 if weight is None else ptr(weight), 0 if bias is None else ptr(bias),
                     ptr(y), 0 if mean is None else ptr(mean), 0 if rstd is None else ptr(rstd), ptr(workspace),
                     stream)
    elif want_stats and plan.stats_shape[0]:
        frame.fill(mean, math.nan)
        frame.fill(rstd, math.nan)
    if out is not None and not direct:
        frame.copy(out, y)
        y = out
    return (y, mean, rstd) if want_stats else y


def _forward_plan(cuda, frame, x, num_groups, weight, bias, eps, activation, channel_axis, out):
    """Every check of a forward call: (plan, x in a kernel layout, weight, bias, out, whether the plan may be kept
    for the call's metadata: no copy or conversion was needed)."""
    x0, w0, b0 = x, weight, bias
    x = _check_input(frame, x)
    axis = channel_axis_of(channel_axis, len(x.shape))
    eps = _core._check_eps_value(eps)
    silu = _core._check_activation(activation)
    c = x.shape[axis]
    w, b = _params(frame, weight, bias, c, x)
    if out is not None:
        out = _check_out(frame, out, x)
    x_dense, layout = _dense(frame, x, axis)
    spec = _problem(frame, x_dense, num_groups, axis, eps, silu, _params_dtype(frame, x, w, b), layout)
    problem = cuda.problem(spec) if math.prod(x.shape) else None
    out_direct = out is not None and _layout(frame, out, axis) == layout
    plan = _Plan(problem, layout, (spec[0], spec[3]), _stats_dtype(frame, x), out_direct)
    cacheable = problem is not None and x_dense is x0 and w is w0 and b is b0
    return plan, x_dense, w, b, out, cacheable


def _check_out(frame, out, x):
    _on_device(frame, out, "out", frame.device(x))
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; it must match the input's shape {tuple(x.shape)}")
    if out.dtype != x.dtype:
        raise ValueError(f"out has dtype {out.dtype}; it must match the input's dtype {x.dtype}")
    frame.writable(out)
    return out


def group_norm(input, num_groups, weight, bias, eps, activation, channel_axis, out, stream=None):
    """groupnorm.group_norm for GPU arrays (see there)."""
    return _forward(input, num_groups, weight, bias, eps, activation, channel_axis, out, False, stream)


def group_norm_forward(input, num_groups, weight, bias, eps, stream=None, activation=None):
    """groupnorm.group_norm_forward for GPU arrays: (y, mean, rstd)."""
    return _forward(input, num_groups, weight, bias, eps, activation, 1, None, True, stream)


# ------------------------------------------------------------------------------------------------ backward

def group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, stream=None, bias=None, activation=None):
    """groupnorm.group_norm_backward for GPU arrays: (grad_input, grad_weight, grad_bias)."""
    gnj = _jax_path(input, None, stream)
    if gnj is not None:
        return gnj.group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, bias=bias,
                                       activation=activation)
    cuda, frame, device = _device_checked(input, (grad_output, mean, rstd, weight, bias))
    return _on_stream(run_backward, frame, device, stream, cuda, frame, grad_output, input, mean, rstd, num_groups,
                      weight, bias, activation)


def run_backward(cuda, frame, grad_output, x, mean, rstd, num_groups, weight, bias, activation, device, stream):
    """The backward on `cuda` for arrays of x's device (see run_forward); bias is read only with an activation,
    whose input the kernels recompute."""
    key = _plan_key(cuda, frame, (grad_output, x, mean, rstd, weight, bias), ("backward", num_groups, activation))
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan, grad_output, x, mean, rstd, weight, bias, cacheable = _backward_plan(
            cuda, frame, grad_output, x, mean, rstd, num_groups, weight, bias, activation)
        if cacheable:
            _keep(key, plan)
    empty, ptr = frame.empty, frame.ptr
    c = x.shape[1]
    dx = frame.empty_like(x)
    grad_weight = empty((c,), plan.stats_dtype, x)
    grad_bias = empty((c,), plan.stats_dtype, x)
    problem = plan.problem
    if problem is not None:
        workspace = empty((problem.backward_workspace,), "uint8", x)
        cuda.backward(problem, device, ptr(grad_output), ptr(x), ptr(mean), ptr(rstd),
                      0 if weight is None else ptr(weight), 0 if bias is None else ptr(bias), ptr(dx),
                      ptr(grad_weight), ptr(grad_bias), ptr(workspace), stream)
    else:
        frame.fill(grad_weight, 0)
        frame.fill(grad_bias, 0)
    return dx, grad_weight, grad_bias


def _backward_plan(cuda, frame, grad_output, x, mean, rstd, num_groups, weight, bias, activation):
    """Every check of a backward call: (plan, grad_output and x in one kernel layout, mean, rstd, weight, bias,
    whether the plan may be kept: no copy or conversion was needed)."""
    originals = (grad_output, x, mean, rstd, weight, bias)
    x = _check_input(frame, x)
    dy = _check_tensor(frame, grad_output, "grad_output", frame.device(x))
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"grad_output has shape {tuple(dy.shape)}; it must match the input's shape "
                         f"{tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise ValueError(f"grad_output has dtype {dy.dtype}; it must match the input's dtype {x.dtype}")
    c = x.shape[1]
    silu = _core._check_activation(activation)
    w, b = _params(frame, weight, bias, c, x)
    x_dense, layout = _dense(frame, x, 1)
    spec = _problem(frame, x_dense, num_groups, 1, 1.0, silu, _params_dtype(frame, x, w, b), layout)
    n, _, _, groups = spec[:4]
    stats = _stats_dtype(frame, x)
    m = _stat(frame, mean, "mean", (n, groups), stats, x)
    r = _stat(frame, rstd, "rstd", (n, groups), stats, x)
    if _layout(frame, dy, 1) == layout:
        dy_dense = dy
    elif layout == 0:
        dy_dense = frame.contiguous(dy)
    else:  # into x's (channels-last) memory order
        dy_dense = frame.empty_like(x_dense)
        frame.copy(dy_dense, dy)
    problem = cuda.problem(spec) if math.prod(x.shape) else None
    plan = _Plan(problem, layout, (n, groups), stats)
    cacheable = problem is not None and all(a is o for a, o in zip((dy_dense, x_dense, m, r, w, b), originals))
    return plan, dy_dense, x_dense, m, r, w, b, cacheable


def _stat(frame, value, name, shape, dtype, x):
    device = frame.device(x)
    if not frame.is_array(value):
        raise TypeError(f"{name} must be a {frame.kind} of shape {shape} on {_device_name(device)} as "
                        f"group_norm_forward returns it, got {type(value).__name__}")
    value = _check_tensor(frame, value, name, device)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; it must be {shape}, one value per sample and "
                         f"group (N, num_groups)")
    if not frame.real(value):
        raise TypeError(f"{name} has dtype {value.dtype}; it must hold real numbers (float or integer)")
    if frame.dtype_name(value) != dtype:
        value = frame.astype(value, dtype)
    return frame.contiguous(value)
