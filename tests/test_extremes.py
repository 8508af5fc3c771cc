"""Extreme magnitudes: huge spreads whose float32 squares overflow, outlier shifts, tiny values."""
import os

import numpy as np
import pytest

import groupnorm as gn
from reference import assert_matches_reference, group_norm_reference


@pytest.mark.parametrize("scale", [1e18, 3e18, 1e30, 1e37])
@pytest.mark.parametrize("channels_last", [False, True])
def test_huge_spread_float32(isa, scale, channels_last):
    rng = np.random.default_rng()
    x = (scale * rng.standard_normal((2, 4, 33, 31))).astype(np.float32)
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = gn.group_norm(x, 2)
    assert np.isfinite(y).all()
    assert_matches_reference(y, group_norm_reference(x, 2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_outlier_at_every_sampled_position(isa, channels_last):
    # The shift is the median of a group's first, middle and last values: make all three outliers.
    rng = np.random.default_rng()
    x = (200 + rng.standard_normal((1, 2, 4097))).astype(np.float32)
    x[:, :, [0, 2048, 4096]] = 0.0
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = gn.group_norm(x, 1)
    assert_matches_reference(y, group_norm_reference(x, 1))


def test_tiny_values_float32(isa):
    # Squares of ~1e-30 underflow float32; with eps=0 a lost variance shows as inf/NaN. Many draws: a
    # group recentred on its float mean can sum to exactly zero, which once skipped the rescaled pass.
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    for _ in range(200):
        x = (1e-30 * rng.standard_normal((2, 8, 100))).astype(np.float32)
        y = gn.group_norm(x, 4, eps=0.0)
        assert_matches_reference(y, group_norm_reference(x, 4, eps=0.0), what=f"seed {seed}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,groups", [((64, 32), 4), ((33, 16), 1), ((40, 8), 8), ((9, 48), 24),
                                          ((12, 8, 2), 4), ((7, 20), 5), ((20, 128), 4), ((6, 128), 2),
                                          ((10, 32, 2), 2)])
def test_short_groups_mixed_magnitudes(isa, dtype, shape, groups):
    # Groups of a power of two values up to a few vectors go packed, several to a register or a few registers a
    # group (the units whose squares leave that arithmetic's range take the general path). Rows mixing ordinary
    # groups with constant ones, spreads far below and above float's square range, an offset of 1e4, a NaN and
    # an infinity: every group as the reference, the NaN and the infinity confined to their own groups; eps = 0
    # too (a constant group is NaN).
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    N, C = shape[:2]
    D = C // groups * int(np.prod(shape[2:]))
    tiny, big = (1e-25, 1e25) if dtype == np.float32 else (1e-160, 1e160)
    kinds = rng.integers(0, 6, size=(N, groups))
    values = rng.standard_normal((N, groups, D)) * np.choose(kinds, [1.0, tiny, big, 1.0, 1.0, 1.0])[..., None]
    values += np.where(kinds == 3, 1e4, 0.0)[..., None]
    values[kinds == 4] = values[kinds == 4][:, :1]  # constant groups
    special = np.argwhere(kinds == 5)
    for (n, g), bad in zip(special[:2], (np.nan, np.inf)):
        values[n, g, D // 2] = bad
    x = values.reshape(shape).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    for eps in (1e-5, 0.0):
        y = gn.group_norm(x, groups, w, b, eps=eps)
        assert_matches_reference(y, group_norm_reference(x, groups, w, b, eps=eps), what=f"seed {seed} eps {eps}")
