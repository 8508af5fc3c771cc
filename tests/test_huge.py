# test_huge.py — one group of more than 2**31 elements (float16, to stay within memory), forward in both native
# layouts and backward, against exact float64 statistics; and a call that cannot allocate its output raising
# MemoryError cleanly. The input repeats a short pattern, so the reference comes from counts, not a copy.
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import groupnorm as gn

PATTERN = np.array([-2.5, -1.0, 0.0, 0.5, 1.25, 3.0, 7.0], dtype=np.float16) + np.float16(10.0)
P = len(PATTERN)
HXW = 2**30 + 12_345  # two channels in one group: 2**31 + 24_690 elements
ARRAY_BYTES = 2 * 2 * HXW  # one float16 array of the shape
CHECK_BYTES = 1 << 30  # the checking chunks


def _require_memory(needed):
    """Skips the test unless `needed` bytes are free now (checked at its start, not at collection, so
    that a concurrent run of the suite makes it skip rather than both be killed for memory)."""
    needed *= 9 / 8 if "asan" in os.environ.get("LD_PRELOAD", "") else 1  # ASan's shadow
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pytest.skip("cannot read MemAvailable from /proc/meminfo")
    if available < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free, {available / 2**30:.1f} GiB is")


# One at a time even under pytest-xdist (--dist loadgroup): two of them at once would need twice the memory.
pytestmark = pytest.mark.xdist_group("huge_memory")


def _counts(start, stop):
    """How often each pattern entry occurs at memory positions start..stop-1 of the repeated pattern."""
    full, left = divmod(stop - start, P)
    counts = np.full(P, full, dtype=np.int64)
    counts[(start + np.arange(left)) % P] += 1
    return counts


def _patterned(length):
    """A float16 vector of `length` elements repeating PATTERN: one block of whole periods, then copies of the
    filled prefix, doubling (memcpy speed; broadcasting the 7-element row took 5-8 s for 4 GiB)."""
    x = np.empty(length, dtype=np.float16)
    filled = min(length, P << 12)
    x[:filled] = np.resize(PATTERN, filled)
    while filled < length:  # the prefix is whole periods, so a copy of it continues the pattern
        more = min(filled, length - filled)
        x[filled:filled + more] = x[:more]
        filled += more
    return x


@pytest.fixture(scope="module")
def flat():
    """The patterned input, made once for the module's tests (which leave it untouched): on the CI's VM the first
    touch of 4 GiB costs 4-13 s of page faults, a second copy as much again."""
    _require_memory(2 * ARRAY_BYTES + CHECK_BYTES)  # itself, then a test's output and checking chunks
    return _patterned(2 * HXW)


def _stats(counts, eps):
    values = PATTERN.astype(np.float64)
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean) ** 2).sum() / total
    return mean, 1.0 / np.sqrt(var + eps), var


def _assert_periodic(flat, expected_row, what):
    """flat (memory order) equals expected_row repeated, bit for bit: every element was written, and alike."""
    bits = flat.view(np.uint16)
    row = expected_row.view(np.uint16)
    whole = len(bits) - len(bits) % P
    step = P << 22
    for start in range(0, whole, step):
        block = bits[start:min(start + step, whole)].reshape(-1, P)
        if not (block == row).all():
            bad = start + int(np.argwhere(block != row)[0] @ [P, 1])
            raise AssertionError(f"{what}: element {bad} is {flat[bad]!r}, expected {expected_row[bad % P]!r}")
    assert (bits[whole:] == row[: len(bits) - whole]).all(), f"{what}: the tail differs"


def _assert_within_one_ulp(got, ref, what):
    ref16 = ref.astype(np.float16)
    err = np.abs(got.astype(np.float64) - ref)
    ulp = np.spacing(np.abs(ref16)).astype(np.float64)
    assert (err <= ulp).all(), f"{what}: {got} vs reference {ref} (error {err}, ulp {ulp})"


@pytest.mark.asan_heavy
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_group_over_2_31_elements(layout, flat):
    _require_memory(ARRAY_BYTES + CHECK_BYTES)
    if layout == "contiguous":
        x = flat.reshape(1, 2, HXW)
    else:
        x = flat.reshape(1, HXW, 2).transpose(0, 2, 1)
    out = np.empty_like(x)
    out_flat = out.reshape(-1) if layout == "contiguous" else out.transpose(0, 2, 1).reshape(-1)
    assert np.shares_memory(out_flat, out)
    out_flat.view(np.uint16)[...] = 0x7E00  # NaN: an unwritten element shows

    y = gn.group_norm(x, 1, out=out)

    assert y is out
    mean, rstd, _ = _stats(_counts(0, 2 * HXW), 1e-5)
    expected_row = out_flat[:P].copy()
    _assert_within_one_ulp(expected_row, (PATTERN.astype(np.float64) - mean) * rstd, "y")
    _assert_periodic(out_flat, expected_row, "y")
    # With no weight, channel 1 normalises alike: in memory it simply continues the pattern.
    assert (flat[:P] == PATTERN).all(), "the input was modified"


