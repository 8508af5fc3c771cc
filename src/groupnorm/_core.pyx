# _core.pyx — the NumPy-facing layer of groupnorm: argument validation, layout choice, and the nogil call
# into the C++ kernels. Every check runs before any output byte is written. Arrays are read through the
# NumPy C-API (PyArray_DATA and friends): a typed memoryview costs ~0.18 us per array to acquire, which a
# 2 us budget for a [16, 32] call cannot absorb four times over.
# cython: language_level=3, embedsignature=True
from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.stdlib cimport free
from libc.string cimport memmove
from libc.stdint cimport int64_t, intptr_t
cimport numpy as cnp

import numbers
import operator
import warnings

import numpy as np

from ._dlpack import BFLOAT16_STORAGE
from ._groupnorm cimport (
    Problem, Status, kOk, kOutOfMemory, kUnsupported, Layout, Activation, DType, Isa,
    group_norm_forward as c_group_norm_forward, group_norm_backward as c_group_norm_backward,
    get_num_threads as c_get_num_threads, set_num_threads as c_set_num_threads, fork_serial as c_fork_serial,
    openmp_enabled, isa_name, isa_compiled, isa_supported, isa_current, isa_select,
)

cdef extern from "numpy/ndarraytypes.h":
    int NPY_USERDEF  # type numbers from here on are user dtypes (ml_dtypes.bfloat16 among them)

cdef extern from "numpy/arrayobject.h":
    ctypedef struct _Descr "PyArray_Descr"
    # Steals a reference to descr.
    object _PyArray_Empty "PyArray_Empty"(int nd, cnp.npy_intp* dims, _Descr* descr, int fortran)
    # Steals a reference to descr; data is borrowed (the caller sets a base that owns it).
    PyTypeObject PyArray_Type
    object _PyArray_NewFromDescr "PyArray_NewFromDescr"(PyTypeObject* subtype, _Descr* descr, int nd,
                                                         cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                                         int flags, void* obj)

cdef extern from "<stdlib.h>" nogil:
    void* aligned_alloc(size_t alignment, size_t size)  # C11 / C++17

cdef extern from *:
    """
    #ifndef GROUPNORM_VERSION
    #define GROUPNORM_VERSION "0+unknown"
    #endif
    #ifndef GROUPNORM_CUDA_NOTE
    #define GROUPNORM_CUDA_NOTE "no CUDA backend was configured"
    #endif
    #ifndef GROUPNORM_JAX_NOTE
    #define GROUPNORM_JAX_NOTE "no JAX custom calls were configured"
    #endif
    #ifndef GROUPNORM_TORCH_NOTE
    #define GROUPNORM_TORCH_NOTE "no C++ autograd node was configured"
    #endif
    """
    const char* GROUPNORM_VERSION
    const char* GROUPNORM_CUDA_NOTE
    const char* GROUPNORM_JAX_NOTE
    const char* GROUPNORM_TORCH_NOTE

__version__ = GROUPNORM_VERSION.decode()
# "built" when this build has groupnorm._cuda; otherwise why not (CMake's GROUPNORM_CUDA, or no CUDA compiler).
CUDA_BUILD_NOTE = GROUPNORM_CUDA_NOTE.decode()
# "built" when this build has groupnorm/_jax_ffi.so (groupnorm.jax's custom calls); otherwise why not.
JAX_BUILD_NOTE = GROUPNORM_JAX_NOTE.decode()
# "built for torch <version>" when this build has groupnorm/_torch_node.so (groupnorm.torch's C++ autograd node);
# otherwise why not.
TORCH_BUILD_NOTE = GROUPNORM_TORCH_NOTE.decode()

cnp.import_array()

cdef object _float32 = np.dtype(np.float32)
cdef object _float64 = np.dtype(np.float64)
# bfloat16 arrives as ml_dtypes.bfloat16 (a NumPy user dtype) or, from a DLPack producer when ml_dtypes is
# absent, as groupnorm._dlpack's one-field structured dtype over the raw bits.
cdef object _bfloat16_storage = BFLOAT16_STORAGE
cdef int _bfloat16_typenum = -1  # ml_dtypes.bfloat16's type number, once one has been seen
cdef str _SUPPORTED_DTYPES = "float16, bfloat16, float32 and float64"
cdef tuple _ISA_NAMES = ("scalar", "avx2", "avx512", "neon", "avx512_bf16")
cdef tuple _ISAS = (Isa.kScalar, Isa.kAvx2, Isa.kAvx512, Isa.kNeon, Isa.kAvx512Bf16)

# Layout codes of the (N, C, spatial...) view of an array.
cdef enum:
    LAYOUT_CHANNELS_FIRST = 0
    LAYOUT_CHANNELS_LAST = 1
    LAYOUT_OTHER = -1


# ----------------------------------------------------------------------------------------------- threads

