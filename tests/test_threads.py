# test_threads.py — OpenMP thread control and determinism: results bitwise identical for 1..4 threads on every
# ISA level, OMP_NUM_THREADS / threadpoolctl honoured as the default, and Python threads calling concurrently.
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import groupnorm as gn
from reference import assert_matches_reference, group_norm_reference, random_array, same_bits

# Each has >= 4 * 32768 elements, so a team of 4 OpenMP threads is possible; N*G below and above the count.
DETERMINISM_CASES = [
    ((1, 4, 256, 256), 1, "contiguous"),     # one group split across threads by chunk
    ((1, 4, 256, 256), 1, "channels_last"),  # one sample split across threads by row chunk
    ((3, 6, 129, 127), 3, "contiguous"),     # N*G = 9, not a multiple of the thread count
    ((3, 6, 129, 127), 3, "channels_last"),  # N = 3
    ((1, 64, 64, 64), 64, "channels_last"),  # one sample's 64 groups, their statistics split across threads
    ((8, 32, 33, 31), 8, "channels_last"),   # many samples
    ((16, 64, 1), 4, "contiguous"),          # HxW = 1, tiny: stays serial
    ((1024, 80), 10, "contiguous"),          # packed groups of 8, blocks split across threads, C not whole vectors
    ((640, 128, 1), 2, "contiguous"),        # packed groups of 64 (a few vectors each)
    ((2, 3, 3 * 16384 + 5), 1, "contiguous"),
]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, G, layout", DETERMINISM_CASES,
                         ids=[f"{s}-G{g}-{lay}".replace(" ", "") for s, g, lay in DETERMINISM_CASES])
def test_bitwise_identical_for_every_thread_count(isa, rng, shape, G, layout, dtype, activation):
    x = random_array(rng, shape, dtype, layout, offset=5.0)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    results = {}
    for n in (1, 2, 3, 4):
        gn.set_num_threads(n)
        assert gn.get_num_threads() == n
        results[n] = gn.group_norm(x, G, weight, bias, activation=activation)
    for n in (2, 3, 4):
        assert same_bits(results[n], results[1]), f"{n} threads differ from 1 thread"
    assert_matches_reference(results[1], group_norm_reference(x, G, weight, bias, activation=activation),
                             activation=activation)


def test_set_and_get_num_threads():
    gn.set_num_threads(0)
    default = gn.get_num_threads()
    assert isinstance(default, int) and default >= 1
    for n in (1, 3, 7):
        gn.set_num_threads(n)
        assert gn.get_num_threads() == n
        assert gn.config()["num_threads"] == n
    gn.set_num_threads(0)
    assert gn.get_num_threads() == default
    gn.set_num_threads(2)
    gn.set_num_threads(None)
    assert gn.get_num_threads() == default
    assert gn.config()["num_threads"] == default


