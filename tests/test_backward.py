# test_backward.py — group_norm_forward's statistics and group_norm_backward's gradients against the float64
# (long double for float64 data) reference on every ISA level: odd tails, 2-D to 5-D, G = 1 and G = C, both
# native layouts and mixed layouts of grad_output and input, large groups and offsets, thread-count
# determinism, finite differences, argument validation and the GroupNorm layer.
import doctest
import re

import numpy as np
import pytest

import groupnorm as gn
from reference import (FOLDED_CASES, FOLDED_IDS, assert_grads_match, at_odd_address, group_norm_backward_reference,
                       group_norm_reference, group_stats_reference, random_array, same_bits, same_memory_order)

DTYPES = [np.float32, np.float64]
TAILS = (1, 3, 7, 15, 16, 17, 31, 33, 63, 65)
LAYOUTS = ["contiguous", "channels_last"]


def _group_choices(C):
    """G = 1, G = C and one proper divisor in between when C has one."""
    middle = [C // d for d in range(2, C) if C % d == 0][:1]
    return sorted({1, C, *middle})


def poison_heap(*arrays):
    """Best effort: allocate and free NaN-filled blocks the size of the outputs about to be allocated, so an
    output element the kernels forget to write is likely NaN rather than a plausible leftover."""
    blocks = [np.full(a.shape, np.nan, a.dtype) for a in arrays for _ in range(3)]
    del blocks


def check_backward(dy, x, G, weight=None, eps=1e-5, *, bias=None, activation=None):
    """group_norm_forward + group_norm_backward against the reference: values, dtypes, shapes, the input's
    memory layout for grad_input, no NaN, inputs unmodified. Returns the three gradients."""
    x_before, dy_before = np.array(x, copy=True), np.array(dy, copy=True)
    y, mean, rstd = gn.group_norm_forward(x, G, weight, bias, eps, activation=activation)
    C = x.shape[1]
    poison_heap(x, np.empty(C, x.dtype), np.empty(C, x.dtype))
    grads = gn.group_norm_backward(dy, x, mean, rstd, G, weight, bias=bias, activation=activation)
    assert isinstance(grads, tuple) and len(grads) == 3
    grad_input, grad_weight, grad_bias = grads
    assert type(grad_input) is np.ndarray and grad_input.shape == x.shape
    assert same_memory_order(grad_input, np.empty_like(x)), \
        f"grad_input strides {grad_input.strides} do not follow the input's layout {x.strides}"
    assert grad_weight.shape == (C,) and grad_bias.shape == (C,)
    assert_grads_match(grads, group_norm_backward_reference(dy, x, G, weight, eps, bias=bias, activation=activation,
                                                            with_scales=True), x.dtype)
    assert same_bits(x, x_before) and same_bits(dy, dy_before), "an input was modified"
    return grads


# (shape, num_groups): tails along HxW (channels-first runs) and along C (channels-last vectors).
TAIL_CASES = ([((1, 1, n), 1) for n in TAILS] + [((2, 6, n), 3) for n in TAILS]
              + [((2, c, 5), g) for c in TAILS for g in _group_choices(c)])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(TAIL_CASES)),
                         ids=[f"{s}-G{g}".replace(" ", "") for s, g in TAIL_CASES])
def test_tails(isa, rng, case, dtype, layout):
    shape, G = TAIL_CASES[case]
    x = random_array(rng, shape, dtype, layout)
    dy = random_array(rng, shape, dtype, layout)
    weight = rng.standard_normal(shape[1]).astype(dtype) if case % 2 else None
    check_backward(dy, x, G, weight)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", [((5, 12), 4), ((7, 1), 1), ((3, 12, 7), 3), ((2, 12, 5, 7), 6),
                                      ((2, 8, 3, 5, 7), 2), ((2, 6, 4, 5), 6), ((3, 16, 9, 9), 1)],
                         ids=["2d", "2d-C1", "3d", "4d", "5d", "4d-G=C", "4d-G1"])
