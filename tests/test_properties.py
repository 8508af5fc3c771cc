# test_properties.py — Hypothesis: random shapes (N 0..3, C = G*D, up to three spatial dims of 0..17), random
# memory layouts (axis permutations, reversals, steps), dtype, affine parameters, eps, channel_axis, SiLU and
# the out= mode (none, same layout, other layout, in place); every case must match the reference on every ISA.
import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import groupnorm as gn
from isa_levels import ISA_PARAMS, use_isa
from reference import assert_matches_reference, group_norm_reference, same_bits

# On a failure Hypothesis's pytest plugin imports its patch writer (libcst); an old libcst warns on import, and
# under -W error that warning turns the failure report into an INTERNALERROR. Import it once, quietly, now.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass


@dataclasses.dataclass
class Problem:
    shape: tuple
    num_groups: int
    channel_axis: int
    dtype: str
    perm: tuple      # memory order of the base array, as logical axes
    steps: tuple     # per logical axis: 1, -1 (reversed) or 2 (every other element)
    affine: str
    eps: float
    activation: object
    offset: float
    scale: float
    out_mode: str
    out_perm: tuple
    seed: int


@st.composite
def problems(draw):
    N = draw(st.integers(0, 3))
    G = draw(st.integers(1, 8))
    D = draw(st.integers(1, 9))
    spatial = draw(st.lists(st.integers(0, 17), min_size=0, max_size=3))
    ndim = 2 + len(spatial)
    c_pos = draw(st.integers(1, ndim - 1))
    dims = [N] + spatial
    dims.insert(c_pos, G * D)
    channel_axis = c_pos - ndim if draw(st.booleans()) else c_pos
    offset, scale = draw(st.sampled_from([(0.0, 1.0), (100.0, 1.0), (1e4, 1.0), (-5.0, 10.0), (0.0, 1e-3)]))
    return Problem(
        shape=tuple(dims), num_groups=G, channel_axis=channel_axis,
        dtype=draw(st.sampled_from(["float32", "float64"])),
        perm=tuple(draw(st.permutations(range(ndim)))),
        steps=tuple(draw(st.lists(st.sampled_from([1, 1, -1, 2]), min_size=ndim, max_size=ndim))),
        affine=draw(st.sampled_from(["none", "weight", "bias", "both"])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0, 0.0])),
        activation=draw(st.sampled_from([None, "silu"])),
        offset=offset, scale=scale,
        out_mode=draw(st.sampled_from(["none", "same", "other", "in_place"])),
        out_perm=tuple(draw(st.permutations(range(ndim)))),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def strided_array(rng, shape, perm, steps, dtype, offset=0.0, scale=1.0):
    """An array of logical `shape` whose memory is ordered by `perm` and then sliced by `steps`."""
    big = [n * abs(s) for n, s in zip(shape, steps)]
    base = (offset + scale * rng.standard_normal([big[a] for a in perm])).astype(dtype)
    x = base.transpose(np.argsort(perm))[tuple(slice(None, None, s) for s in steps)]
    assert x.shape == tuple(shape)
    return x


def _reference(p, x, weight, bias):
    moved = np.moveaxis(x, p.channel_axis, 1)
    return np.moveaxis(group_norm_reference(moved, p.num_groups, weight, bias, p.eps, p.activation), 1,
                       p.channel_axis)


@pytest.mark.parametrize("isa_name", ISA_PARAMS)
@settings(max_examples=60, deadline=None)
@given(p=problems())
def test_matches_reference(isa_name, p):
    rng = np.random.default_rng(p.seed)
    x = strided_array(rng, p.shape, p.perm, p.steps, p.dtype, p.offset, p.scale)
    C = p.shape[p.channel_axis]
    weight = rng.standard_normal(C).astype(p.dtype) if p.affine in ("weight", "both") else None
    bias = rng.standard_normal(C).astype(p.dtype) if p.affine in ("bias", "both") else None
    y_ref = _reference(p, x, weight, bias)
    x_before = x.copy()
    kwargs = dict(activation=p.activation, channel_axis=p.channel_axis)

    with use_isa(isa_name):
        if p.out_mode == "none":
            y = gn.group_norm(x, p.num_groups, weight, bias, p.eps, **kwargs)
        else:
            if p.out_mode == "same":
                out = np.empty_like(x)
            elif p.out_mode == "other":
                out = strided_array(rng, p.shape, p.out_perm, (1,) * len(p.shape), p.dtype)
            else:
                out = x
            if out is not x:
                out[...] = np.nan
            y = gn.group_norm(x, p.num_groups, weight, bias, p.eps, out=out, **kwargs)
            assert y is out

    assert type(y) is np.ndarray and y.dtype == np.dtype(p.dtype) and y.shape == p.shape
    assert_matches_reference(y, y_ref, activation=p.activation)
    if p.out_mode != "in_place":
        assert same_bits(x, x_before), "the input was modified"


@pytest.mark.parametrize("isa_name", ISA_PARAMS)
@settings(max_examples=60, deadline=None)
@given(p=problems())
def test_out_and_thread_count_do_not_change_the_bits(isa_name, p):
    """Writing into out= (same layout as the input) and running on one thread give the same bits as the plain
    call, and the plain call matches the reference."""
    rng = np.random.default_rng(p.seed)
    x = strided_array(rng, p.shape, p.perm, p.steps, p.dtype, p.offset, p.scale)
    kwargs = dict(activation=p.activation, channel_axis=p.channel_axis)
    with use_isa(isa_name):
        y = gn.group_norm(x, p.num_groups, None, None, p.eps, **kwargs)
        out = np.full_like(x, np.nan)
        gn.group_norm(x, p.num_groups, None, None, p.eps, out=out, **kwargs)
        gn.set_num_threads(1)
        try:
            y_serial = gn.group_norm(x, p.num_groups, None, None, p.eps, **kwargs)
        finally:
            gn.set_num_threads(0)
    assert_matches_reference(y, _reference(p, x, None, None), activation=p.activation)
    assert same_bits(out, y), "out= and the allocating call differ"
    assert same_bits(y_serial, y), "one thread and the default thread count differ"