def test_thread_count_visible_from_other_python_threads():
    gn.set_num_threads(3)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(gn.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [3]


def _run_python(code, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("GROUPNORM_ISA", "OMP_NUM_THREADS")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_omp_num_threads_is_the_default():
    if not gn.config()["openmp"]:
        pytest.skip("built without OpenMP")
    proc = _run_python("import json, groupnorm as gn\n"
                       "print(json.dumps([gn.get_num_threads(), gn.config()['num_threads']]))",
                       OMP_NUM_THREADS="3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [3, 3]


FORK_SCRIPT = r"""
import json, os, signal, sys, time, warnings
import numpy as np
import groupnorm as gn

def work():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 32, 64, 64)).astype(np.float32)  # big enough for a team of 2 threads
    cl = np.moveaxis(np.moveaxis(x, 1, -1).copy(), -1, 1)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, rstd = gn.group_norm_forward(x, 8, x[0, :, 0, 0], x[1, :, 0, 0])
    grads = gn.group_norm_backward(dy, x, mean, rstd, 8, x[0, :, 0, 0])
    return [y, mean, rstd, gn.group_norm(cl, 8), *grads]

gn.set_num_threads(2)
parent = work()  # the parent's OpenMP runtime now has its worker threads
pid = os.fork()
if pid == 0:  # the child: report, and never return into the interpreter's own exit
    try:
        runtime_is_gnu = "libgomp" in open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else None
        report = {"runtime_is_gnu": runtime_is_gnu, "fork_serial": gn.config()["fork_serial"],
                  "threads": gn.get_num_threads()}
        report["same_bits"] = all(np.array_equal(a, b) for a, b in zip(work(), parent))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gn.set_num_threads(2)
        report["warned"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        report["threads_after_set"] = gn.get_num_threads()
        report["same_bits_after_set"] = all(np.array_equal(a, b) for a, b in zip(work(), parent))
        print(json.dumps(report), flush=True)
        os._exit(0)
    except BaseException as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
        os._exit(1)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print(json.dumps({"error": "the forked child hung"}), flush=True)
    sys.exit(1)
print(json.dumps({"parent_fork_serial": gn.config()["fork_serial"], "parent_threads": gn.get_num_threads(),
                  "parent_same_bits": all(np.array_equal(a, b) for a, b in zip(work(), parent))}), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_forked_child_runs_on_one_thread_instead_of_hanging():
    """A child forked after the parent's OpenMP threads started: GNU OpenMP leaves it without them, and a team
    would wait for them forever (torch 2.13 hangs there); groupnorm runs on one thread, with the same bits."""
    if not gn.config()["openmp"]:
        pytest.skip("built without OpenMP")
    proc = _run_python(FORK_SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    child, parent = (json.loads(line) for line in proc.stdout.splitlines())
    assert child["same_bits"] and child["same_bits_after_set"], child
    assert parent == {"parent_fork_serial": False, "parent_threads": 2, "parent_same_bits": True}
    if child["runtime_is_gnu"] is False:  # LLVM's or Intel's runtime rebuilds its threads in the child
        assert child["fork_serial"] is False and child["threads"] == child["threads_after_set"] == 2, child
        return
    assert child["fork_serial"] is True and child["threads"] == child["threads_after_set"] == 1, child
    assert len(child["warned"]) == 1 and "set_num_threads(2) has no effect" in child["warned"][0], child


def test_without_openmp_one_thread():
    if gn.config()["openmp"]:
        pytest.skip("built with OpenMP")
    assert gn.get_num_threads() == 1


def test_threadpoolctl_sees_and_limits_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not gn.config()["openmp"]:
        pytest.skip("built without OpenMP")
    gn.set_num_threads(0)
    assert any(info["user_api"] == "openmp" for info in threadpoolctl.threadpool_info()), \
        "threadpoolctl found no OpenMP runtime after importing groupnorm"
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert gn.get_num_threads() == 1
        x = np.random.default_rng().standard_normal((1, 4, 256, 256)).astype(np.float32)
        assert_matches_reference(gn.group_norm(x, 1), group_norm_reference(x, 1))
    assert gn.get_num_threads() >= 1


CONCURRENT_CASES = [
    ((2, 6, 33, 31), 3, np.float32, "contiguous", None),
    ((1, 4, 256, 129), 1, np.float32, "channels_last", "silu"),
    ((3, 10, 17), 5, np.float64, "contiguous", None),
    ((4, 32, 16, 16), 8, np.float64, "channels_last", None),
    ((2, 65, 7), 13, np.float32, "fortran", "silu"),
    ((1, 3, 3 * 16384 + 5), 1, np.float64, "contiguous", None),
    ((5, 16), 4, np.float32, "contiguous", None),
    ((2, 8, 5, 6, 7), 2, np.float32, "negative_strides", None),
]


@pytest.mark.parametrize("threads", [1, 2], ids=["omp1", "omp2"])
def test_concurrent_python_threads(isa, rng, threads):
    """8 Python threads, each on its own shape, repeatedly and at once: each result equals the serial one."""
    gn.set_num_threads(threads)
    problems = []
    for shape, G, dtype, layout, activation in CONCURRENT_CASES:
        x = random_array(rng, shape, dtype, layout)
        weight = rng.standard_normal(shape[1]).astype(dtype)
        expected = gn.group_norm(x, G, weight, activation=activation)
        assert_matches_reference(expected, group_norm_reference(x, G, weight, activation=activation),
                                 activation=activation)
        problems.append((x, G, weight, activation, expected))

    barrier = threading.Barrier(len(problems))
    failures = []

    def work(index):
        x, G, weight, activation, expected = problems[index]
        try:
            barrier.wait(timeout=60)
            for repeat in range(6):
                if repeat % 2:
                    out = np.full_like(x, np.nan)
                    y = gn.group_norm(x, G, weight, activation=activation, out=out)
                else:
                    y = gn.group_norm(x, G, weight, activation=activation)
                if not same_bits(y, expected):
                    failures.append(f"thread {index}, repeat {repeat}: result differs from the serial one")
        except Exception as exc:  # reported below, with the thread it came from
            failures.append(f"thread {index}: {exc!r}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "a worker thread hung"
    assert not failures, "\n".join(failures)
