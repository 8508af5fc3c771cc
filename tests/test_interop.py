# test_interop.py — the public functions on other frameworks' arrays through DLPack: torch tensors of every
# dtype and memory format in and out (values against the NumPy call on the same data, zero copies of the input,
# out= written in place), JAX arrays when JAX is installed, a bare producer object, read-only and non-CPU
# producers refused with clear errors, and memory that stays flat over 10,000 calls.
import gc

import numpy as np
import pytest

import groupnorm as gn
from reference import same_bits

torch = pytest.importorskip("torch")

TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def numpy_view(t):
    """The NumPy array over a CPU tensor's memory (bfloat16 through ml_dtypes or the raw-bits dtype)."""
    from groupnorm import _dlpack
    return _dlpack.as_ndarray(t, "t")


class Producer:
    """A bare DLPack producer: wraps another producer and forwards the protocol, counting exports."""

    def __init__(self, array, device=None):
        self.array, self.device, self.exports = array, device, 0

    def __dlpack__(self, **kwargs):
        self.exports += 1
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device or self.array.__dlpack_device__()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_in_torch_out(rng, dtype, memory_format):
    x = torch.from_numpy(rng.standard_normal((2, 16, 5, 7))).to(dtype).contiguous(memory_format=memory_format)
    weight = torch.from_numpy(rng.standard_normal(16)).to(dtype)
    bias = torch.from_numpy(rng.standard_normal(16)).to(dtype)
    before = x.clone()
    y = gn.group_norm(x, 4, weight, bias, activation="silu")
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=memory_format) and y.stride() == x.stride()
    expected = gn.group_norm(numpy_view(x), 4, numpy_view(weight), numpy_view(bias), activation="silu")
    assert same_bits(numpy_view(y), expected)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_forward_and_backward_return_tensors(rng, dtype):
    x = torch.from_numpy(rng.standard_normal((3, 8, 9))).to(dtype)
    dy = torch.from_numpy(rng.standard_normal((3, 8, 9))).to(dtype)
    y, mean, rstd = gn.group_norm_forward(x, 2)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    assert mean.dtype == stats_dtype and mean.shape == (3, 2) and rstd.dtype == stats_dtype
    dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, 2)
    assert all(isinstance(t, torch.Tensor) for t in (dx, dw, db))
    assert dx.dtype == dtype and dw.dtype == stats_dtype and db.shape == (8,)
    dx_np, dw_np, db_np = gn.group_norm_backward(numpy_view(dy), numpy_view(x), mean.numpy(), rstd.numpy(), 2)
    assert same_bits(numpy_view(dx), dx_np) and same_bits(dw.numpy(), dw_np) and same_bits(db.numpy(), db_np)


def test_input_is_read_in_place(monkeypatch, rng):
    """Zero copies: the kernels see the tensor's own memory (group_norm in place through out=x proves it)."""
    x = torch.from_numpy(rng.standard_normal((2, 8, 6, 6)).astype(np.float32)).contiguous(
        memory_format=torch.channels_last)
    expected = gn.group_norm(x.numpy(), 2)
    pointer = x.data_ptr()
    assert gn.group_norm(x, 2, out=x) is x
    assert x.data_ptr() == pointer and same_bits(x.numpy(), expected)


def test_out_tensor_is_written_and_returned(rng):
    x = torch.from_numpy(rng.standard_normal((2, 8, 11)).astype(np.float32))
    out = torch.full_like(x, float("nan"))
    assert gn.group_norm(x, 4, out=out) is out
    assert same_bits(out.numpy(), gn.group_norm(x.numpy(), 4))


def test_read_only_out_is_refused(rng):
    from groupnorm import _dlpack
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    frozen = x.copy()
    frozen.flags.writeable = False
    out = _dlpack.DLPackArray(frozen)  # exports versioned capsules flagged read-only
    with pytest.raises(ValueError, match=r"out is read-only"):
        gn.group_norm(x, 2, out=out)
    assert same_bits(frozen, x)


def test_bare_producer_gives_a_dlpack_result(rng):
    x = rng.standard_normal((2, 6, 10)).astype(np.float32)
    producer = Producer(x)
    y = gn.group_norm(producer, 3)
    assert producer.exports == 1
    assert not isinstance(y, np.ndarray) and hasattr(y, "__dlpack__")
    assert same_bits(np.from_dlpack(y), gn.group_norm(x, 3))


def test_numpy_input_with_torch_parameters_gives_numpy(rng):
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    w = torch.from_numpy(rng.standard_normal(4).astype(np.float32))
    y = gn.group_norm(x, 2, w)
    assert type(y) is np.ndarray and same_bits(y, gn.group_norm(x, 2, w.numpy()))


@pytest.mark.parametrize("device, name", [((2, 0), "kDLCUDA:0"), ((10, 1), "kDLROCM:1"), ((8, 0), "kDLMetal:0")])
def test_other_devices_are_refused_by_name(device, name):
    x = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(ValueError, match=rf"input .*{name}"):
        gn.group_norm(Producer(x, device), 2)


def test_cuda_message_says_how_to_build_with_cuda():
    with pytest.raises(ValueError, match=r"kDLCUDA:0.*CUDA"):
        gn.group_norm(Producer(np.zeros((2, 4), np.float32), (2, 0)), 2)


def test_unsupported_tensor_dtype_is_a_type_error():
    with pytest.raises(TypeError, match=r"input has DLPack dtype int32; it must be float16, bfloat16, float32 or float64"):
        gn.group_norm(torch.zeros(2, 4, dtype=torch.int32), 2)