def test_dimensions(isa, rng, shape, G, dtype, layout):
    x = random_array(rng, shape, dtype, layout)
    dy = random_array(rng, shape, dtype, layout)
    check_backward(dy, x, G, rng.standard_normal(shape[1]).astype(dtype))
    check_backward(dy, x, G, None)


# Around the 16384-element chunk (channels-first runs, channels-last rows) and both thread-split regimes.
CHUNKED_CASES = [((1, 1, 16383), 1), ((1, 1, 16385), 1), ((1, 3, 3 * 16384 + 5), 3), ((2, 3, 3 * 5462 + 1), 3),
                 ((1, 64, 65, 63), 32), ((3, 6, 129, 127), 3)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", CHUNKED_CASES, ids=[f"{s}-G{g}".replace(" ", "") for s, g in CHUNKED_CASES])
def test_chunked_shapes(isa, rng, shape, G, dtype, layout):
    x = random_array(rng, shape, dtype, layout)
    dy = random_array(rng, shape, dtype, layout)
    check_backward(dy, x, G, rng.standard_normal(shape[1]).astype(dtype))


@pytest.mark.parametrize("shape, layout", [((1, 1, 1 << 20), "contiguous"), ((1, 4, 512, 512), "channels_last"),
                                           ((1, 16, 256, 256), "contiguous")],
                         ids=["1M-run", "1M-channels-last", "1M-group-of-16"])
def test_million_element_group(isa, rng, shape, layout):
    """Groups of 2^20 elements in float32 still meet the 1e-5 target."""
    x = random_array(rng, shape, np.float32, layout, offset=2.0)
    dy = random_array(rng, shape, np.float32, layout)
    check_backward(dy, x, 1, rng.standard_normal(shape[1]).astype(np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e4, -3e3])
@pytest.mark.parametrize("shape, G", [((2, 8, 33, 31), 4), ((1, 4, 130, 130), 1)], ids=["small", "chunked"])
def test_large_offset(isa, rng, shape, G, offset, dtype, layout):
    """|mean| >> std: the float32 mean drops its low part, which the kernels recover from x."""
    x = random_array(rng, shape, dtype, layout, offset=offset)
    dy = random_array(rng, shape, dtype, layout)
    check_backward(dy, x, G, rng.standard_normal(shape[1]).astype(dtype))


# Channels-last rows of C values not a multiple of the vector width (reference.FOLDED_CASES), as in test_forward.py.
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", FOLDED_CASES, ids=FOLDED_IDS)
def test_narrow_channels_last_rows(isa, rng, shape, G, dtype, silu):
    x = random_array(rng, shape, dtype, "channels_last")
    dy = random_array(rng, shape, dtype, "channels_last")
    weight = rng.standard_normal(shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype) if silu else None
    check_backward(dy, x, G, weight, bias=bias, activation="silu" if silu else None)


# x's spread in the first group, far below 1 with eps = 0, and dy's scale: rstd^3 overflows the data type (float32:
# rstd ~ 1e18; float64: rstd ~ 1e200) while dx ~ dy * rstd does not.
TINY_SPREAD = {np.float32: (1e-18, 1e6), np.float64: (1e-200, 1.0)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (3, 4, 130, 9), (6, 4)], ids=["runs", "chunked", "rows"])
def test_rstd_cubed_past_the_range(isa, rng, shape, dtype, layout):
    """A group whose rstd^3 (and so c2 = -ds*rstd^3/M) lies past the data type's range, though dx does not (the
    fuzzer found it in bfloat16: dx came out inf): its dx is computed in the wider type. The other group of the
    sample is ordinary and must stay as accurate (on channels-last, a sample with such a group goes channel by
    channel)."""
    spread, dy_scale = TINY_SPREAD[dtype]
    x = random_array(rng, shape, dtype, layout)
    x[:, :2] *= dtype(spread)
    dy = random_array(rng, shape, dtype, layout, scale=dy_scale)
    w = rng.standard_normal(shape[1]).astype(dtype)
    grads = check_backward(dy, x, 2, w, eps=0.0)
    assert np.isfinite(grads[0]).all()
    ordinary = (slice(None), slice(2, 4))  # group 1, against a reference of its own scale
    ref = group_norm_backward_reference(dy[ordinary], x[ordinary], 1, w[2:], 0.0, with_scales=True)
    assert_grads_match((grads[0][ordinary], grads[1][2:], grads[2][2:]), ref, dtype)


