# _dlpack.pyx — DLPack (v1.1, and the legacy pre-1.0 capsule) in both directions, for groupnorm._core:
# any __dlpack__ producer becomes a zero-copy NumPy view whose base owns the DLPack tensor (the producer's
# deleter runs exactly once, when the last view dies), and a NumPy result goes back as the caller's kind.
# cython: language_level=3, embedsignature=True
cimport cython
from cpython.ref cimport PyObject, PyTypeObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport INT64_MAX, int64_t, intptr_t
from libc.stdlib cimport free, malloc
cimport numpy as cnp

import importlib
import sys

import numpy as np

cnp.import_array()

cdef extern from "Python.h":
    ctypedef void (*CapsuleDestructor)(PyObject*) noexcept
    object PyCapsule_New(void* pointer, const char* name, CapsuleDestructor destructor)
    bint PyCapsule_IsValid(PyObject* capsule, const char* name) noexcept
    void* PyCapsule_GetPointer(PyObject* capsule, const char* name) noexcept
    int PyCapsule_SetName(object capsule, const char* name) except -1
    int Py_IsInitialized() noexcept nogil

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyArray_Descr
    PyTypeObject PyArray_Type
    # Steals a reference to descr, also when it fails.
    object PyArray_NewFromDescr(PyTypeObject* subtype, PyArray_Descr* descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, PyObject* obj)

# The capsule names of the protocol; a consumer renames the capsule to the "used_" name it takes.
cdef const char* CAPSULE_VERSIONED = b"dltensor_versioned"
cdef const char* CAPSULE_VERSIONED_USED = b"used_dltensor_versioned"
cdef const char* CAPSULE_LEGACY = b"dltensor"
cdef const char* CAPSULE_LEGACY_USED = b"used_dltensor"

# NumPy 2's NPY_MAXDIMS; an older NumPy rejects more than its own 32 dimensions itself.
cdef enum:
    MAX_DIMS = 64

BFLOAT16_STORAGE = np.dtype([("bfloat16", "=u2")])
"""The dtype of bfloat16 arrays when ml_dtypes is not installed: raw 16-bit storage, tagged by name."""

cdef object _float16 = np.dtype(np.float16)
cdef object _float32 = np.dtype(np.float32)
cdef object _float64 = np.dtype(np.float64)
cdef object _bfloat16 = None  # bfloat16_dtype(), once looked up
cdef tuple _FLOAT_TYPENUMS = (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64, cnp.NPY_FLOAT16)  # either byte order

cdef dict _DEVICE_NAMES = {
    kDLCPU: "kDLCPU", kDLCUDA: "kDLCUDA", kDLCUDAHost: "kDLCUDAHost", kDLOpenCL: "kDLOpenCL",
    kDLVulkan: "kDLVulkan", kDLMetal: "kDLMetal", kDLVPI: "kDLVPI", kDLROCM: "kDLROCM",
    kDLROCMHost: "kDLROCMHost", kDLExtDev: "kDLExtDev", kDLCUDAManaged: "kDLCUDAManaged",
    kDLOneAPI: "kDLOneAPI", kDLWebGPU: "kDLWebGPU", kDLHexagon: "kDLHexagon", kDLMAIA: "kDLMAIA",
    18: "kDLTrn",  # added after DLPack 1.1; named so that its message reads well
}

# Type codes whose name carries the width; the others read as name + bits (int32, float16, ...).
cdef dict _DTYPE_CODE_NAMES = {
    kDLInt: "int", kDLUInt: "uint", kDLFloat: "float", kDLOpaqueHandle: "opaque_handle",
    kDLBfloat: "bfloat", kDLComplex: "complex", kDLBool: "bool",
    kDLFloat8_e3m4: "float8_e3m4", kDLFloat8_e4m3: "float8_e4m3", kDLFloat8_e4m3b11fnuz: "float8_e4m3b11fnuz",
    kDLFloat8_e4m3fn: "float8_e4m3fn", kDLFloat8_e4m3fnuz: "float8_e4m3fnuz", kDLFloat8_e5m2: "float8_e5m2",
    kDLFloat8_e5m2fnuz: "float8_e5m2fnuz", kDLFloat8_e8m0fnu: "float8_e8m0fnu",
    kDLFloat6_e2m3fn: "float6_e2m3fn", kDLFloat6_e3m2fn: "float6_e3m2fn", kDLFloat4_e2m1fn: "float4_e2m1fn",
}

