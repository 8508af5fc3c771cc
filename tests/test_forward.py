# test_forward.py — group_norm against the float64 reference on every ISA level: odd tails around each vector
# width, 2-D to 6-D shapes, sizes that cross the 16384-element chunk and the thread split, large offsets,
# a 4M-element group, SiLU, eps, NaN isolation and constant groups. Every call also runs a poisoned out=.
import numpy as np
import pytest

import groupnorm as gn
from reference import (FOLDED_CASES, FOLDED_IDS, affine_params, assert_matches_reference, at_odd_address,
                       check_group_norm, empty_like_layout, group_norm_reference, guard_untouched, off_cache_line,
                       random_array, same_bits)

DTYPES = [np.float32, np.float64]
TAILS = (1, 3, 7, 15, 16, 17, 31, 33, 63, 65)
AFFINE = ("none", "weight", "bias", "both")
CHUNK = 16384  # the kernels' minimum chunk, in elements


def _group_choices(C):
    """G = 1, G = C and one proper divisor in between when C has one."""
    middle = [C // d for d in range(2, C) if C % d == 0][:1]
    return sorted({1, C, *middle})


# (shape, num_groups): tails along the group length / HxW (channels-first) and along C (channels-last).
TAIL_CASES = ([((1, 1, n), 1) for n in TAILS] + [((2, 6, n), 3) for n in TAILS]
              + [((2, c, 5), g) for c in TAILS for g in _group_choices(c)])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(TAIL_CASES)),
                         ids=[f"{s}-G{g}".replace(" ", "") for s, g in TAIL_CASES])
def test_tails(isa, rng, case, dtype, layout):
    shape, G = TAIL_CASES[case]
    x = random_array(rng, shape, dtype, layout)
    weight, bias = affine_params(rng, shape[1], dtype, AFFINE[case % len(AFFINE)])
    check_group_norm(x, G, weight, bias)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_combinations(isa, rng, dtype, layout, affine):
    x = random_array(rng, (3, 12, 9, 11), dtype, layout)
    weight, bias = affine_params(rng, 12, dtype, affine)
    check_group_norm(x, 4, weight, bias)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", [((5, 12), 4), ((7, 1), 1), ((3, 12, 7), 3), ((2, 12, 5, 7), 6),
                                      ((2, 8, 3, 5, 7), 2), ((1, 4, 2, 3, 3, 2), 2)],
                         ids=["2d", "2d-C1", "3d", "4d", "5d", "6d"])
def test_dimensions(isa, rng, shape, G, dtype, layout):
    x = random_array(rng, shape, dtype, layout)
    weight, bias = affine_params(rng, shape[1], dtype, "both")
    check_group_norm(x, G, weight, bias)


# Shapes around the chunk size (channels-first: 16384 elements of a group; channels-last: ceil(16384 / C)
# rows of a sample) and both thread-split regimes (N*G below and above the thread count).
BIG_CASES = [
    ((1, 1, CHUNK - 1), 1),
    ((1, 1, CHUNK), 1),
    ((1, 1, CHUNK + 1), 1),
    ((2, 2, 3 * CHUNK + 5), 1),
    ((1, 3, 3 * CHUNK + 5), 3),
    ((2, 3, 3 * 5462 + 1), 3),
    ((1, 5, 3 * 3277 + 2), 1),
    ((1, 3, 128, 129), 1),
    ((3, 6, 129, 127), 3),
    ((8, 4, 64, 65), 4),
    ((1, 64, 65, 63), 32),
    ((2, 17, 97, 101), 17),
    ((2, 1030, 5, 7), 10),           # wide C with a tail: channels-last rows of 1030
    ((64, 64, 4, 4), 32),            # 2048 small groups
    ((2048, 96), 8),                 # HxW = 1, many samples
    ((1, 1, 64 * CHUNK + 13), 1),    # more than 64 minimum chunks: the chunk grows, odd tail
    ((1, 4, 64 * 4096 + 7), 2),      # channels-last: more than 64 row chunks of ceil(16384 / 4)
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", BIG_CASES, ids=[f"{s}-G{g}".replace(" ", "") for s, g in BIG_CASES])
def test_large_shapes(isa, rng, shape, G, dtype, layout):
    x = random_array(rng, shape, dtype, layout)
    weight, bias = affine_params(rng, shape[1], dtype, "both")
    check_group_norm(x, G, weight, bias)


# Channels-last rows of C values not a multiple of the vector width (reference.FOLDED_CASES).
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", FOLDED_CASES, ids=FOLDED_IDS)
def test_narrow_channels_last_rows(isa, rng, shape, G, dtype, silu):
    x = random_array(rng, shape, dtype, "channels_last")
    weight, bias = affine_params(rng, shape[1], dtype, "both")
    check_group_norm(x, G, weight, bias, activation="silu" if silu else None)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_four_million_element_group(isa, rng, layout):
    x = random_array(rng, (1, 4, 1024, 1024), np.float32, layout, offset=3.0)
    weight, bias = affine_params(rng, 4, np.float32, "both")
    check_group_norm(x, 1, weight, bias)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e4, 100.0, -3e3])