MIXED = [("contiguous", "channels_last"), ("channels_last", "contiguous"), ("fortran", "channels_last"),
         ("channels_last", "fortran"), ("sliced_spatial", "contiguous"), ("contiguous", "negative_strides"),
         ("negative_strides", "all_reversed"), ("batch_strided", "sliced_channels"), ("contiguous", "broadcast"),
         ("broadcast", "channels_last")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_layout, dy_layout", MIXED, ids=[f"x-{a}-dy-{b}" for a, b in MIXED])
def test_mixed_layouts(isa, rng, x_layout, dy_layout, dtype):
    """grad_output in another layout than the input: same gradients, grad_input in the input's layout."""
    shape = (2, 6, 9, 7)
    x = random_array(rng, shape, dtype, x_layout)
    dy = random_array(rng, shape, dtype, dy_layout)
    weight = rng.standard_normal(6).astype(dtype)
    grads = check_backward(dy, x, 3, weight)
    _, mean, rstd = gn.group_norm_forward(x, 3, weight)
    same_layout = gn.group_norm_backward(np.ascontiguousarray(dy), np.ascontiguousarray(x), mean, rstd, 3, weight)
    np.testing.assert_allclose(grads[0], same_layout[0], rtol=0,
                               atol=(1e-6 if dtype == np.float32 else 1e-13) * np.abs(same_layout[0]).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_agree(isa, rng, dtype):
    """Channels-first and channels-last copies of the same data give the same gradients (to rounding)."""
    shape = (3, 32, 11, 13)
    x = random_array(rng, shape, dtype, offset=1.5)
    dy = random_array(rng, shape, dtype)
    weight = rng.standard_normal(32).astype(dtype)
    _, mean, rstd = gn.group_norm_forward(x, 8, weight)
    first = gn.group_norm_backward(dy, x, mean, rstd, 8, weight)
    last_x, last_dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dy))
    last = gn.group_norm_backward(last_dy, last_x, mean, rstd, 8, weight)
    assert last[0].strides == last_x.strides and first[0].strides == x.strides
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for a, b in zip(first, last):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(a).max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_none_is_ones(isa, rng, dtype, layout):
    x = random_array(rng, (2, 12, 6, 5), dtype, layout)
    dy = random_array(rng, (2, 12, 6, 5), dtype, layout)
    _, mean, rstd = gn.group_norm_forward(x, 4)
    without = gn.group_norm_backward(dy, x, mean, rstd, 4)
    ones = gn.group_norm_backward(dy, x, mean, rstd, 4, np.ones(12, dtype))
    for a, b in zip(without, ones):
        assert same_bits(a, b), "weight=None and weight=ones differ"


# Each has >= 4 * 32768 elements so a team of several threads forms; N*G below and above the thread count. The
# last two have many samples and C = 600 in groups of 100: the parameter gradients go in tiles of 256 channels
# whose edges fall inside groups. (1, 4, 256, 256) channels-last in float32 takes the backward's pass 2 one row at
# a time on one thread (the 2 MiB of x and dy outgrow L2) and 4 rows at a time on 2 or 3 (a thread's share fits):
# both must give the same bits.
DETERMINISM_CASES = [((1, 4, 256, 256), 1, "contiguous"), ((1, 4, 256, 256), 1, "channels_last"),
                     ((1, 1, 1 << 18), 1, "contiguous"), ((3, 6, 129, 127), 3, "contiguous"),
                     ((3, 6, 129, 127), 3, "channels_last"), ((8, 32, 33, 31), 8, "channels_last"),
                     ((16, 64, 1), 4, "contiguous"), ((300, 600), 6, "contiguous"),
                     ((100, 600, 3), 6, "contiguous")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G, layout", DETERMINISM_CASES,
                         ids=[f"{s}-G{g}-{lay}".replace(" ", "") for s, g, lay in DETERMINISM_CASES])
