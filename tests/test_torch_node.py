"""groupnorm.torch's C++ autograd node (cpp/torch, groupnorm/_torch_node.so): present where the build must have made
it (GROUPNORM_EXPECT_TORCH_NODE=1, as .ci/jax sets), the same values and gradients as the Python node to the bit
on every call it serves (each dtype, layout, parameter set and dtype, and activation, at every ISA level), the
calls it leaves to the Python node, the Python node's errors for bad arguments, second derivatives, saved-tensor hooks, threads,
and the cache that keeps its outputs' memory (across fork() too).
"""
import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import groupnorm as gn  # noqa: E402
import groupnorm.torch as gnt  # noqa: E402

AVAILABLE, REASON = gnt.cpp_node()
needs_node = pytest.mark.skipif(not AVAILABLE, reason=f"no C++ autograd node here: {REASON}")

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, num_groups, channels_last): every rank the node serves, both layouts, odd sizes and G = 1, G = C.
CASES = [((6, 4), 2, False), ((3, 6, 7), 3, False), ((2, 8, 5, 3), 4, False), ((2, 8, 5, 3), 4, True),
         ((1, 6, 3, 2, 5), 6, False), ((2, 4, 3, 2, 5), 1, True), ((2, 12, 9, 9), 3, True)]
CASE_IDS = [f"{'x'.join(map(str, s))}-g{g}{'-cl' if cl else ''}" for s, g, cl in CASES]
AFFINE = ["none", "weight", "bias", "both"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def is_node(grad_fn):
    return grad_fn is not None and "GroupNormNode" in grad_fn.name()


def make_inputs(rng, shape, channels_last, dtype, affine, params="compute"):
    """x, weight, bias, grad_output; the parameters of the compute dtype, of the data's ("data": a 16-bit model's),
    or the weight of the one and the bias of the other ("mixed")."""
    def normal(*size):
        return torch.from_numpy(rng.standard_normal(size) * 2.0 + 0.5)

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    weight_dtype = dtype if params == "data" else compute
    bias_dtype = dtype if params in ("data", "mixed") else compute
    x, grad = normal(*shape).to(dtype), normal(*shape).to(dtype)
    if channels_last:
        x, grad = (t.contiguous(memory_format=CHANNELS_LAST[len(shape)]) for t in (x, grad))
    weight = normal(shape[1]).to(weight_dtype) if affine in ("weight", "both") else None
    bias = normal(shape[1]).to(bias_dtype) if affine in ("bias", "both") else None
    return x, weight, bias, grad


def step(x, num_groups, weight, bias, grad, activation=None, eps=1e-5):
    """One forward and backward on fresh leaves: (y, grad_fn, x.grad, weight.grad, bias.grad)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = gnt.group_norm(leaves[0], num_groups, leaves[1], leaves[2], eps, activation=activation)
    grad_fn = y.grad_fn
    torch.autograd.backward(y, grad)
    return [y.detach(), grad_fn] + [None if t is None else t.grad for t in leaves]


def assert_same_bits(node_result, python_result):
    for what, a, b in zip(("y", "grad_input", "grad_weight", "grad_bias"), node_result[:1] + node_result[2:],
                          python_result[:1] + python_result[2:]):
        if a is None or b is None:
            assert a is None and b is None, what
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
        assert torch.equal(a, b), f"{what}: the C++ node differs from the Python node"


@pytest.mark.skipif(os.environ.get("GROUPNORM_EXPECT_TORCH_NODE") != "1",
                    reason="GROUPNORM_EXPECT_TORCH_NODE=1 is set where the build must have made the node (.ci/jax)")
def test_build_made_and_loaded_the_node():
    assert gnt.cpp_node() == (True, ""), gnt.cpp_node()
    assert gn.config()["torch_node"] and gn.config()["torch_node_reason"] == f"built for torch {torch.__version__}"


def test_node_reason_is_consistent():
    assert AVAILABLE == (REASON == "")
    assert gn.config()["torch_node"] == _build_has_node()
    if not _build_has_node():
        assert REASON == gn.config()["torch_node_reason"]


def _build_has_node():
    return gn.config()["torch_node_reason"].startswith("built")


@pytest.mark.skipif(not _build_has_node(), reason="this build has no C++ autograd node")
def test_environment_keeps_the_node_unloaded():
    code = "import groupnorm.torch as gnt; print(gnt.cpp_node())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "GROUPNORM_TORCH_NODE": "0"}).stdout
    assert out.strip() == "(False, 'GROUPNORM_TORCH_NODE=0 in the environment')"


@pytest.mark.skipif(not _build_has_node(), reason="this build has no C++ autograd node")
def test_other_torch_version_keeps_the_node_unloaded(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    node, reason = gnt._load_node()
    assert node is None and reason == "it was built for torch " + gn.config()["torch_node_reason"].split()[-1] + \
        ", and this is torch 0.0.1"


@needs_node
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, num_groups, channels_last", CASES, ids=CASE_IDS)
def test_node_gives_the_python_nodes_bits(rng, monkeypatch, shape, num_groups, channels_last, dtype, affine,
                                          activation):
    x, weight, bias, grad = make_inputs(rng, shape, channels_last, dtype, affine)
    check_same_bits_as_python(monkeypatch, x, num_groups, weight, bias, grad, activation)


@needs_node
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("params", ["data", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, num_groups, channels_last", CASES[1:5], ids=CASE_IDS[1:5])
def test_sixteen_bit_parameters_give_the_python_nodes_bits(rng, monkeypatch, shape, num_groups, channels_last, dtype,
                                                          params, activation):
    """A 16-bit model's parameters (weight and bias of the data's dtype, or one of each): widened for the kernels,
    their gradients rounded back to their dtype, as the Python node does."""
    x, weight, bias, grad = make_inputs(rng, shape, channels_last, dtype, "both", params)
    result = check_same_bits_as_python(monkeypatch, x, num_groups, weight, bias, grad, activation)
    assert result[3].dtype == weight.dtype and result[4].dtype == bias.dtype


def check_same_bits_as_python(monkeypatch, x, num_groups, weight, bias, grad, activation):
    """The step through the C++ node and through the Python node: the same bits. Returns the C++ node's."""
    by_node = step(x, num_groups, weight, bias, grad, activation, eps=0.01)
    monkeypatch.setattr(gnt, "_node", None)
    by_python = step(x, num_groups, weight, bias, grad, activation, eps=0.01)
    assert is_node(by_node[1]) and not is_node(by_python[1])
    assert_same_bits(by_node, by_python)
    return by_node