cdef str _DTYPE_RULE = "it must be float16, bfloat16, float32 or float64"

# The data pointer of a view of a zero-element tensor that came with data == NULL (never dereferenced).
cdef char _empty_data[1]


def bfloat16_dtype():
    """The NumPy dtype for bfloat16: ``ml_dtypes.bfloat16`` when ml_dtypes imports, else
    :data:`BFLOAT16_STORAGE`.

    Examples
    --------
    >>> from groupnorm import _dlpack
    >>> _dlpack.bfloat16_dtype().itemsize
    2
    """
    global _bfloat16
    if _bfloat16 is None:
        try:  # importlib, unlike Cython's import, honours an import blocked by sys.modules["ml_dtypes"] = None
            ml_dtypes = importlib.import_module("ml_dtypes")
        except ImportError:
            _bfloat16 = BFLOAT16_STORAGE
        else:
            _bfloat16 = np.dtype(ml_dtypes.bfloat16)
    return _bfloat16


cdef bint _is_bfloat16(object dtype):
    """True for ml_dtypes' bfloat16 and for BFLOAT16_STORAGE (without importing ml_dtypes)."""
    if dtype == BFLOAT16_STORAGE:
        return True
    ml_dtypes = sys.modules.get("ml_dtypes")  # no array can hold its bfloat16 before it is imported
    return ml_dtypes is not None and dtype == ml_dtypes.bfloat16


cdef str _device_name(object device_type, object device_id):
    """`kDLCUDA:0`-style name of a DLPack device."""
    name = _DEVICE_NAMES.get(device_type)
    if name is None:
        name = f"device type {device_type}"
    return f"{name}:{device_id}"


cdef str _dtype_name(DLDataType dtype):
    """`int32`-style name of a DLPack dtype (`float32x4` for vector lanes)."""
    code_name = _DTYPE_CODE_NAMES.get(dtype.code)
    if code_name is None:
        name = f"type code {dtype.code} of {dtype.bits} bits"
    elif dtype.code == kDLBool or dtype.code >= kDLFloat8_e3m4:
        name = code_name
    else:
        name = f"{code_name}{dtype.bits}"
    return name if dtype.lanes == 1 else f"{name}x{dtype.lanes}"


cdef bint _host_readable(long device_type) noexcept:
    """CPU memory, or host memory pinned by CUDA/ROCm (ordinary pageable addresses to the CPU)."""
    return device_type == kDLCPU or device_type == kDLCUDAHost or device_type == kDLROCMHost


cdef str _device_error(str name, object device_type, object device_id):
    dev = _device_name(device_type, device_id)
    if device_type == kDLCUDA or device_type == kDLCUDAManaged:
        if sys.modules["groupnorm._core"].CUDA_BUILD_NOTE != "built":
            return (f"{name} lives on device {dev}; this groupnorm build has no CUDA backend (README, section "
                    f"GPU); move the array to the CPU")
        return (f"{name} lives on device {dev}; groupnorm reads GPU memory only when the call's input is there "
                f"too (the CUDA backend); move the array to the CPU")
    return f"{name} lives on device {dev}; groupnorm computes on the CPU only; move the array to the CPU"


# ------------------------------------------------------------------------------------------------ consumer

@cython.final
@cython.freelist(8)
cdef class _ImportedTensor:
    """Owns one consumed DLPack tensor (the base of its NumPy view): calls the producer's deleter exactly
    once, when it dies."""
    cdef DLManagedTensorVersioned* versioned
    cdef DLManagedTensor* legacy

    def __dealloc__(self):
        cdef DLManagedTensorVersioned* versioned = self.versioned
        cdef DLManagedTensor* legacy = self.legacy
        self.versioned = NULL
        self.legacy = NULL
        if versioned != NULL and versioned.deleter != NULL:
            versioned.deleter(versioned)
        if legacy != NULL and legacy.deleter != NULL:
            legacy.deleter(legacy)


cdef object _check_ndarray(object arr, str name, bint writable):
    """An ndarray as it is (a base-class view of a subclass), after the same checks as a DLPack tensor."""
    dtype = arr.dtype
    if dtype.num not in _FLOAT_TYPENUMS and not _is_bfloat16(dtype):
        raise TypeError(f"{name} has dtype {dtype}; {_DTYPE_RULE}")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} is read-only; it must be writeable")
    return arr if type(arr) is np.ndarray else arr.view(np.ndarray)


