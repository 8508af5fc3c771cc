# test_concurrency.py — 32 Python threads call every entry point at once for 10 seconds, on mixed shapes,
# dtypes and layouts, while another thread keeps changing the thread count: every result must equal, bit for
# bit, the one computed serially beforehand (results do not depend on the thread count), and nothing hangs.
import random
import threading
import time

import numpy as np
import pytest

import groupnorm as gn
from reference import (assert_grads_match, assert_matches_reference, group_norm_backward_reference,
                       group_norm_reference, random_array, same_bits)

PYTHON_THREADS = 32
SECONDS = 10.0

CASES = [  # shape, G, dtype, layout, activation
    ((2, 6, 33, 31), 3, np.float32, "contiguous", None),
    ((1, 8, 64, 65), 1, np.float32, "channels_last", "silu"),
    ((3, 10, 17), 5, np.float64, "contiguous", None),
    ((4, 32, 8, 8), 8, np.float64, "channels_last", None),
    ((2, 12, 7), 4, np.float32, "fortran", "silu"),
    ((1, 4, 40_000), 1, np.float32, "contiguous", None),
    ((5, 16), 16, np.float32, "contiguous", None),
    ((2, 8, 5, 6, 7), 2, np.float32, "negative_strides", None),
    ((2, 16, 9, 9), 4, np.float16, "contiguous", "silu"),
    ((1, 32, 12, 11), 8, np.float16, "channels_last", None),
]


def _prepare(rng):
    """Per case: the inputs and the serially computed results of every entry point, checked against the
    float64 references."""
    cases = []
    for shape, G, dtype, layout, activation in CASES:
        x = random_array(rng, shape, dtype, layout)
        dy = random_array(rng, shape, dtype, layout)
        C = shape[1]
        weight = rng.standard_normal(C).astype(np.float32 if dtype == np.float16 else dtype)
        bias = rng.standard_normal(C).astype(weight.dtype)
        y = gn.group_norm(x, G, weight, bias, activation=activation)
        if dtype != np.float16:  # the float16 rounding rule lives in test_half.py
            assert_matches_reference(y, group_norm_reference(x, G, weight, bias, activation=activation),
                                     activation=activation)
        forward = gn.group_norm_forward(x, G, weight, bias)
        backward = gn.group_norm_backward(dy, x, forward[1], forward[2], G, weight)
        if dtype != np.float16:
            assert_grads_match(backward, group_norm_backward_reference(dy, x, G, weight, with_scales=True), dtype)
        layer = gn.GroupNorm(G, C, dtype=weight.dtype)
        layer.weight[...] = weight
        layer.bias[...] = bias
        layer_y = layer(x)
        layer_dx = layer.backward(dy)
        cases.append(dict(x=x, dy=dy, G=G, C=C, weight=weight, bias=bias, activation=activation, y=y,
                          forward=forward, backward=backward, layer_y=layer_y, layer_dx=layer_dx,
                          layer_grads=(layer.grad_weight.copy(), layer.grad_bias.copy())))
    return cases


def _call(kind, case):
    """One entry point on one case; returns (results, expected results)."""
    x, G, weight, bias = case["x"], case["G"], case["weight"], case["bias"]
    if kind == "group_norm":
        return [gn.group_norm(x, G, weight, bias, activation=case["activation"])], [case["y"]]
    if kind == "group_norm_out":
        out = np.full_like(x, np.nan)
        return [gn.group_norm(x, G, weight, bias, activation=case["activation"], out=out)], [case["y"]]
    if kind == "group_norm_forward":
        return list(gn.group_norm_forward(x, G, weight, bias)), list(case["forward"])
    if kind == "group_norm_backward":
        _, mean, rstd = case["forward"]
        return list(gn.group_norm_backward(case["dy"], x, mean, rstd, G, weight)), list(case["backward"])
    layer = gn.GroupNorm(G, case["C"], dtype=weight.dtype)
    layer.weight[...] = weight
    layer.bias[...] = bias
    y = layer(x)
    dx = layer.backward(case["dy"])
    return ([y, dx, layer.grad_weight, layer.grad_bias],
            [case["layer_y"], case["layer_dx"], *case["layer_grads"]])


ENTRY_POINTS = ["group_norm", "group_norm_out", "group_norm_forward", "group_norm_backward", "GroupNorm"]


@pytest.mark.filterwarnings("error")
def test_many_python_threads_every_entry_point_while_the_thread_count_changes(rng):
    cases = _prepare(rng)
    failures = []
    calls = [0] * PYTHON_THREADS
    stop = threading.Event()
    barrier = threading.Barrier(PYTHON_THREADS + 1)

    def work(index):
        local = random.Random(index)
        try:
            barrier.wait(timeout=60)
            while not stop.is_set():
                kind = local.choice(ENTRY_POINTS)
                case_index = local.randrange(len(cases))
                got, expected = _call(kind, cases[case_index])
                for i, (a, b) in enumerate(zip(got, expected)):
                    if not same_bits(a, b):
                        failures.append(f"thread {index}: {kind} on case {case_index}, result {i} differs "
                                        "from the serial one")
                calls[index] += 1
                if failures:
                    return
        except Exception as exc:  # reported below, with the thread it came from
            failures.append(f"thread {index}: {exc!r}")

    def change_thread_count():
        local = random.Random(-1)
        barrier.wait(timeout=60)
        while not stop.is_set():
            gn.set_num_threads(local.choice([0, 1, 2, 3, 4]))
            assert gn.get_num_threads() >= 1
            time.sleep(0.001)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(PYTHON_THREADS)]
    setter = threading.Thread(target=change_thread_count)
    for t in workers + [setter]:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in workers + [setter]:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers + [setter]), "a thread hung"
    assert not failures, "\n".join(failures[:20])
    assert min(calls) > 0, f"a thread never completed a call: {calls}"
