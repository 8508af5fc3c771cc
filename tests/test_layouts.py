# test_layouts.py — every memory layout in, the same layout out: C order, channels-last (3-D to 5-D), Fortran,
# sliced, negative and zero strides; channel_axis other than 1; out= in a different layout; in place (out=x).
import numpy as np
import pytest

import groupnorm as gn
from reference import (LAYOUTS, assert_matches_reference, check_group_norm, group_norm_reference, random_array,
                       same_bits)

DTYPES = [np.float32, np.float64]
SHAPES = [((2, 6, 7, 9), 3), ((2, 6, 33), 2), ((2, 4, 3, 5, 6), 4), ((3, 10), 5)]
SHAPE_IDS = ["4d", "3d", "5d", "2d"]


def stride_order(a):
    """Axes from the smallest to the largest stride (the memory order of a dense array)."""
    return list(np.argsort(a.strides, kind="stable"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, G", SHAPES, ids=SHAPE_IDS)
def test_layout_matches_reference(isa, rng, shape, G, layout, dtype):
    x = random_array(rng, shape, dtype, layout)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    check_group_norm(x, G, weight, bias)
    check_group_norm(x, G, weight, bias, activation="silu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "fortran"])
@pytest.mark.parametrize("shape", [(2, 6, 33), (2, 6, 7, 9), (2, 4, 3, 5, 6)], ids=["3d", "4d", "5d"])
def test_output_keeps_the_input_layout(rng, shape, layout, dtype):
    x = random_array(rng, shape, dtype, layout)
    y = gn.group_norm(x, 2)
    assert y.dtype == x.dtype
    assert stride_order(y) == stride_order(x), f"input strides {x.strides}, output strides {y.strides}"
    if layout == "contiguous":
        assert y.flags.c_contiguous
    elif layout == "channels_last":
        assert np.moveaxis(y, 1, -1).flags.c_contiguous, f"channels-last in, strides {y.strides} out"
    else:
        assert y.flags.f_contiguous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 33, 6), (2, 7, 9, 6), (2, 3, 5, 4, 6)], ids=["nwc", "nhwc", "ndhwc"])
def test_channel_axis_last(isa, rng, shape, dtype):
    """NWC / NHWC / NDHWC arrays with channel_axis=-1 equal the NC* computation moved back."""
    x = random_array(rng, shape, dtype)
    C = shape[-1]
    weight = rng.standard_normal(C).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    y_ref = np.moveaxis(group_norm_reference(np.moveaxis(x, -1, 1), 3, weight, bias), 1, -1)
    y = check_group_norm(x, 3, weight, bias, channel_axis=-1, y_ref=y_ref)
    assert y.shape == x.shape and y.flags.c_contiguous
    y_pos = gn.group_norm(x, 3, weight, bias, channel_axis=x.ndim - 1)
    assert same_bits(y, y_pos), "channel_axis=-1 and channel_axis=ndim-1 must agree"
    y_cf = gn.group_norm(np.ascontiguousarray(np.moveaxis(x, -1, 1)), 3, weight, bias)
    assert_matches_reference(np.moveaxis(y_cf, 1, -1), y_ref)
    check_group_norm(x, 3, weight, bias, channel_axis=-1, activation="silu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_axis", [2, -2, 3, -1])
@pytest.mark.parametrize("layout", ["contiguous", "fortran", "negative_strides", "sliced_channels"])
def test_channel_axis_anywhere(isa, rng, channel_axis, layout, dtype):
    shape = (2, 5, 6, 4)
    x = random_array(rng, shape, dtype, layout)
    C = shape[channel_axis]
    weight = rng.standard_normal(C).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    y_ref = np.moveaxis(group_norm_reference(np.moveaxis(x, channel_axis, 1), 2, weight, bias), 1, channel_axis)
    check_group_norm(x, 2, weight, bias, channel_axis=channel_axis, y_ref=y_ref)


