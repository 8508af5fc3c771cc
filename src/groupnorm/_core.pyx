# _core.pyx — the NumPy-facing layer of groupnorm: argument validation, layout choice, and the nogil call
# into the C++ kernels through typed memoryviews. Every check runs before any output byte is written.
# cython: language_level=3, embedsignature=True
from libc.stdint cimport int64_t
from cython cimport floating

import numbers
import operator

import numpy as np

from ._groupnorm cimport (
    Problem, Status, kOk, kOutOfMemory, kUnsupported, Layout, Activation, DType, Isa,
    group_norm_forward, get_num_threads as c_get_num_threads, set_num_threads as c_set_num_threads,
    openmp_enabled, isa_name, isa_compiled, isa_supported, isa_current, isa_select,
)

cdef extern from *:
    """
    #ifndef GROUPNORM_VERSION
    #define GROUPNORM_VERSION "0+unknown"
    #endif
    """
    const char* GROUPNORM_VERSION

__version__ = GROUPNORM_VERSION.decode()

cdef object _float32 = np.dtype(np.float32)
cdef object _float64 = np.dtype(np.float64)
cdef tuple _ISA_NAMES = ("scalar", "avx2", "avx512", "neon")
cdef tuple _ISAS = (Isa.kScalar, Isa.kAvx2, Isa.kAvx512, Isa.kNeon)

# Layout codes of the (N, C, spatial...) view of an array.
cdef enum:
    LAYOUT_CHANNELS_FIRST = 0
    LAYOUT_CHANNELS_LAST = 1
    LAYOUT_OTHER = -1


# ----------------------------------------------------------------------------------------------- threads

def get_num_threads():
    """Number of OpenMP threads a call uses.

    The value given to :func:`set_num_threads`, else OpenMP's default in the calling thread
    (``OMP_NUM_THREADS``, or a ``threadpoolctl`` limit), else the number of cores.

    Examples
    --------
    >>> import groupnorm as gn
    >>> gn.get_num_threads() >= 1
    True
    """
    return c_get_num_threads()


def set_num_threads(n):
    """Set the number of OpenMP threads every later call uses, from any Python thread.

    Parameters
    ----------
    n : int or None
        A positive count, or ``None`` / ``0`` to return to OpenMP's default. Results are bitwise
        identical for every thread count.

    Examples
    --------
    >>> import groupnorm as gn
    >>> gn.set_num_threads(1); gn.get_num_threads()
    1
    >>> gn.set_num_threads(None)
    """
    if n is None:
        c_set_num_threads(0)
        return
    if isinstance(n, bool):
        raise TypeError(f"n={n!r} must be an integer or None, not bool")
    try:
        count = operator.index(n)
    except TypeError:
        raise TypeError(f"n={n!r} must be an integer or None") from None
    if count < 0:
        raise ValueError(f"n={count} must be >= 0 (0 or None restores the OpenMP default)")
    c_set_num_threads(min(count, 1 << 16))


# ---------------------------------------------------------------------------------------------------- ISA

cdef Isa _isa_from_name(str name) except *:
    if name not in _ISA_NAMES:
        raise ValueError(f"ISA level {name!r} is unknown; choose one of {', '.join(_ISA_NAMES)}")
    return _ISAS[_ISA_NAMES.index(name)]


def set_isa(str name):
    """Run every later call at ISA level `name` (private; ``GROUPNORM_ISA`` sets it at import)."""
    cdef Isa isa = _isa_from_name(name)
    if not isa_compiled(isa):
        raise RuntimeError(f"ISA level {name!r} is not compiled into this build of groupnorm "
                           f"(compiled: {', '.join(compiled_isas())})")
    if not isa_supported(isa):
        raise RuntimeError(f"ISA level {name!r} is not supported by this CPU "
                           f"(supported: {', '.join(supported_isas())})")
    if isa_select(isa) != kOk:
        raise RuntimeError(f"ISA level {name!r} could not be selected")


def get_isa():
    """Name of the ISA level calls run at."""
    return isa_name(isa_current()).decode()


def compiled_isas():
    return [n for n, i in zip(_ISA_NAMES, _ISAS) if isa_compiled(i)]


def supported_isas():
    return [n for n, i in zip(_ISA_NAMES, _ISAS) if isa_supported(i)]


def openmp():
    return bool(openmp_enabled())


# ------------------------------------------------------------------------------------------- validation