def test_bitwise_identical_for_every_thread_count(isa, rng, shape, G, layout, dtype):
    x = random_array(rng, shape, dtype, layout, offset=5.0)
    dy = random_array(rng, shape, dtype, layout)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    _, mean, rstd = gn.group_norm_forward(x, G, weight)
    results = {}
    for n in (1, 2, 3):
        gn.set_num_threads(n)
        results[n] = gn.group_norm_backward(dy, x, mean, rstd, G, weight)
    for n in (2, 3):
        for name, a, b in zip(("grad_input", "grad_weight", "grad_bias"), results[n], results[1]):
            assert same_bits(a, b), f"{name}: {n} threads differ from 1 thread"
    assert_grads_match(results[1], group_norm_backward_reference(dy, x, G, weight, with_scales=True), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_forward_statistics(isa, rng, offset, dtype, layout):
    """mean and rstd are the reference's (rounded to the data dtype), y is group_norm's, bit for bit."""
    shape, G = (3, 12, 17, 9), 4
    x = random_array(rng, shape, dtype, layout, offset=offset)
    weight = rng.standard_normal(12).astype(dtype)
    bias = rng.standard_normal(12).astype(dtype)
    y, mean, rstd = gn.group_norm_forward(x, G, weight, bias, 1e-4)
    assert same_bits(y, gn.group_norm(x, G, weight, bias, 1e-4)) and same_memory_order(y, x)
    assert mean.shape == (3, G) and rstd.shape == (3, G) and mean.dtype == dtype and rstd.dtype == dtype
    mean_ref, rstd_ref = group_stats_reference(x, G, 1e-4)
    # The mean to half an ulp of the data dtype plus the forward's target times std; rstd to that target.
    half_ulp, target = (2.0**-24, 2e-6) if dtype == np.float32 else (2.0**-53, 1e-12)
    std = 1 / rstd_ref.astype(np.float64)
    err = np.abs(mean - mean_ref)
    assert (err <= half_ulp * np.abs(mean_ref) + target * std).all(), f"mean differs by up to {err.max():.3e}"
    np.testing.assert_allclose(rstd, rstd_ref.astype(np.float64), rtol=target, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_of_empty_input(dtype):
    y, mean, rstd = gn.group_norm_forward(np.zeros((2, 6, 0), dtype), 3)
    assert y.shape == (2, 6, 0) and mean.shape == (2, 3) and np.isnan(mean).all() and np.isnan(rstd).all()
    y, mean, rstd = gn.group_norm_forward(np.zeros((0, 6, 4), dtype), 3)
    assert y.shape == (0, 6, 4) and mean.shape == (0, 3) and mean.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0, 4), (0, 6)], ids=["N0", "H0", "2d-N0"])
def test_backward_of_empty_input(isa, dtype, shape):
    x = np.zeros(shape, dtype)
    dx, dw, db = gn.group_norm_backward(x, x, np.zeros((shape[0], 2)), np.ones((shape[0], 2)), 2,
                                        np.ones(6, dtype))
    assert dx.shape == shape and dx.dtype == dtype
    assert dw.shape == (6,) and db.shape == (6,) and (dw == 0).all() and (db == 0).all()


