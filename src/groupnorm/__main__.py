"""``python -m groupnorm``: print the configuration, check every SIMD level against a float64 reference,
and time a few shapes against a plain copy of the same bytes (the memory-bandwidth floor).

Exits with status 1 if any level misses the accuracy target.
"""
import sys
import time

import numpy as np

from . import _core, config, group_norm, show_config

# (shape, groups, channels_last)
CHECK_CASES = [
    ((2, 6, 5, 7), 3, False),
    ((3, 33, 17), 11, False),
    ((1, 64, 31, 33), 8, True),
    ((16, 32), 4, False),
    ((2, 4, 130, 129), 1, False),
]
# (shape, groups, channels_last, dtype name)
TIMING_CASES = [
    ((16, 32), 4, False, "float32"),
    ((4, 256, 28, 28), 32, False, "float32"),
    ((1, 320, 64, 64), 32, False, "float32"),
    ((1, 320, 64, 64), 32, True, "float32"),
    ((1, 128, 256, 256), 32, False, "float32"),
    ((1, 320, 64, 64), 32, False, "float16"),
    ((1, 320, 64, 64), 32, True, "float16"),
]


def check_dtypes():
    """The dtypes to check with their tolerance (relative to max |y_ref|): float32 and float64 at the kernels'
    targets, float16 and bfloat16 (when ml_dtypes is installed) at one ulp of the output's largest values."""
    dtypes = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12, np.dtype(np.float16): 2.0 ** -11}
    try:
        import ml_dtypes
        dtypes[np.dtype(ml_dtypes.bfloat16)] = 2.0 ** -8
    except ImportError:
        pass
    return dtypes


def reference(x, groups, weight, bias, eps, silu):
    """group_norm with a two-pass variance in float64, or long double for float64 input."""
    n, c = x.shape[:2]
    wide = np.longdouble if x.dtype == np.float64 else np.float64  # half types: float64 too
    xd = x.astype(wide).reshape(n, groups, -1)
    mean = xd.mean(axis=-1, keepdims=True)
    var = ((xd - mean) ** 2).mean(axis=-1, keepdims=True)
    y = ((xd - mean) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = y * weight.astype(wide).reshape(shape) + bias.astype(wide).reshape(shape)
    return y / (1 + np.exp(-y)) if silu else y


def make_input(rng, shape, channels_last, dtype, offset=0.0):
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    if channels_last and x.ndim > 2:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    return x


def check_level(level, rng, dtypes):
    """Largest error relative to max|y_ref| over the check cases at one ISA level, per dtype."""
    _core.set_isa(level)
    worst = dict.fromkeys(dtypes, 0.0)
    for shape, groups, channels_last in CHECK_CASES:
        for dtype in worst:
            for offset, silu in ((0.0, False), (1e4, False), (0.0, True)):
                x = make_input(rng, shape, channels_last, dtype, offset)
                w = rng.standard_normal(shape[1]).astype(dtype)
                b = rng.standard_normal(shape[1]).astype(dtype)
                out = np.full_like(x, np.nan)
                y = group_norm(x, groups, w, b, activation="silu" if silu else None, out=out)
                ref = reference(x, groups, w, b, 1e-5, silu)
                err = float(np.max(np.abs(y.astype(ref.dtype) - ref)) / np.max(np.abs(ref)))
                worst[dtype] = max(worst[dtype], err if np.isfinite(err) else np.inf)
    return worst


def median_time(fn, min_batch_seconds=2e-3, rounds=7):
    fn()
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        if time.perf_counter() - start >= min_batch_seconds:
            break
        batch *= 2
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch)
    return float(np.median(samples))


def main():
    show_config()
    cfg = config()
    rng = np.random.default_rng()
    tolerance = check_dtypes()
    print("\naccuracy against a high-precision reference (max |y - y_ref| / max |y_ref|):")
    failed = False
    selected = cfg["isa"]
    for level in cfg["isa_available"]:
        worst = check_level(level, rng, tolerance)
        ok = all(worst[dt] <= tolerance[dt] for dt in worst)
        failed |= not ok
        errors = "  ".join(f"{dt.name} {err:.2e}" for dt, err in worst.items())
        print(f"  {level:8s} {errors}  {'ok' if ok else 'FAILED'}")
    _core.set_isa(selected)

    print(f"\ntiming, {cfg['num_threads']} thread(s), ISA {selected}; copy = np.copyto of the same bytes")
    print(f"  {'shape':22s} {'G':>4s} {'layout':>13s} {'dtype':>8s} {'groupnorm us':>13s} {'copy us':>9s} "
          f"{'ratio':>6s}")
    for shape, groups, channels_last, dtype in TIMING_CASES:
        x = make_input(rng, shape, channels_last, dtype)
        w = rng.standard_normal(shape[1]).astype(np.float32)
        b = rng.standard_normal(shape[1]).astype(np.float32)
        out = np.empty_like(x)
        t_gn = median_time(lambda: group_norm(x, groups, w, b, out=out))
        t_copy = median_time(lambda: np.copyto(out, x))
        layout = "channels-last" if channels_last else "contiguous"
        print(f"  {str(list(shape)):22s} {groups:4d} {layout:>13s} {dtype:>8s} {t_gn * 1e6:13.1f} "
              f"{t_copy * 1e6:9.1f} {t_gn / t_copy:6.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
