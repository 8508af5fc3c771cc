"""The CUDA backend (groupnorm._cuda, groupnorm._gpu): what a build without a GPU must do (clear reasons and errors,
no crash), and, on a machine with a GPU and a CUDA build of torch, the kernels against float64 references.

The GPU tests are marked `gpu` and skip without one; the kernels' own logic is also checked on the CPU by
tests/test_cuda_emu.py, which runs the same sources in an emulation of CUDA's blocks and barriers.
"""
import math
import os

import numpy as np
import pytest

import groupnorm as gn
from groupnorm import _core, _gpu

BUILT = _core.CUDA_BUILD_NOTE == "built"


class CudaProducer:
    """A DLPack producer that says its memory is on a CUDA device and records what it is asked."""

    def __init__(self, device=(2, 0)):
        self.device = device
        self.calls = []

    def __dlpack_device__(self):
        self.calls.append("__dlpack_device__")
        return self.device

    def __dlpack__(self, **kwargs):  # pragma: no cover - must not be reached
        self.calls.append("__dlpack__")
        raise AssertionError("a CUDA array was asked for its capsule")


# --------------------------------------------------------------------------------------- every machine

def test_config_says_whether_and_why_not():
    cfg = gn.config()
    assert isinstance(cfg["cuda"], bool)
    assert (cfg["cuda_reason"] == "") == cfg["cuda"]
    if BUILT:
        assert isinstance(cfg["cuda_devices"], int) and cfg["cuda_devices"] >= 0
        assert cfg["cuda_runtime"] != "none"
        if not cfg["cuda"]:
            assert "CUDA backend finds no" in cfg["cuda_reason"]
    else:
        assert "no CUDA backend" in cfg["cuda_reason"] and _core.CUDA_BUILD_NOTE in cfg["cuda_reason"]


@pytest.mark.skipif(os.environ.get("GROUPNORM_EXPECT_CUDA_BUILD") != "1",
                    reason="GROUPNORM_EXPECT_CUDA_BUILD=1 is set where the build must have compiled the CUDA backend "
                           "(.ci/run, when nvcc is on PATH)")
def test_build_compiled_the_cuda_backend():
    assert BUILT, f"the build left CUDA out: {_core.CUDA_BUILD_NOTE}"
    from groupnorm import _cuda  # noqa: F401  the extension imports without a driver


@pytest.mark.parametrize("device, shown", [((2, 0), "kDLCUDA:0"), ((13, 1), "kDLCUDAManaged:1")])
def test_cuda_array_without_a_usable_backend_is_a_clear_error(device, shown):
    if gn.config()["cuda"]:
        pytest.skip("a GPU is usable here")
    producer = CudaProducer(device)
    with pytest.raises(ValueError, match=rf"^input lives on device {shown}; .*(CUDA backend|no CUDA).*move the "
                                         rf"array to the CPU"):
        gn.group_norm(producer, 2)
    for call in (lambda: gn.group_norm_forward(producer, 2),
                 lambda: gn.group_norm_backward(producer, producer, np.zeros((1, 2), np.float32),
                                                np.ones((1, 2), np.float32), 2)):
        with pytest.raises(ValueError, match=shown):
            call()
    assert "__dlpack__" not in producer.calls


def test_cuda_weight_beside_a_cpu_input_is_refused():
    with pytest.raises(ValueError, match=r"weight lives on device kDLCUDA:0; .*move the array to the CPU"):
        gn.group_norm(np.zeros((2, 4, 3), np.float32), 2, CudaProducer())


needs_build = pytest.mark.skipif(not BUILT, reason=f"no CUDA backend in this build ({_core.CUDA_BUILD_NOTE})")