def test_finite_differences(rng):
    """The analytic gradients are those of L = sum(group_norm(x, G, w, b) * dy), numerically."""
    shape, G, h = (2, 6, 5), 3, 1e-6
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    weight = rng.standard_normal(6)
    bias = rng.standard_normal(6)

    def loss(x_, w_, b_):
        return float((gn.group_norm(x_, G, w_, b_) * dy).sum())

    def numeric(f, a):
        grad = np.empty_like(a)
        for i in np.ndindex(a.shape):
            up, down = a.copy(), a.copy()
            up[i] += h
            down[i] -= h
            grad[i] = (f(up) - f(down)) / (2 * h)
        return grad

    _, mean, rstd = gn.group_norm_forward(x, G, weight, bias)
    dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, G, weight)
    np.testing.assert_allclose(dx, numeric(lambda a: loss(a, weight, bias), x), atol=1e-7)
    np.testing.assert_allclose(dw, numeric(lambda a: loss(x, a, bias), weight), atol=1e-7)
    np.testing.assert_allclose(db, numeric(lambda a: loss(x, weight, a), bias), atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_statistics_and_weight(isa, rng, dtype):
    """Misaligned mean, rstd and weight give the bits of their aligned copies (the kernels take aligned
    pointers)."""
    x, dy = random_array(rng, (2, 6, 37), dtype), random_array(rng, (2, 6, 37), dtype)
    weight = random_array(rng, (6,), dtype)
    _, mean, rstd = gn.group_norm_forward(x, 3, weight)
    expected = gn.group_norm_backward(dy, x, mean, rstd, 3, weight)
    got = gn.group_norm_backward(dy, x, at_odd_address(mean), at_odd_address(rstd), 3, at_odd_address(weight))
    assert all(same_bits(a, b) for a, b in zip(got, expected))


def test_statistics_of_another_dtype_are_converted(rng):
    x = rng.standard_normal((2, 6, 10)).astype(np.float32)
    dy = rng.standard_normal((2, 6, 10)).astype(np.float32)
    _, mean, rstd = gn.group_norm_forward(x, 3)
    expected = gn.group_norm_backward(dy, x, mean, rstd, 3)
    converted = gn.group_norm_backward(dy, x, mean.astype(np.float64), rstd.tolist(), 3)
    for a, b in zip(expected, converted):
        assert same_bits(a, b)


# ------------------------------------------------------------------------------------------------- SiLU
# activation='silu': the forward's z = u*sigmoid(u), u = x_hat*w + b, and the backward's gradient through it, the
# SiLU's input recomputed from x, the statistics, weight and bias.

SILU_CASES = [((2, 6, 17), 3), ((2, 33, 5), 11), ((3, 12, 7, 5), 4), ((2, 16, 3, 5, 4), 8), ((9, 12), 4),
              ((1, 4, 130, 130), 1), ((2, 64, 9, 9), 32)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("shape, G", SILU_CASES, ids=[f"{s}-G{g}".replace(" ", "") for s, g in SILU_CASES])
def test_silu_backward(isa, rng, shape, G, affine, dtype, layout):
    x = random_array(rng, shape, dtype, layout, offset=0.3)
    dz = random_array(rng, shape, dtype, layout)
    C = shape[1]
    weight = rng.uniform(-2, 2, C).astype(dtype) if affine in ("weight", "both") else None
    bias = rng.uniform(-2, 2, C).astype(dtype) if affine in ("bias", "both") else None
    check_backward(dz, x, G, weight, bias=bias, activation="silu")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e4, -3e3])
def test_silu_backward_large_offset(isa, rng, offset, dtype, layout):
    """|mean| * rstd far above 1: the SiLU's input needs the low part of the mean that float32 statistics drop."""
    x = random_array(rng, (2, 8, 33, 31), dtype, layout, offset=offset)
    dz = random_array(rng, x.shape, dtype, layout)
    weight, bias = (rng.uniform(-2, 2, 8).astype(dtype) for _ in range(2))
    check_backward(dz, x, 4, weight, bias=bias, activation="silu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G, layout", [((2, 6, 30007), 3, "contiguous"), ((2, 64, 40, 13), 8, "channels_last"),
                                              ((3000, 12), 4, "contiguous")], ids=["chunked", "rows", "2d"])