@needs_node
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_node_runs_the_selected_isa_level(isa, rng, monkeypatch, dtype):
    """The node calls _core's copy of the core, so the ISA level set through groupnorm is the node's too: its bits
    equal the Python node's at every level (the levels' own results differ in the last bits)."""
    x, weight, bias, grad = make_inputs(rng, (2, 16, 7, 5), True, dtype, "both")
    by_node = step(x, 4, weight, bias, grad, "silu")
    monkeypatch.setattr(gnt, "_node", None)
    by_python = step(x, 4, weight, bias, grad, "silu")
    assert is_node(by_node[1])
    assert_same_bits(by_node, by_python)


@needs_node
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, True, True)], ids=str)
def test_gradients_only_for_what_requires_them(rng, wants):
    x, weight, bias, grad = make_inputs(rng, (2, 8, 4, 4), False, torch.float32, "both")
    leaves = [t.detach().clone().requires_grad_(want) for t, want in zip((x, weight, bias), wants)]
    y = gnt.group_norm(*leaves[:1], 2, *leaves[1:])
    assert is_node(y.grad_fn)
    torch.autograd.backward(y, grad)
    expected = torch_gradients(x, weight, bias, grad, 2)
    for leaf, want, truth in zip(leaves, wants, expected):
        if not want:
            assert leaf.grad is None
        else:
            assert torch.allclose(leaf.grad, truth, rtol=1e-4, atol=1e-5)


def torch_gradients(x, weight, bias, grad, num_groups):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    torch.autograd.backward(torch.nn.functional.group_norm(leaves[0], num_groups, leaves[1], leaves[2]),
                            grad.double())
    return [t.grad.float() for t in leaves]


@needs_node
@pytest.mark.parametrize("case", ["one_mib", "transposed", "integer_eps", "tensor_subclass_weight"])
def test_calls_the_node_leaves_to_the_python_node(rng, case):
    """Calls outside the node's set take the Python node, with the same results as torch's."""
    x, weight, bias, grad = make_inputs(rng, (2, 8, 6, 5), False, torch.float32, "both")
    eps = 1e-5
    if case == "one_mib":  # outputs of 1 MiB and more come from _core's buffer pool
        x, weight, bias, grad = make_inputs(rng, (1, 64, 64, 64), False, torch.float32, "both")
    elif case == "transposed":
        x, grad = x.transpose(2, 3), grad.transpose(2, 3)
    elif case == "integer_eps":
        eps = 1
    elif case == "tensor_subclass_weight":
        weight = weight.as_subclass(Subclass)
    y, grad_fn, dx, dw, db = step(x, 2, weight, bias, grad, eps=eps)
    assert not is_node(grad_fn)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = torch.nn.functional.group_norm(leaves[0], 2, leaves[1], leaves[2], eps)
    torch.autograd.backward(expected, grad.double())
    tolerance = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
    for mine, truth in zip((y, dx, dw, db), (expected, *(t.grad for t in leaves))):
        assert torch.allclose(mine.double(), truth, rtol=tolerance, atol=tolerance)