def as_ndarray(obj, str name, *, bint writable=False):
    """A zero-copy NumPy view of `obj` (called `name` in messages), through the DLPack protocol.

    `obj` is asked for its device first, then for a DLPack 1.1 capsule (``max_version=(1, 1)``), or a legacy
    capsule when its ``__dlpack__`` takes no ``max_version``. The view is read-only when the producer says so;
    its base owns the DLPack tensor, whose deleter runs once when the view and every view of it are gone.
    A ``numpy.ndarray`` is checked and returned as it is. A plain CPU torch tensor (``torch.Tensor``,
    ``nn.Parameter``) is viewed from its ``data_ptr()``, ``shape`` and ``stride()`` (the same memory, without
    DLPack's cost; the view's base is the tensor); a lazily negated torch tensor (``is_neg()``) is read through a
    negated copy, as DLPack would export its memory without the sign; a tensor that requires grad is refused.

    Parameters
    ----------
    obj : object with ``__dlpack__`` and ``__dlpack_device__``
        float16, bfloat16, float32 or float64 data in CPU memory (or CUDA/ROCm pinned host memory).
    name : str
        The argument's name, for messages.
    writable : bool, default False
        Refuse a read-only tensor (for an ``out`` argument).

    Returns
    -------
    numpy.ndarray
        bfloat16 data has dtype ``ml_dtypes.bfloat16`` when ml_dtypes is installed, else
        :data:`BFLOAT16_STORAGE`. Read-only when the producer flags the tensor read-only, and for a JAX
        array (immutable, though JAX exports it without the flag).

    Raises
    ------
    TypeError
        `obj` does not speak DLPack, or its dtype is not one of the four floating types.
    ValueError
        `obj` is not in CPU memory, is read-only (or a lazily negated torch tensor) while `writable`, is a
        torch tensor that requires grad, or its DLPack version is not 1.x.

    Examples
    --------
    >>> import numpy as np
    >>> from groupnorm import _dlpack
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> v = _dlpack.as_ndarray(_dlpack.DLPackArray(x), "input")
    >>> v.ctypes.data == x.ctypes.data, v.shape
    (True, (2, 3))
    """
    if isinstance(obj, np.ndarray):
        return _check_ndarray(obj, name, writable)
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        obj = _torch_resolved(obj, torch, name, writable)
        view = _torch_view(obj, torch)
        if view is not None:
            return view
    get_device = getattr(obj, "__dlpack_device__", None)
    if get_device is None or not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{name} of type {type(obj).__name__} is not an array: it has no __dlpack__ and "
                        f"__dlpack_device__ methods (the DLPack protocol) and is not a numpy.ndarray")
    device = get_device()
    try:
        device_type, device_id = device
        device_type = int(device_type)
        device_id = int(device_id)
    except (TypeError, ValueError):
        raise TypeError(f"{name}.__dlpack_device__() returned {device!r}, not a (device_type, device_id) "
                        f"pair of integers") from None
    if not _host_readable(device_type):
        raise ValueError(_device_error(name, device_type, device_id))
    # JAX arrays are immutable, but JAX exports them as legacy capsules, which carry no read-only flag.
    cdef bint immutable = is_jax_array(obj)
    if immutable and writable:
        raise ValueError(f"{name} is a JAX array, which is immutable; it must be writeable")
    try:
        capsule = obj.__dlpack__(max_version=(DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION))
    except TypeError:  # a pre-1.0 producer: no max_version keyword
        capsule = obj.__dlpack__()
    try:
        return _consume(capsule, name, writable, immutable)
    finally:
        # Dropped here, where no exception is pending: a capsule destructor written in Python (or one that
        # does not save the error state) would otherwise run during the raise and lose the exception.
        capsule = None


cdef object _torch_resolved(object tensor, object torch, str name, bint writable):
    """`tensor` after the checks that only a torch tensor needs; a lazily negated view (``is_neg()``:
    ``x.conj().imag`` of a complex x) comes back as a negated copy, because its memory holds the values'
    negatives and torch's ``__dlpack__`` exports that memory as it is (the kernels would see the wrong sign)."""
    if tensor.requires_grad:
        raise ValueError(f"{name} is a torch tensor that requires grad; groupnorm's array functions record no "
                         f"autograd graph, so it must be detached (pass {name}.detach()), or call "
                         f"groupnorm.torch.group_norm, which is differentiable")
    if not tensor.is_neg():
        return tensor
    if writable:
        raise ValueError(f"{name} is a lazily negated torch tensor (is_neg() is True): its memory holds the "
                         f"negatives of its values, so it cannot be written through; it must be a tensor "
                         f"without the negative bit (resolve_neg() makes one)")
    return tensor.resolve_neg()