def test_silu_backward_bitwise_identical_for_every_thread_count(isa, rng, shape, G, layout, dtype):
    x = random_array(rng, shape, dtype, layout)
    dz = random_array(rng, shape, dtype, layout)
    weight, bias = (rng.uniform(-2, 2, shape[1]).astype(dtype) for _ in range(2))
    _, mean, rstd = gn.group_norm_forward(x, G, weight, bias, activation="silu")
    results = []
    for threads in (1, 2, 3):
        gn.set_num_threads(threads)
        try:
            results.append(gn.group_norm_backward(dz, x, mean, rstd, G, weight, bias=bias, activation="silu"))
        finally:
            gn.set_num_threads(None)
    for other in results[1:]:
        assert all(same_bits(a, b) for a, b in zip(results[0], other))


def test_silu_backward_bias_is_read_only_with_the_activation(rng):
    x = random_array(rng, (2, 6, 5, 4), np.float32)
    dy = random_array(rng, x.shape, np.float32)
    _, mean, rstd = gn.group_norm_forward(x, 3)
    plain = gn.group_norm_backward(dy, x, mean, rstd, 3)
    with_bias = gn.group_norm_backward(dy, x, mean, rstd, 3, bias=np.full(6, 5.0, np.float32))
    assert all(same_bits(a, b) for a, b in zip(plain, with_bias))
    silu = gn.group_norm_backward(dy, x, mean, rstd, 3, bias=np.full(6, 5.0, np.float32), activation="silu")
    assert not np.array_equal(silu[0], plain[0])


def test_silu_layer(rng):
    layer = gn.GroupNorm(4, 12, activation="silu")
    assert repr(layer) == "GroupNorm(4, 12, eps=1e-05, affine=True, activation='silu')"
    layer.weight[:] = rng.uniform(-2, 2, 12)
    layer.bias[:] = rng.uniform(-2, 2, 12)
    x = random_array(rng, (3, 12, 5, 5), np.float64)
    dz = random_array(rng, x.shape, np.float64)
    z = layer(x)
    ref = group_norm_reference(x, 4, layer.weight, layer.bias, activation="silu")
    assert np.abs(z - ref).max() <= 1e-12
    dx = layer.backward(dz)
    want = group_norm_backward_reference(dz, x, 4, layer.weight, bias=layer.bias, activation="silu",
                                         with_scales=True)
    assert_grads_match((dx, layer.grad_weight, layer.grad_bias), want, np.float64)
    with pytest.raises(ValueError, match=message("activation", "'relu'", "None or 'silu'")):
        gn.GroupNorm(4, 12, activation="relu")


# ------------------------------------------------------------------------------------------------ errors

def message(*parts):
    """A `match=` pattern requiring every part (literally, in any order) somewhere in the message."""
    return "(?s)^" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


SHAPE = (2, 6, 5, 4)


def _valid_args():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    _, mean, rstd = gn.group_norm_forward(x, 3)
    return dict(grad_output=rng.standard_normal(SHAPE).astype(np.float32), input=x, mean=mean, rstd=rstd,
                num_groups=3, weight=None)