def test_plain_cpu_tensors_skip_dlpack(monkeypatch, rng):
    """torch.Tensor and nn.Parameter are viewed from data_ptr, shape and stride (the same memory, a fifth of
    DLPack's cost); a tensor subclass still goes through its capsule."""
    class Subclass(torch.Tensor):
        pass

    x = torch.from_numpy(rng.standard_normal((2, 4, 5)).astype(np.float32))
    w = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(4).astype(np.float32)), requires_grad=False)
    expected = gn.group_norm(x.numpy(), 2, w.numpy())
    exports = []
    real = torch.Tensor.__dlpack__

    def counting(self, *args, **kwargs):
        exports.append(type(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "__dlpack__", counting)
    assert same_bits(gn.group_norm(x, 2, w).numpy(), expected) and exports == []
    assert same_bits(gn.group_norm(x.as_subclass(Subclass), 2, w).numpy(), expected)
    assert exports and set(exports) == {Subclass}  # (torch re-enters __dlpack__ through __torch_function__)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_negated_tensor_views_keep_their_sign(rng, dtype):
    """A lazily negated view (``z.conj().imag`` of a complex z, or torch._neg_view) has memory that holds the
    negatives of its values, which DLPack exports as they are."""
    x, w, b = (torch.from_numpy(rng.standard_normal(shape)).to(dtype) for shape in [(2, 4, 5), (4,), (4,)])
    neg_x, neg_w, neg_b = (torch._neg_view(-t) for t in (x, w, b))
    assert neg_x.is_neg() and neg_w.is_neg() and neg_b.is_neg()
    y = gn.group_norm(neg_x, 2, neg_w, neg_b)
    assert same_bits(numpy_view(y), gn.group_norm(numpy_view(x), 2, numpy_view(w), numpy_view(b)))
    assert neg_x.is_neg() and torch.equal(neg_x, x)  # the input is untouched
    if dtype == torch.float32:  # where such views come from
        imag = torch.complex(torch.zeros_like(x), -x).conj().imag
        assert imag.is_neg() and same_bits(numpy_view(gn.group_norm(imag, 2)), gn.group_norm(numpy_view(x), 2))


def test_negated_tensor_as_out_is_refused(rng):
    x = torch.from_numpy(rng.standard_normal((2, 4, 5)).astype(np.float32))
    out = torch.complex(torch.zeros_like(x), torch.ones_like(x)).conj().imag
    with pytest.raises(ValueError, match=r"^out is a lazily negated torch tensor \(is_neg\(\) is True\)"):
        gn.group_norm(x, 2, out=out)
    assert torch.equal(out.resolve_neg(), -torch.ones_like(x))


@pytest.mark.parametrize("argument", ["input", "weight", "bias"])
def test_tensor_requiring_grad_is_refused_by_name(argument):
    args = {"input": torch.ones(2, 4, 3), "weight": torch.ones(4), "bias": torch.zeros(4)}
    args[argument].requires_grad_()
    with pytest.raises(ValueError, match=rf"^{argument} is a torch tensor that requires grad; .*"
                                         rf"{argument}\.detach\(\).*groupnorm\.torch\.group_norm"):
        gn.group_norm(args["input"], 2, args["weight"], args["bias"])
    assert gn.group_norm(args["input"].detach(), 2, args["weight"].detach(), args["bias"].detach()).shape == (2, 4, 3)


def test_validation_errors_are_those_of_numpy_calls():
    x = torch.zeros(2, 6, 3)
    with pytest.raises(ValueError, match=r"num_groups=4 must divide the number of channels \(6\)"):
        gn.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight has shape \(5,\)"):
        gn.group_norm(x, 3, torch.ones(5))


def test_jax_in_jax_out(rng, monkeypatch):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from groupnorm import _interop
    buffers = []
    allocate = _interop._aligned_empty
    monkeypatch.setattr(_interop, "_aligned_empty", lambda like: buffers.append(allocate(like)) or buffers[-1])
    x_np = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    x = jnp.asarray(x_np)
    y = gn.group_norm(x, 4)
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32 and y.shape == x.shape
    assert same_bits(np.asarray(y), gn.group_norm(x_np, 4))
    # The result's memory is handed over, not copied: JAX shares the 64-byte aligned buffer it was written to.
    assert len(buffers) == 1 and y.unsafe_buffer_pointer() == buffers[0].ctypes.data
    with pytest.raises(ValueError, match=r"out .*(immutable|read-only)"):
        gn.group_norm(x_np, 4, out=x)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("through", ["tensor", "capsule"])
def test_memory_stays_flat_over_ten_thousand_calls(rng, through):
    """Plain CPU tensors are viewed from data_ptr, shape and stride; a producer forwarding torch's capsules takes
    the DLPack path (capsule consumed, deleter run) on every call. The warm-up runs the same calls long enough to
    cycle well over 4 MiB through the allocator, so that a freed-memory quarantine (ASan's, 4 MiB deep under
    .ci/sanitize) is full before the measurement rather than filling during it."""
    x = torch.from_numpy(rng.standard_normal((2, 8, 16)).astype(np.float32))
    w = torch.ones(8)
    if through == "capsule":
        x, w = Producer(x), Producer(w)

    def calls(count):
        for _ in range(count):
            y = gn.group_norm(x, 2, w)
            _, mean, rstd = gn.group_norm_forward(x, 2)
            gn.group_norm_backward(y, x, mean, rstd, 2, w)

    calls(3_000)
    gc.collect()
    before = _rss_bytes()
    calls(10_000)
    gc.collect()
    if through == "capsule":
        assert (x.exports, w.exports) == (3 * 13_000, 2 * 13_000)  # one capsule per argument
    grown = _rss_bytes() - before
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 DLPack calls"
