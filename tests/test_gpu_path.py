"""groupnorm._gpu's path from torch tensors to the CUDA kernels, without a GPU: run_forward and run_backward (all
that a GPU call does after its device checks) on CPU tensors, with the kernels' C interface served by the same
kernel sources compiled for the CPU against tests/cuda_emu's emulation (tests/cuda_emu/emu_capi.cpp, loaded by
ctypes in place of groupnorm._cuda). What this checks that the emulated kernel check (test_cuda_emu.py) does not:
the problem tuples, the order of the pointers, the layouts chosen and copied, out= (direct, through scratch, in
place), parameter dtypes, statistics and gradients as tensors, against float64 references. What only a GPU can
check (devices, streams, the allocator) is tests/test_cuda.py's.
"""
import ctypes
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from groupnorm import _core, _gpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
pytestmark = [pytest.mark.xdist_group("gpu_path"),  # one worker compiles the library once
              pytest.mark.skipif(sys.platform == "win32", reason="the emulator needs POSIX fibers and mmap"),
              pytest.mark.own_build]


class _Problem(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("c", ctypes.c_int64), ("s", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("channels_last", ctypes.c_int), ("dtype", ctypes.c_int), ("param_dtype", ctypes.c_int),
                ("silu", ctypes.c_int), ("eps", ctypes.c_double)]


_DTYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


class EmulatedCuda:
    """groupnorm._cuda's functions on the emulated kernels (host pointers; device 0, stream 0)."""

    def __init__(self, library):
        self.lib = ctypes.CDLL(str(library))
        pointer = ctypes.c_void_p
        self.lib.gn_cuda_forward_workspace.restype = ctypes.c_size_t
        self.lib.gn_cuda_backward_workspace.restype = ctypes.c_size_t
        self.lib.gn_cuda_forward.argtypes = [ctypes.POINTER(_Problem)] + [pointer] * 8
        self.lib.gn_cuda_backward.argtypes = [ctypes.POINTER(_Problem)] + [pointer] * 11
        self.lib.gn_emu_set_seed.argtypes = [ctypes.c_uint64]
        self.calls = []  # (direction, problem tuple) of each kernel call
        self.streams = []  # the stream handle of each kernel call
        self.problems = 0  # problems checked: one for each call that was not planned before

    def problem(self, spec):
        """The stand-in of groupnorm._cuda.problem: the checked problem with its workspace sizes."""
        n, c, s, groups, channels_last, dtype, param_dtype, silu, eps = spec
        checked = EmulatedProblem()
        checked.spec = spec
        checked.struct = _Problem(n, c, s, groups, int(channels_last), _DTYPES[dtype], _DTYPES[param_dtype],
                                  int(silu), eps)
        if not self.lib.gn_cuda_problem_valid(ctypes.byref(checked.struct)):
            raise ValueError(f"the CUDA kernels do not take the problem {spec} (cpp/cuda/groupnorm_cuda.h)")
        checked.forward_workspace = self.lib.gn_cuda_forward_workspace(ctypes.byref(checked.struct))
        checked.backward_workspace = self.lib.gn_cuda_backward_workspace(ctypes.byref(checked.struct))
        self.problems += 1
        return checked

    def forward(self, problem, device, *pointers):
        assert device == 0
        self.calls.append(("forward", problem.spec))
        self.streams.append(pointers[-1])
        code = self.lib.gn_cuda_forward(ctypes.byref(problem.struct), *[p or None for p in pointers[:-1]], None)
        assert code == 0, f"gn_cuda_forward returned {code}"

    def backward(self, problem, device, *pointers):
        assert device == 0
        self.calls.append(("backward", problem.spec))
        self.streams.append(pointers[-1])
        code = self.lib.gn_cuda_backward(ctypes.byref(problem.struct), *[p or None for p in pointers[:-1]], None)
        assert code == 0, f"gn_cuda_backward returned {code}"


class EmulatedProblem:
    """What groupnorm._cuda.problem returns: spec, forward_workspace, backward_workspace (and the C struct)."""


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    if not (ROOT / "cpp" / "cuda" / "groupnorm_cuda_impl.cuh").exists() or not (EMU / "emu_capi.cpp").exists():
        pytest.skip("needs the source tree")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    library = tmp_path_factory.mktemp("gpu_path") / "libgn_cuda_emu.so"
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-DGN_CUDA_EMULATE",
               f"-I{ROOT / 'cpp' / 'cuda'}", f"-I{ROOT / 'cpp' / 'include'}", f"-I{EMU}", str(EMU / "emu_capi.cpp"),
               "-o", str(library), "-ldl"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    emulated = EmulatedCuda(library)
    emulated.lib.gn_emu_set_seed(12345)
    return emulated


TORCH = _gpu.TorchArrays(torch)


def forward(cuda, x, groups, weight=None, bias=None, eps=1e-5, activation=None, channel_axis=1, out=None,
            stats=False):
    return _gpu.run_forward(cuda, TORCH, x, groups, weight, bias, eps, activation, channel_axis, out, stats, 0, 0)


def backward(cuda, dy, x, mean, rstd, groups, weight=None, bias=None, activation=None):
    return _gpu.run_backward(cuda, TORCH, dy, x, mean, rstd, groups, weight, bias, activation, 0, 0)


TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(got, want, dtype, what):
    scale = want.abs().max().item() + 1
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= TOLERANCE[dtype], f"{what}: max error {err:.3g} of the scale"


def reference(x, groups, weight, bias, eps, silu, channel_axis=1):
    """float64 group norm with channels on channel_axis (and SiLU)."""
    moved = x.double().movedim(channel_axis, 1)
    y = torch.nn.functional.group_norm(moved, groups, None if weight is None else weight.double(),
                                       None if bias is None else bias.double(), eps)
    y = y * torch.sigmoid(y) if silu else y
    return y.movedim(1, channel_axis)


def layout_of(tensor):
    if tensor.is_contiguous():
        return "contiguous"
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "other"


def make(shape, dtype, layout, seed, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view that is dense in no kernel order: copied once
        x = x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, ::1, :]
        x = torch.cat([x, x], dim=3)[..., :shape[3]]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("silu", [False, True])
def test_forward_matches_float64(cuda, dtype, layout, silu):
    x = make((2, 12, 5, 7), dtype, layout, seed=1, offset=3.0)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(12, generator=gen).to(dtype)
    b = torch.randn(12, generator=gen).to(dtype)
    y, mean, rstd = forward(cuda, x, 3, w, b, 1e-5, "silu" if silu else None, stats=True)
    close(y, reference(x, 3, w, b, 1e-5, silu), dtype, "y")
    assert y.dtype == dtype and y.shape == x.shape
    assert layout_of(y) == ("channels_last" if layout == "channels_last" else "contiguous")
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == stats_dtype and mean.shape == rstd.shape == (2, 3)
    groups = x.double().reshape(2, 3, -1)
    close(mean, groups.mean(-1), dtype, "mean")
    close(rstd, 1 / torch.sqrt(groups.var(-1, unbiased=False) + 1e-5), dtype, "rstd")
    assert cuda.calls[-1] == ("forward", (2, 12, 35, 3, layout == "channels_last", str(dtype)[6:], str(dtype)[6:],
                                          silu, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_with_half_data(cuda, dtype):
    x = make((3, 8, 4, 4), dtype, "channels_last", seed=3)
    w, b = torch.linspace(0.5, 2, 8), torch.linspace(-1, 1, 8)
    y = forward(cuda, x, 4, w, b)
    close(y, reference(x, 4, w, b, 1e-5, False), dtype, "y")
    assert cuda.calls[-1][1][6] == "float32"
    # Only one of them float32: both go as float32. float64 ones with half data: converted to float32.
    close(forward(cuda, x, 4, w.to(dtype), b), reference(x, 4, w.to(dtype), b, 1e-5, False), dtype, "y")
    assert cuda.calls[-1][1][6] == "float32"
    close(forward(cuda, x, 4, w.double(), None), reference(x, 4, w, None, 1e-5, False), dtype, "y")


def test_channel_axis_last(cuda):
    x = make((2, 5, 6, 8), torch.float32, "contiguous", seed=4)  # (N, H, W, C) memory
    w = torch.linspace(-1, 1, 8)
    y = forward(cuda, x, 4, w, None, channel_axis=-1)
    close(y, reference(x, 4, w, None, 1e-5, False, channel_axis=3), torch.float32, "y")
    assert cuda.calls[-1][1][:5] == (2, 8, 30, 4, True)


def test_out_direct_scratch_and_in_place(cuda):
    x = make((2, 8, 6, 6), torch.float32, "channels_last", seed=5)
    want = reference(x, 2, None, None, 1e-5, False)
    direct = torch.full_like(x, math.nan)  # channels_last, like x
    assert forward(cuda, x, 2, out=direct) is direct
    close(direct, want, torch.float32, "direct out")
    scratch = torch.full(x.shape, math.nan)  # contiguous: written through a scratch copy
    assert forward(cuda, x, 2, out=scratch) is scratch
    close(scratch, want, torch.float32, "scratch out")
    inplace = x.clone()
    assert forward(cuda, inplace, 2, out=inplace) is inplace
    close(inplace, want, torch.float32, "in place")
    # out overlapping x but not x itself: through scratch, x read whole before anything is written
    base = torch.randn(2 * 8 * 36 + 5)
    xs = base[:2 * 8 * 36].view(2, 8, 6, 6)
    os_ = base[5:].view(2, 8, 6, 6)
    expected = reference(xs.clone(), 2, None, None, 1e-5, False)
    forward(cuda, xs, 2, out=os_)
    close(os_, expected, torch.float32, "overlapping out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_backward_matches_autograd_float64(cuda, dtype, layout, with_weight):
    x = make((2, 12, 5, 7), dtype, layout, seed=6, offset=-2.0)
    dy = make((2, 12, 5, 7), dtype, "channels_last" if layout == "contiguous" else "contiguous", seed=7)
    w = torch.linspace(-1.5, 1.5, 12).to(dtype) if with_weight else None
    _, mean, rstd = forward(cuda, x, 4, w, None, stats=True)
    dx, dw, db = backward(cuda, dy, x, mean, rstd, 4, w)
    xr = x.double().requires_grad_()
    wr = (w.double() if with_weight else torch.ones(12, dtype=torch.float64)).requires_grad_()
    br = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.group_norm(xr, 4, wr, br, 1e-5).backward(dy.double())
    close(dx, xr.grad, dtype, "grad_input")
    close(dw, wr.grad, dtype, "grad_weight")
    close(db, br.grad, dtype, "grad_bias")
    assert dx.dtype == dtype and layout_of(dx) == ("channels_last" if layout == "channels_last" else "contiguous")
    assert dw.dtype == db.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_silu_backward_matches_autograd_float64(cuda, dtype, layout):
    """activation='silu' through the forward with statistics and the backward with bias: the CUDA kernels'
    fused SiLU gradient against torch's silu(group_norm) in float64."""
    x = make((2, 12, 5, 7), dtype, layout, seed=8, offset=0.5)
    dz = make((2, 12, 5, 7), dtype, layout, seed=9)
    w = torch.linspace(-1.5, 1.5, 12).to(dtype)
    b = torch.linspace(1.0, -0.5, 12).to(torch.float32)  # float32 bias with 16-bit data: both go as float32
    z, mean, rstd = forward(cuda, x, 4, w, b, activation="silu", stats=True)
    dx, dw, db = backward(cuda, dz, x, mean, rstd, 4, w, b, activation="silu")
    xr, wr, br = (t.detach().clone().double().requires_grad_() for t in (x, w, b))
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(xr, 4, wr, br, 1e-5))
    want.backward(dz.double())
    close(z, want.detach(), dtype, "z")
    close(dx, xr.grad, dtype, "grad_input")
    close(dw, wr.grad, dtype, "grad_weight")
    close(db, br.grad, dtype, "grad_bias")
    plain = backward(cuda, dz, x, mean, rstd, 4, w, b)  # the bias alone changes nothing
    assert torch.equal(plain[0], backward(cuda, dz, x, mean, rstd, 4, w)[0])
    assert not torch.equal(plain[0], dx)


def test_empty_tensors(cuda):
    x = torch.empty(2, 4, 0)
    y, mean, rstd = forward(cuda, x, 2, stats=True)
    assert y.shape == x.shape and torch.isnan(mean).all() and torch.isnan(rstd).all()
    dx, dw, db = backward(cuda, x, x, mean, rstd, 2)
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all()
    calls = len(cuda.calls)
    forward(cuda, torch.empty(0, 4, 3), 2)
    assert len(cuda.calls) == calls  # nothing launched


def test_checks_name_the_argument(cuda):
    x = torch.randn(2, 4, 3)
    cases = [
        (lambda: forward(cuda, x, 3), ValueError, "num_groups=3 must divide the number of channels"),
        (lambda: forward(cuda, x, 0), ValueError, "num_groups=0 must be positive"),
        (lambda: forward(cuda, x, 2.0), TypeError, "num_groups=2.0 must be an integer"),
        (lambda: forward(cuda, x, 2, torch.ones(3)), ValueError, r"weight has shape \(3,\)"),
        (lambda: forward(cuda, x, 2, None, torch.ones(4, dtype=torch.complex64)), TypeError, "bias has dtype"),
        (lambda: forward(cuda, x, 2, eps=-1.0), ValueError, "eps=-1.0 must be non-negative"),
        (lambda: forward(cuda, x, 2, activation="relu"), ValueError, "activation='relu' is unknown"),
        (lambda: forward(cuda, x, 2, channel_axis=0), ValueError, "channel_axis=0 names the batch axis"),
        (lambda: forward(cuda, x, 2, out=torch.empty(2, 4, 3, dtype=torch.float64)), ValueError, "out has dtype"),
        (lambda: forward(cuda, x, 2, out=torch.empty(2, 4)), ValueError, "out has shape"),
        (lambda: forward(cuda, x.int(), 2), TypeError, "input has dtype torch.int32"),
        (lambda: forward(cuda, torch.randn(4), 2), ValueError, "it needs at least 2"),
        (lambda: backward(cuda, torch.randn(2, 4, 2), x, torch.zeros(2, 2), torch.ones(2, 2), 2), ValueError,
         "grad_output has shape"),
        (lambda: backward(cuda, x, x, torch.zeros(2, 3), torch.ones(2, 2), 2), ValueError, r"mean has shape \(2, 3\)"),
        (lambda: backward(cuda, x, x, torch.zeros(2, 2), [1.0], 2), TypeError, "rstd must be a torch.Tensor"),
    ]
    calls = len(cuda.calls)
    before = x.clone()
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert len(cuda.calls) == calls and torch.equal(x, before)


def test_problem_tuple_matches_the_extension(cuda):
    """The stand-in's workspace sizes are the real extension's (the same C functions behind both): the tuple that
    groupnorm._gpu builds means the same to groupnorm._cuda."""
    if _core.CUDA_BUILD_NOTE != "built":
        pytest.skip("no CUDA backend in this build")
    from groupnorm import _cuda
    for problem in [(2, 64, 4096, 32, False, "float32", "float32", False, 1e-5),
                    (1, 320, 4096, 32, True, "float16", "float32", True, 1e-6),
                    (8, 6, 1, 3, False, "float64", "float64", False, 0.0)]:
        real, emulated = _cuda.problem(problem), cuda.problem(problem)
        assert real.spec == emulated.spec == problem
        assert real.forward_workspace == emulated.forward_workspace
        assert real.backward_workspace == emulated.backward_workspace


# ------------------------------------------------------------------------------------------------ kept plans

def _fresh_plans():
    _gpu._plans.clear()


def test_a_plan_is_kept_for_the_same_metadata_and_only_for_it(cuda):
    """The second call with the same metadata checks no problem again and gives the same bits; any change in
    shape, strides, dtype, parameters, out= or scalars makes a plan of its own."""
    _fresh_plans()
    x = make((2, 8, 6, 5), torch.float32, "channels_last", seed=11)
    w, b = torch.linspace(-1, 1, 8), torch.linspace(0, 1, 8)
    first = forward(cuda, x, 4, w, b)
    checked = cuda.problems
    again = forward(cuda, x.clone(memory_format=torch.channels_last), 4, w.clone(), b.clone())
    assert cuda.problems == checked and torch.equal(first, again)
    other = make((2, 8, 6, 5), torch.float32, "channels_last", seed=12)  # other values, same metadata
    close(forward(cuda, other, 4, w, b), reference(other, 4, w, b, 1e-5, False), torch.float32, "y")
    assert cuda.problems == checked
    variants = [
        lambda: forward(cuda, x.contiguous(), 4, w, b),  # strides
        lambda: forward(cuda, x.double(), 4, w.double(), b.double()),  # dtype
        lambda: forward(cuda, x, 2, w, b),  # num_groups
        lambda: forward(cuda, x, 4, w, None),  # no bias
        lambda: forward(cuda, x, 4, w, b, eps=0.5),
        lambda: forward(cuda, x, 4, w, b, activation="silu"),
        lambda: forward(cuda, x, 4, w, b, stats=True),
        lambda: forward(cuda, x, 4, w, b, out=torch.empty_like(x)),
    ]
    for variant in variants:
        before = cuda.problems
        variant()
        assert cuda.problems == before + 1
        variant()
        assert cuda.problems == before + 1
    assert cuda.calls[-1][1][8] == 1e-5 and cuda.calls[-2][1][8] == 1e-5


def test_a_kept_plan_keeps_the_checks_that_depend_on_values(cuda):
    _fresh_plans()
    x = make((2, 8, 4, 4), torch.float32, "contiguous", seed=13)
    want = reference(x, 4, None, None, 1e-5, False)
    forward(cuda, x, 1)
    forward(cuda, x, 4)
    forward(cuda, x, 2, eps=1.0)
    checked = cuda.problems
    # Equal as Python values, but errors: the key has the types
    with pytest.raises(TypeError, match="num_groups=True must be an integer"):
        forward(cuda, x, True)
    with pytest.raises(TypeError, match="num_groups=4.0 must be an integer"):
        forward(cuda, x, 4.0)
    close(forward(cuda, x, 2, eps=1), reference(x, 2, None, None, 1.0, False), torch.float32, "eps as an integer")
    # requires_grad while grad mode is on: refused, though the same tensor without it ran
    with pytest.raises(ValueError, match="input requires grad"):
        forward(cuda, x.clone().requires_grad_(), 4)
    with torch.no_grad():
        close(forward(cuda, x.clone().requires_grad_(), 4), want, torch.float32, "under no_grad")
    # A lazily negated view has the metadata of a plain tensor but another value
    negated = torch._neg_view(x)  # holds x's memory, means -x
    assert negated.is_neg()
    close(forward(cuda, negated, 4), reference(-x, 4, None, None, 1e-5, False), torch.float32, "negated view")
    # out= of one metadata: direct, in place, or overlapping x (through scratch), decided each call
    out = torch.full_like(x, math.nan)
    assert forward(cuda, x, 4, out=out) is out
    close(out, want, torch.float32, "out")
    inplace = x.clone()
    forward(cuda, inplace, 4, out=inplace)
    close(inplace, want, torch.float32, "in place")
    base = torch.randn(2 * 8 * 16 + 3)
    xs, os_ = base[:2 * 8 * 16].view(2, 8, 4, 4), base[3:].view(2, 8, 4, 4)
    expected = reference(xs.clone(), 4, None, None, 1e-5, False)
    forward(cuda, xs, 4, out=os_)
    close(os_, expected, torch.float32, "overlapping out")
    assert cuda.problems > checked  # the variants above checked problems of their own


def test_backward_plans(cuda):
    _fresh_plans()
    x = make((2, 8, 4, 6), torch.float16, "channels_last", seed=14)
    dy = make((2, 8, 4, 6), torch.float16, "channels_last", seed=15)
    w = torch.linspace(0.5, 1.5, 8).half()
    _, mean, rstd = forward(cuda, x, 2, w, None, stats=True)
    first = backward(cuda, dy, x, mean, rstd, 2, w)
    checked = cuda.problems
    second = backward(cuda, dy, x, mean, rstd, 2, w)
    assert cuda.problems == checked
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # grad_output in another layout is copied, and mean/rstd of another dtype converted: correct, never kept
    for args in [(dy.contiguous(), x, mean, rstd), (dy, x, mean.double(), rstd)]:
        got = backward(cuda, *args, 2, w)
        assert all(torch.equal(a, b) for a, b in zip(first, got))
        again = cuda.problems
        backward(cuda, *args, 2, w)
        assert cuda.problems == again + 1


def test_the_plan_cache_is_bounded(cuda, monkeypatch):
    _fresh_plans()
    monkeypatch.setattr(_gpu, "_PLANS_KEPT", 4)
    for c in range(1, 11):
        forward(cuda, torch.randn(1, c, 3), 1)
        assert len(_gpu._plans) <= 4


# ------------------------------------------------------------------------------------------------ streams

class _CudaStreamProtocol:
    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


class _TorchLike:
    cuda_stream = 0x7F00


class _CupyLike:
    ptr = 0x7F10


def test_stream_handles():
    assert _gpu.stream_handle(0) == 0 and _gpu.stream_handle(2) == 2 and _gpu.stream_handle(0x5000) == 0x5000
    assert _gpu.stream_handle(_CudaStreamProtocol(0x6000)) == 0x6000
    assert _gpu.stream_handle(_TorchLike()) == 0x7F00
    assert _gpu.stream_handle(_CupyLike()) == 0x7F10
    for bad, error, message in [(True, TypeError, "stream=True must be None"), (1.5, TypeError, "stream=1.5"),
                                ("s", TypeError, "stream='s'"), (-1, ValueError, "names the handle -1; a cudaS"),
                                (_CudaStreamProtocol(-3), ValueError, "names the handle -3"),
                                (_CudaStreamProtocol(None), TypeError, "its handle is None")]:
        with pytest.raises(error, match=message):
            _gpu.stream_handle(bad)


def test_the_stream_reaches_the_kernels(cuda):
    x = make((2, 8, 4, 4), torch.float32, "contiguous", seed=16)
    _, mean, rstd = _gpu.run_forward(cuda, TORCH, x, 4, None, None, 1e-5, None, 1, None, True, 0, 0x1234)
    assert cuda.streams[-1] == 0x1234
    _gpu.run_backward(cuda, TORCH, x, x, mean, rstd, 4, None, None, None, 0, 0x5678)
    assert cuda.streams[-1] == 0x5678


# ------------------------------------------------------------------------------------------------ NumPy-like arrays

class NumpyArrays(_gpu.NumpyLikeArrays):
    """CuPy's side of a call (groupnorm._gpu.CupyArrays) with NumPy arrays in its place: everything but the device,
    the pointers and the streams, which are CuPy's own."""

    def device(self, array):
        return 0

    def ptr(self, array):
        return array.ctypes.data

    def device_index(self, array):
        return 0


NUMPY = NumpyArrays(np)


def np_forward(cuda, x, groups, weight=None, bias=None, eps=1e-5, activation=None, channel_axis=1, out=None,
               stats=False):
    return _gpu.run_forward(cuda, NUMPY, x, groups, weight, bias, eps, activation, channel_axis, out, stats, 0, 0)


def np_layout(array):
    if array.flags.c_contiguous:
        return "contiguous"
    if array.ndim == 4 and array.transpose(0, 2, 3, 1).flags.c_contiguous:
        return "channels_last"
    return "other"


def as_numpy(tensor, layout):
    """A NumPy array of the tensor's values in `layout`: contiguous, channels_last or strided (dense in no order)."""
    array = tensor.numpy()
    if layout == "channels_last":
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "strided":
        wide = np.zeros(array.shape[:3] + (2 * array.shape[3],), array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    return np.ascontiguousarray(array)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_numpy_like_forward_and_backward(cuda, dtype, layout):
    xt = make((2, 12, 5, 6), dtype, "contiguous", seed=21, offset=2.0)
    dyt = make((2, 12, 5, 6), dtype, "contiguous", seed=22)
    x, dy = as_numpy(xt, layout), as_numpy(dyt, "contiguous" if layout != "contiguous" else "channels_last")
    assert np_layout(x) == ("other" if layout == "strided" else layout)
    w = np.linspace(-1.5, 1.5, 12).astype(x.dtype)
    b = np.linspace(0, 1, 12).astype(np.float32)  # mixed: float32 bias (half data: both go as float32)
    y, mean, rstd = np_forward(cuda, x, 4, w, b, stats=True)
    bias = torch.from_numpy(b.astype(x.dtype))
    want = reference(xt, 4, torch.from_numpy(w), bias if dtype != torch.float16 else torch.from_numpy(b), 1e-5,
                     False)
    close(torch.from_numpy(np.ascontiguousarray(y)), want, dtype, "y")
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype
    assert np_layout(y) == ("channels_last" if layout == "channels_last" else "contiguous")
    stats = np.float64 if dtype == torch.float64 else np.float32
    assert mean.dtype == rstd.dtype == stats and mean.shape == (2, 4)
    dx, dw, db = _gpu.run_backward(cuda, NUMPY, dy, x, mean, rstd, 4, w, None, None, 0, 0)
    xr = xt.double().requires_grad_()
    wr = torch.from_numpy(w).double().requires_grad_()
    br = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.group_norm(xr, 4, wr, br, 1e-5).backward(dyt.double())
    close(torch.from_numpy(np.ascontiguousarray(dx)), xr.grad, dtype, "grad_input")
    close(torch.from_numpy(dw), wr.grad, dtype, "grad_weight")
    close(torch.from_numpy(db), br.grad, dtype, "grad_bias")
    assert np_layout(dx) == ("channels_last" if layout == "channels_last" else "contiguous")


def test_numpy_like_out_channel_axis_and_checks(cuda):
    _fresh_plans()
    xt = make((2, 8, 4, 6), torch.float32, "contiguous", seed=23)
    x = xt.numpy()
    want = reference(xt, 2, None, None, 1e-5, True)
    out = np.full_like(x, np.nan)
    assert np_forward(cuda, x, 2, activation="silu", out=out) is out
    close(torch.from_numpy(out), want, torch.float32, "out")
    checked = cuda.problems
    again = np.full_like(x, np.nan)
    np_forward(cuda, x, 2, activation="silu", out=again)
    assert cuda.problems == checked and np.array_equal(out, again)  # the kept plan
    inplace = x.copy()
    np_forward(cuda, inplace, 2, activation="silu", out=inplace)
    close(torch.from_numpy(inplace), want, torch.float32, "in place")
    scratch = np.full(x.shape[::-1], np.nan, np.float32).T  # Fortran order: through a scratch copy
    np_forward(cuda, x, 2, activation="silu", out=scratch)
    close(torch.from_numpy(np.ascontiguousarray(scratch)), want, torch.float32, "scratch out")
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = np_forward(cuda, nhwc, 2, channel_axis=-1)
    close(torch.from_numpy(got).permute(0, 3, 1, 2), reference(xt, 2, None, None, 1e-5, False), torch.float32,
          "channel_axis=-1")
    assert cuda.calls[-1][1][:5] == (2, 8, 24, 2, True)
    readonly = np.empty_like(x)
    readonly.flags.writeable = False
    cases = [
        (lambda: np_forward(cuda, x, 3), ValueError, "num_groups=3 must divide the number of channels"),
        (lambda: np_forward(cuda, x, 2, np.ones(3, np.float32)), ValueError, r"weight has shape \(3,\)"),
        (lambda: np_forward(cuda, x, 2, np.ones(8, np.complex64)), TypeError, "weight has dtype complex64"),
        (lambda: np_forward(cuda, x, 2, torch.ones(8)), TypeError, "weight must be a numpy.ndarray on cuda:0"),
        (lambda: np_forward(cuda, x.astype(np.int32), 2), TypeError, "input has dtype int32; groupnorm supports"),
        (lambda: np_forward(cuda, x.astype(">f4"), 2), TypeError, "input has dtype >f4"),
        (lambda: np_forward(cuda, x, 2, out=readonly), ValueError, "out is read-only"),
        (lambda: np_forward(cuda, x, 2, out=np.empty(x.shape)), ValueError, "out has dtype float64"),
        (lambda: _gpu.run_backward(cuda, NUMPY, x, x, np.zeros((2, 3), np.float32), np.ones((2, 2), np.float32), 2,
                                   None, None, None, 0, 0), ValueError, r"mean has shape \(2, 3\)"),
    ]
    calls = len(cuda.calls)
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert len(cuda.calls) == calls


def test_numpy_like_empty_and_byte_strides(cuda):
    y, mean, rstd = np_forward(cuda, np.empty((2, 4, 0), np.float32), 2, stats=True)
    assert y.shape == (2, 4, 0) and np.isnan(mean).all() and np.isnan(rstd).all()
    # A stride that is no whole number of elements (a field of a structured array): dense in no order, copied
    record = np.zeros((2, 4, 3), dtype=[("a", np.float32), ("b", np.float32)])
    record["b"] = np.random.default_rng(1).standard_normal((2, 4, 3))
    view = record["b"]
    assert NUMPY.strides(view)[2] == 2  # whole, but not dense: 8-byte steps of a 4-byte element
    got = np_forward(cuda, view, 2)
    close(torch.from_numpy(got), reference(torch.from_numpy(np.ascontiguousarray(view)), 2, None, None, 1e-5, False),
          torch.float32, "strided field")


def test_frameworks_served_and_refused():
    assert isinstance(_gpu.arrays_of(torch.zeros(1)), _gpu.TorchArrays)
    assert _gpu.arrays_of(np.zeros(1)) is None and _gpu.arrays_of([1.0]) is None

    class OtherArray:  # any other producer's GPU array
        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(ValueError, match=r"^input lives on device kDLCUDA:0 as a test_gpu_path\.OtherArray; "
                                         r"groupnorm's CUDA backend serves torch CUDA tensors, CuPy arrays and "
                                         r"\(through groupnorm\.jax\) JAX arrays: pass other arrays through "
                                         r"torch\.from_dlpack or cupy\.from_dlpack"):
        _gpu._served("input", OtherArray(), "kDLCUDA:0")
