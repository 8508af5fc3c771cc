"""groupnorm._dlpack: DLPack in (as_ndarray) and out (DLPackArray, wrap_like), zero copy, with the producer's
deleter run exactly once on every path. Producers: NumPy, torch, JAX, our own DLPackArray, and tensors built
field by field with ctypes whose deleter counts its calls."""
import ctypes
import doctest
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

from groupnorm import _dlpack
from groupnorm._dlpack import BFLOAT16_STORAGE, DLPackArray, as_ndarray, bfloat16_dtype, wrap_like

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


# ----------------------------------------------------------------------------------- DLPack ABI in ctypes

class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    pass


LEGACY_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", LEGACY_DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


VERSIONED_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))
DLManagedTensorVersioned._fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                                     ("deleter", VERSIONED_DELETER), ("flags", ctypes.c_uint64),
                                     ("dl_tensor", DLTensor)]

READ_ONLY, IS_COPIED = 1, 2
K_DL_FLOAT, K_DL_BFLOAT, K_DL_COMPLEX, K_DL_FLOAT8_E4M3FN = 2, 4, 5, 10

CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi))
_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def capsule_name(capsule):
    return _capsule_name(capsule).decode()


def managed_of(capsule):
    """The managed tensor behind an unconsumed capsule (versioned or legacy)."""
    name = _capsule_name(capsule)
    struct = DLManagedTensorVersioned if name == b"dltensor_versioned" else DLManagedTensor
    return struct.from_address(_capsule_pointer(capsule, name))


class Crafted:
    """A DLPack producer whose tensor is built field by field; `deleted` counts the deleter's calls.

    Every capsule it hands out shares one managed tensor, so each test asks for one capsule only."""

    def __init__(self, memory, *, versioned=True, major=1, minor=1, flags=0, code=K_DL_FLOAT, bits=None,
                 lanes=1, shape=None, strides=None, ndim=None, data=None, byte_offset=0, device=(1, 0),
                 tensor_device=None, name=None, null_shape=False):
        self.memory = memory  # the bytes the tensor points into, kept alive here
        self.deleted = 0
        self.calls = []
        self.device = device
        shape = memory.shape if shape is None else shape
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * max(len(strides), 1))(*strides)
        if versioned:
            self.managed = DLManagedTensorVersioned()
            self.managed.version.major, self.managed.version.minor = major, minor
            self.managed.flags = flags
            self._deleter = VERSIONED_DELETER(self._on_delete)
        else:
            self.managed = DLManagedTensor()
            self._deleter = LEGACY_DELETER(self._on_delete)
        self.managed.deleter = self._deleter
        tensor = self.managed.dl_tensor
        tensor.data = memory.ctypes.data if data is None else data
        tensor.device.device_type, tensor.device.device_id = tensor_device or device
        tensor.ndim = len(shape) if ndim is None else ndim
        tensor.dtype.code, tensor.dtype.lanes = code, lanes
        tensor.dtype.bits = 8 * memory.itemsize if bits is None else bits
        if not null_shape:
            tensor.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        if self._strides is not None:
            tensor.strides = ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64))
        tensor.byte_offset = byte_offset
        self._name = name or (b"dltensor_versioned" if versioned else b"dltensor")

    def _on_delete(self, managed):
        assert ctypes.addressof(managed.contents) == ctypes.addressof(self.managed)
        self.deleted += 1

    def __dlpack_device__(self):
        self.calls.append("__dlpack_device__")
        return self.device

    def __dlpack__(self, **kwargs):
        self.calls.append(kwargs)
        self.capsule = _capsule_new(ctypes.addressof(self.managed), self._name, None)
        return self.capsule


class Wrapping:
    """A producer that hands out another producer's capsules and records how it was called."""

    def __init__(self, inner, device=None):
        self.inner = inner
        self.device = device
        self.calls = []

    def __dlpack_device__(self):
        self.calls.append("__dlpack_device__")
        return self.device if self.device is not None else self.inner.__dlpack_device__()

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        kwargs = {"max_version": max_version} if max_version is not None else {}
        self.calls.append(kwargs)
        return self.inner.__dlpack__(**kwargs)


class LegacyOnly(Wrapping):
    """A pre-1.0 producer: ``__dlpack__()`` takes no argument at all."""

    def __dlpack__(self):
        self.calls.append({})
        return self.inner.__dlpack__()


