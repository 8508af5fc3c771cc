# test_half.py — float16 and bfloat16 storage (float32 compute) on every ISA level: outputs rounded to nearest
# from the float64 reference, checked element by element in units of the output dtype's last place; the narrowing
# conversion (ties to even, overflow, subnormals, NaN) and the widening of every bit pattern; |x| up to 65504;
# mixed parameter dtypes; statistics and gradients; the bfloat16 bit-storage dtype that DLPack producers give.
import numpy as np
import pytest

import groupnorm as gn
from groupnorm._dlpack import BFLOAT16_STORAGE
from isa_levels import use_isa
from reference import (affine_params, empty_like_layout, group_norm_backward_reference, group_norm_reference,
                       group_stats_reference, guard_untouched, off_cache_line, random_array, same_bits,
                       same_memory_order, silu_grad_reference)

try:
    import ml_dtypes
except ImportError:  # bfloat16 NumPy arrays need ml_dtypes; CI installs it with the test extra
    ml_dtypes = None

HALF_DTYPES = [pytest.param(np.dtype(np.float16), id="float16"),
               pytest.param(np.dtype(ml_dtypes.bfloat16) if ml_dtypes else None, id="bfloat16",
                            marks=pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed"))]
LAYOUTS = ["contiguous", "channels_last", "fortran", "sliced_channels"]
TAILS = (1, 3, 7, 15, 16, 17, 31, 33, 63, 65)

# float32 compute: coefficients, the centred value and the fused multiply-add each round once in float32, so an
# output is known to within a few float32 ulps of the terms it sums (|x_hat * w| and |bias|). 2^-20 of them is
# 16 such ulps, and still 2^9 times finer than a float16 ulp: a truncating conversion or half accumulation fails.
COMPUTE_SLACK = 2.0 ** -20


def neighbours(values, dtype):
    """The next representable values of `dtype` below and above each element, as float64."""
    inf = np.array(np.inf, dtype)
    return (np.nextafter(values, -inf).astype(np.float64), np.nextafter(values, inf).astype(np.float64))


def assert_rounded_to_nearest(y, r, slack, what):
    """y (float16/bfloat16) against the float64 reference r, element by element: within one ulp of r rounded to
    y's dtype everywhere, and equal to it wherever r lies farther than `slack` (float64 array or scalar) from a
    rounding boundary. NaN exactly where r has NaN."""
    dtype = y.dtype
    r = np.asarray(r, np.float64)
    assert y.shape == r.shape, f"{what}: shape {y.shape} != reference {r.shape}"
    nan = np.isnan(r)
    assert np.array_equal(np.isnan(y.astype(np.float64)), nan), f"{what}: NaN pattern differs from the reference"
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = r.astype(dtype)
    below, above = neighbours(nearest, dtype)
    near = nearest.astype(np.float64)
    yf = y.astype(np.float64)
    ulp = np.maximum(above - near, near - below)
    err = np.where(nan, 0.0, np.abs(yf - near))
    assert (err <= ulp + slack).all(), (
        f"{what}: {int((err > ulp + slack).sum())} element(s) more than one ulp from the rounded reference; "
        f"worst {float((err / ulp).max()):.2f} ulp at {np.unravel_index(np.argmax(err / ulp), err.shape)}")
    boundary_distance = np.minimum(np.abs(r - (near + below) / 2), np.abs(r - (near + above) / 2))
    decided = ~nan & (boundary_distance > slack)
    wrong = decided & (yf != near)
    assert not wrong.any(), (
        f"{what}: {int(wrong.sum())} of {int(decided.sum())} element(s) clear of a rounding boundary are not the "
        f"nearest {dtype} value; first at {tuple(np.argwhere(wrong)[0])}: got {yf[wrong][0]!r}, "
        f"nearest {near[wrong][0]!r}, reference {r[wrong][0]!r}")
    if r.size >= 1000:  # the strict test must bind: most elements lie clear of a boundary
        assert decided.sum() >= 0.9 * (~nan).sum(), f"{what}: only {int(decided.sum())} element(s) decided"


def forward_slack(x, G, weight, bias, activation):
    """COMPUTE_SLACK times the terms each output sums, |x_hat * w| + |bias|, plus |w|/4: the float32 mean is known
    to a few float32 ulps of the standard deviation, so x_hat is known to ~2^-27 even where it is 0 (SiLU's
    slope stays below 1.1)."""
    pre = group_norm_reference(x.astype(np.float64), G, weight, None)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    b = 0.0 if bias is None else np.abs(np.asarray(bias, np.float64)).reshape(shape)
    w = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64)).reshape(shape)
    terms = np.abs(np.asarray(pre, np.float64)) + b + w / 4
    return COMPUTE_SLACK * (1.1 if activation else 1.0) * terms