cdef object _torch_descr(object dtype, object torch):
    """The NumPy dtype for a torch dtype the kernels take, else None."""
    if dtype is torch.float32:
        return _float32
    if dtype is torch.bfloat16:
        return bfloat16_dtype()
    if dtype is torch.float16:
        return _float16
    if dtype is torch.float64:
        return _float64
    return None


cdef object _tensor_memory(object tensor, object descr):
    """The NumPy view (of dtype `descr`) of a CPU tensor's memory, shape and strides, whose base is the tensor:
    what its DLPack capsule gives, built from ``data_ptr``, ``shape`` and ``stride`` at a fifth of DLPack's cost
    (torch's Python-level ``__dlpack__`` dominates a small call). None beyond MAX_DIMS dimensions."""
    shape = tensor.shape
    strides = tensor.stride()
    cdef int ndim = len(shape)
    if ndim > MAX_DIMS:
        return None
    cdef cnp.npy_intp dims[MAX_DIMS]
    cdef cnp.npy_intp byte_strides[MAX_DIMS]
    cdef cnp.npy_intp itemsize = (<cnp.dtype>descr).itemsize
    cdef int i
    for i in range(ndim):
        dims[i] = shape[i]
        byte_strides[i] = <cnp.npy_intp>strides[i] * itemsize
    cdef intptr_t address = tensor.data_ptr()
    cdef void* data = <void*>address
    if data == NULL:  # an empty tensor may have no memory; NumPy would allocate for a NULL pointer
        data = _empty_data
    Py_INCREF(descr)
    arr = PyArray_NewFromDescr(&PyArray_Type, <PyArray_Descr*>descr, ndim, dims, byte_strides, data,
                               cnp.NPY_ARRAY_WRITEABLE, NULL)
    cnp.set_array_base(arr, tensor)  # the view keeps the tensor, and with it its storage, alive
    return arr


cdef object _torch_view(object tensor, object torch):
    """The NumPy view of a plain CPU tensor (``torch.Tensor`` or ``nn.Parameter``, checked by _torch_resolved)
    of one of the four dtypes; None for any other tensor (a subclass may define its own ``__dlpack__``), which
    DLPack then serves or refuses."""
    cls = type(tensor)
    if (cls is not torch.Tensor and cls is not torch.nn.Parameter) or not tensor.is_cpu:
        return None
    descr = _torch_descr(tensor.dtype, torch)
    return None if descr is None else _tensor_memory(tensor, descr)


def torch_views(input, weight, bias):
    """(x, w, b): the NumPy views of groupnorm.torch's forward tensors (weight and bias may be None, and stay None)
    where each is a plain CPU ``torch.Tensor`` or ``nn.Parameter`` of a kernel dtype, not lazily negated; None
    where any is not, and the caller's own checks then raise or resolve (from_torch). For the common call, about
    1 us less than those checks (3.0 against 3.9 us for three tensors on a 2-core Zen 3 VM).

    Examples
    --------
    >>> import torch
    >>> from groupnorm import _dlpack
    >>> x, w, b = _dlpack.torch_views(torch.zeros(2, 4), torch.ones(4), None)
    >>> x.shape, w.tolist(), b
    ((2, 4), [1.0, 1.0, 1.0, 1.0], None)
    >>> _dlpack.torch_views(torch.zeros(2, 4, dtype=torch.int32), None, None) is None
    True
    """
    torch = sys.modules["torch"]
    x = _plain_torch_view(input, torch)
    if x is None:
        return None
    w = b = None
    if weight is not None:
        w = _plain_torch_view(weight, torch)
        if w is None:
            return None
    if bias is not None:
        b = _plain_torch_view(bias, torch)
        if b is None:
            return None
    return x, w, b


cdef object _plain_torch_view(object tensor, object torch):
    """_torch_view of a tensor without the negative bit; None otherwise."""
    view = _torch_view(tensor, torch)
    return None if view is None or tensor.is_neg() else view