cdef object _check_input(object input):
    cdef object x
    if isinstance(input, np.ndarray):
        x = input
    elif isinstance(input, (str, bytes)):
        raise TypeError(f"input must be an array of float32 or float64, got {type(input).__name__} {input!r}")
    else:
        x = np.asarray(input)
    dt = x.dtype
    if dt is not _float32 and dt is not _float64 and dt != _float32 and dt != _float64:
        raise TypeError(f"input has dtype {dt}; group_norm supports float32 and float64")
    if x.ndim < 2:
        raise ValueError(f"input has shape {x.shape} ({x.ndim} dimension(s)); it needs at least 2: (N, C, *)")
    return x


cdef Py_ssize_t _check_int(object value, str name) except? -1:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be an integer") from None


cdef object _check_param(object value, str name, Py_ssize_t C, object dtype):
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an array of {C} real numbers, got {type(value).__name__} {value!r}")
    a = value if isinstance(value, np.ndarray) else np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} has dtype {a.dtype}; it must hold real numbers (float or integer)")
    if a.ndim != 1 or a.shape[0] != C:
        raise ValueError(f"{name} has shape {a.shape}; it must be ({C},), one value per channel")
    if a.dtype is dtype and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=dtype)


cdef bint _contiguous_in_order(object x, tuple order):
    """True if x's memory is C-contiguous when its axes are read in `order` (length-1 axes ignored)."""
    cdef tuple shape = x.shape, strides = x.strides
    cdef Py_ssize_t expected = x.itemsize, axis, extent
    for i in range(len(order) - 1, -1, -1):
        axis = order[i]
        extent = shape[axis]
        if extent != 1 and strides[axis] != expected:
            return False
        expected *= extent
    return True


# ------------------------------------------------------------------------------------------------ kernel

cdef void _raise_status(Status status) except *:
    if status == kOutOfMemory:
        raise MemoryError("groupnorm: out of memory for scratch buffers")
    raise RuntimeError(f"groupnorm: kernel failed with status {<int>status}")


cdef _forward_kernel(const floating[::1] x, floating[::1] y, const floating[::1] weight,
                     const floating[::1] bias, Problem* problem):
    """The nogil call: flat buffers in the layout problem.layout names, weight/bias optional."""
    cdef const void* w = &weight[0] if weight is not None else NULL
    cdef const void* b = &bias[0] if bias is not None else NULL
    cdef DType dtype = DType.kFloat32 if floating is float else DType.kFloat64
    cdef Status status
    with nogil:
        status = group_norm_forward(problem[0], dtype, &x[0], w, b, &y[0], NULL, NULL)
    if status != kOk:
        _raise_status(status)