def layouts(dtype):
    base = np.arange(1, 61).reshape(3, 4, 5).astype(dtype)
    return {
        "c": base,
        "fortran": np.asfortranarray(base),
        "sliced": base[::2, 1:, ::2],
        "negative": base[::-1, :, ::-2],
        "0-d": np.array(7, dtype),
        "zero-size": np.zeros((2, 0, 3), dtype),
    }


LAYOUTS = list(layouts(np.float32))


def assert_view_of(view, source):
    """`view` is a zero-copy, writeable view of `source`'s memory in the same layout."""
    assert type(view) is np.ndarray
    assert view.shape == source.shape and view.dtype == source.dtype
    if source.size:
        assert view.ctypes.data == source.ctypes.data
        assert view.strides == source.strides or source.size == 1
        view, source = (view.view(np.uint16), source.view(np.uint16)) if _is_bf16(view.dtype) else (view, source)
        np.testing.assert_array_equal(view, source)
        assert view.flags.writeable
        view[(0,) * view.ndim] = 42
        assert source[(0,) * source.ndim] == 42


# ------------------------------------------------------------------------------------------------ consumer

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_producer_roundtrip(dtype, layout):
    source = layouts(dtype)[layout]
    producer = Wrapping(source)
    view = as_ndarray(producer, "input")
    assert producer.calls == ["__dlpack_device__", {"max_version": (1, 1)}]
    assert_view_of(view, source)
    assert type(view.base).__name__ == "_ImportedTensor"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + ["ml_bfloat16", "storage_bfloat16"], ids=str)
def test_dlpackarray_roundtrip(dtype, layout):
    if dtype == "ml_bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    elif dtype == "storage_bfloat16":
        dtype = BFLOAT16_STORAGE
    source = layouts(np.float32)[layout]
    if not isinstance(dtype, type):
        source = source.astype(np.uint16).view(dtype)
    view = as_ndarray(DLPackArray(source), "input")
    expected_dtype = bfloat16_dtype() if _is_bf16(source.dtype) else source.dtype
    assert view.dtype == expected_dtype
    assert_view_of(view.view(source.dtype), source)


def _is_bf16(dtype):
    return dtype.itemsize == 2 and dtype.kind == "V"