def from_torch(tensor):
    """The NumPy view of a CPU torch tensor's memory (as_torch's inverse) for groupnorm.torch, which has checked
    its type, device and dtype (one of the four): no copy, whether or not it requires grad, except for a lazily
    negated tensor (``is_neg()``), which is read through a negated copy. The view keeps the tensor alive.

    Examples
    --------
    >>> import torch
    >>> from groupnorm import _dlpack
    >>> t = torch.arange(6.0).reshape(2, 3).t()
    >>> v = _dlpack.from_torch(t)
    >>> v.ctypes.data == t.data_ptr(), v.strides, v.tolist() == t.tolist()
    (True, (4, 12), True)
    """
    torch = sys.modules["torch"]
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    descr = _torch_descr(tensor.dtype, torch)
    if descr is None:
        raise TypeError(f"from_torch takes float16, bfloat16, float32 or float64 tensors, not {tensor.dtype}")
    view = _tensor_memory(tensor, descr)
    if view is None:
        raise ValueError(f"the tensor has {tensor.dim()} dimensions; at most {MAX_DIMS} are supported")
    return view


cdef bint _has_negative_stride(cnp.ndarray array) noexcept:
    cdef int i
    for i in range(array.ndim):
        if array.strides[i] < 0:
            return True
    return False


def as_torch(cnp.ndarray array):
    """A CPU torch tensor over `array`'s memory, no copy: the same dtype (bfloat16 by its bits), shape and
    strides (a channels-last result stays channels_last). Negative strides, which torch lacks, are copied.
    torch must be imported already.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from groupnorm import _dlpack
    >>> y = np.zeros((2, 3), np.float32)
    >>> t = _dlpack.as_torch(y)
    >>> t.data_ptr() == y.ctypes.data, t.dtype
    (True, torch.float32)
    """
    torch = sys.modules["torch"]
    if _has_negative_stride(array):
        # torch has no negative strides (torch 2.13's from_dlpack even aborts the process on one).
        array = array.copy(order="K")
    if _is_bfloat16(array.dtype):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


cpdef bint is_jax_array(object obj):
    """obj is a JAX array (immutable; JAX imports only 64-byte aligned memory without a copy)."""
    jax = sys.modules.get("jax")  # never imported here: a JAX array exists only once jax is
    return jax is not None and isinstance(obj, jax.Array)