BACKWARD_ERRORS = [
    ("grad_output-int", TypeError, message("grad_output", "int64", "float32"),
     dict(grad_output=np.zeros(SHAPE, np.int64))),
    ("grad_output-str", TypeError, message("grad_output", "'abc'"), dict(grad_output="abc")),
    ("grad_output-shape", ValueError, message("grad_output", "(2, 6, 5, 3)", "(2, 6, 5, 4)"),
     dict(grad_output=np.zeros((2, 6, 5, 3), np.float32))),
    ("grad_output-dtype", ValueError, message("grad_output", "float64", "float32"),
     dict(grad_output=np.zeros(SHAPE, np.float64))),
    ("input-int", TypeError, message("input", "int32"), dict(input=np.zeros(SHAPE, np.int32))),
    ("input-1d", ValueError, message("input", "(6,)"), dict(input=np.zeros(6, np.float32))),
    ("num_groups-float", TypeError, message("num_groups", "1.5"), dict(num_groups=1.5)),
    ("num_groups-not-dividing", ValueError, message("num_groups", "4", "6"), dict(num_groups=4)),
    ("num_groups-zero", ValueError, message("num_groups", "0"), dict(num_groups=0)),
    ("weight-short", ValueError, message("weight", "(5,)", "6"), dict(weight=np.ones(5, np.float32))),
    ("weight-str", TypeError, message("weight"), dict(weight="abcdef")),
    ("mean-shape", ValueError, message("mean", "(6,)", "(2, 3)"), dict(mean=np.zeros(6, np.float32))),
    ("mean-transposed", ValueError, message("mean", "(3, 2)", "(2, 3)"), dict(mean=np.zeros((3, 2), np.float32))),
    ("mean-None", TypeError, message("mean", "None", "(2, 3)"), dict(mean=None)),
    ("rstd-complex", TypeError, message("rstd", "complex128"), dict(rstd=np.zeros((2, 3), np.complex128))),
    ("rstd-str", TypeError, message("rstd", "'x'"), dict(rstd="x")),
    ("bias-short", ValueError, message("bias", "(5,)", "6"), dict(bias=np.ones(5, np.float32))),
    ("bias-str", TypeError, message("bias"), dict(bias="abcdef")),
    ("activation-unknown", ValueError, message("activation", "'relu'", "None or 'silu'"), dict(activation="relu")),
    ("activation-int", TypeError, message("activation", "1"), dict(activation=1)),
]


@pytest.mark.parametrize("exception, pattern, change", [c[1:] for c in BACKWARD_ERRORS],
                         ids=[c[0] for c in BACKWARD_ERRORS])
def test_backward_errors(exception, pattern, change):
    args = _valid_args()
    args.update(change)
    before = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exception, match=pattern):
        gn.group_norm_backward(args["grad_output"], args["input"], args["mean"], args["rstd"],
                               args["num_groups"], args["weight"], bias=args.get("bias"),
                               activation=args.get("activation", "silu"))
    for k, v in before.items():
        assert same_bits(args[k], v), f"a refused call modified {k}"


FORWARD_ERRORS = [
    ("input-complex", TypeError, message("input", "complex64"), dict(input=np.zeros(SHAPE, np.complex64))),
    ("num_groups-bool", TypeError, message("num_groups", "bool"), dict(num_groups=True)),
    ("num_groups-above-C", ValueError, message("num_groups", "12", "6"), dict(num_groups=12)),
    ("eps-negative", ValueError, message("eps", "-0.1"), dict(eps=-0.1)),
    ("eps-str", TypeError, message("eps", "'1'"), dict(eps="1")),
    ("bias-2d", ValueError, message("bias", "(6, 1)"), dict(bias=np.ones((6, 1)))),
    ("activation-unknown", ValueError, message("activation", "'gelu'", "None or 'silu'"), dict(activation="gelu")),
]


@pytest.mark.parametrize("exception, pattern, change", [c[1:] for c in FORWARD_ERRORS],
                         ids=[c[0] for c in FORWARD_ERRORS])
def test_forward_errors(exception, pattern, change):
    args = dict(input=np.zeros(SHAPE, np.float32), num_groups=3, weight=None, bias=None, eps=1e-5)
    args.update(change)
    with pytest.raises(exception, match=pattern):
        gn.group_norm_forward(args["input"], args["num_groups"], args["weight"], args["bias"], args["eps"],
                              activation=args.get("activation"))


