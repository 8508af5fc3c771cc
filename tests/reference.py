# reference.py — the float64 NumPy reference GroupNorm (long double for float64 input), two-pass statistics,
# and the helpers every accuracy test shares: the tolerance rule, arrays in a given memory layout, and a
# checked call that also runs the poisoned out= path and proves the input untouched.
import numpy as np

import groupnorm as gn

# max|y - y_ref| <= TOLERANCE * max|y_ref|: the float32 target, and float64 a few thousand ulp. Both
# kernels carry the mean's low part, so a large offset (1e4 + randn) gets no allowance.
TOLERANCE = {
    (np.dtype(np.float32), False): 2e-6,
    (np.dtype(np.float32), True): 4e-6,  # SiLU: a polynomial exp and one division on top of the norm
    (np.dtype(np.float64), False): 1e-12,
    (np.dtype(np.float64), True): 1e-12,
}

LAYOUTS = ("contiguous", "channels_last", "fortran", "sliced_spatial", "sliced_channels", "negative_strides",
           "all_reversed", "batch_strided", "broadcast")


def accumulator_dtype(dtype):
    """float64 for float32 data; long double (at least float64) for float64 data."""
    return np.dtype(np.longdouble) if np.dtype(dtype) == np.float64 else np.dtype(np.float64)


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, channel_axis=1):
    """torch.nn.functional.group_norm semantics in high precision; returns the accumulator-dtype result."""
    x = np.asarray(x)
    acc = accumulator_dtype(x.dtype)
    xc = np.moveaxis(x, channel_axis, 1).astype(acc)
    N, C = xc.shape[:2]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if xc.size == 0:
            y = xc.copy()
        else:
            groups = xc.reshape(N, num_groups, xc.size // (N * num_groups))
            mean = groups.mean(axis=2, keepdims=True)
            var = np.square(groups - mean).mean(axis=2, keepdims=True)
            y = ((groups - mean) / np.sqrt(var + acc.type(eps))).reshape(xc.shape)
        per_channel = (1, C) + (1,) * (xc.ndim - 2)
        if weight is not None:
            y = y * np.asarray(weight).astype(acc).reshape(per_channel)
        if bias is not None:
            y = y + np.asarray(bias).astype(acc).reshape(per_channel)
        if activation == "silu":
            y = y / (1 + np.exp(-y))
    return np.moveaxis(y, 1, channel_axis)


def assert_matches_reference(y, y_ref, *, activation=None, what="group_norm"):
    """y has y_ref's shape, NaNs exactly where y_ref has them, and max error within TOLERANCE * max|y_ref|."""
    y = np.asarray(y)
    y_ref = np.asarray(y_ref)
    assert y.shape == y_ref.shape, f"{what}: shape {y.shape} != reference {y_ref.shape}"
    tol = TOLERANCE[(y.dtype, activation == "silu")]
    nan_y, nan_ref = np.isnan(y), np.isnan(y_ref)
    if not np.array_equal(nan_y, nan_ref):
        bad = np.argwhere(nan_y != nan_ref)
        raise AssertionError(f"{what}: NaN pattern differs from the reference at {len(bad)} element(s), "
                             f"first at index {tuple(bad[0])}: got {y[tuple(bad[0])]!r}, "
                             f"expected {y_ref[tuple(bad[0])]!r}")
    if y.size == 0 or nan_ref.all():
        return
    finite = ~nan_ref
    err = np.abs(y.astype(y_ref.dtype) - y_ref)
    err[~finite] = 0
    scale = np.abs(y_ref[finite]).max()
    bound = tol * scale if scale > 0 else tol
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= bound, (
        f"{what}: max|y - y_ref| = {float(err.max()):.3e} > {tol:g} * max|y_ref| = {float(bound):.3e} "
        f"(ratio {float(err.max() / max(scale, 1e-300)):.2e}) at index {tuple(int(i) for i in worst)}: "
        f"got {y[worst]!r}, expected {float(y_ref[worst])!r}; dtype {y.dtype}, shape {y.shape}")


def affine_params(rng, C, dtype, affine):
    """Standard normal (C,) weight and bias of `dtype`, each present when `affine` names it ("weight", "bias",
    "both"; anything else gives neither)."""
    weight = rng.standard_normal(C).astype(dtype) if affine in ("weight", "both") else None
    bias = rng.standard_normal(C).astype(dtype) if affine in ("bias", "both") else None
    return weight, bias


def random_array(rng, shape, dtype, layout="contiguous", *, offset=0.0, scale=1.0):
    """Standard normal data (times scale, plus offset) of logical shape (N, C, *) in the named memory layout."""
    shape = tuple(shape)

    def fill(physical_shape):
        return (offset + scale * rng.standard_normal(physical_shape)).astype(dtype)

    if layout == "contiguous":
        return fill(shape)
    if layout == "channels_last":  # e.g. x_nhwc.transpose(0, 3, 1, 2)
        return np.moveaxis(fill((shape[0],) + shape[2:] + (shape[1],)), -1, 1)
    if layout == "fortran":
        return np.asfortranarray(fill(shape))
    if layout == "sliced_spatial":  # every other position along the last axis
        return fill(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if layout == "sliced_channels":
        return fill((shape[0], 2 * shape[1]) + shape[2:])[:, 1::2]
    if layout == "negative_strides":
        return fill(shape)[..., ::-1]
    if layout == "all_reversed":
        return fill(shape)[(slice(None, None, -1),) * len(shape)]
    if layout == "batch_strided":
        return fill((2 * shape[0] + 1,) + shape[1:])[1::2]
    if layout == "broadcast":  # zero strides along the batch axis, read-only
        return np.broadcast_to(fill((1,) + shape[1:]), shape)
    raise ValueError(f"unknown layout {layout!r}")


def empty_like_layout(x, fill_value=np.nan):
    """A writeable array of x's shape and dtype, filled with a sentinel, in x's memory order."""
    out = np.empty_like(x)
    out[...] = fill_value
    return out


def at_odd_address(a):
    """A copy of array a whose data starts one byte past an aligned address (misaligned for every dtype)."""
    odd = np.frombuffer(bytearray(a.nbytes + 1), dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    odd[...] = a
    return odd


def off_cache_line(physical_shape, dtype, offset_bytes, guard=64):
    """An empty array of physical_shape whose data starts offset_bytes past a 64-byte boundary, inside a byte
    buffer whose other bytes (at least `guard` on each side) hold 0xAB: returns (array, buffer, start)."""
    nbytes = int(np.prod(physical_shape)) * np.dtype(dtype).itemsize
    buffer = np.full(nbytes + 2 * guard + 128, 0xAB, np.uint8)
    start = guard + (-(buffer.ctypes.data + guard)) % 64 + offset_bytes
    array = buffer[start:start + nbytes].view(dtype).reshape(physical_shape)
    return array, buffer, start


def guard_untouched(buffer, start, nbytes):
    """Every byte of buffer outside [start, start + nbytes) still holds 0xAB (off_cache_line's fill)."""
    return bool((buffer[:start] == 0xAB).all() and (buffer[start + nbytes:] == 0xAB).all())


def same_bits(a, b):
    """Bitwise equality (NaN payloads included) of two arrays of one dtype and shape."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def check_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, channel_axis=1,
                     y_ref=None):
    """Run group_norm with and without a NaN-poisoned out=, check both against the reference, the two results
    bitwise equal, and x, weight and bias unmodified. Returns the result of the call without out=."""
    x_before = np.array(x, copy=True)
    params_before = [None if p is None else np.array(p, copy=True) for p in (weight, bias)]
    if y_ref is None:
        y_ref = group_norm_reference(x, num_groups, weight, bias, eps, activation, channel_axis)

    y = gn.group_norm(x, num_groups, weight, bias, eps, activation=activation, channel_axis=channel_axis)
    assert type(y) is np.ndarray, f"result is a {type(y).__name__}, not an ndarray"
    assert y.dtype == x.dtype, f"result dtype {y.dtype} != input dtype {x.dtype}"
    assert_matches_reference(y, y_ref, activation=activation, what="group_norm(x)")

    out = empty_like_layout(x, np.nan)
    returned = gn.group_norm(x, num_groups, weight, bias, eps, activation=activation, channel_axis=channel_axis,
                             out=out)
    assert returned is out, "out= given: the same object must be returned"
    assert_matches_reference(out, y_ref, activation=activation, what="group_norm(x, out=poisoned)")
    assert same_bits(out, y), "the out= path and the allocating path differ bitwise"

    assert same_bits(x, x_before), "the input was modified"
    for p, before in zip((weight, bias), params_before):
        if p is not None:
            assert same_bits(p, before), "weight or bias was modified"
    return y


# Gradients: max|g - g_ref| <= GRAD_TOLERANCE * max|g_ref| for each of grad_input, grad_weight, grad_bias, the
# issue's target. Where the reference value itself is the residue of a cancellation, max|g_ref| gives way to
# the scale of the terms that cancel (term_scales): grad_input sums three terms that cancel almost exactly in
# a group of 1 or 2 elements (which normalises to a constant), so there it is max|rstd*w*dy|; grad_weight and
# grad_bias are sums whose typical size is the root of the sum of squares of their terms, which a handful
# of terms of one channel can undercut by chance (so can a long channel's: a sum of 262,144 terms came out
# 3.7 where their root sum of squares is 512). With more than a few elements per group and per channel these
# scales rarely exceed max|g_ref| by more than a small factor, so the target is unchanged.
# Channels-last rows of C values not a multiple of the vector width, which the kernels take several at a time
# (row_fold: k = W / gcd(C, W) rows or a multiple, for W = 1 to 16 across the levels and dtypes); where HxW is not a
# multiple of k (HxW odd), a sample's last HxW % k rows go apart (fold_remainder). test_forward.py and
# test_backward.py run these.
FOLDED_CASES = [((2, 3, 32, 32), 1), ((1, 3, 64, 96), 3), ((2, 2, 128, 130), 2), ((3, 12, 8, 16), 4),
                ((1, 6, 100, 164), 2), ((2, 20, 16, 16), 5), ((1, 40, 48), 8), ((2, 5, 33, 17), 5),
                ((1, 2, 99, 101), 1), ((3, 6, 7, 7), 3)]
FOLDED_IDS = [f"{s}-G{g}".replace(" ", "") for s, g in FOLDED_CASES]

GRAD_TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def finite_max(a):
    """The largest finite |a| (as a float), 0 when there is none."""
    a = np.abs(np.asarray(a, np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def silu_grad_reference(grad_output, x, num_groups, weight=None, bias=None, eps=1e-5):
    """dz * silu'(u) in the accumulator dtype: the gradient at the normalised u = x_hat*w + b of z = silu(u), from x
    itself, silu'(u) = s*(1 + u*(1 - s)) with s = sigmoid(u)."""
    x = np.asarray(x)
    acc = accumulator_dtype(x.dtype)
    u = group_norm_reference(x, num_groups, weight, bias, eps).astype(acc)
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-u))
    return np.asarray(grad_output).astype(acc) * s * (1 + u * (1 - s))


def group_norm_backward_reference(grad_output, x, num_groups, weight=None, eps=1e-5, *, bias=None, activation=None,
                                  with_scales=False):
    """(grad_input, grad_weight, grad_bias) of group_norm (then SiLU with activation='silu', whose input needs
    bias) in the accumulator dtype, from x itself: dx = rstd*(w*dy - mean_g(w*dy) - x_hat*mean_g(w*dy*x_hat)),
    dw = sum dy*x_hat, db = sum dy, with dy = grad_output, or silu_grad_reference of it. With_scales, a 4th
    item: the term scales of the three (see GRAD_TOLERANCE)."""
    x = np.asarray(x)
    acc = accumulator_dtype(x.dtype)
    N, C = x.shape[:2]
    if x.size == 0:
        zeros = (np.zeros(x.shape, acc), np.zeros(C, acc), np.zeros(C, acc))
        return zeros + ((0.0, 0.0, 0.0),) if with_scales else zeros
    if activation == "silu":
        grad_output = silu_grad_reference(grad_output, x, num_groups, weight, bias, eps)
    groups = x.astype(acc).reshape(N, num_groups, -1)
    dy = np.asarray(grad_output).astype(acc).reshape(N, C, -1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = groups.mean(axis=2, keepdims=True)
        rstd = 1 / np.sqrt(np.square(groups - mean).mean(axis=2, keepdims=True) + acc.type(eps))
        x_hat = (groups - mean) * rstd
        w = np.ones(C, acc) if weight is None else np.asarray(weight).astype(acc)
        w_dy = (dy * w[None, :, None]).reshape(groups.shape)
        dx = rstd * (w_dy - w_dy.mean(axis=2, keepdims=True)
                     - x_hat * (w_dy * x_hat).mean(axis=2, keepdims=True))
        dy_x_hat = dy * x_hat.reshape(dy.shape)
        dweight = dy_x_hat.sum(axis=(0, 2))
        dbias = dy.sum(axis=(0, 2))
        scales = tuple(finite_max(s) for s in (np.abs(rstd * w_dy), np.sqrt(np.square(dy_x_hat).sum(axis=(0, 2))),
                                               np.sqrt(np.square(dy).sum(axis=(0, 2)))))
    grads = (dx.reshape(x.shape), dweight, dbias)
    return grads + (scales,) if with_scales else grads


def group_stats_reference(x, num_groups, eps=1e-5):
    """(mean, rstd) of each (sample, group), shape (N, G), in the accumulator dtype."""
    x = np.asarray(x)
    acc = accumulator_dtype(x.dtype)
    groups = x.astype(acc).reshape(x.shape[0], num_groups, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = groups.mean(axis=2)
        rstd = 1 / np.sqrt(np.square(groups - mean[..., None]).mean(axis=2) + acc.type(eps))
    return mean, rstd


def assert_grads_match(grads, grads_ref, dtype, what="group_norm_backward"):
    """Each gradient has its reference's shape, no NaN, and max error within GRAD_TOLERANCE * max|g_ref| (or times
    its term scale where larger, when grads_ref carries the term scales as a 4th item)."""
    tol = GRAD_TOLERANCE[np.dtype(dtype)]
    term_scales = grads_ref[3] if len(grads_ref) > 3 else (0.0, 0.0, 0.0)
    for name, g, g_ref, term_scale in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads_ref[:3],
                                          term_scales):
        g = np.asarray(g)
        assert g.dtype == dtype, f"{what}: {name} has dtype {g.dtype}, expected {np.dtype(dtype)}"
        assert g.shape == g_ref.shape, f"{what}: {name} shape {g.shape} != reference {g_ref.shape}"
        if g.size == 0:
            continue
        assert not np.isnan(g).any(), f"{what}: {name} holds NaN at {np.argwhere(np.isnan(g))[0]}"
        err = np.abs(g.astype(g_ref.dtype) - g_ref)
        scale = max(float(np.abs(g_ref).max()), term_scale)
        bound = tol * scale if scale > 0 else tol
        worst = np.unravel_index(np.argmax(err), err.shape)
        assert err.max() <= bound, (
            f"{what}: {name}: max|g - g_ref| = {float(err.max()):.3e} > {tol:g} * {scale:.3e} = {bound:.3e} "
            f"(max|g_ref| {float(np.abs(g_ref).max()):.3e}, term scale {term_scale:.3e}; "
            f"ratio {float(err.max()) / max(scale, 1e-300):.2e}) at {tuple(int(i) for i in worst)}: "
            f"got {g[worst]!r}, expected {float(g_ref[worst])!r}; dtype {g.dtype}, shape {g.shape}")


def same_memory_order(a, b):
    """a and b lay their elements out alike: equal strides on every axis longer than 1."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides))
