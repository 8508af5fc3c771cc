# _core.pyx — the NumPy-facing layer of groupnorm: argument validation, layout choice, and the nogil call
# into the C++ kernels. Every check runs before any output byte is written. Arrays are read through the
# NumPy C-API (PyArray_DATA and friends): a typed memoryview costs ~0.18 us per array to acquire, which a
# 2 us budget for a [16, 32] call cannot absorb four times over.
# cython: language_level=3, embedsignature=True
from libc.stdint cimport int64_t, intptr_t
cimport numpy as cnp

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

cnp.import_array()

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

cdef int _MAX_DIMS = 32


cdef object _check_input(object input):
    """input as a float32/float64 ndarray of >= 2 dims, native byte order and aligned (else TypeError/ValueError)."""
    cdef object x
    if type(input) is np.ndarray:
        x = input
    elif isinstance(input, (str, bytes)):
        raise TypeError(f"input must be an array of float32 or float64, got {type(input).__name__} {input!r}")
    elif isinstance(input, np.ndarray):
        x = input
    else:
        x = np.asarray(input)
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError(f"input has dtype {x.dtype}; group_norm supports float32 and float64")
    if cnp.PyArray_NDIM(<cnp.ndarray>x) < 2:
        raise ValueError(f"input has shape {x.shape} ({x.ndim} dimension(s)); it needs at least 2: (N, C, *)")
    if cnp.PyArray_NDIM(<cnp.ndarray>x) > _MAX_DIMS:
        raise ValueError(f"input has {x.ndim} dimensions; at most {_MAX_DIMS} are supported")
    if not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>x) or not cnp.PyArray_ISALIGNED(<cnp.ndarray>x):
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="K")  # native, aligned copy
    return x


cdef Py_ssize_t _check_int(object value, str name) except? -1:
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be an integer") from None


cdef object _check_param(object value, str name, Py_ssize_t C, int typenum):
    """weight / bias as a contiguous (C,) array of the input's dtype, or None."""
    if value is None:
        return None
    if (type(value) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>value) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>value) == 1 and cnp.PyArray_DIMS(<cnp.ndarray>value)[0] == C
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>value) and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>value)):
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an array of {C} real numbers, got {type(value).__name__} {value!r}")
    a = value if isinstance(value, np.ndarray) else np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} has dtype {a.dtype}; it must hold real numbers (float or integer)")
    if a.ndim != 1 or a.shape[0] != C:
        raise ValueError(f"{name} has shape {a.shape}; it must be ({C},), one value per channel")
    return np.ascontiguousarray(a, dtype=np.float32 if typenum == cnp.NPY_FLOAT32 else np.float64)


cdef bint _contiguous_in_order(cnp.ndarray a, const int* order, int ndim) noexcept:
    """True if a's memory is C-contiguous when its axes are read in `order` (length-1 axes ignored)."""
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(a)
    cdef cnp.npy_intp expected = cnp.PyArray_ITEMSIZE(a)
    cdef int i
    for i in range(ndim - 1, -1, -1):
        if dims[order[i]] != 1 and strides[order[i]] != expected:
            return False
        expected *= dims[order[i]]
    return True


cdef void _memory_extent(cnp.ndarray a, intptr_t* lo, intptr_t* hi) noexcept:
    """The byte range [lo, hi) that a non-empty array a can touch."""
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(a)
    cdef intptr_t start = <intptr_t>cnp.PyArray_DATA(a)
    cdef intptr_t low = start, high = start + cnp.PyArray_ITEMSIZE(a)
    cdef int i
    for i in range(cnp.PyArray_NDIM(a)):
        if strides[i] > 0:
            high += strides[i] * (dims[i] - 1)
        else:
            low += strides[i] * (dims[i] - 1)
    lo[0] = low
    hi[0] = high


cdef bint _same_view(cnp.ndarray a, cnp.ndarray b) noexcept:
    """a and b address the same elements in the same order (in-place is then safe)."""
    cdef int i
    if cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b):
        return False
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[i] != 1 and cnp.PyArray_STRIDES(a)[i] != cnp.PyArray_STRIDES(b)[i]:
            return False
    return True


cdef bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef intptr_t alo, ahi, blo, bhi
    _memory_extent(a, &alo, &ahi)
    _memory_extent(b, &blo, &bhi)
    return alo < bhi and blo < ahi


# ------------------------------------------------------------------------------------------------ kernel

cdef void _raise_status(Status status) except *:
    if status == kOutOfMemory:
        raise MemoryError("groupnorm: out of memory for scratch buffers")
    raise RuntimeError(f"groupnorm: kernel failed with status {<int>status}")