@pytest.mark.parametrize("shape, G", [((2, 8, 33, 31), 4), ((1, 4, 130, 130), 1)], ids=["small", "chunked"])
def test_large_offset(isa, rng, shape, G, offset, dtype, layout):
    """|mean| >> std: the classic cancellation trap; the issue's float32 target must still hold."""
    x = random_array(rng, shape, dtype, layout, offset=offset)
    weight, bias = affine_params(rng, shape[1], dtype, "both")
    check_group_norm(x, G, weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 1e6, 1e17])
def test_magnitudes(isa, rng, scale, dtype):
    """Tiny and huge data; 1e17 keeps float32 squares of deviations (and short sums of them) finite."""
    x = random_array(rng, (2, 6, 40), dtype, "contiguous", scale=scale)
    weight, bias = affine_params(rng, 6, dtype, "both")
    check_group_norm(x, 2, weight, bias, eps=1e-5 * scale * scale)
    check_group_norm(x, 2, weight, bias)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_scale", [1.0, 30.0], ids=["unit", "wide"])
@pytest.mark.parametrize("shape, G", [((2, 6, 17), 3), ((2, 33, 5), 11), ((1, 4, 130, 130), 2)],
                         ids=["cf-tail", "cl-tail", "chunked"])
def test_silu(isa, rng, shape, G, weight_scale, dtype, layout):
    """Fused y * sigmoid(y); the wide weights push y far into both saturated ends of the sigmoid."""
    x = random_array(rng, shape, dtype, layout)
    weight = (weight_scale * rng.standard_normal(shape[1])).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    check_group_norm(x, G, weight, bias, activation="silu")
    check_group_norm(x, G, None, None, activation="silu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_is_norm_times_sigmoid(isa, rng, dtype):
    x = random_array(rng, (2, 8, 31), dtype)
    y = gn.group_norm(x, 4).astype(np.float64)
    silu = gn.group_norm(x, 4, activation="silu")
    tol = 4e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(silu, y / (1 + np.exp(-y)), rtol=0, atol=tol * np.abs(y).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-3, 1.0, 1e3])
def test_eps(isa, rng, eps, dtype):
    x = random_array(rng, (2, 6, 9, 7), dtype)
    weight, bias = affine_params(rng, 6, dtype, "both")
    check_group_norm(x, 3, weight, bias, eps=eps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_group(isa, rng, dtype, layout, bad):
    """A NaN (or an infinity, whose group's variance is NaN) poisons its own group and no other."""
    N, C, G = 2, 6, 3
    x = random_array(rng, (N, C, 5, 7), dtype, layout)
    x[1, 2, 3, 4] = bad  # sample 1, group 1 (channels 2 and 3)
    weight, bias = affine_params(rng, C, dtype, "both")
    out = empty_like_layout(x, -12345.0)
    y = gn.group_norm(x, G, weight, bias, out=out)
    assert y is out
    assert np.isnan(y[1, 2:4]).all(), "every element of the group holding the NaN must be NaN"
    assert not np.isnan(y[0]).any() and not np.isnan(y[1, :2]).any() and not np.isnan(y[1, 4:]).any()
    assert_matches_reference(y, group_norm_reference(x, G, weight, bias))
    assert_matches_reference(gn.group_norm(x, G, weight, bias), group_norm_reference(x, G, weight, bias))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [3.25, 1e4], ids=["small", "offset"])