@pytest.mark.asan_heavy
def test_backward_group_over_2_31_elements(flat):
    """dy = x and eps = var make dx = x_hat / 2 (rstd^2 * var = 1/2): well conditioned, known exactly."""
    _require_memory(ARRAY_BYTES + CHECK_BYTES)
    x = flat.reshape(1, 2, HXW)
    mean, _, var = _stats(_counts(0, 2 * HXW), 0.0)
    eps = var
    mean32 = np.array([[mean]], dtype=np.float32)
    rstd32 = np.array([[1.0 / np.sqrt(var + eps)]], dtype=np.float32)

    dx, dw, db = gn.group_norm_backward(x, x, mean32, rstd32, 1)

    values = PATTERN.astype(np.float64)
    r = float(rstd32[0, 0])
    x_hat = (values - mean) * r
    mean_dy_xhat = r * var  # mean(x * x_hat) over the group, with the rstd the kernel was given
    dx_ref = r * (values - mean - x_hat * mean_dy_xhat)
    dx_flat = dx.reshape(-1)
    expected_row = dx_flat[:P].copy()
    _assert_within_one_ulp(expected_row, dx_ref, "dx")
    _assert_periodic(dx_flat, expected_row, "dx")
    for c in range(2):
        counts = _counts(c * HXW, (c + 1) * HXW)
        np.testing.assert_allclose(db[c], (counts * values).sum(), rtol=1e-5, err_msg=f"grad_bias[{c}]")
        np.testing.assert_allclose(dw[c], (counts * values * x_hat).sum(), rtol=1e-5,
                                   atol=1e-6 * (counts * np.abs(values * x_hat)).sum(),
                                   err_msg=f"grad_weight[{c}]")


def _sanitized():
    """Running under AddressSanitizer, whose shadow memory makes an address-space limit meaningless."""
    return "asan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS (Linux)")
@pytest.mark.skipif(_sanitized(), reason="AddressSanitizer reserves terabytes of address space")
def test_output_that_cannot_be_allocated_raises_memory_error():
    """Under an address-space limit that admits the input but not its output, every entry point raises
    MemoryError, leaves the input untouched, and the next call that fits works."""
    script = textwrap.dedent("""
        import resource
        import numpy as np
        import groupnorm as gn

        x = np.random.default_rng(0).standard_normal((1, 4, 1 << 25)).astype(np.float32)  # 512 MiB
        before = x[0, :, :8].copy()
        small = x[:, :, :4096]
        y_small = gn.group_norm(small, 2)  # starts the OpenMP team before the limit
        gn.group_norm_backward(small, small, *gn.group_norm_forward(small, 2)[1:], 2)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20), resource.RLIM_INFINITY))
        calls = {
            "group_norm": lambda: gn.group_norm(x, 2),
            "group_norm_forward": lambda: gn.group_norm_forward(x, 2),
            "group_norm_backward": lambda: gn.group_norm_backward(x, x, np.zeros((1, 2), np.float32),
                                                                  np.ones((1, 2), np.float32), 2),
            "GroupNorm": lambda: gn.GroupNorm(2, 4)(x),
        }
        for name, call in calls.items():
            try:
                call()
            except MemoryError:
                print(name, "MemoryError")
            else:
                print(name, "returned")
        assert (x[0, :, :8] == before).all(), "the input was modified"
        assert (gn.group_norm(small, 2) == y_small).all(), "a later call differs"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("group_norm", "group_norm_forward", "group_norm_backward", "GroupNorm"):
        assert f"{name} MemoryError" in result.stdout, result.stdout
    assert result.stdout.split()[-1] == "ok"


@pytest.mark.skipif(_sanitized(), reason="AddressSanitizer reports (logs) every allocation it refuses")
def test_broadcast_input_too_large_to_copy_raises_memory_error():
    x = np.broadcast_to(np.float32(1.0), (1, 4, 1 << 44))
    with pytest.raises(MemoryError):
        gn.group_norm(x, 2)
