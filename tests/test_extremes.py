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