cdef object _flat(object a, tuple order):
    """The 1-D view of an array whose memory is C-contiguous in `order`."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    return a.transpose(order).reshape(-1)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               channel_axis=1, out=None):
    """Group Normalization over the channels of each sample, as ``torch.nn.functional.group_norm``.

    For every sample ``n`` and group ``g`` (channels ``g*C/G`` to ``(g+1)*C/G - 1`` together with all
    trailing positions) computes ``y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]`` with the
    biased variance, optionally followed by ``y * sigmoid(y)``.

    Parameters
    ----------
    input : array_like, shape (N, C, *)
        float32 or float64, at least 2 dimensions, any memory layout. Contiguous and channels-last
        arrays are read in place; other layouts are copied once.
    num_groups : int
        Number of groups G; it must divide C. ``1`` gives LayerNorm over (C, *), ``C`` InstanceNorm.
    weight, bias : array_like, shape (C,), optional
        Per-channel scale and shift, each optional on its own; converted to the input's dtype.
    eps : float, default 1e-5
        Added to the variance; non-negative.
    activation : {None, 'silu'}, optional
        ``'silu'`` fuses ``y * sigmoid(y)`` into the same pass.
    channel_axis : int, default 1
        The axis holding C (``-1`` for NHWC / NWC arrays). The batch axis is always 0.
    out : numpy.ndarray, optional
        Where to write the result: same shape and dtype as the input, writeable. May be the input itself.

    Returns
    -------
    numpy.ndarray
        The normalised array (``out`` if given), with the input's shape, dtype and memory layout.

    Raises
    ------
    TypeError
        A wrong type: a non-integer ``num_groups``, an input that is not float32/float64, ...
    ValueError
        A wrong value: ``num_groups`` not dividing C, weight of the wrong shape, negative ``eps``, ...

    Examples
    --------
    >>> import numpy as np, groupnorm as gn
    >>> x = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    >>> gn.group_norm(x, 2).round(3)
    array([[[-1.342, -0.447],
            [ 0.447,  1.342],
    <BLANKLINE>
            [-1.342, -0.447],
            [ 0.447,  1.342]]], dtype=float32)
    >>> y = gn.group_norm(x.transpose(0, 2, 1), 2, channel_axis=-1)   # channels last
    >>> np.allclose(y.transpose(0, 2, 1), gn.group_norm(x, 2))
    True
    """
    x = _check_input(input)
    cdef Py_ssize_t ndim = x.ndim
    cdef Py_ssize_t ax = _check_int(channel_axis, "channel_axis")
    if ax < -ndim or ax >= ndim:
        raise ValueError(f"channel_axis={ax} is out of range for an input of {ndim} dimensions")
    if ax < 0:
        ax += ndim
    if ax == 0:
        raise ValueError(f"channel_axis={channel_axis} names the batch axis 0; channels must be on another axis")
    cdef tuple shape = x.shape
    cdef Py_ssize_t C = shape[ax]
    cdef Py_ssize_t G = _check_int(num_groups, "num_groups")
    if G <= 0:
        raise ValueError(f"num_groups={G} must be positive")
    if C % G != 0:
        raise ValueError(f"num_groups={G} must divide the number of channels ({C})")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps={eps!r} must be a real number")
    cdef double eps_value = float(eps)
    if not (eps_value >= 0.0):
        raise ValueError(f"eps={eps!r} must be non-negative (and not NaN)")
    cdef Activation act = Activation.kNone
    if activation is not None:
        if not isinstance(activation, str):
            raise TypeError(f"activation={activation!r} must be None or a string")
        if activation != "silu":
            raise ValueError(f"activation={activation!r} is unknown; it must be None or 'silu'")
        act = Activation.kSilu
    dtype = x.dtype
    w = _check_param(weight, "weight", C, dtype)
    b = _check_param(bias, "bias", C, dtype)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"out has shape {out.shape}; it must match the input's shape {shape}")
        if out.dtype != dtype:
            raise ValueError(f"out has dtype {out.dtype}; it must match the input's dtype {dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only; it must be writeable")

    if x.size == 0:
        return out if out is not None else np.empty_like(x)

    cdef Problem problem
    problem.N = shape[0]
    problem.C = C
    problem.G = G
    problem.HxW = x.size // (shape[0] * C)
    problem.activation = act
    problem.eps = eps_value
    problem.num_threads = 0

    # Logical orders of the axes: channels-first reads (N, C, spatial...), channels-last (N, spatial..., C).
    spatial = tuple(i for i in range(1, ndim) if i != ax)
    cdef tuple first_order = (0, ax) + spatial
    cdef tuple last_order = (0,) + spatial + (ax,)
    cdef int layout
    # With one position per channel both layouts coincide; channels-last vectorises across C.
    if problem.HxW > 1 and _contiguous_in_order(x, first_order):
        layout = LAYOUT_CHANNELS_FIRST
    elif _contiguous_in_order(x, last_order):
        layout = LAYOUT_CHANNELS_LAST
    elif _contiguous_in_order(x, first_order):
        layout = LAYOUT_CHANNELS_FIRST
    else:
        layout = LAYOUT_OTHER
    cdef tuple order = last_order if layout == LAYOUT_CHANNELS_LAST else first_order
    problem.layout = Layout.kChannelsLast if layout == LAYOUT_CHANNELS_LAST else Layout.kChannelsFirst

    if layout == LAYOUT_OTHER:
        x_flat = np.ascontiguousarray(x.transpose(order)).reshape(-1)  # the one copy of an odd layout
    else:
        x_flat = _flat(x, order)

    # Write straight into the result when its memory has the kernel's layout and cannot clobber input
    # still to be read; otherwise compute into a scratch array and copy.
    if out is None:
        if layout == LAYOUT_OTHER:
            result = np.empty_like(x)
        else:
            inverse = tuple(np.argsort(order))
            result = np.empty(tuple(shape[i] for i in order), dtype=dtype).transpose(inverse)
    else:
        result = out
    direct = layout != LAYOUT_OTHER and _contiguous_in_order(result, order)
    if direct and out is not None and layout != LAYOUT_OTHER and np.may_share_memory(out, x):
        direct = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                  and out.strides == x.strides)
    if direct:
        y_flat = _flat(result, order)
    else:
        y_flat = np.empty(x.size, dtype=dtype)

    if dtype == _float32:
        _forward_kernel[float](x_flat, y_flat, w, b, &problem)
    else:
        _forward_kernel[double](x_flat, y_flat, w, b, &problem)

    if not direct:
        inverse = tuple(np.argsort(order))
        np.copyto(result, y_flat.reshape(tuple(shape[i] for i in order)).transpose(inverse))
    return result