def get_num_threads():
    """Number of OpenMP threads a call uses.

    The value given to :func:`set_num_threads`, else OpenMP's default in the calling thread
    (``OMP_NUM_THREADS``, or a ``threadpoolctl`` limit), else the number of cores; and 1 in a process
    forked (``os.fork``, multiprocessing's ``'fork'`` start method) from one that uses GNU OpenMP, whose
    worker threads do not survive ``fork()``: a team of threads there would wait for them forever (as torch's
    own kernels do), so every call runs on its calling thread. Workers started with ``'spawn'`` or
    ``'forkserver'`` keep their threads.

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
    count = _index(n, "n", "an integer or None")
    if count < 0:
        raise ValueError(f"n={count} must be >= 0 (0 or None restores the OpenMP default)")
    if count > 1 and c_fork_serial():
        warnings.warn(f"groupnorm.set_num_threads({count}) has no effect in this process: it was forked from one "
                      f"that uses GNU OpenMP, whose threads fork() does not copy, so groupnorm runs on one thread "
                      f"here; start workers with multiprocessing's 'spawn' or 'forkserver' method for more",
                      RuntimeWarning, stacklevel=2)
    c_set_num_threads(min(count, 1 << 16))


def fork_serial():
    """Whether this process is a fork of one that uses GNU OpenMP, so that every call runs on one thread."""
    return bool(c_fork_serial())


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


def _cpu_entry_points():
    """The addresses of the C++ core's group_norm_forward and group_norm_backward: groupnorm.jax binds its CPU
    custom calls to them, and groupnorm.torch its C++ autograd node, so that this one core, with its ISA level and
    thread count, serves JAX and that node too."""
    return <size_t>&c_group_norm_forward, <size_t>&c_group_norm_backward


def openmp():
    return bool(openmp_enabled())


# ------------------------------------------------------------------------------------------- validation

cdef int _MAX_DIMS = 32


cdef str _repr_short(object value):
    """repr(value), but a huge integer by its size: Python refuses to print one of over 4300 digits."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"
    return repr(value)


cdef object _as_array(object value, str name):
    """np.asarray(value); what NumPy cannot convert (a ragged nested list, ...) raises naming `name`."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(
            f"{name} cannot be converted to an array: {e}") from None


cdef int _dtype_code(cnp.ndarray x) except -2:
    """The DType of x's elements, or -1 for a dtype the kernels do not take."""
    global _bfloat16_typenum
    cdef int typenum = cnp.PyArray_TYPE(x)
    if typenum == cnp.NPY_FLOAT32:
        return <int>DType.kFloat32
    if typenum == cnp.NPY_FLOAT64:
        return <int>DType.kFloat64
    if typenum == cnp.NPY_FLOAT16:
        return <int>DType.kFloat16
    if typenum == cnp.NPY_VOID or typenum >= NPY_USERDEF:
        return _bfloat16_code((<object>x).dtype, typenum)
    return -1


cdef int _bfloat16_code(object dtype, int typenum) except -2:
    global _bfloat16_typenum
    if typenum == _bfloat16_typenum:
        return <int>DType.kBFloat16
    if typenum == cnp.NPY_VOID:
        return <int>DType.kBFloat16 if dtype == _bfloat16_storage else -1
    if typenum >= NPY_USERDEF and dtype.name == "bfloat16" and dtype.itemsize == 2:
        _bfloat16_typenum = typenum
        return <int>DType.kBFloat16
    return -1


cdef int _compute_typenum(int code) noexcept:
    """Type number of the parameters and statistics of data of DType `code`: float64 only for float64."""
    return cnp.NPY_FLOAT64 if code == <int>DType.kFloat64 else cnp.NPY_FLOAT32


cdef object _as_float(object a, int typenum):
    """a (any real or bfloat16 array) as a C-contiguous, aligned array of float32 / float64."""
    dtype = np.float64 if typenum == cnp.NPY_FLOAT64 else np.float32
    if a.dtype.num == cnp.NPY_VOID and a.dtype == _bfloat16_storage:
        a = (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if cnp.PyArray_ISALIGNED(<cnp.ndarray>a) else a.copy()  # the kernels take aligned pointers only


cdef bint _is_real(object dtype):
    """dtype holds real numbers: float, integer, or bfloat16."""
    return dtype.kind in "fiu" or (dtype.itemsize == 2 and _bfloat16_code(dtype, dtype.num) >= 0)


cdef object _check_input(object input, str name, str func):
    """`input` (called `name` in messages, an argument of `func`) as a float16/bfloat16/float32/float64 ndarray
    of >= 2 dims, native byte order and aligned (else TypeError/ValueError)."""
    cdef object x
    if type(input) is np.ndarray:
        x = input
    elif isinstance(input, (str, bytes)):
        raise TypeError(f"{name} must be an array of {_SUPPORTED_DTYPES}, got {type(input).__name__} {input!r}")
    elif isinstance(input, np.ndarray):
        x = input
    else:
        x = _as_array(input, name)
    if _dtype_code(<cnp.ndarray>x) < 0:
        raise TypeError(f"{name} has dtype {x.dtype}; {func} supports {_SUPPORTED_DTYPES}")
    if cnp.PyArray_NDIM(<cnp.ndarray>x) < 2:
        raise ValueError(f"{name} has shape {x.shape} ({x.ndim} dimension(s)); it needs at least 2: (N, C, *)")
    if cnp.PyArray_NDIM(<cnp.ndarray>x) > _MAX_DIMS:
        raise ValueError(f"{name} has {x.ndim} dimensions; at most {_MAX_DIMS} are supported")
    if not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>x) or not cnp.PyArray_ISALIGNED(<cnp.ndarray>x):
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="K")  # native, aligned copy
    return x


def _index(value, str name, str kind="an integer"):
    """value as a Python integer (operator.index), not bool; else a TypeError naming `name` and what it must be
    (`kind`). Shared by every integer argument of the package, the layer's included."""
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be {kind}, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be {kind}") from None


cdef Py_ssize_t _check_int(object value, str name) except? -1:
    """value as an integer (not bool) that fits in a Py_ssize_t."""
    if type(value) is not int:
        value = _index(value, name)
    try:
        return value
    except OverflowError:
        raise ValueError(f"{name}={_repr_short(value)} is out of range; it must fit in a signed "
                         f"{8 * sizeof(Py_ssize_t)}-bit integer") from None