cdef object _empty_in_order(cnp.ndarray like, const int* order, int ndim):
    """A new array shaped like `like` whose memory is C-contiguous in the axis order `order`."""
    cdef cnp.npy_intp dims[32]
    cdef cnp.PyArray_Dims perm
    cdef cnp.npy_intp inverse[32]
    cdef int i
    cdef bint identity = True
    for i in range(ndim):
        dims[i] = cnp.PyArray_DIMS(like)[order[i]]
        inverse[order[i]] = i
        identity = identity and order[i] == i
    arr = cnp.PyArray_EMPTY(ndim, dims, cnp.PyArray_TYPE(like), 0)
    if identity:
        return arr
    perm.ptr = inverse
    perm.len = ndim
    return cnp.PyArray_Transpose(<cnp.ndarray>arr, &perm)


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
        Where to write the result: same shape and dtype as the input, writeable. May be the input
        itself (in place); any other overlap with the input is handled through a scratch copy.

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
    cdef cnp.ndarray x = _check_input(input)
    cdef int ndim = cnp.PyArray_NDIM(x)
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t ax = _check_int(channel_axis, "channel_axis")
    if ax < -ndim or ax >= ndim:
        raise ValueError(f"channel_axis={ax} is out of range for an input of {ndim} dimensions")
    if ax < 0:
        ax += ndim
    if ax == 0:
        raise ValueError(f"channel_axis={channel_axis} names the batch axis 0; channels must be on another axis")
    cdef Py_ssize_t C = dims[ax]
    cdef Py_ssize_t G = _check_int(num_groups, "num_groups")
    if G <= 0:
        raise ValueError(f"num_groups={G} must be positive")
    if C % G != 0:
        raise ValueError(f"num_groups={G} must divide the number of channels ({C})")
    cdef double eps_value
    if type(eps) is float:
        eps_value = eps
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps={eps!r} must be a real number")
    else:
        eps_value = float(eps)
    if not (eps_value >= 0.0):
        raise ValueError(f"eps={eps!r} must be non-negative (and not NaN)")
    cdef Activation act = Activation.kNone
    if activation is not None:
        if not isinstance(activation, str):
            raise TypeError(f"activation={activation!r} must be None or a string")
        if activation != "silu":
            raise ValueError(f"activation={activation!r} is unknown; it must be None or 'silu'")
        act = Activation.kSilu
    cdef int typenum = cnp.PyArray_TYPE(x)
    w = _check_param(weight, "weight", C, typenum)
    b = _check_param(bias, "bias", C, typenum)
    cdef cnp.ndarray out_arr
    cdef int i
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        out_arr = out
        if cnp.PyArray_NDIM(out_arr) != ndim or any_dim_differs(out_arr, x):
            raise ValueError(f"out has shape {out.shape}; it must match the input's shape {(<object>x).shape}")
        if cnp.PyArray_TYPE(out_arr) != typenum or not cnp.PyArray_ISNOTSWAPPED(out_arr):
            raise ValueError(f"out has dtype {out.dtype}; it must match the input's dtype {(<object>x).dtype}")
        if not cnp.PyArray_ISWRITEABLE(out_arr):
            raise ValueError("out is read-only; it must be writeable")

    cdef Py_ssize_t size = cnp.PyArray_SIZE(x)
    if size == 0:
        return out if out is not None else np.empty_like(x)

    cdef Problem problem
    problem.N = dims[0]
    problem.C = C
    problem.G = G
    problem.HxW = size // (dims[0] * C)
    problem.activation = act
    problem.eps = eps_value
    problem.num_threads = 0

    # Axis orders: channels-first reads (N, C, spatial...), channels-last (N, spatial..., C).
    cdef int first_order[32]
    cdef int last_order[32]
    cdef int k = 2
    first_order[0] = 0
    first_order[1] = ax
    last_order[0] = 0
    last_order[ndim - 1] = ax
    for i in range(1, ndim):
        if i != ax:
            first_order[k] = i
            last_order[k - 1] = i
            k += 1
    cdef bint channels_last
    cdef bint native = True
    # With one position per channel both layouts coincide; channels-last vectorises across C.
    if problem.HxW > 1 and _contiguous_in_order(x, first_order, ndim):
        channels_last = False
    elif _contiguous_in_order(x, last_order, ndim):
        channels_last = True
    else:
        channels_last = False
        native = _contiguous_in_order(x, first_order, ndim)
    cdef const int* order = &first_order[0]
    if channels_last:
        order = &last_order[0]
    problem.layout = Layout.kChannelsLast if channels_last else Layout.kChannelsFirst

    cdef cnp.ndarray x_src = x if native else _empty_in_order(x, order, ndim)
    if not native:
        cnp.PyArray_CopyInto(x_src, x)  # the one copy of an odd layout

    # Write straight into the result when its memory has the kernel's layout and cannot clobber input
    # still to be read; otherwise compute into a scratch array and copy.
    cdef cnp.ndarray result
    if out is not None:
        result = out_arr
    elif native:
        result = _empty_in_order(x, order, ndim)
    else:
        result = np.empty_like(x)
    cdef bint direct = _contiguous_in_order(result, order, ndim)
    if direct and out is not None and native and _overlap(result, x):
        direct = _same_view(result, x)
    cdef cnp.ndarray y_dst = result if direct else _empty_in_order(x, order, ndim)

    cdef const void* x_ptr = cnp.PyArray_DATA(x_src)
    cdef void* y_ptr = cnp.PyArray_DATA(y_dst)
    cdef const void* w_ptr = cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    cdef const void* b_ptr = cnp.PyArray_DATA(<cnp.ndarray>b) if b is not None else NULL
    cdef DType dtype = DType.kFloat32 if typenum == cnp.NPY_FLOAT32 else DType.kFloat64
    cdef Status status
    with nogil:
        status = group_norm_forward(problem, dtype, x_ptr, w_ptr, b_ptr, y_ptr, NULL, NULL)
    if status != kOk:
        _raise_status(status)
    if not direct:
        cnp.PyArray_CopyInto(result, y_dst)
    return result


cdef bint any_dim_differs(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int i
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(b)[i]:
            return True
    return False