class Subclass(torch.Tensor):
    pass


@needs_node
def test_strided_weight_is_left_to_the_python_node(rng):
    x, weight, bias, grad = make_inputs(rng, (2, 8, 6, 5), False, torch.float32, "both")
    pair = torch.stack([weight, weight], 1).requires_grad_()
    y = gnt.group_norm(x.requires_grad_(), 2, pair[:, 0], bias)
    assert pair[:, 0].stride() == (2,) and not is_node(y.grad_fn)
    torch.autograd.backward(y, grad)
    _, truth, _ = torch_gradients(x, weight, bias, grad, 2)
    assert torch.allclose(pair.grad[:, 0], truth, rtol=1e-4, atol=1e-5) and not pair.grad[:, 1].any()


@needs_node
@pytest.mark.parametrize("kwargs, error", [
    ({"num_groups": 3}, ValueError), ({"num_groups": 0}, ValueError), ({"num_groups": -2}, ValueError),
    ({"num_groups": 1 << 70}, ValueError), ({"num_groups": True}, TypeError), ({"eps": -1.0}, ValueError),
    ({"eps": float("nan")}, ValueError), ({"activation": "relu"}, ValueError),
    ({"weight": "short"}, ValueError), ({"weight": "float64"}, TypeError), ({"bias": "int"}, TypeError),
], ids=str)
def test_bad_arguments_raise_the_python_nodes_errors(rng, monkeypatch, kwargs, error):
    x, weight, bias, _ = make_inputs(rng, (2, 8, 3, 3), False, torch.float32, "both")
    x.requires_grad_()
    call = {"num_groups": 2, "weight": weight, "bias": bias, "eps": 1e-5, "activation": None, **kwargs}
    call["weight"] = {"short": weight[:4], "float64": weight.double()}.get(kwargs.get("weight"), call["weight"])
    call["bias"] = bias.int() if kwargs.get("bias") == "int" else call["bias"]
    before = [t.clone() for t in (x, weight, bias)]
    messages = []
    for node in (gnt._node, None):
        monkeypatch.setattr(gnt, "_node", node)
        with pytest.raises(error) as info:
            gnt.group_norm(x, call["num_groups"], call["weight"], call["bias"], call["eps"],
                           activation=call["activation"])
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert all(torch.equal(a, b) for a, b in zip(before, (x, weight, bias)))