# ------------------------------------------------------------------------------------------------- layer

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_forward_and_backward(isa, rng, dtype, layout):
    layer = gn.GroupNorm(4, 12, eps=1e-4, dtype=dtype)
    assert layer.weight.dtype == dtype and (layer.weight == 1).all() and (layer.bias == 0).all()
    layer.weight[:] = rng.standard_normal(12)
    layer.bias[:] = rng.standard_normal(12)
    x = random_array(rng, (3, 12, 7, 6), dtype, layout)
    dy = random_array(rng, (3, 12, 7, 6), dtype, layout)
    y = layer(x)
    assert same_bits(y, gn.group_norm(x, 4, layer.weight, layer.bias, 1e-4))
    assert same_bits(layer.forward(x), y)
    dx = layer.backward(dy)
    _, mean, rstd = gn.group_norm_forward(x, 4, layer.weight, layer.bias, 1e-4)
    expected = gn.group_norm_backward(dy, x, mean, rstd, 4, layer.weight)
    for got, want in zip((dx, layer.grad_weight, layer.grad_bias), expected):
        assert same_bits(got, want)
    assert_grads_match((dx, layer.grad_weight, layer.grad_bias),
                       group_norm_backward_reference(dy, x, 4, layer.weight, 1e-4, with_scales=True), dtype)


def test_layer_without_affine(rng):
    layer = gn.GroupNorm(2, 4, affine=False)
    assert layer.weight is None and layer.bias is None
    x = rng.standard_normal((2, 4, 9)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 9)).astype(np.float32)
    assert same_bits(layer(x), gn.group_norm(x, 2))
    dx = layer.backward(dy)
    assert_grads_match((dx,), group_norm_backward_reference(dy, x, 2)[:1], np.float32)
    assert layer.grad_weight is None and layer.grad_bias is None


def test_layer_repr():
    assert repr(gn.GroupNorm(32, 64)) == "GroupNorm(32, 64, eps=1e-05, affine=True)"
    assert repr(gn.GroupNorm(1, 3, eps=0.5, affine=False)) == "GroupNorm(1, 3, eps=0.5, affine=False)"


@pytest.mark.parametrize("args, kwargs, exception, pattern", [
    ((5, 64), {}, ValueError, message("num_groups", "5", "64")),
    ((0, 64), {}, ValueError, message("num_groups", "0")),
    ((4, -8), {}, ValueError, message("num_channels", "-8")),
    ((2, 2**70), {}, ValueError, message("num_channels", str(2**70))),
    ((2.0, 64), {}, TypeError, message("num_groups", "2.0")),
    ((2, "64"), {}, TypeError, message("num_channels", "'64'")),
    ((True, 64), {}, TypeError, message("num_groups", "bool")),
    ((2, 64), dict(eps=-1.0), ValueError, message("eps", "-1.0")),
    ((2, 64), dict(eps="small"), TypeError, message("eps", "'small'")),
    ((2, 64), dict(affine=1), TypeError, message("affine", "1")),
    ((2, 64), dict(dtype=np.int32), TypeError, message("dtype", "int32")),
], ids=["not-dividing", "zero-groups", "negative-channels", "huge-channels", "float-groups", "str-channels", "bool-groups",
        "eps-negative", "eps-str", "affine-int", "dtype-int"])
def test_layer_errors(args, kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        gn.GroupNorm(*args, **kwargs)


def test_layer_call_errors(rng):
    layer = gn.GroupNorm(2, 4)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((1, 4, 3), np.float32))
    with pytest.raises(ValueError, match=message("input", "(1, 6, 3)", "4")):
        layer(np.zeros((1, 6, 3), np.float32))


@pytest.mark.parametrize("obj", [gn.group_norm_forward, gn.group_norm_backward, gn.GroupNorm],
                         ids=["group_norm_forward", "group_norm_backward", "GroupNorm"])
def test_docstring_examples(obj):
    parser = doctest.DocTestParser()
    test = parser.get_doctest(obj.__doc__, {}, obj.__name__, None, 0)
    assert test.examples, f"{obj.__name__} has no examples"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0, f"{runner.failures} example(s) of {obj.__name__} failed (see stdout)"