def check_forward(x, G, weight=None, bias=None, activation=None):
    """group_norm with and without a NaN-poisoned out=, both rounded to nearest, bitwise equal, inputs untouched."""
    x_before = np.array(x, copy=True)
    r = np.asarray(group_norm_reference(x.astype(np.float64), G, weight, bias, activation=activation), np.float64)
    slack = forward_slack(x, G, weight, bias, activation)
    y = gn.group_norm(x, G, weight, bias, activation=activation)
    assert type(y) is np.ndarray and y.dtype == x.dtype
    assert same_memory_order(y, np.empty_like(x)) or not x.flags.forc
    assert_rounded_to_nearest(y, r, slack, f"group_norm({x.dtype}, {x.shape}, G={G}, {activation})")
    out = empty_like_layout(x, np.nan)
    assert gn.group_norm(x, G, weight, bias, activation=activation, out=out) is out
    assert same_bits(out, y), "the out= path and the allocating path differ bitwise"
    assert same_bits(x, x_before), "the input was modified"
    return y


TAIL_CASES = ([((2, 6, n), 3) for n in TAILS] + [((2, c, 5), 1) for c in TAILS] + [((2, c, 3), c) for c in TAILS])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", range(len(TAIL_CASES)), ids=[f"{s}-G{g}".replace(" ", "") for s, g in TAIL_CASES])
def test_tails(isa, rng, case, dtype, layout):
    shape, G = TAIL_CASES[case]
    x = random_array(rng, shape, dtype, layout, offset=0.5, scale=2.0)
    weight, bias = affine_params(rng, shape[1], np.float32, ("both", "weight", "bias", None)[case % 4])
    check_forward(x, G, weight, bias)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape, G", [((2, 64, 33, 17), 32), ((1, 320, 24, 24), 32), ((3, 40, 1000), 8),
                                      ((1, 8, 70000), 2), ((4, 96, 9, 9), 96)])
def test_forward(isa, rng, shape, G, dtype, layout, activation):
    x = random_array(rng, shape, dtype, layout, offset=1.0, scale=3.0)
    weight, bias = affine_params(rng, shape[1], np.float32, "both")
    check_forward(x, G, weight, bias, activation)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape, G", [((2, 8, 40, 41), 4), ((1, 4, 70000), 2)])