@needs_build
def test_extension_sizes_and_refuses_problems():
    from groupnorm import _cuda
    problem = (2, 64, 4096, 32, False, "float32", "float32", False, 1e-5)
    checked = _cuda.problem(problem)
    assert checked.spec == problem
    forward, backward = checked.forward_workspace, checked.backward_workspace
    assert forward >= 2 * 64 * 4 * 2 and backward >= forward  # at least the per-(n, c) coefficients
    # silu and eps 0 are taken
    assert _cuda.problem(problem[:6] + ("float32", True, 0.0)).forward_workspace == forward
    for bad in [(2, 63, 16, 32, False, "float32", "float32", False, 1e-5),  # groups do not divide C
                (0, 64, 16, 32, False, "float32", "float32", False, 1e-5),  # empty
                (2, 64, 16, 32, False, "float32", "float32", False, -1.0),  # negative eps
                (2, 64, 16, 32, False, "float32", "float32", False, math.nan),
                (2, 64, 16, 32, False, "float32", "float64", False, 1e-5),  # float64 params for float32 data
                (2, 64, 16, 32, False, "float64", "float32", False, 1e-5)]:
        with pytest.raises(ValueError, match="do not take the problem"):
            _cuda.problem(bad)
    with pytest.raises(KeyError):
        _cuda.problem((2, 64, 16, 32, False, "int8", "int8", False, 1e-5))
    with pytest.raises(TypeError):  # a problem is made by _cuda.problem, not passed as its tuple
        _cuda.forward(problem, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    # 16-bit data with float32 parameters is torch's mixed rule
    assert _cuda.problem((2, 64, 16, 32, True, "bfloat16", "float32", True, 1e-5)).forward_workspace > 0


@needs_build
def test_extension_reports_runtime_errors_without_crashing():
    if gn.config()["cuda"]:
        pytest.skip("a GPU is usable here: the calls below would pass it null pointers")
    from groupnorm import _cuda
    problem = _cuda.problem((1, 4, 8, 2, False, "float32", "float32", False, 1e-5))
    with pytest.raises(RuntimeError, match=r"groupnorm's CUDA forward failed: cuda\w+ \(\d+\)"):
        _cuda.forward(problem, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"groupnorm's CUDA backward failed: cuda\w+ \(\d+\)"):
        _cuda.backward(problem, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def test_config_says_whether_the_jax_custom_calls_were_built():
    """config()["jax"] follows the build; without the custom calls jax_reason says why, in one piece (a CMake list
    or a stray quote in the note broke the build once)."""
    cfg = gn.config()
    assert cfg["jax"] == (_core.JAX_BUILD_NOTE == "built")
    if not cfg["jax"]:  # e.g. "the JAX FFI headers of jaxlib were not found ... (GROUPNORM_JAX=AUTO), ..."
        assert "JAX" in cfg["jax_reason"] and ";" not in cfg["jax_reason"] and '"' not in cfg["jax_reason"]
    else:
        assert cfg["jax_reason"] == ""


def test_stream_with_cpu_arrays_is_refused():
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    y, mean, rstd = gn.group_norm_forward(x, 2)
    calls = [lambda a, s: gn.group_norm(a, 2, stream=s), lambda a, s: gn.group_norm_forward(a, 2, stream=s),
             lambda a, s: gn.group_norm_backward(a, a, mean, rstd, 2, stream=s)]
    arrays = [x]
    torch_module = None
    try:
        import torch as torch_module
    except ImportError:
        pass
    if torch_module is not None:
        arrays.append(torch_module.from_numpy(x))
    for array in arrays:
        for call in calls:
            with pytest.raises(ValueError, match=r"stream=1 names a CUDA stream, but input is a CPU array \((numpy"
                                                 r"\.ndarray|torch\.Tensor)\); stream= applies to arrays in CUDA"):
                call(array, 1)
            call(array, None)  # None is every call's default


# --------------------------------------------------------------------------------------- with a GPU

def _gpu_torch():
    if not gn.config()["cuda"]:
        pytest.skip(f"no usable GPU: {gn.config()['cuda_reason']}")
    torch_module = pytest.importorskip("torch")
    if not torch_module.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch_module


def _reference(x, groups, weight, bias, eps, silu):
    """float64 group norm (and SiLU) of a CPU float64 tensor, as torch computes it."""
    import torch as t
    y = t.nn.functional.group_norm(x, groups, weight, bias, eps)
    return y * t.sigmoid(y) if silu else y


CASES = [((2, 64, 16, 16), 32), ((1, 320, 64, 64), 32), ((3, 12, 7, 5), 3), ((4, 6), 2), ((2, 2048, 8, 8), 1),
         ((1, 8, 65537), 8), ((2, 30, 5, 3, 4), 5), ((40000, 4, 1), 4)]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
TOLERANCE = {"float32": 2e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}  # relative to |y|max + 1


@pytest.mark.gpu
@pytest.mark.parametrize("shape, groups", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True])
def test_forward_on_gpu_matches_float64(shape, groups, dtype, layout, silu):
    t = _gpu_torch()
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels_last needs 4 or 5 dimensions")
    gen = t.Generator().manual_seed(hash((shape, dtype, layout, silu)) % 2**31)
    x64 = t.randn(shape, dtype=t.float64, generator=gen) * 3 + 1
    w64 = t.randn(shape[1], dtype=t.float64, generator=gen)
    b64 = t.randn(shape[1], dtype=t.float64, generator=gen)
    torch_dtype = getattr(t, dtype)
    fmt = {4: t.channels_last, 5: t.channels_last_3d}.get(len(shape)) if layout == "channels_last" else None
    x = x64.to(torch_dtype).cuda()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = w64.to(torch_dtype).cuda(), b64.to(torch_dtype).cuda()
    # Poisoned output inside a guarded buffer: every element must be written, nothing beyond.
    guard = 4096
    buffer = t.full((x.numel() + 2 * guard,), float("nan"), dtype=torch_dtype, device="cuda")
    out = buffer[guard:guard + x.numel()].view(x.shape) if fmt is None else (
        buffer[guard:guard + x.numel()].view(x.permute(0, *range(2, x.dim()), 1).shape)
        .permute(0, x.dim() - 1, *range(1, x.dim() - 1)))
    result = gn.group_norm(x, groups, w, b, 1e-5, activation="silu" if silu else None, out=out)
    t.cuda.synchronize()
    assert result is out
    assert t.isnan(buffer[:guard]).all() and t.isnan(buffer[-guard:]).all(), "written outside the output"
    ref = _reference(x.double().cpu(), groups, w.double().cpu(), b.double().cpu(), 1e-5, silu)
    got = out.double().cpu()
    assert not t.isnan(got).any(), "an output element was not written"
    scale = ref.abs().max().item() + 1
    err = (got - ref).abs().max().item() / scale
    assert err <= TOLERANCE[dtype], f"max error {err:.3g} of the scale"
    again = gn.group_norm(x, groups, w, b, 1e-5, activation="silu" if silu else None)
    assert t.equal(again, out), "not the same bits run to run"
    assert again.is_contiguous(memory_format=fmt or t.contiguous_format)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, groups", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_on_gpu_matches_torch_float64(shape, groups, dtype, layout):
    t = _gpu_torch()
    import groupnorm.torch as gnt
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels_last needs 4 or 5 dimensions")
    gen = t.Generator().manual_seed(hash((shape, dtype, layout)) % 2**31)
    torch_dtype = getattr(t, dtype)
    fmt = {4: t.channels_last, 5: t.channels_last_3d}.get(len(shape)) if layout == "channels_last" else None
    x = (t.randn(shape, dtype=t.float64, generator=gen) + 0.5).to(torch_dtype).cuda()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = t.randn(shape, dtype=t.float64, generator=gen).to(torch_dtype).cuda()
    if fmt is not None:
        dy = dy.contiguous(memory_format=fmt)
    w = t.randn(shape[1], dtype=t.float64, generator=gen)
    b = t.randn(shape[1], dtype=t.float64, generator=gen)
    # Ours, torch's own CUDA module in the same dtype (the yardstick), and torch in float64 on the CPU (the truth).
    results = {}
    for name, module, device, run_dtype in [("ours", gnt.GroupNorm, "cuda", torch_dtype),
                                            ("torch", t.nn.GroupNorm, "cuda", torch_dtype),
                                            ("float64", t.nn.GroupNorm, "cpu", t.float64)]:
        m = module(groups, shape[1], device=device, dtype=run_dtype)
        with t.no_grad():
            m.weight.copy_(w.to(torch_dtype))
            m.bias.copy_(b.to(torch_dtype))
        xi = x.to(device=device, dtype=run_dtype).detach().clone().requires_grad_()
        y = m(xi)
        y.backward(dy.to(device=device, dtype=run_dtype))
        results[name] = [v.detach().double().cpu() for v in (y, xi.grad, m.weight.grad, m.bias.grad)]
        if name == "ours":
            assert xi.grad.is_contiguous(memory_format=fmt or t.contiguous_format)
    t.cuda.synchronize()
    for i, what in enumerate(["y", "grad_input", "grad_weight", "grad_bias"]):
        truth = results["float64"][i]
        scale = truth.abs().max().item() + 1
        ours_err = (results["ours"][i] - truth).abs().max().item() / scale
        torch_err = (results["torch"][i] - truth).abs().max().item() / scale
        assert ours_err <= 2 * torch_err + TOLERANCE[dtype], (
            f"{what}: max error {ours_err:.3g} of the scale, torch's {torch_err:.3g}")


@pytest.mark.gpu
def test_gpu_work_is_ordered_on_the_current_stream():
    t = _gpu_torch()
    x = t.randn(8, 64, 32, 32, device="cuda")
    expected = gn.group_norm(x, 8)
    side = t.cuda.Stream()
    side.wait_stream(t.cuda.current_stream())
    with t.cuda.stream(side):
        x2 = x * 1  # produced on the side stream: groupnorm must queue behind it there
        got = gn.group_norm(x2, 8)
    side.synchronize()
    assert t.equal(got, expected)


@pytest.mark.gpu
def test_gpu_work_runs_on_an_explicit_stream():
    """stream= queues the kernels (and allocates the results) on that stream instead of the current one, in each of
    its forms; the second call of a shape takes the kept plan."""
    t = _gpu_torch()
    x = t.randn(4, 64, 32, 32, device="cuda").contiguous(memory_format=t.channels_last)
    w, b = t.randn(64, device="cuda"), t.randn(64, device="cuda")
    expected = gn.group_norm(x, 8, w, b)
    side = t.cuda.Stream()
    dy = t.ones_like(x)  # filled on the current stream: made before the side stream waits for it
    for stream in [side, side.cuda_stream, t.cuda.ExternalStream(side.cuda_stream), 0]:
        side.wait_stream(t.cuda.current_stream())
        got = gn.group_norm(x, 8, w, b, stream=stream)
        y, mean, rstd = gn.group_norm_forward(x, 8, w, b, stream=stream)
        dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, 8, w, stream=stream)
        t.cuda.synchronize()
        assert t.equal(got, expected) and t.equal(y, expected)
        assert dx.is_contiguous(memory_format=t.channels_last) and dw.shape == db.shape == (64,)
    with pytest.raises(TypeError, match="stream='side' must be None"):
        gn.group_norm(x, 8, stream="side")