def as_float(view):
    """float64 values of a float view, bfloat16 (either dtype) decoded from its bits."""
    if _is_bf16(view.dtype):
        return (view.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return view.astype(np.float64)


def test_numpy_ndarray_is_checked_and_returned_as_it_is():
    x = np.ones((2, 3), np.float32)
    assert as_ndarray(x, "input") is x
    assert as_ndarray(x, "out", writable=True) is x
    m = np.ma.masked_array(x)
    v = as_ndarray(m, "input")
    assert type(v) is np.ndarray and v.ctypes.data == x.ctypes.data
    swapped = x.astype(">f4")
    assert as_ndarray(swapped, "input") is swapped
    with pytest.raises(TypeError, match=r"input has dtype int32; it must be float16, bfloat16, float32 or float64"):
        as_ndarray(np.ones(3, np.int32), "input")
    x.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        as_ndarray(x, "out", writable=True)


def test_not_an_array_raises_type_error():
    with pytest.raises(TypeError, match=r"weight of type list is not an array.*DLPack"):
        as_ndarray([1.0, 2.0], "weight")


def test_bad_device_tuple_raises_type_error():
    producer = Wrapping(np.ones(3), device="cpu")
    with pytest.raises(TypeError, match=r"input.__dlpack_device__\(\) returned 'cpu'"):
        as_ndarray(producer, "input")


def test_legacy_only_producer_falls_back_to_no_argument_call():
    source = np.arange(6, dtype=np.float64).reshape(2, 3)
    producer = LegacyOnly(source)
    view = as_ndarray(producer, "input", writable=True)
    # The max_version call fails in Python's argument parsing, before the body records it.
    assert producer.calls == ["__dlpack_device__", {}]
    assert_view_of(view, source)


def test_legacy_capsule_from_a_versioned_call_is_accepted():
    memory = np.arange(4, dtype=np.float32)
    producer = Crafted(memory, versioned=False)
    view = as_ndarray(producer, "input", writable=True)
    assert producer.calls == ["__dlpack_device__", {"max_version": (1, 1)}]
    assert capsule_name(producer.capsule) == "used_dltensor"
    assert view.flags.writeable and view.ctypes.data == memory.ctypes.data
    del view
    assert producer.deleted == 1


def test_read_only_versioned_capsule():
    source = np.arange(6, dtype=np.float32)
    source.flags.writeable = False
    producer = Wrapping(DLPackArray(source))
    with pytest.raises(ValueError, match=r"out is read-only .*DLPACK_FLAG_BITMASK_READ_ONLY.*must be writeable"):
        as_ndarray(producer, "out", writable=True)
    view = as_ndarray(producer, "input")
    assert not view.flags.writeable
    np.testing.assert_array_equal(view, source)
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1


@pytest.mark.parametrize("device, shown", [((2, 0), "kDLCUDA:0"), ((13, 1), "kDLCUDAManaged:1"), ((18, 0), "kDLTrn:0"),
                                           ((10, 2), "kDLROCM:2"), ((8, 0), "kDLMetal:0"),
                                           ((14, 0), "kDLOneAPI:0"), ((99, 3), "device type 99:3")])
def test_device_other_than_cpu_raises_value_error(device, shown):
    producer = Wrapping(np.ones(3, np.float32), device=device)
    with pytest.raises(ValueError, match=rf"^input lives on device {shown};.* move the array to the CPU"):
        as_ndarray(producer, "input")
    assert producer.calls == ["__dlpack_device__"]  # no capsule asked for


# A CUDA array reaches as_ndarray (a CPU view) only as a weight, bias or out beside a CPU input: groupnorm._gpu
# takes the calls whose input is on the GPU. The remedy then depends on whether this build has the CUDA backend.
_CUDA_ADVICE = ("groupnorm reads GPU memory only when the call's input is there too"
                if __import__("groupnorm")._core.CUDA_BUILD_NOTE == "built"
                else "this groupnorm build has no CUDA backend")


@pytest.mark.parametrize("device, advice", [((2, 0), _CUDA_ADVICE),
                                            ((13, 0), _CUDA_ADVICE),
                                            ((10, 0), "groupnorm computes on the CPU only"),
                                            ((8, 0), "groupnorm computes on the CPU only")])
def test_device_message_gives_the_remedy(device, advice):
    with pytest.raises(ValueError, match=rf":0; {advice}"):
        as_ndarray(Wrapping(np.ones(3, np.float32), device=device), "input")


@pytest.mark.parametrize("device", [(3, 0), (11, 0)], ids=["kDLCUDAHost", "kDLROCMHost"])
def test_pinned_host_memory_is_read_in_place(device):
    memory = np.arange(5, dtype=np.float32)
    producer = Crafted(memory, device=device)
    view = as_ndarray(producer, "input")
    assert view.ctypes.data == memory.ctypes.data


def test_capsule_with_a_device_other_than_the_reported_one_is_refused():
    producer = Crafted(np.ones(3, np.float32), device=(1, 0), tensor_device=(2, 1))
    with pytest.raises(ValueError, match="kDLCUDA:1"):
        as_ndarray(producer, "input")
    assert producer.deleted == 1


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_deleter_runs_once_when_the_last_view_dies(versioned):
    memory = np.arange(12, dtype=np.float32)
    producer = Crafted(memory, versioned=versioned, shape=(3, 4))
    view = as_ndarray(producer, "input")
    assert capsule_name(producer.capsule) == ("used_dltensor_versioned" if versioned else "used_dltensor")
    sub = view[1:, ::2]
    del view
    gc.collect()
    assert producer.deleted == 0
    np.testing.assert_array_equal(sub, memory.reshape(3, 4)[1:, ::2])
    del sub
    assert producer.deleted == 1
    del producer.capsule  # a consumed capsule leaves the tensor alone
    gc.collect()
    assert producer.deleted == 1


BAD_TENSORS = {
    "lanes": (dict(lanes=4), TypeError, r"input has DLPack dtype float32x4; it must be float16, bfloat16"),
    "int": (dict(code=0), TypeError, r"DLPack dtype int32;"),
    "uint": (dict(code=1, bits=8), TypeError, r"DLPack dtype uint8;"),
    "complex": (dict(code=K_DL_COMPLEX), TypeError, r"DLPack dtype complex32;"),
    "bool": (dict(code=6, bits=8), TypeError, r"DLPack dtype bool;"),
    "float8": (dict(code=K_DL_FLOAT8_E4M3FN, bits=8), TypeError, r"DLPack dtype float8_e4m3fn;"),
    "float24": (dict(bits=24), TypeError, r"DLPack dtype float24;"),
    "bfloat32": (dict(code=K_DL_BFLOAT), TypeError, r"DLPack dtype bfloat32;"),
    "code 99": (dict(code=99), TypeError, r"DLPack dtype type code 99 of 32 bits;"),
    "major 2": (dict(major=2, minor=0), ValueError, r"input came as a DLPack 2.0 tensor; groupnorm reads DLPack 1.x"),
    "major 0": (dict(major=0, minor=8), ValueError, r"DLPack 0.8 tensor"),
    "ndim -1": (dict(ndim=-1), ValueError, r"input has -1 dimensions; at most 64"),
    "ndim 65": (dict(ndim=65), ValueError, r"input has 65 dimensions; at most 64"),
    "negative extent": (dict(shape=(2, -2)), ValueError, r"negative extent -2"),
    "huge stride": (dict(shape=(2,), strides=(1 << 62,)), ValueError, r"stride of 4611686018427387904 elements"),
    "null data": (dict(data=0), ValueError, r"NULL DLPack data pointer"),
    "null shape": (dict(shape=(4,), null_shape=True), ValueError, r"input has 1 dimensions but a NULL DLPack shape"),
    "read-only out": (dict(flags=READ_ONLY), ValueError, r"out is read-only"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_every_error_after_consumption_calls_the_deleter_once(case):
    fields, error, message = BAD_TENSORS[case]
    producer = Crafted(np.ones(4, np.float32), **fields)
    with pytest.raises(error, match=message):
        as_ndarray(producer, "out" if case == "read-only out" else "input", writable=case == "read-only out")
    gc.collect()
    assert producer.deleted == 1
    assert capsule_name(producer.capsule).startswith("used_")


@pytest.mark.parametrize("name", [b"dltensor_foreign", b"used_dltensor_versioned", b"used_dltensor"])
def test_capsule_with_another_name_is_left_to_its_own_destructor(name):
    producer = Crafted(np.ones(4, np.float32), name=name)
    with pytest.raises(TypeError, match=r"input.__dlpack__\(\) returned <capsule .*expected an unconsumed DLPack"):
        as_ndarray(producer, "input")
    assert capsule_name(producer.capsule) == name.decode()
    assert producer.deleted == 0


def test_capsule_destructor_runs_when_the_capsule_is_refused():
    destroyed = []
    destructor = CAPSULE_DESTRUCTOR(lambda capsule: destroyed.append(capsule))
    memory = np.ones(2)

    class Foreign:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kwargs):
            return _capsule_new(memory.ctypes.data, b"not_a_dltensor", ctypes.cast(destructor, ctypes.c_void_p))

    with pytest.raises(TypeError):
        as_ndarray(Foreign(), "input")
    gc.collect()
    assert len(destroyed) == 1


def test_byte_offset_and_null_strides():
    memory = np.arange(16, dtype=np.float64)
    producer = Crafted(memory, shape=(2, 3), byte_offset=5 * 8)
    view = as_ndarray(producer, "input")
    assert view.flags.c_contiguous and view.strides == (24, 8)
    np.testing.assert_array_equal(view, np.arange(5, 11).reshape(2, 3))


def test_element_strides_become_byte_strides():
    memory = np.arange(24, dtype=np.float16)
    producer = Crafted(memory, shape=(3, 4), strides=(1, 6))
    view = as_ndarray(producer, "input")
    assert view.strides == (2, 12)
    np.testing.assert_array_equal(view, [[0, 6, 12, 18], [1, 7, 13, 19], [2, 8, 14, 20]])


def test_zero_size_tensor_with_null_data():
    producer = Crafted(np.zeros(0, np.float32), shape=(4, 0, 2), data=0)
    view = as_ndarray(producer, "input", writable=True)
    assert view.shape == (4, 0, 2) and view.size == 0 and view.dtype == np.float32
    del view
    assert producer.deleted == 1


def test_zero_dimensional_tensor():
    memory = np.array([2.5], np.float32)
    producer = Crafted(memory, shape=())
    view = as_ndarray(producer, "input")
    assert view.shape == () and float(view) == 2.5


# ------------------------------------------------------------------------- the deleter, seen from NumPy

@pytest.mark.parametrize("export", ["numpy", "DLPackArray"])
def test_exported_array_released_exactly_when_the_view_dies(export):
    source = np.arange(8, dtype=np.float32)
    producer = Wrapping(source if export == "numpy" else DLPackArray(source))
    before = sys.getrefcount(source)
    view = as_ndarray(producer, "input")
    assert sys.getrefcount(source) == before + 1  # the capsule's manager holds one reference
    del view
    assert sys.getrefcount(source) == before  # released once: twice would leave before - 1


def test_exported_array_released_when_a_read_only_capsule_is_refused():
    source = np.arange(8, dtype=np.float32)
    source.flags.writeable = False
    before = sys.getrefcount(source)
    with pytest.raises(ValueError, match="out is read-only"):
        as_ndarray(Wrapping(DLPackArray(source)), "out", writable=True)
    assert sys.getrefcount(source) == before


@pytest.mark.parametrize("producer", [Wrapping, LegacyOnly])
def test_exported_array_released_when_its_dtype_is_refused(producer):
    source = np.arange(8, dtype=np.int32)  # exported by NumPy, refused by as_ndarray
    before = sys.getrefcount(source)
    with pytest.raises(TypeError, match="input has DLPack dtype int32"):
        as_ndarray(producer(source), "input")
    assert sys.getrefcount(source) == before


def test_unconsumed_capsule_releases_the_array():
    source = np.ones(4, np.float64)
    before = sys.getrefcount(source)
    for max_version in [None, (1, 0)]:
        capsule = DLPackArray(source).__dlpack__(max_version=max_version)
        assert sys.getrefcount(source) == before + 1
        del capsule
        assert sys.getrefcount(source) == before


def test_view_keeps_memory_alive_after_the_producer_is_gone():
    source = np.arange(5, dtype=np.float64)
    alive = weakref.ref(source)
    view = as_ndarray(DLPackArray(source), "input")
    del source
    gc.collect()
    assert alive() is not None
    np.testing.assert_array_equal(view, np.arange(5))
    del view
    gc.collect()
    assert alive() is None


# ------------------------------------------------------------------------------------------------ producer

@pytest.mark.parametrize("max_version, name, minor", [(None, "dltensor", None), ((0, 8), "dltensor", None),
                                                      ((1, 0), "dltensor_versioned", 0),
                                                      ((1, 1), "dltensor_versioned", 1),
                                                      ((1, 7), "dltensor_versioned", 1),
                                                      ((2, 0), "dltensor_versioned", 1)])
def test_capsule_kind_follows_max_version(max_version, name, minor):
    source = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]
    capsule = DLPackArray(source).__dlpack__(max_version=max_version)
    assert capsule_name(capsule) == name
    managed = managed_of(capsule)
    if minor is not None:
        assert (managed.version.major, managed.version.minor) == (1, minor)
        assert managed.flags == 0
    tensor = managed.dl_tensor
    assert tensor.data == source.ctypes.data and tensor.byte_offset == 0
    assert (tensor.device.device_type, tensor.device.device_id) == (1, 0)
    assert (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes) == (K_DL_FLOAT, 32, 1)
    assert tensor.ndim == 2 and tensor.shape[:2] == [2, 2] and tensor.strides[:2] == [3, 2]


@pytest.mark.parametrize("dtype, code, bits", [(np.float16, K_DL_FLOAT, 16), (np.float32, K_DL_FLOAT, 32),
                                               (np.float64, K_DL_FLOAT, 64), ("storage", K_DL_BFLOAT, 16),
                                               ("ml_dtypes", K_DL_BFLOAT, 16)])
def test_exported_dtype(dtype, code, bits):
    if dtype == "storage":
        dtype = BFLOAT16_STORAGE
    elif dtype == "ml_dtypes":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    tensor = managed_of(DLPackArray(np.zeros(3, dtype)).__dlpack__(max_version=(1, 1))).dl_tensor
    assert (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes) == (code, bits, 1)


def test_read_only_array_exports_the_read_only_flag():
    source = np.ones(3, np.float32)
    source.flags.writeable = False
    assert managed_of(DLPackArray(source).__dlpack__(max_version=(1, 0))).flags == READ_ONLY
    with pytest.raises(BufferError, match="read-only array cannot be exported as a legacy"):
        DLPackArray(source).__dlpack__()


def test_copy_true_exports_a_copy_flagged_is_copied():
    source = np.arange(6, dtype=np.float32).reshape(2, 3)
    source.flags.writeable = False
    capsule = DLPackArray(source).__dlpack__(max_version=(1, 1), copy=True)
    managed = managed_of(capsule)
    assert managed.flags == IS_COPIED and managed.dl_tensor.data != source.ctypes.data
    shared = as_ndarray(Wrapping(DLPackArray(source)), "input")
    assert shared.ctypes.data == source.ctypes.data  # copy=None: no copy
    legacy = DLPackArray(source).__dlpack__(copy=True)  # a writeable copy needs no read-only flag
    assert managed_of(legacy).dl_tensor.data != source.ctypes.data


def test_strides_that_are_not_whole_items_are_exported_as_a_copy():
    buffer = np.zeros(32, np.uint8)
    odd = np.ndarray((3,), np.float32, buffer=buffer, strides=(6,))
    odd[:] = [1, 2, 3]
    view = np.from_dlpack(DLPackArray(odd))
    np.testing.assert_array_equal(view, [1, 2, 3])
    assert view.ctypes.data != odd.ctypes.data
    assert managed_of(DLPackArray(odd).__dlpack__(max_version=(1, 1))).flags == IS_COPIED
    with pytest.raises(BufferError, match="needs a copy.*copy=False"):
        DLPackArray(odd).__dlpack__(copy=False)
    swapped = np.arange(3, dtype=">f8")
    np.testing.assert_array_equal(np.from_dlpack(DLPackArray(swapped)), [0, 1, 2])
    with pytest.raises(BufferError, match="copy=False"):
        DLPackArray(swapped).__dlpack__(max_version=(1, 1), copy=False)


def test_dl_device_and_stream():
    a = DLPackArray(np.ones(2, np.float32))
    assert a.__dlpack_device__() == (1, 0)
    assert capsule_name(a.__dlpack__(dl_device=(1, 0), copy=False, stream=None)) == "dltensor"
    with pytest.raises(BufferError, match="cannot be exported to kDLCUDA:0"):
        a.__dlpack__(dl_device=(2, 0))
    with pytest.raises(ValueError, match="dl_device='cpu' must be a"):
        a.__dlpack__(dl_device="cpu")
    with pytest.raises(ValueError, match="CPU memory has no stream"):
        a.__dlpack__(stream=1)
    assert capsule_name(a.__dlpack__(stream=-1)) == "dltensor"


def test_dlpackarray_convenience():
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    a = DLPackArray(x)
    assert a.shape == (2, 3) and a.dtype == np.float64 and a.ndim == 2
    assert a.numpy() is x and np.asarray(a) is x
    assert np.asarray(a, dtype=np.float32).dtype == np.float32
    assert np.array(a, copy=True).ctypes.data != x.ctypes.data
    assert repr(a) == "DLPackArray(shape=(2, 3), dtype=float64, device=kDLCPU:0, writeable=True)"
    with pytest.raises(TypeError, match="array has dtype int64; it must be float16, bfloat16, float32 or float64"):
        DLPackArray(np.arange(3, dtype=np.int64))
    with pytest.raises(TypeError, match="array must be a numpy.ndarray, got list"):
        DLPackArray([1.0])
    with pytest.raises(TypeError):
        DLPackArray.__new__(DLPackArray)  # no half-built instance to export from


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_imports_dlpackarray(dtype):
    x = layouts(dtype)["sliced"]
    y = np.from_dlpack(DLPackArray(x))
    assert y.ctypes.data == x.ctypes.data and y.strides == x.strides
    np.testing.assert_array_equal(y, x)


# ----------------------------------------------------------------------------------------------- bfloat16

def test_bfloat16_dtype_is_ml_dtypes_when_installed():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert bfloat16_dtype() == np.dtype(ml_dtypes.bfloat16)


def test_without_ml_dtypes_bfloat16_is_the_storage_tag():
    torch = pytest.importorskip("torch")
    del torch
    script = textwrap.dedent("""
        import sys
        sys.modules["ml_dtypes"] = None   # makes `import ml_dtypes` raise ImportError
        import numpy as np, torch
        from groupnorm import _dlpack
        assert _dlpack.bfloat16_dtype() == _dlpack.BFLOAT16_STORAGE == np.dtype([("bfloat16", "<u2")])
        t = torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.bfloat16)
        v = _dlpack.as_ndarray(t, "input")
        assert v.dtype == _dlpack.BFLOAT16_STORAGE and v.ctypes.data == t.data_ptr()
        assert (v.view(np.uint16) == t.view(torch.int16).numpy().view(np.uint16)).all()
        back = _dlpack.wrap_like(v, t)
        assert back.dtype == torch.bfloat16 and back.data_ptr() == t.data_ptr() and torch.equal(back, t)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_importing_the_module_imports_no_framework():
    script = ("import sys, groupnorm._dlpack; "
              "print(sorted(m for m in ('torch', 'jax', 'ml_dtypes') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------------------- torch

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


TORCH_DTYPES = ["float16", "bfloat16", "float32", "float64"]


def torch_layouts(torch, dtype):
    base = torch.arange(1, 2 * 6 * 4 * 5 + 1).reshape(2, 6, 4, 5).to(getattr(torch, dtype))
    return {
        "contiguous": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": base[1:, 2:, :, 1::2],  # storage_offset != 0
        "transposed": base.transpose(1, 3),
        "0-d": base[1, 2, 3, 4],
        "zero-size": base[:, :0],
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed", "0-d", "zero-size"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_tensor_roundtrip(torch, dtype, layout):
    t = torch_layouts(torch, dtype)[layout]
    view = as_ndarray(t, "input", writable=True)
    itemsize = t.element_size()
    assert view.shape == tuple(t.shape)
    assert view.strides == tuple(s * itemsize for s in t.stride())
    assert view.dtype == (bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype))
    original = t.double().numpy().copy()
    np.testing.assert_array_equal(as_float(view), original)
    if t.numel() == 0:
        return
    assert view.ctypes.data == t.data_ptr()
    t.mul_(2)  # torch -> NumPy
    np.testing.assert_array_equal(as_float(view), 2 * original)
    first = (0,) * view.ndim
    view.view(np.uint16 if dtype in ("float16", "bfloat16") else view.dtype)[first] = 0  # NumPy -> torch
    assert t[first].item() == 0.0


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("make_view", ["as_ndarray", "from_torch"])
def test_tensor_views_keep_the_tensor_alive(torch, dtype, make_view):
    """A view built from a tensor's data_ptr owns a reference to the tensor: its storage outlives the caller's
    last reference, and is freed with the view."""
    from groupnorm import _dlpack
    t = torch.arange(1, 4097, dtype=torch.float64).reshape(64, 64).to(getattr(torch, dtype))[3:, ::2]
    expected = t.double().numpy().copy()
    alive = weakref.ref(t)
    view = as_ndarray(t, "input") if make_view == "as_ndarray" else _dlpack.from_torch(t)
    del t
    gc.collect()
    assert alive() is not None
    torch.zeros(64, 64, dtype=torch.float64)  # reuses freed memory if the storage had gone
    np.testing.assert_array_equal(as_float(view), expected)
    del view
    gc.collect()
    assert alive() is None


def test_torch_writes_visible_both_ways(torch):
    t = torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last)
    view = as_ndarray(t, "out", writable=True)
    view[1, 2, 3, 0] = 7.0
    assert t[1, 2, 3, 0].item() == 7.0
    t[0, 1, 0, 2] = -3.0
    assert view[0, 1, 0, 2] == -3.0


@pytest.mark.parametrize("dtype, shown", [("int32", "int32"), ("complex64", "complex64"), ("bool", "bool"),
                                          ("uint8", "uint8"), ("float8_e4m3fn", "float8_e4m3fn")])
def test_torch_unsupported_dtype_raises_type_error(torch, dtype, shown):
    t = torch.zeros(2, 3, dtype=getattr(torch, dtype))
    with pytest.raises(TypeError, match=rf"^weight has DLPack dtype {shown}; it must be float16, bfloat16, float32 "
                                        rf"or float64$"):
        as_ndarray(t, "weight")


def test_torch_calls_and_capsule(torch):
    t = torch.ones(3)
    producer = Wrapping(t)
    as_ndarray(producer, "input")
    assert producer.calls == ["__dlpack_device__", {"max_version": (1, 1)}]
    assert capsule_name(t.__dlpack__(max_version=(1, 1))) == "dltensor_versioned"


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
def test_wrap_like_torch(torch, dtype, layout):
    t = torch_layouts(torch, dtype)[layout]
    result = as_ndarray(t, "input")
    back = wrap_like(result, t)
    assert type(back) is torch.Tensor
    assert back.dtype == t.dtype and back.shape == t.shape and back.stride() == t.stride()
    assert back.data_ptr() == t.data_ptr() == result.ctypes.data
    if layout == "channels_last":
        assert back.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(back, t)


def test_wrap_like_torch_keeps_a_fresh_result_alive(torch):
    like = torch.zeros(2, 4, 3, 3).to(memory_format=torch.channels_last)
    result = np.empty((2, 3, 3, 4), np.float32).transpose(0, 3, 1, 2)  # channels-last memory
    result[...] = np.arange(72).reshape(2, 4, 3, 3)
    alive = weakref.ref(result.base)
    pointer = result.ctypes.data
    back = wrap_like(result, like)
    del result
    gc.collect()
    assert alive() is not None and back.data_ptr() == pointer
    assert back.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(back, torch.arange(72, dtype=torch.float32).reshape(2, 4, 3, 3))
    del back
    gc.collect()
    assert alive() is None


def test_wrap_like_torch_copies_negative_strides(torch):
    result = np.arange(10, dtype=np.float32)[::-2]
    back = wrap_like(result, torch.zeros(5))
    assert torch.equal(back, torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0]))
    assert back.data_ptr() != result.ctypes.data


def test_torch_rss_flat_over_many_round_trips(torch):
    def statm_rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm (Linux)")

    def round_trips(count):
        for _ in range(count):
            t = torch.empty(16, 1024)  # fresh 64 KiB each time: a leaked deleter keeps every one alive
            view = as_ndarray(t, "input", writable=True)
            back = wrap_like(np.empty_like(view), t)
            assert back.shape == t.shape

    round_trips(1000)
    gc.collect()
    before = statm_rss()
    round_trips(10_000)
    gc.collect()
    grown = statm_rss() - before
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 round trips"


# ---------------------------------------------------------------------------------------------------- JAX

@pytest.fixture
def jnp():
    pytest.importorskip("jax")
    import jax.numpy
    return jax.numpy


def aligned_empty(shape, dtype, alignment=64):
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + size].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_jax_array_roundtrip(jnp, dtype):
    x = jnp.arange(12, dtype=getattr(jnp, dtype)).reshape(3, 4)
    view = as_ndarray(x, "input")
    assert view.shape == (3, 4) and not view.flags.writeable  # JAX arrays are immutable
    assert view.ctypes.data == x.unsafe_buffer_pointer()
    np.testing.assert_array_equal(as_float(view), np.arange(12).reshape(3, 4))
    with pytest.raises(ValueError, match="out is a JAX array, which is immutable"):
        as_ndarray(x, "out", writable=True)

    result = aligned_empty((3, 4), view.dtype)
    result[...] = view
    back = wrap_like(result, x)
    assert back.dtype == x.dtype and back.shape == x.shape
    assert back.unsafe_buffer_pointer() == result.ctypes.data  # 64-byte aligned: zero copy
    assert bool((back == x).all())


# ------------------------------------------------------------------------------------------ other callers

def test_wrap_like_numpy_returns_the_result():
    result = np.ones((2, 3), np.float32)
    assert wrap_like(result, np.zeros(3)) is result
    storage = np.zeros(3, np.uint16).view(BFLOAT16_STORAGE)
    back = wrap_like(storage, np.zeros(3))
    assert back.dtype == bfloat16_dtype() and back.ctypes.data == storage.ctypes.data


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_wrap_like_other_gives_a_dlpack_array(dtype):
    result = np.arange(6, dtype=dtype).reshape(2, 3).T
    back = wrap_like(result, Wrapping(np.zeros(3)))
    assert isinstance(back, DLPackArray) and hasattr(back, "__dlpack__")
    imported = np.from_dlpack(back)
    assert imported.ctypes.data == result.ctypes.data and imported.strides == result.strides
    np.testing.assert_array_equal(imported, result)
    assert as_ndarray(back, "input").ctypes.data == result.ctypes.data


def test_docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(_dlpack, _dlpack.__name__)
    assert sum(len(t.examples) for t in tests) >= 8
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
