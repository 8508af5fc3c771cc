"""loop_entry_points.py — every groupnorm entry point (the functions, the layer, DLPack, each argument check) over
all dtypes, layouts and options, a few rounds each, for valgrind's memcheck (.ci/memcheck). Results are checked
against a float64 reference, so a kernel that reads uninitialised memory fails here as well as under memcheck.

    python tests/memcheck/loop_entry_points.py [--rounds N] [--expect-isa NAME] [--torch]
"""
import argparse
import sys

import numpy as np

import groupnorm as gn
from groupnorm import _core, _dlpack
from groupnorm._dlpack import DLPackArray, as_ndarray, wrap_like

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
if _dlpack.bfloat16_dtype() != _dlpack.BFLOAT16_STORAGE:  # ml_dtypes is installed
    DTYPES.append(_dlpack.bfloat16_dtype())
TOLERANCE = {4: 1e-5, 8: 1e-12, 2: 2e-2}  # by itemsize, relative to max|y_ref|
# (shape, G): odd tails, one position per channel, and a group past the kernels' 16384-element chunk.
SHAPES = [((2, 6, 37), 3), ((3, 4, 5, 7), 2), ((2, 8, 1), 8), ((1, 2, 20001), 1)]
calls = 0


def reference(x, G, weight=None, bias=None, eps=1e-5, silu=False):
    """float64 GroupNorm of x (N, C, *) with channels on axis 1."""
    x64 = np.asarray(x, np.float64)
    groups = x64.reshape(x64.shape[0], G, -1)
    mean = groups.mean(axis=2, keepdims=True)
    y = ((groups - mean) / np.sqrt(groups.var(axis=2, keepdims=True) + eps)).reshape(x64.shape)
    shape = (1, -1) + (1,) * (x64.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y / (1 + np.exp(-y)) if silu else y


def check(y, y_ref, what, itemsize=None):
    """y matches y_ref within the tolerance of its dtype (or of elements of `itemsize` bytes)."""
    global calls
    calls += 1
    y = np.asarray(y)
    error = np.abs(y.astype(np.float64) - y_ref).max(initial=0.0)
    bound = TOLERANCE[itemsize or y.dtype.itemsize] * max(np.abs(y_ref).max(initial=0.0), 1.0)
    if not error <= bound:  # NaN fails too
        raise AssertionError(f"{what}: max error {error} > {bound}")


def random(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def layouts(x):
    """x in every memory layout the kernels meet: native, channels-last, and copied ones."""
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    yield "contiguous", x
    yield "channels_last", np.moveaxis(nhwc, -1, 1)
    yield "fortran", np.asfortranarray(x)
    yield "negative_strides", x[..., ::-1].copy()[..., ::-1]
    padded = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    padded[..., ::2] = x
    yield "strided", padded[..., ::2]


def at_odd_address(a):
    odd = np.frombuffer(bytearray(a.nbytes + 1), dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    odd[...] = a
    return odd


def loop_group_norm(rng):
    for shape, G in SHAPES:
        C = shape[1]
        for dtype in DTYPES:
            param_dtype = np.float64 if dtype == np.float64 else np.float32
            weight, bias = random(rng, (C,), param_dtype), random(rng, (C,), param_dtype)
            x = random(rng, shape, dtype)
            for name, view in layouts(x):
                for w, b in ((None, None), (weight, None), (None, bias), (weight, bias)):
                    check(gn.group_norm(view, G, w, b), reference(x, G, w, b), f"group_norm {name} {dtype}")
                check(gn.group_norm(view, G, weight, bias, activation="silu"),
                      reference(x, G, weight, bias, silu=True), f"group_norm silu {name} {dtype}")
                out = np.full_like(view, np.nan)
                assert gn.group_norm(view, G, weight, bias, out=out) is out
                check(out, reference(x, G, weight, bias), f"group_norm out= {name} {dtype}")
            nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            check(np.moveaxis(gn.group_norm(nhwc, G, weight, bias, channel_axis=-1), -1, 1),
                  reference(x, G, weight, bias), f"group_norm channel_axis=-1 {dtype}")
            in_place = x.copy()
            assert gn.group_norm(in_place, G, weight, bias, out=in_place) is in_place
            check(in_place, reference(x, G, weight, bias), f"group_norm in place {dtype}")
            odd = at_odd_address(np.zeros_like(x))
            gn.group_norm(at_odd_address(x), G, at_odd_address(weight), at_odd_address(bias), out=odd)
            check(odd, reference(x, G, weight, bias), f"group_norm misaligned {dtype}")
    # out= overlapping the input without being it: the kernels write to scratch first.
    buffer = random(rng, (2 * 6 * 37 + 5,), np.float32)
    x, out = buffer[:-5].reshape(2, 6, 37), buffer[5:].reshape(2, 6, 37)
    expected = reference(x, 3)
    gn.group_norm(x, 3, out=out)
    check(out, expected, "group_norm overlapping out=")
    empty = np.empty((0, 4, 3), np.float32)
    assert gn.group_norm(empty, 2).shape == empty.shape


def loop_forward_backward(rng):
    for shape, G in SHAPES:
        N, C = shape[:2]
        for dtype in DTYPES:
            param_dtype = np.float64 if dtype == np.float64 else np.float32
            weight, bias = random(rng, (C,), param_dtype), random(rng, (C,), param_dtype)
            x, dy = random(rng, shape, dtype), random(rng, shape, dtype)
            for (name, x_view), (_, dy_view) in zip(layouts(x), layouts(dy)):
                for w, b in ((None, None), (weight, bias)):
                    y, mean, rstd = gn.group_norm_forward(x_view, G, w, b)
                    check(y, reference(x, G, w, b), f"group_norm_forward {name} {dtype}")
                    check(mean, np.asarray(x, np.float64).reshape(N, G, -1).mean(axis=2), "mean")
                    dx, dw, db = gn.group_norm_backward(dy_view, x_view, mean, rstd, G, w)
                    check(db, np.asarray(dy, np.float64).sum(axis=tuple({0} | set(range(2, x.ndim)))),
                          f"group_norm_backward grad_bias {name} {dtype}")
                    assert dx.shape == x.shape and np.isfinite(np.asarray(dx, np.float64)).all()
            # The SiLU's backward in the native layouts, its data offset so that the low part of the mean is summed.
            x_off = (np.asarray(x, np.float64) + 100).astype(dtype)
            for (name, x_view), (_, dy_view) in list(zip(layouts(x_off), layouts(dy)))[:2]:
                _, mean, rstd = gn.group_norm_forward(x_view, G, weight, bias, activation="silu")
                dx, dw, db = gn.group_norm_backward(dy_view, x_view, mean, rstd, G, weight, bias=bias,
                                                    activation="silu")
                assert np.isfinite(np.asarray(dx, np.float64)).all() and np.isfinite(dw).all(), name
            # grad_output in another layout than the input, and statistics of another dtype.
            _, mean, rstd = gn.group_norm_forward(x, G, weight)
            gn.group_norm_backward(np.asfortranarray(dy), x, mean.astype(np.float64), rstd.tolist(), G, weight)
            gn.group_norm_backward(dy, x, at_odd_address(mean), at_odd_address(rstd), G, at_odd_address(weight))
    x = np.empty((0, 4, 3), np.float32)
    _, mean, rstd = gn.group_norm_forward(x, 2)
    gn.group_norm_backward(x, x, mean, rstd, 2)


def loop_layer(rng):
    for dtype in (np.float32, np.float64):
        for affine in (True, False):
            layer = gn.GroupNorm(3, 6, affine=affine, dtype=dtype)
            x = random(rng, (2, 6, 5, 3), dtype)
            check(layer(x), reference(x, 3, layer.weight, layer.bias), f"GroupNorm {dtype} affine={affine}")
            grad_input = layer.backward(np.ones_like(x))
            assert grad_input.shape == x.shape
            assert repr(layer).startswith("GroupNorm(3, 6")


class LegacyProducer:
    """A pre-1.0 DLPack producer: __dlpack__ takes no max_version and gives a "dltensor" capsule."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self):
        return DLPackArray(self.array).__dlpack__()

    def __dlpack_device__(self):
        return (1, 0)


class NumpyProducer:
    """NumPy's own producer behind a foreign type (so groupnorm does not take it for an ndarray)."""

    def __init__(self, array, device=(1, 0)):
        self.array, self.device = array, device

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device


def loop_dlpack(rng):
    for dtype in DTYPES:
        x = random(rng, (2, 6, 4, 3), dtype)
        weight = random(rng, (6,), np.float64 if dtype == np.float64 else np.float32)
        for producer in (DLPackArray, LegacyProducer):
            view = as_ndarray(producer(x), "input")
            assert view.ctypes.data == x.ctypes.data
            y = gn.group_norm(producer(x), 3, weight)
            check(np.asarray(y.numpy() if isinstance(y, DLPackArray) else y), reference(x, 3, weight),
                  f"group_norm via DLPack {producer.__name__} {dtype}")
        out = np.zeros_like(x)
        gn.group_norm(DLPackArray(x), 3, DLPackArray(weight), out=DLPackArray(out))
        check(out, reference(x, 3, weight), f"group_norm DLPack out= {dtype}")
        y, mean, rstd = gn.group_norm_forward(DLPackArray(x), 3, weight)
        dx, dw, db = gn.group_norm_backward(DLPackArray(x), DLPackArray(x), mean, rstd, 3, DLPackArray(weight))
        assert isinstance(dx, DLPackArray) and dx.shape == x.shape
        channels_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        check(as_ndarray(DLPackArray(channels_last), "input"), x.astype(np.float64), "DLPack strides")
        if dtype.kind == "f":  # NumPy's consumer takes no bfloat16
            check(np.from_dlpack(wrap_like(x, object())), x.astype(np.float64), "np.from_dlpack(DLPackArray)")
        assert wrap_like(x, x) is x
    DLPackArray(np.ones(3, np.float32)).__dlpack__(max_version=(1, 1))  # dropped unconsumed: its destructor frees
    DLPackArray(np.ones(3, np.float32)).__dlpack__()
    read_only = np.ones((2, 2), np.float32)
    read_only.flags.writeable = False
    assert not as_ndarray(DLPackArray(read_only), "input").flags.writeable
    as_ndarray(DLPackArray(np.ones((2, 3), np.float32)[:, ::2]), "input")
    as_ndarray(DLPackArray(np.ones((2, 3), ">f4")), "input")  # exported as a native copy
    as_ndarray(DLPackArray(np.empty((0, 3), np.float32)), "input")
    as_ndarray(NumpyProducer(np.ones((2, 3), np.float32)), "input")


def expect_error(exception, function, *args, **kwargs):
    global calls
    calls += 1
    try:
        function(*args, **kwargs)
    except exception:
        return
    raise AssertionError(f"{function.__name__}{args!r} did not raise {exception.__name__}")


def loop_errors(rng):
    x = random(rng, (2, 6, 5), np.float32)
    _, mean, rstd = gn.group_norm_forward(x, 3)
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    for function in (gn.group_norm, gn.group_norm_forward):
        expect_error(TypeError, function, "x", 3)
        expect_error(TypeError, function, x.astype(np.int32), 3)
        expect_error(TypeError, function, x.astype(np.complex64), 3)
        expect_error(ValueError, function, x[0, 0], 3)
        expect_error(ValueError, function, x.reshape((1,) * 31 + (2, 6, 5)), 3)
        expect_error(ValueError, function, x, 0)
        expect_error(ValueError, function, x, 4)
        expect_error(TypeError, function, x, True)
        expect_error(TypeError, function, x, 2.5)
        expect_error(ValueError, function, x, 3, eps=-1.0)
        expect_error(ValueError, function, x, 3, eps=float("nan"))
        expect_error(TypeError, function, x, 3, eps="small")
        expect_error(ValueError, function, x, 3, np.ones(5, np.float32))
        expect_error(TypeError, function, x, 3, None, np.ones(6, np.complex64))
        expect_error(TypeError, function, x, 3, "weights")
    expect_error(ValueError, gn.group_norm, x, 3, activation="relu")
    expect_error(TypeError, gn.group_norm, x, 3, activation=1)
    expect_error(ValueError, gn.group_norm, x, 3, channel_axis=0)
    expect_error(ValueError, gn.group_norm, x, 3, channel_axis=3)
    expect_error(TypeError, gn.group_norm, x, 3, channel_axis="last")
    expect_error(ValueError, gn.group_norm, x, 3, out=np.zeros((2, 6, 4), np.float32))
    expect_error(ValueError, gn.group_norm, x, 3, out=np.zeros_like(x, np.float64))
    expect_error(ValueError, gn.group_norm, x, 3, out=read_only)
    expect_error(TypeError, gn.group_norm, x, 3, out=[0.0] * 60)
    expect_error(ValueError, gn.group_norm_backward, x[:, :, :4], x, mean, rstd, 3)
    expect_error(ValueError, gn.group_norm_backward, x.astype(np.float64), x, mean, rstd, 3)
    expect_error(TypeError, gn.group_norm_backward, x, x, None, rstd, 3)
    expect_error(ValueError, gn.group_norm_backward, x, x, mean[:1], rstd, 3)
    expect_error(TypeError, gn.group_norm_backward, x, x, mean, rstd.astype(np.complex64), 3)
    expect_error(ValueError, gn.group_norm_backward, x, x, mean, rstd, 2)
    expect_error(ValueError, gn.group_norm_backward, x, x, mean, rstd, 3, np.ones(4, np.float32))
    expect_error(ValueError, gn.GroupNorm, 0, 6)
    expect_error(ValueError, gn.GroupNorm, 4, 6)
    expect_error(TypeError, gn.GroupNorm, 2.0, 6)
    expect_error(ValueError, gn.GroupNorm, 3, 6, eps=-1.0)
    expect_error(TypeError, gn.GroupNorm, 3, 6, affine="yes")
    expect_error(TypeError, gn.GroupNorm, 3, 6, dtype=np.int32)
    expect_error(ValueError, gn.GroupNorm(3, 6), x[:, :4])
    expect_error(RuntimeError, gn.GroupNorm(3, 6).backward, x)
    expect_error(ValueError, gn.set_num_threads, -1)
    expect_error(TypeError, gn.set_num_threads, True)
    expect_error(ValueError, _core.set_isa, "sse9")
    # DLPack consumer and producer checks; a refused capsule still has its deleter run.
    expect_error(TypeError, as_ndarray, object(), "input")
    expect_error(TypeError, as_ndarray, NumpyProducer(np.ones(3, np.int32)), "input")
    expect_error(TypeError, as_ndarray, NumpyProducer(np.ones(3, np.complex64)), "input")
    expect_error(ValueError, as_ndarray, NumpyProducer(np.ones(3, np.float32), device=(2, 0)), "input")
    expect_error(TypeError, as_ndarray, NumpyProducer(np.ones(3, np.float32), device="cpu"), "input")
    expect_error(ValueError, as_ndarray, DLPackArray(read_only), "out", writable=True)
    expect_error(TypeError, DLPackArray, np.ones(3, np.int32))
    expect_error(TypeError, DLPackArray, [1.0, 2.0])
    expect_error(ValueError, DLPackArray(x).__dlpack__, stream=1)
    expect_error(BufferError, DLPackArray(x).__dlpack__, dl_device=(2, 0))
    expect_error(BufferError, DLPackArray(read_only).__dlpack__)
    expect_error(BufferError, DLPackArray(np.ones(3, ">f4")).__dlpack__, max_version=(1, 1), copy=False)
    expect_error(ValueError, gn.group_norm, DLPackArray(x), 3, out=DLPackArray(read_only))
    expect_error(TypeError, gn.group_norm, NumpyProducer(x.astype(np.int32)), 3)


def loop_torch(rng):
    """torch tensors through the DLPack path and groupnorm.torch's autograd Function and module."""
    import torch
    import groupnorm.torch as gnt

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(2, 6, 4, 3, dtype=dtype)
        for tensor in (x, x.to(memory_format=torch.channels_last)):
            y = gn.group_norm(tensor, 3, torch.ones(6), torch.zeros(6))
            check(y.double().numpy(), reference(x.double().numpy(), 3), f"group_norm torch {dtype}",
                  itemsize=x.element_size())
            y, mean, rstd = gn.group_norm_forward(tensor, 3)
            gn.group_norm_backward(torch.ones_like(tensor), tensor, mean, rstd, 3)
            leaf = tensor.detach().requires_grad_()
            gnt.group_norm(leaf, 3).sum().backward()
            assert leaf.grad.shape == x.shape
    module = gnt.GroupNorm(3, 6)
    module(torch.randn(2, 6, 5, requires_grad=True)).sum().backward()
    assert module.weight.grad.shape == (6,)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="times every entry point is looped (default 2)")
    parser.add_argument("--expect-isa", help="fail unless groupnorm runs at this ISA level")
    parser.add_argument("--torch", action="store_true", help="also loop torch tensors (slow under valgrind)")
    args = parser.parse_args()
    isa = _core.get_isa()
    print(f"loop_entry_points: ISA level {isa}, {gn.get_num_threads()} threads, dtypes "
          f"{', '.join(str(d) for d in DTYPES)}", flush=True)
    if args.expect_isa and isa != args.expect_isa:
        sys.exit(f"loop_entry_points: runs at ISA level {isa}, expected {args.expect_isa}")
    rng = np.random.default_rng(2024)
    loops = [loop_group_norm, loop_forward_backward, loop_layer, loop_dlpack, loop_errors]
    if args.torch:
        loops.append(loop_torch)
    for _ in range(args.rounds):
        for loop in loops:
            loop(rng)
    print(f"loop_entry_points: {calls} checked calls in {args.rounds} rounds, ok", flush=True)


if __name__ == "__main__":
    main()