def test_constant_group_gives_bias(isa, rng, value, dtype, layout):
    """A group with zero variance normalises to exactly 0, so its output is exactly the bias."""
    x = random_array(rng, (2, 6, 4, 5), dtype, layout)
    x[1, 2:4] = value
    weight, bias = affine_params(rng, 6, dtype, "both")
    y = check_group_norm(x, 3, weight, bias)
    np.testing.assert_array_equal(y[1, 2:4], np.broadcast_to(bias[2:4, None, None], (2, 4, 5)))
    y_plain = gn.group_norm(x, 3)
    assert (y_plain[1, 2:4] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_of_one_element(isa, rng, dtype):
    """HxW = 1 and G = C: every group is a single value, normalised to 0, so y = bias."""
    x = random_array(rng, (3, 5), dtype)
    weight, bias = affine_params(rng, 5, dtype, "both")
    y = check_group_norm(x, 5, weight, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (3, 5)))


# One position per sample (HxW = 1, an (N, C) input): the kernels' single-row path, groups of D values around
# every vector width, next to groups the float sums cannot hold and to non-finite values.
ROW_DS = (1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 65)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("G", [1, 2, 5])
@pytest.mark.parametrize("D", ROW_DS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_position_per_sample(isa, rng, dtype, D, G, activation):
    C = D * G
    x = random_array(rng, (9, C), dtype, offset=100.0 * (D % 3))
    weight, bias = affine_params(rng, C, dtype, AFFINE[(D + G) % len(AFFINE)])
    check_group_norm(x, G, weight, bias, activation=activation)
    if D > 1:  # a 3-D view with HxW = 1 and channels last is the same memory and the same answer
        x3 = x.reshape(9, 1, C)
        check_group_norm(x3, G, weight, bias, activation=activation, channel_axis=-1)
    y_ref = group_norm_reference(x, G, weight, bias, activation=activation)
    in_place = x.copy()
    assert gn.group_norm(in_place, G, weight, bias, activation=activation, out=in_place) is in_place
    assert_matches_reference(in_place, y_ref, activation=activation, what="group_norm in place")


@pytest.mark.parametrize("D", [1, 3, 8, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_position_many_groups(isa, rng, dtype, D):
    """Hundreds of single-row groups, which the kernel takes in batches of 64 within blocks of 4096 values: groups
    that need a second look (huge spread, underflowing squares, a constant, NaN) on both sides of every batch
    boundary, each normalised as the reference says, and no other group touched by them."""
    N, G = 7, 30  # 210 groups: batches of 64 and a partial one; D = 40 also cuts blocks of 102 groups
    x = random_array(rng, (N, G * D), dtype, offset=50.0)
    groups = x.reshape(N * G, D)  # a view: group i is row i
    big = 1e30 if dtype == np.float32 else 1e200
    tiny = 1e-30 if dtype == np.float32 else 1e-300
    for i in (0, 62, 63, 64, 65, 127, 128, 191, 192, N * G - 1):
        kind = i % 4
        if kind == 0:
            groups[i] = big * np.linspace(-1, 1, D)
        elif kind == 1:
            groups[i] = tiny * np.arange(D)
        elif kind == 2:
            groups[i] = 7.5
        else:
            groups[i, D // 2] = np.nan
    weight, bias = affine_params(rng, G * D, dtype, "both")
    y_ref = group_norm_reference(x, G, weight, bias)
    out = empty_like_layout(x, -12345.0)
    assert gn.group_norm(x, G, weight, bias, out=out) is out
    assert_matches_reference(out, y_ref)
    nan_groups = np.isnan(out).reshape(N * G, D).any(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(nan_groups), [63, 127, 191])


@pytest.mark.parametrize("D", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_position_extreme_and_non_finite_groups(isa, rng, dtype, D):
    """Single-row groups whose sums leave the compute type (huge spread, tiny values, constant, NaN, inf) beside
    ordinary ones: each is normalised as the reference says, and only a non-finite group turns NaN."""
    G = 6
    x = random_array(rng, (4, G * D), dtype)
    big = 1e30 if dtype == np.float32 else 1e200
    tiny = 1e-30 if dtype == np.float32 else 1e-300
    x[0, :D] = big * np.linspace(-1, 1, D)                  # spread beyond the float sums of squares
    x[0, 2 * D:3 * D] = tiny * np.arange(D)                 # squares that underflow
    x[1, D:2 * D] = 7.5                                      # constant
    x[2, 3 * D] = np.nan
    x[3, 4 * D] = np.inf
    weight, bias = affine_params(rng, G * D, dtype, "both")
    y_ref = group_norm_reference(x, G, weight, bias)
    out = empty_like_layout(x, -12345.0)
    assert gn.group_norm(x, G, weight, bias, out=out) is out
    assert_matches_reference(out, y_ref)
    nan_groups = np.isnan(out).reshape(4, G, D).any(axis=2)
    expected = np.zeros((4, G), bool)
    expected[2, 3] = expected[3, 4] = True
    np.testing.assert_array_equal(nan_groups, expected)
    np.testing.assert_array_equal(out[1, D:2 * D], bias[D:2 * D])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hand_computed_values(isa, dtype):
    x = np.arange(8, dtype=dtype).reshape(1, 4, 2)
    y = gn.group_norm(x, 2, eps=0.0)
    expected = np.array([-3, -1, 1, 3] * 2, dtype=np.float64).reshape(1, 4, 2) / np.sqrt(5.0)
    np.testing.assert_allclose(y, expected, rtol=2e-6 if dtype == np.float32 else 1e-14)


def test_list_input_gives_float64():
    y = gn.group_norm([[1.0, 2.0], [3.0, 4.0]], 1)
    assert type(y) is np.ndarray and y.dtype == np.float64 and y.shape == (2, 2)
    assert_matches_reference(y, group_norm_reference(np.array([[1.0, 2.0], [3.0, 4.0]]), 1))


def test_nested_list_with_weight_and_bias_lists(rng):
    x = rng.standard_normal((2, 4, 3))
    weight, bias = rng.standard_normal(4), rng.standard_normal(4)
    y = gn.group_norm(x.tolist(), 2, weight.tolist(), bias.tolist())
    assert y.dtype == np.float64
    assert_matches_reference(y, group_norm_reference(x, 2, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_integer_num_groups(rng, dtype):
    x = random_array(rng, (2, 6, 5), dtype)
    assert same_bits(gn.group_norm(x, np.int64(3)), gn.group_norm(x, 3))
    assert same_bits(gn.group_norm(x, np.int32(3)), gn.group_norm(x, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_defaults_match_explicit_arguments(rng, dtype):
    x = random_array(rng, (2, 6, 5, 3), dtype)
    y = gn.group_norm(x, 3)
    assert same_bits(y, gn.group_norm(x, 3, None, None, 1e-5, activation=None, channel_axis=1, out=None))
    assert same_bits(y, gn.group_norm(input=x, num_groups=3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_of_another_dtype_is_converted(rng, dtype):
    x = random_array(rng, (2, 6, 5), dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    weight, bias = rng.standard_normal(6).astype(other), rng.standard_normal(6).astype(other)
    y = gn.group_norm(x, 3, weight, bias)
    assert y.dtype == dtype
    assert_matches_reference(y, group_norm_reference(x, 3, weight.astype(dtype), bias.astype(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_input(isa, rng, dtype):
    x = random_array(rng, (2, 6, 33), dtype)
    x.flags.writeable = False
    check_group_norm(x, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_input_and_output(isa, rng, dtype):
    """Arrays at an odd byte address: the kernels must not assume element alignment."""
    shape, itemsize = (2, 6, 37), np.dtype(dtype).itemsize
    size = int(np.prod(shape))
    x = np.frombuffer(bytearray(size * itemsize + 1), dtype=dtype, count=size, offset=1).reshape(shape)
    assert not x.flags.aligned
    x[...] = random_array(rng, shape, dtype)
    out = np.frombuffer(bytearray(size * itemsize + 3), dtype=dtype, count=size, offset=3).reshape(shape)
    out[...] = np.nan
    y = gn.group_norm(x, 3, out=out)
    assert y is out
    assert_matches_reference(out, group_norm_reference(x, 3))
    assert_matches_reference(gn.group_norm(x, 3), group_norm_reference(x, 3))


@pytest.mark.parametrize("offset", [1, 3, 8, 15])
@pytest.mark.parametrize("C", [64, 80])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_output_off_a_vector_boundary(isa, rng, dtype, C, offset):
    """Channels-last rows of whole vectors written to an out= that starts `offset` elements past a cache line: each
    row's first channels go out through a masked store so that the others are aligned. Also in place there."""
    N, H, W, G = 2, 5, 7, 8
    x = random_array(rng, (N, C, H, W), dtype, "channels_last")
    weight, bias = affine_params(rng, C, dtype, "both")
    nbytes = x.nbytes
    for activation in (None, "silu"):
        y_ref = group_norm_reference(x, G, weight, bias, activation=activation)
        out_nhwc, buffer, start = off_cache_line((N, H, W, C), dtype, offset * np.dtype(dtype).itemsize)
        out = out_nhwc.transpose(0, 3, 1, 2)
        out[...] = np.nan
        assert gn.group_norm(x, G, weight, bias, activation=activation, out=out) is out
        assert_matches_reference(out, y_ref, activation=activation, what="out= off a vector boundary")
        assert guard_untouched(buffer, start, nbytes), "a byte outside out= was written"
        out[...] = x
        assert gn.group_norm(out, G, weight, bias, activation=activation, out=out) is out
        assert_matches_reference(out, y_ref, activation=activation, what="in place off a vector boundary")
        assert guard_untouched(buffer, start, nbytes), "a byte outside the array was written in place"


@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_results_start_on_a_cache_line(rng, dtype, layout):
    """A result of 64 KiB or more in a native layout starts on a 64-byte boundary, in the input's memory order;
    smaller ones, and those of other layouts, are as NumPy allocates them."""
    x = random_array(rng, (2, 64, 16, 16), dtype, layout)
    assert x.nbytes >= 1 << 16
    for y in (gn.group_norm(x, 8), gn.group_norm_forward(x, 8)[0]):
        assert y.ctypes.data % 64 == 0
        assert y.strides == x.strides and y.flags.writeable and y.flags.aligned
    out = empty_like_layout(x, np.nan)
    assert same_bits(gn.group_norm(x, 8), gn.group_norm(x, 8, out=out)), "the aligned result differs from out="
    if dtype != np.float16:  # test_half judges 16-bit values
        assert_matches_reference(out, group_norm_reference(x, 8))


def test_large_results_reuse_freed_memory(rng):
    """A freed result of 1 MiB or more is kept for the next call of its size (no fresh pages to fault in), never
    while the caller holds it, and the pool stays within its bounds (16 buffers, 256 MiB)."""
    from groupnorm import _core
    x = random_array(rng, (1, 64, 64, 64), np.float32)
    y = gn.group_norm(x, 8)
    address = y.ctypes.data
    del y
    y = gn.group_norm(x, 8)
    assert y.ctypes.data == address, "the freed result's memory was not reused"
    y_copy = y.copy()
    z = gn.group_norm(x * 2, 8)
    assert z.ctypes.data != y.ctypes.data and same_bits(y, y_copy), "a result still held was reused"
    del y, z
    older, newer = gn.group_norm(x, 8), gn.group_norm(x, 8)  # two buffers of one size, both alive
    newest = newer.ctypes.data
    del older, newer  # the last freed is the one still in cache: every later call of that size takes it
    for _ in range(3):
        assert gn.group_norm(x, 8).ctypes.data == newest, "a call did not take the most recently freed buffer"
    results = [gn.group_norm(random_array(rng, (n, 64, 32, 32), np.float32), 8) for n in range(4, 24)]
    del results  # twenty sizes freed together: the pool keeps the newest sixteen
    buffers, held = _core._result_pool()
    assert buffers == 16 and held <= 1 << 28
    huge = gn.group_norm(np.zeros((1, 1, 40, 1 << 20), np.float32), 1)  # 160 MiB: beyond a pooled buffer
    del huge
    assert _core._result_pool()[1] <= 1 << 28


@pytest.mark.parametrize("skew", [0, 16, 48, 2048, 4080])
def test_large_results_start_half_a_page_from_their_inputs(rng, skew):
    """A result of 64 KiB or more starts on a cache line, half a page (to a line) from its input modulo 4 KiB, so
    that no load in the kernels waits on a store to the same page offset; the backward's dx keeps at least a
    quarter page from both x and dy. Inputs at several offsets; results pooled or fresh alike."""
    def at_skew(a, offset):
        raw = np.empty(a.nbytes + 8192, np.uint8)
        start = (-raw.ctypes.data) % 4096 + offset
        out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out

    shape = (2, 32, 24, 24)  # 147 KiB of float32
    x = at_skew(random_array(rng, shape, np.float32), skew)
    dy = at_skew(random_array(rng, shape, np.float32), (skew + 1000) % 4096 // 16 * 16)
    for _ in range(2):  # a fresh buffer, then the pooled one
        y, mean, rstd = gn.group_norm_forward(x, 8)
        for result in (y, gn.group_norm(x, 8)):
            assert result.ctypes.data % 64 == 0
            assert abs((result.ctypes.data - x.ctypes.data) % 4096 - 2048) <= 32
        dx, _, _ = gn.group_norm_backward(dy, x, mean, rstd, 8)
        assert dx.ctypes.data % 64 == 0
        for source in (x, dy):
            assert 1024 - 64 <= (dx.ctypes.data - source.ctypes.data) % 4096 <= 3072 + 64
        assert_matches_reference(y, group_norm_reference(x, 8))
        del y, dx


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_weight_and_bias(isa, rng, dtype):
    """Misaligned weight and bias give the bits of their aligned copies (the kernels take aligned pointers)."""
    x = random_array(rng, (2, 6, 37), dtype)
    weight, bias = affine_params(rng, 6, dtype, "both")
    expected = gn.group_norm(x, 3, weight, bias)
    assert same_bits(gn.group_norm(x, 3, at_odd_address(weight), at_odd_address(bias)), expected)
    assert same_bits(gn.group_norm_forward(x, 3, at_odd_address(weight), at_odd_address(bias))[0], expected)


def test_unaligned_output_past_the_streaming_threshold(isa, rng):
    """A misaligned out= whose input + output (64 MiB) exceed the last-level cache: the kernels' non-temporal
    stores need aligned addresses (a segmentation fault once), so it is written through scratch."""
    x = random_array(rng, (2, 4, 1 << 20), np.float32)
    out = at_odd_address(np.full_like(x, np.nan))
    assert gn.group_norm(x, 2, out=out) is out
    assert same_bits(out, gn.group_norm(x, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_byte_swapped_input_is_correct_or_refused(rng, dtype):
    """Non-native byte order may be refused (TypeError / ValueError) but must never be misread."""
    x = random_array(rng, (2, 6, 5), dtype)
    swapped = x.astype(x.dtype.newbyteorder())
    try:
        y = gn.group_norm(swapped, 3)
    except (TypeError, ValueError) as exc:
        assert "input" in str(exc) or "dtype" in str(exc)
    else:
        assert_matches_reference(np.asarray(y, dtype=dtype), group_norm_reference(x, 3))


@pytest.mark.parametrize("lead", [1, 16, -1], ids=["one_element_after", "a_line_after", "one_element_before"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_just_after_the_input_modulo_a_page(isa, rng, dtype, layout, lead):
    """x and out= in one buffer, out starting `lead` elements past x modulo 4 KiB (as np.empty_like(x) right after
    x tends to be): the apply pass then runs backwards to avoid 4K-aliasing stalls (forwards for a negative
    lead). Long channel runs and whole-vector channels-last rows, 68672 elements in all; the same bits
    as into a separate buffer, and nothing written outside out."""
    shape, G = (2, 32, 37, 29), 4
    itemsize = np.dtype(dtype).itemsize
    physical = shape if layout == "contiguous" else (shape[0], shape[2], shape[3], shape[1])
    size = int(np.prod(shape))
    page = 4096 // itemsize
    at = -(-(size + 64) // page) * page + lead % page  # out's element index: lead past a page boundary
    buffer = np.full((at + size + 64) * itemsize + 4096, 0xAB, np.uint8)
    base = (-buffer.ctypes.data) % 4096  # x starts on a page boundary
    x_flat = buffer[base:base + size * itemsize].view(dtype)
    out_start = base + at * itemsize
    out_flat = buffer[out_start:out_start + size * itemsize].view(dtype)
    x_physical = x_flat.reshape(physical)
    x_physical[...] = rng.standard_normal(physical)
    x = x_physical if layout == "contiguous" else x_physical.transpose(0, 3, 1, 2)
    out = out_flat.reshape(physical)
    out = out if layout == "contiguous" else out.transpose(0, 3, 1, 2)
    assert (out.ctypes.data - x.ctypes.data) % 4096 == (lead % page) * itemsize
    weight, bias = affine_params(rng, shape[1], dtype, "both")
    x_before = x.copy()
    out[...] = np.nan
    assert gn.group_norm(x, G, weight, bias, out=out) is out
    y_ref = group_norm_reference(x, G, weight, bias)
    assert_matches_reference(out, y_ref)
    assert same_bits(out, gn.group_norm(x, G, weight, bias))
    assert same_bits(x, x_before)
    assert (buffer[base + size * itemsize:out_start] == 0xAB).all() and (buffer[out_start + size * itemsize:] == 0xAB).all()