cdef object _check_param(object value, str name, Py_ssize_t C, int typenum):
    """weight / bias as a contiguous (C,) array of type number `typenum` (the compute type), or None."""
    if value is None:
        return None
    if (type(value) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>value) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>value) == 1 and cnp.PyArray_DIMS(<cnp.ndarray>value)[0] == C
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>value) and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>value)):
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an array of {C} real numbers, got {type(value).__name__} {value!r}")
    a = value if isinstance(value, np.ndarray) else _as_array(value, name)
    if not _is_real(a.dtype):
        raise TypeError(f"{name} has dtype {a.dtype}; it must hold real numbers (float or integer)")
    if a.ndim != 1 or a.shape[0] != C:
        raise ValueError(f"{name} has shape {a.shape}; it must be ({C},), one value per channel")
    return _as_float(a, typenum)


cdef object _check_stats(object value, str name, Py_ssize_t N, Py_ssize_t G, int typenum):
    """mean / rstd of the forward as a C-contiguous (N, G) array of type number `typenum` (the compute type)."""
    if (type(value) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>value) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>value) == 2 and cnp.PyArray_DIMS(<cnp.ndarray>value)[0] == N
            and cnp.PyArray_DIMS(<cnp.ndarray>value)[1] == G
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>value) and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>value)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>value)):
        return value
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an array of shape ({N}, {G}) (N, num_groups) as group_norm_forward "
                        f"returns it, got {type(value).__name__} {value!r}")
    a = value if isinstance(value, np.ndarray) else _as_array(value, name)
    if not _is_real(a.dtype):
        raise TypeError(f"{name} has dtype {a.dtype}; it must hold real numbers (float or integer)")
    if a.shape != (N, G):
        raise ValueError(f"{name} has shape {a.shape}; it must be ({N}, {G}), one value per sample and group "
                         f"(N, num_groups), as group_norm_forward returns it")
    return _as_float(a, typenum)


cdef double _check_eps(object eps) except? -1.0:
    """eps as a non-negative double."""
    cdef double eps_value
    if type(eps) is float:
        eps_value = eps
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps={eps!r} must be a real number")
    else:
        try:
            eps_value = float(eps)
        except OverflowError:
            raise ValueError(f"eps={_repr_short(eps)} is too large to convert to a float") from None
    if not (eps_value >= 0.0):
        raise ValueError(f"eps={eps!r} must be non-negative (and not NaN)")
    return eps_value


def _check_activation(activation):
    """Whether `activation` asks for SiLU (True) or nothing (False, for None); else the error naming it. Shared with
    groupnorm._gpu."""
    if activation is None:
        return False
    if not isinstance(activation, str):
        raise TypeError(f"activation={activation!r} must be None or a string")
    if activation != "silu":
        raise ValueError(f"activation={activation!r} is unknown; it must be None or 'silu'")
    return True


def _refuse_stream(stream, input):
    """The error for a ``stream=`` given with CPU arrays (shared with groupnorm._interop)."""
    raise ValueError(f"stream={stream!r} names a CUDA stream, but input is a CPU array ({type(input).__module__}."
                     f"{type(input).__name__}); stream= applies to arrays in CUDA memory only: pass None")


def _check_eps_value(eps):
    """eps as a non-negative float, with the messages of every function here (groupnorm._gpu's checks)."""
    return _check_eps(eps)


# What a kernel call needs to know of its input: the problem and the order in which it reads memory.
cdef struct _Plan:
    Problem problem
    int ndim
    int dtype         # the data's DType
    int typenum       # type number of parameters and statistics: float64 for float64 data, else float32
    bint native       # the input's memory is already C-contiguous in `order`
    int order[32]     # axes in memory order: (N, C, spatial...) channels-first or (N, spatial..., C) last


cdef inline int _plan_activation(object activation, _Plan* plan) except -1:
    """The plan's activation from the argument (_check_activation's rules), with no call for the default None."""
    if activation is not None and _check_activation(activation):
        plan.problem.activation = Activation.kSilu
    return 0


cdef int _check_shape(cnp.ndarray x, object num_groups, object channel_axis, _Plan* plan) except -1:
    """Checks channel_axis and num_groups against x and fills plan's shape; returns the channel axis."""
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
    cdef Py_ssize_t size = cnp.PyArray_SIZE(x)
    plan.ndim = ndim
    plan.dtype = _dtype_code(x)
    plan.typenum = _compute_typenum(plan.dtype)
    plan.problem.N = dims[0]
    plan.problem.C = C
    plan.problem.G = G
    plan.problem.HxW = size // (dims[0] * C) if size != 0 else 0
    plan.problem.layout = Layout.kChannelsFirst
    plan.problem.activation = Activation.kNone
    plan.problem.eps = 1e-5
    plan.problem.num_threads = 0
    return <int>ax


cdef void _choose_layout(cnp.ndarray x, int ax, _Plan* plan) noexcept:
    """Picks the kernel layout for a non-empty x: channels-first or channels-last when x's memory is one of
    them (native), else channels-first after one copy."""
    cdef int ndim = plan.ndim
    cdef int first_order[32]
    cdef int last_order[32]
    cdef int i, k = 2
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
    plan.native = True
    # With one position per channel both layouts coincide; channels-last vectorises across C.
    if plan.problem.HxW > 1 and _contiguous_in_order(x, first_order, ndim):
        channels_last = False
    elif _contiguous_in_order(x, last_order, ndim):
        channels_last = True
    else:
        channels_last = False
        plan.native = _contiguous_in_order(x, first_order, ndim)
    plan.problem.layout = Layout.kChannelsLast if channels_last else Layout.kChannelsFirst
    for i in range(ndim):
        plan.order[i] = last_order[i] if channels_last else first_order[i]


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


