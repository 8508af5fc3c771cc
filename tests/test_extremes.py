"""Extreme magnitudes: huge spreads whose float32 squares overflow, outlier shifts, tiny values."""
import os

import numpy as np
import pytest

import groupnorm as gn
from reference import assert_matches_reference, group_norm_reference, same_bits


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
    # The shift comes from a group's first, middle and last positions (channels-last: each channel's nine rows
    # k (rows - 1) / 8): make them all outliers.
    rng = np.random.default_rng()
    x = (200 + rng.standard_normal((1, 2, 4097))).astype(np.float32)
    x[:, :, [k * 4096 // 8 for k in range(9)] if channels_last else [0, 2048, 4096]] = 0.0
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = gn.group_norm(x, 1)
    assert_matches_reference(y, group_norm_reference(x, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels,groups", [(6, 6), (12, 4), (64, 4), (84, 2), (200, 5)])
def test_channels_last_second_look(isa, dtype, channels, groups):
    # Channels-last groups (1, 3, 16, 42 and 40 channels: within a vector, whole vectors, a tail) whose every
    # channel is an outlier in the nine rows the shift is taken from (sample_shifts: rows k (rows - 1) / 8), so
    # the shift sits far from the mean and the group is summed again (strided_shifted_sums), beside groups that
    # are not; rows enough for several flushes.
    rng = np.random.default_rng()
    rows = 301
    D = channels // groups
    x = (1e3 + rng.standard_normal((2, rows, channels))).astype(dtype)
    sampled_rows = [k * (rows - 1) // 8 for k in range(9)]
    for n, g in ((0, 0), (1, groups - 1)):
        x[n, sampled_rows, g * D:(g + 1) * D] = -5e3
    x = np.moveaxis(x, -1, 1)  # (N, C, rows), channels-last in memory
    w = rng.standard_normal(channels).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    y = gn.group_norm(x, groups, w, b)
    assert_matches_reference(y, group_norm_reference(x, groups, w, b))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_channels_last_one_sample_groups_split_among_threads(isa, threads):
    # One channels-last sample of 48 one-channel groups: its groups' statistics are split among the threads. The
    # first group takes the second look (outliers at its nine sampled rows), the last one is wide (float32
    # squares overflow), and every thread's rows must be applied in Wide<T> for it, bitwise as with one thread.
    rng = np.random.default_rng()
    rows, C = 2048, 48  # 98304 elements: a team of three
    x = (1e3 + rng.standard_normal((1, rows, C))).astype(np.float32)
    x[0, [k * (rows - 1) // 8 for k in range(9)], 0] = -5e3
    x[0, :, C - 1] = 1e30 * rng.standard_normal(rows)
    x = np.moveaxis(x, -1, 1)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    one = gn.group_norm(x, C, w, b)
    gn.set_num_threads(threads)
    y = gn.group_norm(x, C, w, b)
    assert same_bits(y, one)
    assert_matches_reference(y, group_norm_reference(x, C, w, b))


def test_tiny_values_float32(isa):
    # Squares of ~1e-30 underflow float32; with eps=0 a lost variance shows as inf/NaN. Many draws: a
    # group recentred on its float mean can sum to exactly zero, which once skipped the rescaled pass.
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    for _ in range(200):
        x = (1e-30 * rng.standard_normal((2, 8, 100))).astype(np.float32)
        y = gn.group_norm(x, 4, eps=0.0)
        assert_matches_reference(y, group_norm_reference(x, 4, eps=0.0), what=f"seed {seed}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subnormal_spread_with_eps_zero(isa, dtype, channels_last):
    # Values of ~1e-40 (float32 subnormals) with eps = 0: 1/std ~ 1e40 lies beyond float32, so the group's apply
    # must run in double (GroupStats::wide); in float every output was NaN (inf * 0) where the reference is of
    # order 1. Short groups (the packed path), channel runs and rows alike.
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    for shape, groups in (((2, 8, 33, 31), 4), ((3, 16, 4), 4), ((2, 64, 7), 2)):
        x = (1e-40 * rng.standard_normal(shape)).astype(dtype)
        if channels_last:
            x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        y = gn.group_norm(x, groups, eps=0.0)
        ref = group_norm_reference(x.astype(np.float32), groups, eps=0.0)
        assert np.isfinite(ref).all()
        if y.dtype == np.float32:
            assert_matches_reference(y, ref, what=f"seed {seed} {shape}")
        else:  # within a bfloat16 ulp of the reference (2^-8 relative), to a few ulps of its largest value
            err = np.abs(y.astype(np.float64) - ref)
            assert (err <= 2.0 ** -8 * np.abs(ref) + 2.0 ** -12 * np.abs(ref).max()).all(), f"seed {seed} {shape}"


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