cdef object _consume(object capsule, str name, bint writable, bint read_only):
    """The NumPy view of an unconsumed DLPack capsule, which it marks used and whose tensor it owns;
    read-only if `read_only` or if the capsule says so."""
    cdef PyObject* capsule_ptr = <PyObject*>capsule
    cdef _ImportedTensor owner = _ImportedTensor.__new__(_ImportedTensor)
    cdef DLManagedTensorVersioned* versioned
    cdef DLManagedTensor* legacy
    cdef DLTensor* tensor
    # From the rename on, `owner` holds the tensor: any exception below drops it, which calls the deleter.
    if PyCapsule_IsValid(capsule_ptr, CAPSULE_VERSIONED):
        versioned = <DLManagedTensorVersioned*>PyCapsule_GetPointer(capsule_ptr, CAPSULE_VERSIONED)
        PyCapsule_SetName(capsule, CAPSULE_VERSIONED_USED)
        owner.versioned = versioned
        if versioned.version.major != DLPACK_MAJOR_VERSION:  # only version/deleter are readable then
            raise ValueError(f"{name} came as a DLPack {versioned.version.major}.{versioned.version.minor} "
                             f"tensor; groupnorm reads DLPack 1.x")
        read_only = read_only or (versioned.flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0
        tensor = &versioned.dl_tensor
    elif PyCapsule_IsValid(capsule_ptr, CAPSULE_LEGACY):
        legacy = <DLManagedTensor*>PyCapsule_GetPointer(capsule_ptr, CAPSULE_LEGACY)
        PyCapsule_SetName(capsule, CAPSULE_LEGACY_USED)
        owner.legacy = legacy
        tensor = &legacy.dl_tensor
    else:
        raise TypeError(f"{name}.__dlpack__() returned {capsule!r}; expected an unconsumed DLPack capsule "
                        f"named 'dltensor_versioned' or 'dltensor'")

    if not _host_readable(tensor.device.device_type):
        raise ValueError(_device_error(name, tensor.device.device_type, tensor.device.device_id))
    descr = _descr_of(tensor.dtype, name)
    cdef int ndim = tensor.ndim
    if ndim < 0 or ndim > MAX_DIMS:
        raise ValueError(f"{name} has {ndim} dimensions; at most {MAX_DIMS} are supported")
    if ndim > 0 and tensor.shape == NULL:
        raise ValueError(f"{name} has {ndim} dimensions but a NULL DLPack shape")
    if read_only and writable:
        raise ValueError(f"{name} is read-only (its DLPack capsule has DLPACK_FLAG_BITMASK_READ_ONLY set); "
                         f"it must be writeable")

    cdef cnp.npy_intp dims[MAX_DIMS]
    cdef cnp.npy_intp byte_strides[MAX_DIMS]
    cdef int64_t itemsize = tensor.dtype.bits // 8
    cdef int64_t extent, stride
    cdef bint empty = False
    cdef int i
    for i in range(ndim):
        extent = tensor.shape[i]
        if extent < 0:
            raise ValueError(f"{name} has a negative extent {extent} in its DLPack shape")
        empty = empty or extent == 0
        dims[i] = extent
        if tensor.strides != NULL:
            stride = tensor.strides[i]
            if stride > INT64_MAX // itemsize or stride < -(INT64_MAX // itemsize):
                raise ValueError(f"{name} has a DLPack stride of {stride} elements, too large to address")
            byte_strides[i] = stride * itemsize
    cdef char* data = <char*>tensor.data
    if data == NULL:
        if not empty:
            raise ValueError(f"{name} has a NULL DLPack data pointer but {ndim}-d data that is not empty")
        data = _empty_data
    else:
        data += tensor.byte_offset
    cdef cnp.npy_intp* strides_arg = NULL  # NumPy's C-contiguous strides, as DLPack's NULL means
    if tensor.strides != NULL:
        strides_arg = &byte_strides[0]
    Py_INCREF(descr)
    arr = PyArray_NewFromDescr(&PyArray_Type, <PyArray_Descr*>descr, ndim, dims,
                               strides_arg, data,
                               0 if read_only else cnp.NPY_ARRAY_WRITEABLE, NULL)
    cnp.set_array_base(arr, owner)
    return arr


cdef object _descr_of(DLDataType dtype, str name):
    """The NumPy dtype of a DLPack dtype, or TypeError naming `name`."""
    if dtype.lanes == 1:
        if dtype.code == kDLFloat:
            if dtype.bits == 32:
                return _float32
            if dtype.bits == 64:
                return _float64
            if dtype.bits == 16:
                return _float16
        elif dtype.code == kDLBfloat and dtype.bits == 16:
            return bfloat16_dtype()
    raise TypeError(f"{name} has DLPack dtype {_dtype_name(dtype)}; {_DTYPE_RULE}")


# ------------------------------------------------------------------------------------------------ producer

cdef void _release_manager_ctx(void* array) noexcept nogil:
    """Drops the exported array's reference, from any thread; leaks it if Python is already gone."""
    if array != NULL and Py_IsInitialized():
        with gil:
            Py_XDECREF(<PyObject*>array)


cdef void _delete_versioned(DLManagedTensorVersioned* managed) noexcept nogil:
    if managed != NULL:
        _release_manager_ctx(managed.manager_ctx)
        free(managed)


cdef void _delete_legacy(DLManagedTensor* managed) noexcept nogil:
    if managed != NULL:
        _release_manager_ctx(managed.manager_ctx)
        free(managed)


cdef void _capsule_destructor_versioned(PyObject* capsule) noexcept:
    """An unconsumed capsule frees its tensor; a consumed one ("used_...") leaves it to the consumer."""
    cdef DLManagedTensorVersioned* managed
    if PyCapsule_IsValid(capsule, CAPSULE_VERSIONED):
        managed = <DLManagedTensorVersioned*>PyCapsule_GetPointer(capsule, CAPSULE_VERSIONED)
        managed.deleter(managed)


cdef void _capsule_destructor_legacy(PyObject* capsule) noexcept:
    cdef DLManagedTensor* managed
    if PyCapsule_IsValid(capsule, CAPSULE_LEGACY):
        managed = <DLManagedTensor*>PyCapsule_GetPointer(capsule, CAPSULE_LEGACY)
        managed.deleter(managed)


cdef bint _dl_dtype_of(object dtype, DLDataType* out):
    """The DLPack dtype of a NumPy dtype groupnorm exchanges; False for any other dtype."""
    out.lanes = 1
    out.bits = 8 * dtype.itemsize
    if dtype.num in _FLOAT_TYPENUMS:
        out.code = kDLFloat
        return True
    if _is_bfloat16(dtype):
        out.code = kDLBfloat
        return True
    return False


cdef bint _strides_in_elements(cnp.ndarray arr) noexcept:
    cdef cnp.npy_intp itemsize = cnp.PyArray_ITEMSIZE(arr)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(arr)
    cdef int i
    for i in range(cnp.PyArray_NDIM(arr)):
        if strides[i] % itemsize != 0:
            return False
    return True


@cython.final
cdef class DLPackArray:
    """A NumPy array behind the DLPack protocol (``__dlpack__`` / ``__dlpack_device__``), zero copy.

    What :func:`wrap_like` returns for a caller whose array type it does not know: ``torch.from_dlpack``,
    ``jax.numpy.from_dlpack``, ``numpy.from_dlpack`` and every other DLPack consumer import it without a
    copy. The exported tensor keeps the NumPy array alive until the consumer's deleter call.

    Parameters
    ----------
    array : numpy.ndarray
        float16, bfloat16 (``ml_dtypes.bfloat16`` or :data:`BFLOAT16_STORAGE`), float32 or float64.

    Examples
    --------
    >>> import numpy as np
    >>> from groupnorm._dlpack import DLPackArray
    >>> a = DLPackArray(np.ones((2, 3), np.float32))
    >>> a
    DLPackArray(shape=(2, 3), dtype=float32, device=kDLCPU:0, writeable=True)
    >>> float(np.from_dlpack(a).sum())
    6.0
    """
    cdef object array

    def __cinit__(self, array):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"array must be a numpy.ndarray, got {type(array).__name__}")
        cdef DLDataType dl_dtype
        if not _dl_dtype_of(array.dtype, &dl_dtype):
            raise TypeError(f"array has dtype {array.dtype}; {_DTYPE_RULE}")
        self.array = array

    @property
    def shape(self):
        """The shape of the array."""
        return self.array.shape

    @property
    def dtype(self):
        """The NumPy dtype of the array."""
        return self.array.dtype

    @property
    def ndim(self):
        """The number of dimensions."""
        return self.array.ndim

    def numpy(self):
        """The wrapped NumPy array itself (no copy)."""
        return self.array

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self.array, dtype=dtype, copy=True)
        if dtype is None or np.dtype(dtype) == self.array.dtype:
            return self.array
        if copy is False:
            raise ValueError(f"converting {self.array.dtype} to {np.dtype(dtype)} needs a copy, but copy=False")
        return self.array.astype(dtype)

    def __repr__(self):
        return (f"DLPackArray(shape={self.array.shape}, dtype={self.array.dtype}, device=kDLCPU:0, "
                f"writeable={bool(self.array.flags.writeable)})")

    def __dlpack_device__(self):
        """``(1, 0)``: kDLCPU, device 0."""
        return (kDLCPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """A DLPack capsule of the array: "dltensor_versioned" when `max_version` is 1.x or later, else the
        legacy "dltensor".

        Parameters follow the array API standard. `stream` must be None (or -1: CPU memory has no stream);
        `dl_device` may only name the CPU; ``copy=True`` exports a copy, ``copy=False`` raises BufferError
        when the array needs one (strides that are not a whole number of items, non-native byte order).
        A read-only array exports with ``DLPACK_FLAG_BITMASK_READ_ONLY`` and cannot export as a legacy capsule.
        """
        if stream is not None and not (type(stream) is int and stream == -1):
            raise ValueError(f"stream={stream!r}: CPU memory has no stream; pass None")
        if dl_device is not None:
            try:
                device_type, device_id = dl_device
                device_type = int(device_type)
                device_id = int(device_id)
            except (TypeError, ValueError):
                raise ValueError(f"dl_device={dl_device!r} must be a (device_type, device_id) pair") from None
            if device_type != kDLCPU or device_id != 0:
                raise BufferError(f"DLPackArray lives on kDLCPU:0 and cannot be exported to "
                                  f"{_device_name(device_type, device_id)}")
        cdef int minor = DLPACK_MINOR_VERSION
        cdef bint versioned = False
        if max_version is not None:
            requested_major, requested_minor = max_version
            versioned = requested_major >= DLPACK_MAJOR_VERSION
            if requested_major == DLPACK_MAJOR_VERSION:
                minor = min(minor, requested_minor)

        cdef cnp.ndarray arr = self.array
        cdef bint copied = False
        dtype = arr.dtype
        if copy or not dtype.isnative or not _strides_in_elements(arr):
            if copy is not None and not copy:
                raise BufferError(f"exporting this {dtype} array needs a copy (its byte order or strides do "
                                  f"not map to DLPack), but copy=False")
            arr = np.array(arr, dtype=dtype if dtype.isnative else dtype.newbyteorder("="), order="K",
                           copy=True)
            copied = True
        cdef bint read_only = not cnp.PyArray_ISWRITEABLE(arr)
        if read_only and not versioned:
            raise BufferError("a read-only array cannot be exported as a legacy DLPack capsule, which has no "
                              "read-only flag; ask for max_version=(1, 0) or later")
        return _export(arr, versioned, minor, read_only, copied)


cdef object _export(cnp.ndarray arr, bint versioned, int minor, bint read_only, bint copied):
    """A capsule whose managed tensor holds a reference to `arr` (dropped by its deleter)."""
    cdef int ndim = cnp.PyArray_NDIM(arr)
    cdef size_t header = sizeof(DLManagedTensorVersioned) if versioned else sizeof(DLManagedTensor)
    cdef void* block = malloc(header + 2 * (ndim if ndim > 0 else 1) * sizeof(int64_t))
    if block == NULL:
        raise MemoryError("cannot allocate a DLPack tensor")
    cdef int64_t* shape = <int64_t*>(<char*>block + header)
    cdef int64_t* strides = shape + (ndim if ndim > 0 else 1)
    cdef cnp.npy_intp itemsize = cnp.PyArray_ITEMSIZE(arr)
    cdef int i
    for i in range(ndim):
        shape[i] = cnp.PyArray_DIMS(arr)[i]
        strides[i] = cnp.PyArray_STRIDES(arr)[i] // itemsize

    cdef DLManagedTensorVersioned* managed_versioned = <DLManagedTensorVersioned*>block
    cdef DLManagedTensor* managed_legacy = <DLManagedTensor*>block
    cdef DLTensor* tensor
    if versioned:
        managed_versioned.version.major = DLPACK_MAJOR_VERSION
        managed_versioned.version.minor = minor
        managed_versioned.manager_ctx = <void*>arr
        managed_versioned.deleter = _delete_versioned
        managed_versioned.flags = ((DLPACK_FLAG_BITMASK_READ_ONLY if read_only else 0)
                                   | (DLPACK_FLAG_BITMASK_IS_COPIED if copied else 0))
        tensor = &managed_versioned.dl_tensor
    else:
        managed_legacy.manager_ctx = <void*>arr
        managed_legacy.deleter = _delete_legacy
        tensor = &managed_legacy.dl_tensor
    Py_INCREF(arr)
    tensor.data = cnp.PyArray_DATA(arr)
    tensor.device.device_type = kDLCPU
    tensor.device.device_id = 0
    tensor.ndim = ndim
    _dl_dtype_of(arr.dtype, &tensor.dtype)
    tensor.shape = shape
    tensor.strides = strides
    tensor.byte_offset = 0
    try:
        if versioned:
            return PyCapsule_New(block, CAPSULE_VERSIONED, _capsule_destructor_versioned)
        return PyCapsule_New(block, CAPSULE_LEGACY, _capsule_destructor_legacy)
    except BaseException:
        if versioned:
            _delete_versioned(managed_versioned)
        else:
            _delete_legacy(managed_legacy)
        raise


# ------------------------------------------------------------------------------------------------- results

def wrap_like(result, like):
    """`result` (a NumPy array) as an array of `like`'s kind, zero copy.

    A ``torch.Tensor`` `like` gives a tensor (:func:`as_torch`: dtype, bfloat16 included, and strides
    kept, so a channels_last result stays channels_last; negative strides, which torch lacks, are copied),
    a JAX array a JAX array (zero copy only for 64-byte aligned data: JAX copies the rest), a ``numpy.ndarray``
    `result` itself, anything else a :class:`DLPackArray`. Frameworks are found in ``sys.modules``; none is
    imported here.

    Examples
    --------
    >>> import numpy as np
    >>> from groupnorm import _dlpack
    >>> y = np.zeros(3, np.float32)
    >>> _dlpack.wrap_like(y, np.ones(3, np.float32)) is y
    True
    >>> _dlpack.wrap_like(y, object())
    DLPackArray(shape=(3,), dtype=float32, device=kDLCPU:0, writeable=True)
    """
    if isinstance(like, np.ndarray):
        if result.dtype == BFLOAT16_STORAGE:
            return result.view(bfloat16_dtype())
        return result
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(like, torch.Tensor):
        return as_torch(result)
    if is_jax_array(like):
        # Zero copy when the data is 64-byte aligned; JAX's CPU client copies anything else.
        return sys.modules["jax"].numpy.from_dlpack(DLPackArray(result))
    return DLPackArray(result)