# Results of at least this many bytes start on a cache line: a channels-last apply whose vector stores straddle
# two lines runs 15-25% slower ([1,320,64,64] float16 and float32, 2 threads), and malloc gives 16 bytes.
cdef cnp.npy_intp _ALIGNED_BYTES = 1 << 16
cdef size_t _CACHE_LINE = 64

# Freed result buffers kept for the next call of the same size: past glibc's 32 MiB mmap ceiling every
# allocation is fresh pages that the kernel zeroes and faults in one by one, which cost a [1,128,256,256] float32
# call (33.5 MB) as much as its kernel (7.4 ms against 4.1 ms into a reused buffer, 2 threads). Bounded: at most
# _POOL_SLOTS buffers of at most _POOL_MAX_BUFFER bytes each, _POOL_MAX_TOTAL in all; the GIL guards the pool.
# Slots for a network's worth of sizes, each with its output and its gradient alive at once: with 4, a training
# loop over four sizes (bench_training.py's cases) evicted a buffer most steps, and every miss paid fresh pages
# and every eviction an munmap ([1,256,56,56] G1 forward+backward: 1.1 ms alone, 2-3.4 ms in that loop).
cdef enum:
    _POOL_SLOTS = 16
cdef size_t _POOL_MIN_BUFFER = 1 << 20
cdef size_t _POOL_MAX_BUFFER = 1 << 27
cdef size_t _POOL_MAX_TOTAL = 1 << 28
cdef void* _pool_ptr[_POOL_SLOTS]  # slots [0, _pool_count) hold buffers, least recently freed first
cdef size_t _pool_bytes[_POOL_SLOTS]
cdef int _pool_count = 0
cdef size_t _pool_total = 0


cdef void* _pool_remove(int i) noexcept:
    """Takes slot i out of the pool (the later slots move up) and returns its buffer."""
    global _pool_count, _pool_total
    cdef void* ptr = _pool_ptr[i]
    _pool_total -= _pool_bytes[i]
    _pool_count -= 1
    memmove(&_pool_ptr[i], &_pool_ptr[i + 1], (_pool_count - i) * sizeof(void*))
    memmove(&_pool_bytes[i], &_pool_bytes[i + 1], (_pool_count - i) * sizeof(size_t))
    return ptr


cdef void* _pool_take(size_t nbytes) noexcept:
    """The most recently freed cached buffer of exactly nbytes (the pool's sizes are results' sizes), else NULL.
    The newest is the one still in cache: taking the oldest made a loop alternate between two buffers of a size
    once two results of that size had been alive at once, twice the memory a call streams ([8,64,4096] float32,
    2 threads: 530-550 us against 400-430 with one buffer, in bench_forward.py's all-case run)."""
    cdef int i
    for i in range(_pool_count - 1, -1, -1):
        if _pool_bytes[i] == nbytes:
            return _pool_remove(i)
    return NULL


cdef void _pool_give(void* ptr, size_t nbytes) noexcept:
    """Keeps ptr for a later call when it is within the pool's bounds (evicting the oldest as needed), else
    frees it."""
    global _pool_count, _pool_total
    if nbytes < _POOL_MIN_BUFFER or nbytes > _POOL_MAX_BUFFER:
        free(ptr)
        return
    while _pool_count == _POOL_SLOTS or _pool_total + nbytes > _POOL_MAX_TOTAL:
        free(_pool_remove(0))
    _pool_ptr[_pool_count] = ptr
    _pool_bytes[_pool_count] = nbytes
    _pool_count += 1
    _pool_total += nbytes


cdef void _pool_clear() noexcept:
    while _pool_count > 0:
        free(_pool_remove(0))


def _result_pool():
    """(buffers, bytes) the pool of freed results holds now; for tests."""
    return _pool_count, _pool_total


cdef class _ResultBuffer:
    """Owns the memory of a large result (its ndarray's base): 64-byte aligned, from and back to the pool."""
    cdef void* ptr
    cdef size_t nbytes

    def __dealloc__(self):
        if self.ptr != NULL:
            _pool_give(self.ptr, self.nbytes)


cdef size_t _result_offset(const char* base, const void* source, const void* other) noexcept:
    """Where a result's data starts in a buffer at `base` that has a spare page: the multiple of 64 bytes
    that puts it closest to half a page from `source` (and `other`, when not NULL) modulo 4 KiB. A load that
    follows a store to the same offset in a page (on some CPUs, in a MiB) waits for that store ("4K aliasing");
    a result a few bytes past its input that way made a forward 2-3x slower, and a backward 2x ([8,64,4096]
    float16, 2 threads: 658 against 294-310 us)."""
    cdef size_t best = 0, worst, best_worst = 4096, c, d
    cdef size_t s0 = <size_t>(<const char*>source - base) % 4096
    cdef size_t s1 = <size_t>(<const char*>other - base) % 4096 if other != NULL else s0
    for c in range(0, 4096, _CACHE_LINE):
        d = (c + 4096 - s0) % 4096
        worst = d - 2048 if d >= 2048 else 2048 - d
        d = (c + 4096 - s1) % 4096
        worst = max(worst, d - 2048 if d >= 2048 else 2048 - d)
        if worst < best_worst:
            best, best_worst = c, worst
    return best