def _gpu_cupy():
    if not gn.config()["cuda"]:
        pytest.skip(f"no usable GPU: {gn.config()['cuda_reason']}")
    return pytest.importorskip("cupy")


def _np_reference(x, groups, weight, bias, eps):
    """float64 group norm of a NumPy array (channels on axis 1)."""
    x = x.astype(np.float64)
    grouped = x.reshape(x.shape[0], groups, -1)
    y = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + eps)
    view = (1, -1) + (1,) * (x.ndim - 2)
    return y.reshape(x.shape) * weight.astype(np.float64).reshape(view) + bias.astype(np.float64).reshape(view)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cupy_arrays_on_gpu(dtype, layout):
    """CuPy arrays in, CuPy arrays out (same memory order), on CuPy's current stream, memory from CuPy's pool."""
    cp = _gpu_cupy()
    rng = np.random.default_rng(5)
    host = (rng.standard_normal((2, 64, 9, 7)) * 2 + 1).astype(dtype)
    dy_host = rng.standard_normal(host.shape).astype(dtype)
    w_host, b_host = rng.standard_normal(64).astype(dtype), rng.standard_normal(64).astype(dtype)
    x, dy = cp.asarray(host), cp.asarray(dy_host)
    if layout == "nhwc":
        x = cp.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w, b = cp.asarray(w_host), cp.asarray(b_host)
    tolerance = TOLERANCE[dtype]
    want = _np_reference(host, 8, w_host, b_host, 1e-5)
    y = gn.group_norm(x, 8, w, b)
    assert isinstance(y, cp.ndarray) and y.dtype == x.dtype and y.strides == x.strides
    assert np.abs(cp.asnumpy(y).astype(np.float64) - want).max() / (np.abs(want).max() + 1) <= tolerance
    y2, mean, rstd = gn.group_norm_forward(x, 8, w, b)
    assert isinstance(mean, cp.ndarray) and mean.shape == (2, 8) and bool(cp.array_equal(y, y2))
    out = cp.full_like(x, cp.nan)
    assert gn.group_norm(x, 8, w, b, out=out) is out and bool(cp.array_equal(out, y))
    dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, 8, w)
    assert isinstance(dx, cp.ndarray) and dx.strides == x.strides and dw.shape == db.shape == (64,)
    torch_module = pytest.importorskip("torch")
    xr = torch_module.from_numpy(host.astype(np.float64)).requires_grad_()
    wr = torch_module.from_numpy(w_host.astype(np.float64)).requires_grad_()
    br = torch_module.from_numpy(b_host.astype(np.float64)).requires_grad_()
    torch_module.nn.functional.group_norm(xr, 8, wr, br, 1e-5).backward(torch_module.from_numpy(
        dy_host.astype(np.float64)))
    for name, got, truth in [("dx", dx, xr.grad), ("dw", dw, wr.grad), ("db", db, br.grad)]:
        truth = truth.numpy()
        err = np.abs(cp.asnumpy(got).astype(np.float64) - truth).max() / (np.abs(truth).max() + 1)
        assert err <= tolerance * (1 if name == "dx" else 50), f"{name}: {err:.3g}"
    # On a CuPy stream: as the current one, and through stream=
    cp.cuda.get_current_stream().synchronize()
    side = cp.cuda.Stream(non_blocking=True)
    with side:
        z = gn.group_norm(x * 1, 8, w, b)
    side.synchronize()
    assert bool(cp.array_equal(z, y))
    cp.cuda.get_current_stream().synchronize()
    side2 = cp.cuda.Stream(non_blocking=True)
    z2 = gn.group_norm(x, 8, w, b, stream=side2)
    side2.synchronize()
    assert bool(cp.array_equal(z2, y))


@pytest.mark.gpu
def test_gpu_errors_name_the_argument():
    t = _gpu_torch()
    x = t.randn(2, 4, 3, device="cuda")
    with pytest.raises(ValueError, match="num_groups=3 must divide the number of channels"):
        gn.group_norm(x, 3)
    with pytest.raises(ValueError, match=r"weight is on device cpu but input is on cuda:0"):
        gn.group_norm(x, 2, t.ones(4))
    with pytest.raises(ValueError, match=r"weight has shape \(3,\)"):
        gn.group_norm(x, 2, t.ones(3, device="cuda"))
    with pytest.raises(TypeError, match="input has dtype torch.int32"):
        gn.group_norm(t.zeros(2, 4, 3, dtype=t.int32, device="cuda"), 2)
    with pytest.raises(ValueError, match="eps=-1"):
        gn.group_norm(x, 2, eps=-1)
    with pytest.raises(ValueError, match="out has dtype"):
        gn.group_norm(x, 2, out=t.empty(2, 4, 3, device="cuda", dtype=t.float64))