def test_channel_axis_one_is_the_default(rng):
    x = random_array(rng, (2, 6, 5, 4), np.float32, "channels_last")
    assert same_bits(gn.group_norm(x, 3, channel_axis=1), gn.group_norm(x, 3))
    assert same_bits(gn.group_norm(x, 3, channel_axis=-3), gn.group_norm(x, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_layout, out_layout", [
    ("contiguous", "channels_last"), ("channels_last", "contiguous"), ("fortran", "contiguous"),
    ("contiguous", "fortran"), ("negative_strides", "channels_last"), ("channels_last", "negative_strides"),
])
def test_out_in_another_layout(isa, rng, x_layout, out_layout, dtype):
    shape = (2, 6, 9, 7)
    x = random_array(rng, shape, dtype, x_layout)
    out = random_array(rng, shape, dtype, out_layout)
    out[...] = np.nan
    out_strides = out.strides
    weight = rng.standard_normal(6).astype(dtype)
    y = gn.group_norm(x, 3, weight, out=out)
    assert y is out and out.strides == out_strides
    assert_matches_reference(out, group_norm_reference(x, 3, weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_a_strided_view(isa, rng, dtype):
    """out= a view into a larger buffer: only the view's elements change."""
    shape = (2, 6, 5, 8)
    x = random_array(rng, shape, dtype, "channels_last")
    buffer = np.full((2, 12, 5, 17), 7.5, dtype=dtype)
    out = buffer[:, ::2, :, 1::2]
    y = gn.group_norm(x, 3, out=out)
    assert y is out
    assert_matches_reference(out, group_norm_reference(x, 3))
    outside = np.ones(buffer.shape, dtype=bool)
    outside[:, ::2, :, 1::2] = False
    assert (buffer[outside] == 7.5).all(), "elements outside the out= view were written"


def _overlapping_pairs(buffer):
    """(x, out) views of one buffer that overlap without being the same view."""
    return {
        "shifted_sample": (buffer[0:2], buffer[1:3]),
        "shifted_position": (buffer[0:2, :, :-1], buffer[0:2, :, 1:]),
        "reversed": (buffer[0:2], buffer[0:2, :, ::-1]),
        "channels_reversed": (buffer[0:2], buffer[0:2, ::-1]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", ["shifted_sample", "shifted_position", "reversed", "channels_reversed"])
def test_out_partially_overlapping_the_input(isa, rng, pair, dtype):
    """out= sharing memory with the input but not the same view: the result is as if the input were read
    first (as NumPy's ufuncs guarantee), or the call is refused with a ValueError naming out."""
    buffer = rng.standard_normal((3, 6, 41)).astype(dtype)
    x, out = _overlapping_pairs(buffer)[pair]
    weight = rng.standard_normal(6).astype(dtype)
    y_ref = group_norm_reference(x.copy(), 3, weight)
    try:
        y = gn.group_norm(x, 3, weight, out=out)
    except ValueError as exc:
        assert "out" in str(exc)
        return
    assert y is out
    assert_matches_reference(out, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "fortran", "negative_strides",
                                    "sliced_spatial", "sliced_channels"])
@pytest.mark.parametrize("shape, G", [((2, 6, 9, 7), 3), ((1, 4, 130, 130), 1), ((2, 65), 5)],
                         ids=["small", "chunked", "2d"])
def test_in_place(isa, rng, shape, G, layout, dtype):
    x = random_array(rng, shape, dtype, layout)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    y_ref = group_norm_reference(x, G, weight, bias)
    expected = gn.group_norm(x, G, weight, bias)
    strides = x.strides
    base = x.base if x.base is not None else x
    expected_base = np.array(base, copy=True, order="C" if base.flags.c_contiguous else "K")
    y = gn.group_norm(x, G, weight, bias, out=x)
    assert y is x and x.strides == strides
    assert_matches_reference(x, y_ref)
    assert same_bits(x, expected), "in place and out-of-place results differ"
    if base is not x:  # the rest of the buffer x is a view of must be untouched
        _view_like(expected_base, base, x)[...] = expected
        assert same_bits(base, expected_base), "in place wrote outside the view"


def _view_like(target, base, view):
    """The view of `target` (a C-contiguous copy of `base`) that `view` is of `base`."""
    assert base.flags.c_contiguous and target.flags.c_contiguous
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    start = target.reshape(-1)[offset // target.itemsize:]
    return np.lib.stride_tricks.as_strided(start, shape=view.shape, strides=view.strides)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_channel_axis_last(isa, rng, dtype):
    x = random_array(rng, (2, 7, 9, 6), dtype)
    y_ref = np.moveaxis(group_norm_reference(np.moveaxis(x, -1, 1), 2), 1, -1)
    assert gn.group_norm(x, 2, channel_axis=-1, out=x) is x
    assert_matches_reference(x, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_silu(isa, rng, dtype):
    x = random_array(rng, (2, 6, 40), dtype, "channels_last")
    y_ref = group_norm_reference(x, 3, activation="silu")
    assert gn.group_norm(x, 3, activation="silu", out=x) is x
    assert_matches_reference(x, y_ref, activation="silu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0, 4), (2, 6, 4, 0), (0, 6), (3, 4, 0)],
                         ids=["N0", "H0", "W0", "2d-N0", "3d-L0"])
def test_empty(isa, rng, shape, dtype):
    x = np.zeros(shape, dtype=dtype)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    y = gn.group_norm(x, 2, weight, weight, activation="silu")
    assert type(y) is np.ndarray and y.shape == shape and y.dtype == dtype
    out = np.empty(shape, dtype=dtype)
    assert gn.group_norm(x, 2, weight, out=out) is out
    assert gn.group_norm(x, 2, out=x) is x
    x_nhwc = np.zeros((shape[0],) + shape[2:] + (shape[1],), dtype=dtype)
    assert gn.group_norm(np.moveaxis(x_nhwc, -1, 1), 2).shape == shape
    assert gn.group_norm(x_nhwc, 2, channel_axis=-1).shape == x_nhwc.shape


def test_empty_input_is_still_validated():
    x = np.zeros((0, 6, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="num_groups"):
        gn.group_norm(x, 4)
    with pytest.raises(ValueError, match="out"):
        gn.group_norm(x, 2, out=np.zeros((0, 6, 5), dtype=np.float32))