cdef object _empty_cache_aligned(int ndim, cnp.npy_intp* dims, object descr, cnp.npy_intp nbytes,
                                 const void* source, const void* other):
    """A new C-contiguous array of dtype descr and shape dims whose data starts on a 64-byte boundary, half a
    page from source's (and other's) modulo 4 KiB (_result_offset), owned by a _ResultBuffer (its base)."""
    cdef _ResultBuffer owner = _ResultBuffer.__new__(_ResultBuffer)
    cdef size_t size = ((<size_t>nbytes + _CACHE_LINE - 1) // _CACHE_LINE) * _CACHE_LINE + 4096
    cdef void* ptr = _pool_take(size)
    if ptr == NULL:
        ptr = aligned_alloc(_CACHE_LINE, size)
    if ptr == NULL:  # drop what the pool holds and try once more
        _pool_clear()
        ptr = aligned_alloc(_CACHE_LINE, size)
    if ptr == NULL:
        raise MemoryError(f"cannot allocate {nbytes} bytes for the result")
    owner.ptr = ptr
    owner.nbytes = size
    cdef char* data = <char*>ptr + _result_offset(<const char*>ptr, source, other)
    Py_INCREF(descr)  # PyArray_NewFromDescr steals it
    cdef cnp.ndarray arr = _PyArray_NewFromDescr(&PyArray_Type, <_Descr*>descr, ndim, dims, NULL, data,
                                                  cnp.NPY_ARRAY_CARRAY, NULL)
    cnp.set_array_base(arr, owner)
    return arr


cdef object _empty_in_order(cnp.ndarray like, const int* order, int ndim, const void* other=NULL):
    """A new array shaped like `like` whose memory is C-contiguous in the axis order `order`; a large one starts
    half a page from like's data (and other's, when given) modulo 4 KiB."""
    cdef cnp.npy_intp dims[32]
    cdef cnp.PyArray_Dims perm
    cdef cnp.npy_intp inverse[32]
    cdef int i
    cdef bint identity = True
    for i in range(ndim):
        dims[i] = cnp.PyArray_DIMS(like)[order[i]]
        inverse[order[i]] = i
        identity = identity and order[i] == i
    cdef int typenum = cnp.PyArray_TYPE(like)
    if cnp.PyArray_NBYTES(like) >= _ALIGNED_BYTES:
        arr = _empty_cache_aligned(ndim, dims, (<object>like).dtype, cnp.PyArray_NBYTES(like),
                                   cnp.PyArray_DATA(like), other)
    elif typenum != cnp.NPY_VOID and typenum < NPY_USERDEF:
        arr = cnp.PyArray_EMPTY(ndim, dims, typenum, 0)
    else:  # a structured or user dtype is more than its type number
        descr = (<object>like).dtype
        Py_INCREF(descr)  # PyArray_Empty steals it
        arr = _PyArray_Empty(ndim, dims, <_Descr*>descr, 0)
    if identity:
        return arr
    perm.ptr = inverse
    perm.len = ndim
    return cnp.PyArray_Transpose(<cnp.ndarray>arr, &perm)


cdef cnp.ndarray _in_order(cnp.ndarray a, _Plan* plan):
    """a itself when its memory is C-contiguous in plan's order, else its one copy in that order."""
    if _contiguous_in_order(a, plan.order, plan.ndim):
        return a
    cdef cnp.ndarray copy = _empty_in_order(a, plan.order, plan.ndim)
    cnp.PyArray_CopyInto(copy, a)
    return copy


cdef cnp.ndarray _new_like(cnp.ndarray x, _Plan* plan, const void* other=NULL):
    """A new array with x's shape, dtype and memory layout (in plan's order when x's memory is)."""
    if _contiguous_in_order(x, plan.order, plan.ndim):
        return _empty_in_order(x, plan.order, plan.ndim, other)
    return np.empty_like(x)


cdef object _interop_module = None


cdef object _interop():
    """groupnorm._interop, imported on the first foreign call (it imports this module) and kept."""
    global _interop_module
    if _interop_module is None:
        from . import _interop as module
        _interop_module = module
    return _interop_module


cdef inline bint _foreign(object obj):
    """obj is another framework's array that speaks DLPack (the call then goes through groupnorm._interop)."""
    return (obj is not None and type(obj) is not np.ndarray and hasattr(type(obj), "__dlpack__")
            and not isinstance(obj, np.ndarray))


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
               channel_axis=1, out=None, stream=None):
    """Group Normalization over the channels of each sample, as ``torch.nn.functional.group_norm``.

    For every sample ``n`` and group ``g`` (channels ``g*C/G`` to ``(g+1)*C/G - 1`` together with all
    trailing positions) computes ``y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]`` with the
    biased variance, optionally followed by ``y * sigmoid(y)``.

    Parameters
    ----------
    input : array_like, shape (N, C, *)
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64, at least 2 dimensions, any memory
        layout. Contiguous and channels-last arrays are read in place; other layouts are copied once.
        float16 and bfloat16 compute in float32 and round the result to nearest. Any array with
        ``__dlpack__`` in CPU memory (torch, JAX, CuPy host arrays, ...) is read without a copy, and then
        the result is of the same kind (see Returns).
    num_groups : int
        Number of groups G; it must divide C. ``1`` gives LayerNorm over (C, *), ``C`` InstanceNorm.
    weight, bias : array_like, shape (C,), optional
        Per-channel scale and shift, each optional on its own; converted to the compute dtype (float64
        for float64 input, float32 otherwise).
    eps : float, default 1e-5
        Added to the variance; non-negative.
    activation : {None, 'silu'}, optional
        ``'silu'`` fuses ``y * sigmoid(y)`` into the same pass.
    channel_axis : int, default 1
        The axis holding C (``-1`` for NHWC / NWC arrays). The batch axis is always 0.
    out : numpy.ndarray, optional
        Where to write the result: same shape and dtype as the input, writeable. May be the input
        itself (in place); any other overlap with the input is handled through a scratch copy.
    stream : optional
        For arrays in CUDA memory only: the stream to queue the kernels on, instead of the framework's
        current stream (torch's ``torch.cuda.current_stream()``): an integer ``cudaStream_t`` (0, 1 and
        2 are the default, legacy default and per-thread default streams, as in DLPack), a
        ``torch.cuda.Stream``, a CuPy stream or any object with ``__cuda_stream__``. The results are
        allocated for that stream; ordering it against the caller's other streams is the caller's part.
        Must be None for CPU arrays.

    Returns
    -------
    numpy.ndarray or the input's kind of array
        The normalised array (``out`` if given), with the input's shape, dtype and memory layout: a NumPy
        array for NumPy input, a torch tensor (channels_last kept) for a torch tensor, a JAX array for a JAX
        array, an object with ``__dlpack__`` for any other DLPack producer.

    Raises
    ------
    TypeError
        A wrong type: a non-integer ``num_groups``, an input that is not float16/bfloat16/float32/float64, ...
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
    if _foreign(input) or _foreign(weight) or _foreign(bias) or _foreign(out):
        return _interop().group_norm(input, num_groups, weight, bias, eps, activation, channel_axis, out, stream)
    if stream is not None:
        _refuse_stream(stream, input)
    cdef _Plan plan
    cdef cnp.ndarray x = _check_input(input, "input", "group_norm")
    cdef int ax = _check_shape(x, num_groups, channel_axis, &plan)
    plan.problem.eps = _check_eps(eps)
    _plan_activation(activation, &plan)
    cdef int typenum = plan.typenum
    w = _check_param(weight, "weight", plan.problem.C, typenum)
    b = _check_param(bias, "bias", plan.problem.C, typenum)
    cdef cnp.ndarray out_arr
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        out_arr = out
        if cnp.PyArray_NDIM(out_arr) != plan.ndim or any_dim_differs(out_arr, x):
            raise ValueError(f"out has shape {out.shape}; it must match the input's shape {(<object>x).shape}")
        if _dtype_code(out_arr) != plan.dtype or not cnp.PyArray_ISNOTSWAPPED(out_arr):
            raise ValueError(f"out has dtype {out.dtype}; it must match the input's dtype {(<object>x).dtype}")
        if not cnp.PyArray_ISWRITEABLE(out_arr):
            raise ValueError("out is read-only; it must be writeable")

    if cnp.PyArray_SIZE(x) == 0:
        return out if out is not None else np.empty_like(x)
    _choose_layout(x, ax, &plan)
    cdef bint native = plan.native
    cdef cnp.ndarray x_src = x if native else _in_order(x, &plan)  # the one copy of an odd layout

    # Write straight into the result when its memory has the kernel's layout and cannot clobber input
    # still to be read; otherwise compute into a scratch array and copy.
    cdef cnp.ndarray result
    if out is not None:
        result = out_arr
    elif native:
        result = _empty_in_order(x, plan.order, plan.ndim)
    else:
        result = np.empty_like(x)
    # A misaligned `out` is written through scratch too: the kernels take aligned pointers only.
    cdef bint direct = _contiguous_in_order(result, plan.order, plan.ndim) and cnp.PyArray_ISALIGNED(result)
    if direct and out is not None and native and _overlap(result, x):
        direct = _same_view(result, x)
    # weight and bias are read while y is written: an out= over their memory also goes through scratch.
    if direct and out is not None and ((w is not None and _overlap(result, <cnp.ndarray>w))
                                       or (b is not None and _overlap(result, <cnp.ndarray>b))):
        direct = False
    cdef cnp.ndarray y_dst = result if direct else _empty_in_order(x, plan.order, plan.ndim)

    cdef const void* x_ptr = cnp.PyArray_DATA(x_src)
    cdef void* y_ptr = cnp.PyArray_DATA(y_dst)
    cdef const void* w_ptr = cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    cdef const void* b_ptr = cnp.PyArray_DATA(<cnp.ndarray>b) if b is not None else NULL
    cdef DType dtype = <DType>plan.dtype
    cdef Status status
    with nogil:
        status = c_group_norm_forward(plan.problem, dtype, x_ptr, w_ptr, b_ptr, y_ptr, NULL, NULL)
    if status != kOk:
        _raise_status(status)
    if not direct:
        cnp.PyArray_CopyInto(result, y_dst)
    return result


def group_norm_forward(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, stream=None):
    """Group Normalization that also returns the statistics its backward pass needs.

    The same computation as :func:`group_norm` (channels on axis 1), plus each group's mean and
    ``rstd = 1 / sqrt(var + eps)``, as ``torch.native_group_norm`` returns them.

    Parameters
    ----------
    input : array_like, shape (N, C, *)
        float16, bfloat16, float32 or float64, at least 2 dimensions, any memory layout (contiguous and
        channels-last are read in place, others copied once).
    num_groups : int
        Number of groups G; it must divide C.
    weight, bias : array_like, shape (C,), optional
        Per-channel scale and shift, converted to the compute dtype (float64 for float64 input, else float32).
    eps : float, default 1e-5
        Added to the (biased) variance; non-negative.
    activation : {None, 'silu'}, optional
        ``'silu'`` fuses ``y * sigmoid(y)`` into the same pass; pass the same ``activation`` and ``bias``
        to :func:`group_norm_backward`.

    Returns
    -------
    y : numpy.ndarray
        The normalised array (after the activation), with the input's shape, dtype and memory layout.
    mean, rstd : numpy.ndarray, shape (N, G)
        Per sample and group: the mean and ``1 / sqrt(var + eps)``, float64 for float64 input and float32
        otherwise. Pass them to :func:`group_norm_backward`.

    Raises
    ------
    TypeError
        A wrong type: a non-integer ``num_groups``, an input that is not float16/bfloat16/float32/float64, ...
    ValueError
        A wrong value: ``num_groups`` not dividing C, weight of the wrong shape, negative ``eps``, ...

    Examples
    --------
    >>> import numpy as np, groupnorm as gn
    >>> x = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    >>> y, mean, rstd = gn.group_norm_forward(x, 2)
    >>> mean
    array([[1.5, 5.5]], dtype=float32)
    >>> rstd.round(4)
    array([[0.8944, 0.8944]], dtype=float32)
    >>> np.array_equal(y, gn.group_norm(x, 2))
    True
    """
    if _foreign(input) or _foreign(weight) or _foreign(bias):
        return _interop().group_norm_forward(input, num_groups, weight, bias, eps, activation, stream)
    if stream is not None:
        _refuse_stream(stream, input)
    cdef _Plan plan
    cdef cnp.ndarray x = _check_input(input, "input", "group_norm_forward")
    _check_shape(x, num_groups, 1, &plan)
    plan.problem.eps = _check_eps(eps)
    _plan_activation(activation, &plan)
    cdef int typenum = plan.typenum
    w = _check_param(weight, "weight", plan.problem.C, typenum)
    b = _check_param(bias, "bias", plan.problem.C, typenum)
    cdef cnp.npy_intp stats_dims[2]
    stats_dims[0] = plan.problem.N
    stats_dims[1] = plan.problem.G
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(2, stats_dims, typenum, 0)
    cdef cnp.ndarray rstd = cnp.PyArray_EMPTY(2, stats_dims, typenum, 0)
    if cnp.PyArray_SIZE(x) == 0:  # a group with no element has no mean
        mean.fill(np.nan)
        rstd.fill(np.nan)
        return np.empty_like(x), mean, rstd

    _choose_layout(x, 1, &plan)
    cdef cnp.ndarray x_src = _in_order(x, &plan)
    cdef cnp.ndarray result = _new_like(x, &plan)
    cdef bint direct = _contiguous_in_order(result, plan.order, plan.ndim)
    cdef cnp.ndarray y_dst = result if direct else _empty_in_order(x, plan.order, plan.ndim)
    cdef const void* x_ptr = cnp.PyArray_DATA(x_src)
    cdef void* y_ptr = cnp.PyArray_DATA(y_dst)
    cdef const void* w_ptr = cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    cdef const void* b_ptr = cnp.PyArray_DATA(<cnp.ndarray>b) if b is not None else NULL
    cdef void* mean_ptr = cnp.PyArray_DATA(mean)
    cdef void* rstd_ptr = cnp.PyArray_DATA(rstd)
    cdef DType dtype = <DType>plan.dtype
    cdef Status status
    with nogil:
        status = c_group_norm_forward(plan.problem, dtype, x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr)
    if status != kOk:
        _raise_status(status)
    if not direct:
        cnp.PyArray_CopyInto(result, y_dst)
    return result, mean, rstd


def group_norm_backward(grad_output, input, mean, rstd, num_groups, weight=None, *, bias=None, activation=None,
                        stream=None):
    """Gradients of Group Normalization with respect to its input, weight and bias.

    With ``x_hat = (x - mean) * rstd`` per sample and group, ``M = C/G * prod(spatial)`` elements a
    group and ``w = weight`` (ones if None)::

        grad_input  = rstd * (w*dy - mean_g(w*dy) - x_hat * mean_g(w*dy*x_hat))
        grad_weight = sum over N and spatial of dy * x_hat
        grad_bias   = sum over N and spatial of dy

    where ``mean_g`` averages over the M elements of the group. Sums are centered on the group mean
    (whose low-order part, lost when it was rounded to float32, is recovered from ``input``), so data
    with a large offset keeps its accuracy. Results are bitwise identical for every thread count.

    With ``activation='silu'``, ``grad_output`` is the gradient of the forward's activated output
    ``z = u * sigmoid(u)``, ``u = x_hat * w + b``, and ``dy`` above is ``grad_output * s * (1 + u * (1 - s))``
    with ``s = sigmoid(u)``: u is recomputed from ``input``, the statistics, ``weight`` and ``bias``
    (the forward need not keep it). In float16 and bfloat16, ``dy`` is rounded to the storage dtype
    on the way, as torch's separate ``silu`` and ``group_norm`` round it.

    Parameters
    ----------
    grad_output : array_like, shape (N, C, *)
        The gradient of the loss with respect to the forward's output; the input's shape and dtype.
        Any memory layout; when it differs from the input's it is copied once into the input's.
    input : array_like, shape (N, C, *)
        The forward's input, float16, bfloat16, float32 or float64, any memory layout (contiguous and
        channels-last are read in place).
    mean, rstd : array_like, shape (N, G)
        The statistics :func:`group_norm_forward` returned; converted to the compute dtype.
    num_groups : int
        Number of groups G; it must divide C.
    weight : array_like, shape (C,), optional
        The forward's per-channel scale (ones if None), converted to the compute dtype.
    bias : array_like, shape (C,), optional
        The forward's per-channel shift (zeros if None); read only with an activation.
    activation : {None, 'silu'}, optional
        The forward's activation.

    Returns
    -------
    grad_input : numpy.ndarray
        With the input's shape, dtype and memory layout.
    grad_weight, grad_bias : numpy.ndarray, shape (C,)
        float64 for float64 input and float32 otherwise (the compute dtype), returned whether or not
        ``weight`` was given.

    Raises
    ------
    TypeError
        A wrong type: a non-integer ``num_groups``, an input or grad_output of an unsupported dtype,
        a mean that does not hold numbers, ...
    ValueError
        A wrong value: grad_output of another shape or dtype than the input, mean or rstd not of shape
        (N, G), ``num_groups`` not dividing C, weight of the wrong shape, ...

    Examples
    --------
    >>> import numpy as np, groupnorm as gn
    >>> x = np.arange(8, dtype=np.float64).reshape(1, 4, 2)
    >>> y, mean, rstd = gn.group_norm_forward(x, 2)
    >>> dy = np.ones_like(x)            # the gradient of y.sum()
    >>> dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, 2)
    >>> bool(np.abs(dx).max() < 1e-12)  # y sums to 0 in each group whatever x is
    True
    >>> db
    array([2., 2., 2., 2.])
    >>> dw.round(3)                     # sum of x_hat per channel
    array([-1.789,  1.789, -1.789,  1.789])
    """
    if (_foreign(grad_output) or _foreign(input) or _foreign(mean) or _foreign(rstd) or _foreign(weight)
            or _foreign(bias)):
        return _interop().group_norm_backward(grad_output, input, mean, rstd, num_groups, weight, bias, activation,
                                              stream)
    if stream is not None:
        _refuse_stream(stream, input)
    cdef _Plan plan
    cdef cnp.ndarray x = _check_input(input, "input", "group_norm_backward")
    cdef cnp.ndarray dy = _check_input(grad_output, "grad_output", "group_norm_backward")
    if cnp.PyArray_NDIM(dy) != cnp.PyArray_NDIM(x) or any_dim_differs(dy, x):
        raise ValueError(f"grad_output has shape {(<object>dy).shape}; it must match the input's shape "
                         f"{(<object>x).shape}")
    if _dtype_code(dy) != _dtype_code(x):
        raise ValueError(f"grad_output has dtype {(<object>dy).dtype}; it must match the input's dtype "
                         f"{(<object>x).dtype}")
    _check_shape(x, num_groups, 1, &plan)
    _plan_activation(activation, &plan)
    cdef int typenum = plan.typenum
    w = _check_param(weight, "weight", plan.problem.C, typenum)
    b = _check_param(bias, "bias", plan.problem.C, typenum)
    m = _check_stats(mean, "mean", plan.problem.N, plan.problem.G, typenum)
    r = _check_stats(rstd, "rstd", plan.problem.N, plan.problem.G, typenum)
    cdef cnp.npy_intp C = plan.problem.C
    cdef cnp.ndarray grad_weight = cnp.PyArray_EMPTY(1, &C, typenum, 0)
    cdef cnp.ndarray grad_bias = cnp.PyArray_EMPTY(1, &C, typenum, 0)
    if cnp.PyArray_SIZE(x) == 0:  # sums over no element
        grad_weight.fill(0)
        grad_bias.fill(0)
        return np.empty_like(x), grad_weight, grad_bias

    # The input's layout rules; an odd-layout input follows grad_output's when that one is native.
    cdef _Plan dy_plan
    _choose_layout(x, 1, &plan)
    if not plan.native:
        dy_plan = plan
        _choose_layout(dy, 1, &dy_plan)
        if dy_plan.native:
            plan = dy_plan
    cdef cnp.ndarray x_src = _in_order(x, &plan)
    cdef cnp.ndarray dy_src = _in_order(dy, &plan)
    cdef cnp.ndarray result = _new_like(x, &plan, cnp.PyArray_DATA(dy_src))
    cdef bint direct = _contiguous_in_order(result, plan.order, plan.ndim)
    cdef cnp.ndarray dx_dst = result if direct else _empty_in_order(x_src, plan.order, plan.ndim,
                                                                     cnp.PyArray_DATA(dy_src))
    cdef const void* dy_ptr = cnp.PyArray_DATA(dy_src)
    cdef const void* x_ptr = cnp.PyArray_DATA(x_src)
    cdef const void* mean_ptr = cnp.PyArray_DATA(<cnp.ndarray>m)
    cdef const void* rstd_ptr = cnp.PyArray_DATA(<cnp.ndarray>r)
    cdef const void* w_ptr = cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    cdef const void* b_ptr = cnp.PyArray_DATA(<cnp.ndarray>b) if b is not None else NULL
    cdef void* dx_ptr = cnp.PyArray_DATA(dx_dst)
    cdef void* dw_ptr = cnp.PyArray_DATA(grad_weight)
    cdef void* db_ptr = cnp.PyArray_DATA(grad_bias)
    cdef DType dtype = <DType>plan.dtype
    cdef Status status
    with nogil:
        status = c_group_norm_backward(plan.problem, dtype, dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
                                       dx_ptr, dw_ptr, db_ptr)
    if status != kOk:
        _raise_status(status)
    if not direct:
        cnp.PyArray_CopyInto(result, dx_dst)
    return result, grad_weight, grad_bias


cdef bint any_dim_differs(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int i
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(b)[i]:
            return True
    return False