@needs_node
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_and_gradgradcheck_through_the_node(rng, channels_last, activation):
    x, weight, bias, _ = make_inputs(rng, (2, 6, 3, 4), channels_last, torch.float64, "both")
    inputs = [t.requires_grad_() for t in (x, weight, bias)]

    def function(x, weight, bias):
        return gnt.group_norm(x, 3, weight, bias, eps=0.1, activation=activation)

    assert is_node(function(*inputs).grad_fn)
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(function, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@needs_node
def test_saved_tensor_hooks_see_the_nodes_tensors(rng):
    x, weight, bias, grad = make_inputs(rng, (2, 8, 4, 4), True, torch.float32, "both")
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = gnt.group_norm(leaves[0], 2, leaves[1], leaves[2])
    assert is_node(y.grad_fn)
    torch.autograd.backward(y, grad)
    assert (2, 8, 4, 4) in packed and sorted(packed) == sorted(unpacked)
    for leaf, truth in zip(leaves, torch_gradients(x, weight, bias, grad, 2)):
        assert torch.allclose(leaf.grad, truth, rtol=1e-4, atol=1e-5)


@needs_node
def test_input_changed_in_place_after_the_forward_is_refused(rng):
    x, weight, bias, grad = make_inputs(rng, (2, 8, 4, 4), False, torch.float32, "both")
    leaf = x.requires_grad_()
    base = leaf * 1.0
    y = gnt.group_norm(base, 2, weight, bias)
    base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.backward(y, grad)


@needs_node
def test_outputs_reuse_freed_memory_and_never_live_memory(rng):
    x, weight, bias, grad = make_inputs(rng, (2, 8, 6, 6), False, torch.float32, "both")
    x.requires_grad_()
    first = gnt.group_norm(x, 2, weight, bias)
    second = gnt.group_norm(x, 2, weight, bias)
    assert first.data_ptr() != second.data_ptr()
    expected = first.detach().clone()
    address = first.data_ptr()
    del first
    third = gnt.group_norm(x, 2, weight, bias)
    assert third.data_ptr() == address and torch.equal(third, expected) and torch.equal(second, expected)
    third.detach().resize_(4, 8, 6, 6).fill_(1.0)  # the cache's storage grows like any tensor's


@needs_node
def test_steps_from_threads_match_serial_steps(rng):
    cases = [make_inputs(rng, (2, 8, 5, 5), bool(i % 2), DTYPES[i % 4], AFFINE[i % 4]) for i in range(8)]
    serial = [step(x, 4, w, b, g, "silu") for x, w, b, g in cases]
    results = [None] * len(cases)
    gn.set_num_threads(2)

    def worker(i):
        for _ in range(20):
            results[i] = step(*cases[i][:1], 4, *cases[i][1:], activation="silu")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, truth in zip(results, serial):
        assert is_node(mine[1])
        assert_same_bits(mine, truth)


@needs_node
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_fork_while_another_thread_holds_the_output_cache(rng):
    """A child forked while another thread holds the lock of the node's output cache (as a thread inside a step
    does for a moment) can still run a step: fork() takes the lock first, and both processes release it. Without
    that, about 1 fork in 300-1000 made while another thread ran steps left a child hung on its first step."""
    path = next(iter(sorted(pathlib.Path(gnt.__file__).parent.glob("_torch_node*.so"))))
    hold = ctypes.CDLL(str(path)).gn_torch_hold_output_cache
    hold.argtypes = [ctypes.c_int64]
    x, weight, bias, grad = make_inputs(rng, (2, 8, 5, 5), False, torch.float32, "both")
    expected = step(x, 4, weight, bias, grad)
    holder = threading.Thread(target=hold, args=(400_000,))  # ctypes releases the GIL for the call
    holder.start()
    time.sleep(0.1)
    with warnings.catch_warnings():  # jax, when imported, warns at every fork (Python 3.12 too, with threads)
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:  # the child: one step; 0 if it gave the parent's bits, 1 if not, 2 if it raised
        code = 2
        try:
            assert_same_bits(step(x, 4, weight, bias, grad), expected)
            code = 0
        except AssertionError:
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    holder.join()
    assert status[0] != 0, "the forked child hung in its step (the output cache's lock stayed held)"
    assert os.waitstatus_to_exitcode(status[1]) == 0, "the forked child's step failed or differed"


@needs_node
def test_module_training_step_runs_on_the_node(rng):
    module = gnt.GroupNorm(4, 16)
    reference = torch.nn.GroupNorm(4, 16)
    x = torch.from_numpy(rng.standard_normal((2, 16, 5, 5)).astype(np.float32)).requires_grad_()
    y = module(x)
    assert is_node(y.grad_fn)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(module.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(module.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-5)


@needs_node
@pytest.mark.parametrize("case", ["one_dim", "empty", "zero_groups", "groups_not_dividing", "negative_eps", "nan_eps",
                                  "short_weight", "float64_weight", "integer_input", "relu"])
def test_operator_called_directly_answers_empty_for_what_it_does_not_serve(rng, case):
    """groupnorm_node::group_norm is reachable as torch.ops.groupnorm_node.group_norm: any call outside its set
    returns [] (groupnorm.torch then raises its own error), never a crash or a write."""
    x, weight, bias, _ = make_inputs(rng, (2, 8, 3, 3), False, torch.float32, "both")
    args = {"input": x, "num_groups": 2, "weight": weight, "bias": bias, "eps": 1e-5, "activation": None}
    args.update({
        "one_dim": {"input": x.flatten()}, "empty": {"input": x[:0]}, "zero_groups": {"num_groups": 0},
        "groups_not_dividing": {"num_groups": 3}, "negative_eps": {"eps": -1.0}, "nan_eps": {"eps": float("nan")},
        "short_weight": {"weight": weight[:4]}, "float64_weight": {"weight": weight.double()},
        "integer_input": {"input": x.int()}, "relu": {"activation": "relu"},
    }[case])
    before = [t.clone() for t in (x, weight, bias)]
    assert torch.ops.groupnorm_node.group_norm(*args.values()) == []
    assert all(torch.equal(a, b) for a, b in zip(before, (x, weight, bias)))