def test_first_look_without_a_shift(isa, rng, dtype, layout, shape, G):
    """Channels-first 16-bit groups whose first, middle and last values lie around 0 are summed as they are, with
    no shift (and by vdpbf16ps for bfloat16 on avx512_bf16), then again around their mean where it lies too far
    from 0. Groups here: 1000 + N(0, 20^2) with -1, 0 and 1 at those three places (plain float32 sums of them
    lose a few bfloat16 ulps of the variance: only the second look gets it right); N(0, 1); tiny values
    (bfloat16: ~1e-38, subnormals among them, which vdpbf16ps takes as 0; float16: ~1e-6); 3 + N(0, 0.1^2),
    whose samples keep their median as the shift. eps = 0, so every group's outputs are of order 1; 70000 values a
    group are summed in chunks."""
    N, C = shape[:2]
    L = C // G * int(np.prod(shape[2:]))
    tiny = 1e-6 if dtype == np.float16 else 1e-38
    kinds = np.arange(N * G).reshape(N, G) % 4
    values = rng.standard_normal((N, G, L)) * np.choose(kinds, [20.0, 1.0, tiny, 0.1])[..., None]
    values += np.choose(kinds, [1000.0, 0.0, 0.0, 3.0])[..., None]
    values[kinds == 0, 0], values[kinds == 0, L // 2], values[kinds == 0, L - 1] = -1.0, 0.0, 1.0
    x = random_array(rng, shape, dtype, layout)
    x[...] = values.reshape(shape).astype(dtype)
    r = np.asarray(group_norm_reference(x.astype(np.float64), G, eps=0.0), np.float64)
    y = gn.group_norm(x, G, eps=0.0)
    assert_rounded_to_nearest(y, r, COMPUTE_SLACK * (np.abs(r) + 0.25), f"first look, {dtype}, {shape}, G={G}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape, G", [((2, 20, 24, 25), 2), ((2, 520, 9, 10), 26), ((2, 4, 64, 65), 2),
                                      ((2, 6, 30, 31), 2), ((2, 8, 1, 37), 4)])
def test_channels_last_sums_around_zero(isa, rng, dtype, shape, G):
    """A channels-last sample whose groups all lie around 0 at its nine probed rows is summed around 0, for
    bfloat16 on avx512_bf16 by vdpbf16ps two channels a lane (groups of an even number of channels: 10 with a
    masked tail, 20 past the 384 channels of one register tile, 2 in folded rows with rows left over; 3 and 1
    take the shifted sums everywhere). Sample 0 holds N(0, 1) groups beside a trap, 1000 + N(0, 20^2) with values
    in [-1, 1] at the probed rows (its float32 sums around 0 lose the variance: only the second look gets it
    right), and a tiny group (bfloat16: ~1e-38, subnormals among them, which vdpbf16ps takes as 0; float16: ~1e-6).
    Sample 1 adds a group at 3 + N(0, 0.1^2), which keeps its sample on the shifted sums. eps = 0."""
    N, C = shape[:2]
    rows = int(np.prod(shape[2:]))
    tiny = 1e-6 if dtype == np.float16 else 1e-38
    kinds = np.arange(N * G).reshape(N, G) % 3
    kinds[1, -1] = 3
    scale = np.choose(kinds, [20.0, 1.0, tiny, 0.1])[..., None, None]
    values = rng.standard_normal((N, G, C // G, rows)) * scale
    values += np.choose(kinds, [1000.0, 0.0, 0.0, 3.0])[..., None, None]
    probed = [k * (rows - 1) // 8 for k in range(9)]
    trap = values[kinds == 0]
    trap[..., probed] = rng.uniform(-1.0, 1.0, trap[..., probed].shape)
    values[kinds == 0] = trap
    x = random_array(rng, shape, dtype, "channels_last")
    x[...] = values.reshape(shape).astype(dtype)
    r = np.asarray(group_norm_reference(x.astype(np.float64), G, eps=0.0), np.float64)
    y = gn.group_norm(x, G, eps=0.0)
    assert_rounded_to_nearest(y, r, COMPUTE_SLACK * (np.abs(r) + 0.25), f"sums around 0, {dtype}, {shape}, G={G}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_large_groups_split_across_threads(isa, rng, dtype, layout):
    gn.set_num_threads(2)
    x = random_array(rng, (1, 64, 96, 96), dtype, layout, offset=100.0, scale=5.0)
    weight, bias = affine_params(rng, 64, np.float32, "both")
    check_forward(x, 2, weight, bias)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float16_extremes_do_not_overflow(isa, rng, layout):
    """|x| up to 65504 (float16's largest): x - mean and its square stay in float32, never in half."""
    x = random_array(rng, (2, 8, 13, 11), np.float16, layout)
    x[...] = np.where(rng.random(x.shape) < 0.5, -1.0, 1.0) * rng.uniform(30000.0, 65504.0, x.shape)
    x[0, :, 0, 0] = 65504.0
    x[1, :, 0, 0] = -65504.0
    y = check_forward(x, 4, np.full(8, 1.5, np.float32), np.full(8, 0.25, np.float32))
    assert np.isfinite(y.astype(np.float32)).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_narrowing_rounds_ties_to_even(isa, rng, dtype, layout):
    """weight 0 makes every output its channel's float32 bias, narrowed: ties, overflow, subnormals and NaN
    must convert as NumPy/ml_dtypes convert (round to nearest, ties to even), on vectors and on tails."""
    one = np.float32(1.0)
    mantissa_bits = 10 if dtype == np.float16 else 7
    half_ulp = np.float32(2.0 ** -(mantissa_bits + 1))
    largest = np.float32((np.finfo if dtype == np.float16 else ml_dtypes.finfo)(dtype).max)
    # No -0.0: (x - mean) * 0 + -0.0 is +0.0 or -0.0 by the sign of x - mean, before any narrowing.
    specials = np.array([1 + half_ulp, 1 + 3 * half_ulp, -(1 + half_ulp), 1 + half_ulp * 1.0001, 2 - half_ulp / 2,
                         largest * np.float32(1.001), largest, -1e38, 1e-8, 3e-6, 6.1e-5, -2.9e-8, 2.0 ** -25,
                         1.5 * 2.0 ** -24, np.nan, np.inf, -np.inf, 0.0, 65519.0, 65520.0, one / 3,
                         1e-39, -3e-40, 1.4e-45, 2.0 ** -133 * 1.5, 2.0 ** -126 * (1 - 2.0 ** -9)], np.float32)
    # float32 subnormals too: vcvtneps2bf16 (the avx512_bf16 level) flushes them, the kernels must not
    magnitudes = 10.0 ** rng.integers(-45, 5, 45).astype(np.float64)
    drawn = (rng.standard_normal(45) * magnitudes).astype(np.float32)
    values = np.concatenate([specials, np.where(drawn == 0, np.float32(1), drawn)])  # no -0.0 (above)
    C = values.size  # 67 channels: whole vectors and a tail on every level
    x = random_array(rng, (2, C, 19), dtype, layout)
    with np.errstate(over="ignore", invalid="ignore"):
        y = gn.group_norm(x, 1, np.zeros(C, np.float32), values)
        expected = np.broadcast_to(values.astype(dtype)[None, :, None], x.shape)
    numbers = ~np.isnan(values)  # infinities included
    assert same_bits(np.ascontiguousarray(y[:, numbers]), np.ascontiguousarray(expected[:, numbers])), \
        "narrowing differs from round to nearest, ties to even"
    assert np.isnan(y[:, np.isnan(values)].astype(np.float32)).all()


@pytest.mark.parametrize("layout, positions", [("channels_last", 3), ("contiguous", 37)])
def test_bfloat16_narrowing_is_the_same_on_every_level(rng, layout, positions):
    """Every float32 bit pattern class (normals, subnormals, ties, infinities, NaNs with payloads) narrows to the
    same bfloat16 bits on every level the machine has, vcvtneps2bf16's included, as the bias of a weight-0 call.
    Channels-first runs of 37 take the vector-pair path (load_split / store_split on AVX2) and a tail."""
    if ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    bits = rng.integers(0, 2 ** 32, 4096, dtype=np.uint64).astype(np.uint32)
    bits[:1024] &= np.uint32(0x807FFFFF)  # subnormals and zeros
    bits[1024:1280] = (bits[1024:1280] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # ties
    bits[1280:1536] |= np.uint32(0x7F800000)  # infinities and NaNs
    values = bits.view(np.float32)
    values = values[values != 0]  # (x - mean) * 0 + -0.0 takes the sign of x - mean, before narrowing
    C = values.size
    x = random_array(rng, (1, C, positions), np.dtype(ml_dtypes.bfloat16), layout)
    results = {}
    for name in gn.config()["isa_available"]:
        with use_isa(name), np.errstate(over="ignore", invalid="ignore"):
            results[name] = gn.group_norm(x, 1, np.zeros(C, np.float32), values)
    first = next(iter(results.values()))
    for name, y in results.items():
        assert same_bits(y, first), f"bfloat16 narrowing on {name} differs from {next(iter(results))}"
    finite = ~np.isnan(values)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.broadcast_to(values.astype(ml_dtypes.bfloat16)[None, :, None], x.shape)
    assert same_bits(np.ascontiguousarray(first[:, finite]), np.ascontiguousarray(expected[:, finite]))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_widening_of_every_bit_pattern(isa, dtype):
    """Every one of the 65536 values, one per group: the mean group_norm_forward returns is the value itself."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype).reshape(1, 65536)
    with np.errstate(invalid="ignore"):
        _, mean, rstd = gn.group_norm_forward(x, 65536)
        widened = x.astype(np.float32)
    finite = np.isfinite(widened)
    assert mean.dtype == np.float32 and rstd.dtype == np.float32
    assert np.array_equal(mean[finite], widened[finite])  # -0.0 may come back as +0.0: a mean of one value
    assert not np.isfinite(mean[~finite]).any()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_statistics_in_float32(isa, rng, dtype, layout):
    x = random_array(rng, (3, 32, 20, 20), dtype, layout, offset=50.0, scale=4.0)
    y, mean, rstd = gn.group_norm_forward(x, 8)
    assert mean.dtype == np.float32 and rstd.dtype == np.float32 and mean.shape == (3, 8)
    mean_ref, rstd_ref = group_stats_reference(x.astype(np.float64), 8)
    np.testing.assert_allclose(mean, mean_ref, rtol=2e-7, atol=0)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-6, atol=0)
    assert same_bits(y, gn.group_norm(x, 8))


@pytest.mark.parametrize("param_dtype", [np.float16, np.float32, np.float64, "bfloat16"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_mixed_parameter_dtypes(rng, dtype, param_dtype):
    """Half input with parameters of any float dtype (float32 as torch allows): the output keeps the input's dtype,
    and the parameters enter as their float32 values."""
    if param_dtype == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is not installed")
        param_dtype = ml_dtypes.bfloat16
    x = random_array(rng, (2, 12, 7, 5), dtype)
    weight = rng.standard_normal(12).astype(param_dtype)
    bias = rng.standard_normal(12).astype(param_dtype)
    y = gn.group_norm(x, 4, weight, bias)
    assert y.dtype == x.dtype
    assert same_bits(y, gn.group_norm(x, 4, weight.astype(np.float32), bias.astype(np.float32)))


def grad_input_terms(dy, x, G, weight):
    """Per element, the size of the three terms grad_input sums, rstd*(|w*dy| + |mean_g(w*dy)| +
    |x_hat * mean_g(w*dy*x_hat)|): float32 compute knows the result to a few float32 ulps of that."""
    N, C = x.shape[:2]
    groups = x.astype(np.float64).reshape(N, G, -1)
    mean = groups.mean(axis=2, keepdims=True)
    rstd = 1 / np.sqrt(np.square(groups - mean).mean(axis=2, keepdims=True) + 1e-5)
    x_hat = (groups - mean) * rstd
    w_dy = (dy.astype(np.float64).reshape(N, C, -1) * weight.astype(np.float64)[None, :, None]).reshape(groups.shape)
    terms = rstd * (np.abs(w_dy) + np.abs(w_dy.mean(axis=2, keepdims=True))
                    + np.abs(x_hat * (w_dy * x_hat).mean(axis=2, keepdims=True)))
    return terms.reshape(x.shape)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
# (1, 320, 48, 48): a sample larger than what one of two threads keeps in L2 but within half the last-level cache,
# where channels-last 16-bit data take pass 2 four rows at a time (backward_channels_last's in_llc).
@pytest.mark.parametrize("shape, G", [((2, 6, 17), 3), ((3, 33, 7, 5), 11), ((1, 64, 40, 40), 32), ((2, 5, 3), 5),
                                      ((1, 320, 48, 48), 32)])
def test_backward(isa, rng, shape, G, dtype, layout):
    x = random_array(rng, shape, dtype, layout, offset=2.0, scale=3.0)
    dy = random_array(rng, shape, dtype, layout)
    weight = rng.standard_normal(shape[1]).astype(np.float32)
    x_before, dy_before = np.array(x, copy=True), np.array(dy, copy=True)
    _, mean, rstd = gn.group_norm_forward(x, G, weight)
    dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, G, weight)
    assert dx.dtype == x.dtype and dx.shape == x.shape and same_memory_order(dx, np.empty_like(x))
    assert dw.dtype == np.float32 and db.dtype == np.float32 and dw.shape == (shape[1],)
    dx_ref, dw_ref, db_ref = group_norm_backward_reference(dy.astype(np.float64), x.astype(np.float64), G, weight)
    dx_ref = np.asarray(dx_ref, np.float64)
    assert_rounded_to_nearest(dx, dx_ref, 2.0 ** -18 * grad_input_terms(dy, x, G, weight), "grad_input")
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())
    np.testing.assert_allclose(db, db_ref, rtol=0, atol=1e-5 * np.abs(db_ref).max())
    assert same_bits(x, x_before) and same_bits(dy, dy_before)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_first_pass_groups(isa, rng, dtype, layout):
    """Channels-first bfloat16 groups whose mean lies within a standard deviation of 0 take the plain sums of dy,
    dy*x and x by vdpbf16ps on avx512_bf16 (dot_grad_sums); groups here: such a group; one about 150 standard
    deviations from 0 (64 + N(0, 0.5^2), which takes the exact, centred sums); two whose gradients lie near the
    subnormals (bfloat16: 1e-39, which vdpbf16ps takes as 0, and 1e-25, whose squares flush; float16: 1e-7 and
    1e-5); one of equal values and one of tiny ones (bfloat16: subnormals; float16: 1e-7), whose exact centred sums
    are 0 or nearly, so that grad_weight is 0 or nearly (the fuzz test found the second): all these summed again
    the exact way."""
    shape, G = (1, 12, 20, 21), 6  # one sample: each channel's grad_weight comes from its group alone
    N, C = shape[:2]
    kinds = np.arange(N * G).reshape(N, G) % 6
    tiny = (1e-7, 1e-5) if dtype == np.float16 else (1e-39, 1e-25)
    x = random_array(rng, shape, dtype, layout)
    dy = random_array(rng, shape, dtype, layout)
    x_values = rng.standard_normal((N, G, x.size // (N * G))) * np.choose(kinds, [1.0, 0.5, 1.0, 1.0, 0.0, tiny[0]])[
        ..., None]
    x[...] = (x_values + np.choose(kinds, [0.3, 64.0, 0.0, 0.0, 1.5, 0.0])[..., None]).reshape(shape).astype(dtype)
    dy_values = rng.standard_normal(x_values.shape) * np.choose(kinds, [1.0, 1.0, tiny[0], tiny[1], 1.0, 1.0])[
        ..., None]
    dy[...] = dy_values.reshape(shape).astype(dtype)
    weight = rng.standard_normal(C).astype(np.float32)
    _, mean, rstd = gn.group_norm_forward(x, G, weight)
    dx, dw, db = gn.group_norm_backward(dy, x, mean, rstd, G, weight)
    dx_ref, dw_ref, db_ref = group_norm_backward_reference(dy.astype(np.float64), x.astype(np.float64), G, weight)
    # The tiny gradients' dx lie among float32's subnormals too, where float32 compute rounds to multiples of
    # 2^-149 whatever the terms: a few of those join the slack (a sanitizer CI run found dx 8.8e-46 from a
    # bfloat16 midpoint, the existing channels-last path).
    assert_rounded_to_nearest(dx, np.asarray(dx_ref, np.float64),
                              2.0 ** -18 * grad_input_terms(dy, x, G, weight) + 4 * 2.0 ** -149, "grad_input")
    # Per channel, against the sum of its terms' magnitudes, |dy * x_hat| and |dy|: the tiny groups' channels are
    # judged on their own (to 1e-42 absolute where they are float32 subnormals).
    groups = x.astype(np.float64).reshape(N, G, -1)
    x_hat = ((groups - groups.mean(axis=2, keepdims=True))
             / np.sqrt(groups.var(axis=2, keepdims=True) + 1e-5)).reshape(N, C, -1)
    dy_c = dy.astype(np.float64).reshape(N, C, -1)
    for got, ref, terms in ((dw, dw_ref, dy_c * x_hat), (db, db_ref, dy_c)):
        scale = np.abs(terms).sum(axis=(0, 2))
        assert (np.abs(got.astype(np.float64) - np.asarray(ref, np.float64)) <= 1e-5 * scale + 1e-42).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape, G", [((2, 6, 17), 3), ((3, 33, 7, 5), 11), ((1, 64, 40, 40), 32), ((9, 12), 4)])
def test_silu_backward(isa, rng, shape, G, dtype, layout):
    """activation='silu': the SiLU's gradient g = dz*silu'(u) is rounded to the storage dtype before the
    normalisation's backward (as torch's separate silu rounds it), so grad_input is judged against the float64
    gradient of that rounded g, with one ulp of g a term of slack (where the kernels' float g and the exact one
    round apart); the parameter gradients against the exact g, with that rounding summed into the bound."""
    x = random_array(rng, shape, dtype, layout, offset=0.5, scale=2.0)
    dz = random_array(rng, shape, dtype, layout)
    weight, bias = (rng.uniform(-2, 2, shape[1]).astype(np.float32) for _ in range(2))
    x_before, dz_before = np.array(x, copy=True), np.array(dz, copy=True)
    _, mean, rstd = gn.group_norm_forward(x, G, weight, bias, activation="silu")
    dx, dw, db = gn.group_norm_backward(dz, x, mean, rstd, G, weight, bias=bias, activation="silu")
    assert dx.dtype == x.dtype and same_memory_order(dx, np.empty_like(x)) and dw.dtype == db.dtype == np.float32
    x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
    g = silu_grad_reference(dz64, x64, G, weight, bias)
    g_stored = g.astype(np.float32).astype(x.dtype).astype(np.float64)
    ulp = 2.0 ** -(10 if np.dtype(dtype) == np.float16 else 7)
    dx_ref = np.asarray(group_norm_backward_reference(g_stored, x64, G, weight)[0], np.float64)
    # The slack, in ulps of g: each element's own g (2^-mantissa of |g|, and the least normal value below it,
    # where silu'(u) is tiny and g subnormal), and every g of its group through the group's means, which move dx
    # by rstd*(1 + |x_hat|*max|x_hat|)*mean_g(|w*g|) for one ulp of every g.
    least_normal = float(np.finfo(dtype).smallest_normal)
    N, C = shape[:2]
    per_group = (N, G, -1)
    w_g = np.abs(g_stored.reshape(N, C, -1) * weight[None, :, None]).reshape(per_group)
    x_hat = np.abs(x64.reshape(per_group) - mean[..., None]) * rstd[..., None]
    r = rstd[..., None]
    own = r * np.broadcast_to(np.abs(weight)[None, :, None], (N, C, x64[0, 0].size)).reshape(per_group) * least_normal
    through_means = r * (1 + x_hat * x_hat.max(axis=2, keepdims=True)) * w_g.mean(axis=2, keepdims=True)
    terms = grad_input_terms(g_stored, x64, G, weight) + (own + through_means).reshape(shape)
    with np.errstate(over="ignore"):
        nearest = dx_ref.astype(dtype).astype(np.float64)
    below, above = neighbours(dx_ref.astype(dtype), dtype)
    err, dx_ulp = np.abs(dx.astype(np.float64) - nearest), np.maximum(above - nearest, nearest - below)
    # Not checked: that most elements are the nearest value. Near silu'(u)'s zero (u ~ -1.28) g is 1 + u*(1 - s)
    # cancelling, known in float32 to ~1e-7 absolute (as in torch's silu_backward), so there many g round apart
    # from the exact one, and each moves its group's means and so other elements across a boundary.
    assert (err <= dx_ulp + ulp * terms).all(), "grad_input: farther than an ulp plus one ulp of g a term"
    _, dw_ref, db_ref = group_norm_backward_reference(g, x64, G, weight)
    x_hat = (x64.reshape(shape[0], G, -1) - mean[..., None]) * rstd[..., None]
    per_channel = (0,) + tuple(range(2, x.ndim))
    g_abs = np.abs(g).sum(axis=per_channel)
    g_x_hat_abs = np.abs(g * x_hat.reshape(shape)).sum(axis=per_channel)
    assert np.all(np.abs(dw - dw_ref) <= 1e-5 * np.abs(dw_ref).max() + ulp * g_x_hat_abs), "grad_weight"
    assert np.all(np.abs(db - db_ref) <= 1e-5 * np.abs(db_ref).max() + ulp * g_abs), "grad_bias"
    assert same_bits(x, x_before) and same_bits(dz, dz_before)


@pytest.mark.parametrize("offset", [1, 5, 8, 15])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_channels_last_output_off_a_vector_boundary(isa, rng, dtype, offset):
    """A channels-last out= (rows of whole vectors) `offset` elements past a cache line, and in place there: the
    same bits as the allocating call, which is itself checked against the rounded reference, and nothing else
    written."""
    N, C, H, W, G = 2, 64, 3, 9, 16
    x = random_array(rng, (N, C, H, W), dtype, "channels_last")
    weight, bias = affine_params(rng, C, np.float32, "both")
    for activation in (None, "silu"):
        y = check_forward(x, G, weight, bias, activation)
        out_nhwc, buffer, start = off_cache_line((N, H, W, C), dtype, offset * 2)
        out = out_nhwc.transpose(0, 3, 1, 2)
        assert gn.group_norm(x, G, weight, bias, activation=activation, out=out) is out
        assert same_bits(out, y) and guard_untouched(buffer, start, x.nbytes)
        out[...] = x
        assert gn.group_norm(out, G, weight, bias, activation=activation, out=out) is out
        assert same_bits(out, y) and guard_untouched(buffer, start, x.nbytes)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_in_place(isa, rng, dtype):
    x = random_array(rng, (2, 16, 9, 9), dtype)
    expected = gn.group_norm(x, 4)
    assert gn.group_norm(x, 4, out=x) is x
    assert same_bits(x, expected)


def test_bfloat16_bit_storage_matches_ml_dtypes(rng):
    """The structured bfloat16 dtype (raw bits, what DLPack import gives without ml_dtypes) computes alike."""
    if ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    x = random_array(rng, (2, 16, 9, 9), ml_dtypes.bfloat16)
    stored = x.view(np.uint16).view(BFLOAT16_STORAGE)
    weight = rng.standard_normal(16).astype(ml_dtypes.bfloat16)
    y = gn.group_norm(stored, 4, weight.view(np.uint16).view(BFLOAT16_STORAGE))
    assert y.dtype == BFLOAT16_STORAGE
    assert np.array_equal(y.view(np.uint16), gn.group_norm(x, 4, weight).view(np.uint16))
    dx, dw, db = gn.group_norm_backward(stored, stored, *gn.group_norm_forward(stored, 4)[1:], 4)
    assert dx.dtype == BFLOAT16_STORAGE and dw.dtype == np.float32


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dtype_mismatches_are_errors(rng, dtype):
    x = random_array(rng, (2, 4, 5), dtype)
    with pytest.raises(ValueError, match=r"out has dtype float32; it must match the input's dtype"):
        gn.group_norm(x, 2, out=np.empty(x.shape, np.float32))
    _, mean, rstd = gn.group_norm_forward(x, 2)
    with pytest.raises(ValueError, match=r"grad_output has dtype float32; it must match the input's dtype"):
        gn.group_norm_backward(x.astype(np.float32), x, mean, rstd, 2)


def test_unsupported_dtype_names_the_supported_ones():
    with pytest.raises(TypeError, match=r"input has dtype int16; group_norm supports float16, bfloat16, float32 "
                                        r"and float64"):
        gn.group_norm(np.zeros((2, 4), np.int16), 2)
    with pytest.raises(TypeError, match=r"input has dtype \[\('x', '<u2'\)\]"):
        gn.group_norm(np.zeros((2, 4), [("x", "<u2")]), 2)
