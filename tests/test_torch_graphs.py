"""groupnorm.torch in graphs that torch builds and in torch.func transforms: torch.compile (fullgraph, with and
without dynamic shapes, the aot_eager and inductor backends), torch.export (strict and not), torch.jit.trace and
make_fx; vmap, grad, per-sample gradients (vmap of grad) and jacrev. Such calls go through the custom operators
groupnorm::group_norm_forward and groupnorm::group_norm_backward (torch.library.opcheck checks their schemas, fake
functions and autograd registration), which carry vmap rules; eager calls keep the autograd.Function path.
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as torch_functional  # noqa: E402

import groupnorm.torch as gnt  # noqa: E402

if getattr(gnt, "_ops", None) is None:
    pytest.skip("this torch has no torch.library.register_fake (torch < 2.4)", allow_module_level=True)

FLOAT32_RTOL = 1e-5


def tensor(rng, shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    values = torch.from_numpy(rng.standard_normal(shape) * 2.0 + 0.5).to(dtype)
    return values.contiguous(memory_format=memory_format)


def assert_close(actual, expected, what, rtol=FLOAT32_RTOL, scale=0.0):
    """Within rtol of the largest magnitude of expected (or of `scale`, where that is larger)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = max(float(expected.abs().max()), scale, 1e-30)
    error = float((actual.double() - expected.double()).abs().max()) / scale
    assert error <= rtol, f"{what}: max |groupnorm - torch| / max|torch| = {error:.3g} > {rtol:g}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the operators' real (not fake) implementations ran, by name."""
    calls = {"forward": 0, "backward": 0}

    def counted(name, function):
        @functools.wraps(function)
        def wrapper(*args):
            calls[name] += 1
            return function(*args)
        return wrapper

    monkeypatch.setattr(gnt, "_op_forward_impl", counted("forward", gnt._op_forward_impl))
    monkeypatch.setattr(gnt, "_op_backward_impl", counted("backward", gnt._op_backward_impl))
    return calls


class Block(torch.nn.Module):
    """conv -> GroupNorm -> SiLU, the diffusion U-Net's pattern."""

    def __init__(self, norm):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 16, kernel_size=3, padding=1)
        self.norm = norm

    def forward(self, x):
        return torch_functional.silu(self.norm(self.conv(x)))


def blocks(rng, memory_format=torch.contiguous_format):
    """The same Block with torch.nn.GroupNorm and with groupnorm.torch.GroupNorm, random affine parameters."""
    torch.manual_seed(int(rng.integers(2**31)))
    reference = Block(torch.nn.GroupNorm(4, 16))
    with torch.no_grad():
        reference.norm.weight.copy_(tensor(rng, (16,)))
        reference.norm.bias.copy_(tensor(rng, (16,)))
    ours = Block(gnt.GroupNorm(4, 16))
    ours.load_state_dict(reference.state_dict())
    return reference.to(memory_format=memory_format), ours.to(memory_format=memory_format)


def step(model, x, grad):
    """Forward and backward; the output and the gradients of x and of every parameter."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    torch.autograd.backward(y, grad)
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


# --------------------------------------------------------------------------------------------- the operators

OPCHECK_CASES = [  # (shape, num_groups, memory_format, dtype, param dtype or None for no affine)
    ((2, 6, 3, 4), 3, torch.contiguous_format, torch.float32, torch.float32),
    ((2, 6, 3, 4), 3, torch.channels_last, torch.float64, torch.float64),
    ((2, 6, 3, 4), 2, torch.channels_last, torch.bfloat16, torch.float32),
    ((3, 4, 5), 2, torch.contiguous_format, torch.float16, torch.float16),
    ((3, 6), 3, torch.contiguous_format, torch.float32, None),
    ((2, 4, 2, 3, 2), 4, torch.channels_last_3d, torch.float32, torch.float32),
]


@pytest.mark.parametrize("shape, num_groups, memory_format, dtype, param_dtype", OPCHECK_CASES,
                         ids=lambda v: str(v).replace(" ", "").replace("torch.", ""))
def test_opcheck(rng, shape, num_groups, memory_format, dtype, param_dtype):
    """torch.library.opcheck: schema, fake functions against the real ones (shapes, dtypes, strides), the autograd
    registration, and AOTAutograd with dynamic shapes, for the backward operator too (its derivative is the second
    derivative of group_norm)."""
    x = tensor(rng, shape, dtype, memory_format).requires_grad_()
    params = [None, None] if param_dtype is None else [
        tensor(rng, (shape[1],), param_dtype).requires_grad_() for _ in range(2)]
    results = torch.library.opcheck(torch.ops.groupnorm.group_norm_forward, (x, num_groups, *params, 1e-5))
    y, mean, rstd = torch.ops.groupnorm.group_norm_forward(x, num_groups, *params, 1e-5)
    grad = tensor(rng, shape, dtype, memory_format)
    results_backward = torch.library.opcheck(torch.ops.groupnorm.group_norm_backward,
                                             (grad.requires_grad_(), x, mean, rstd, num_groups, params[0]))
    failed = {k: v for k, v in {**results, **results_backward}.items() if v != "SUCCESS"}
    assert not failed, failed


# Decomposed operators against the kernels, relative to the largest magnitude: float rounding for float32 and
# float64; for 16-bit data four units in the last place (the kernels round a SiLU's gradient to the storage dtype on
# the way, as torch's separate silu and group_norm do; the decomposition rounds once, at the end).
DECOMPOSITION_RTOL = {torch.float64: 1e-12, torch.float32: FLOAT32_RTOL,
                      torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8}


@pytest.mark.parametrize("shape, num_groups, memory_format, dtype, param_dtype", OPCHECK_CASES,
                         ids=lambda v: str(v).replace(" ", "").replace("torch.", ""))
@pytest.mark.parametrize("activation", [None, "silu"])
def test_decompositions_compute_what_the_kernels_do(rng, shape, num_groups, memory_format, dtype, param_dtype,
                                                    activation):
    """gnt.decompositions() holds both operators, and each function gives what the operator's kernels give: the
    forward's output and statistics, the backward's three gradients, in the same shapes and dtypes."""
    forward, backward = torch.ops.groupnorm.group_norm_forward.default, torch.ops.groupnorm.group_norm_backward.default
    table = gnt.decompositions()
    assert set(table) == {forward, backward}
    rtol = DECOMPOSITION_RTOL[dtype]
    x = tensor(rng, shape, dtype, memory_format)
    weight, bias = (None, None) if param_dtype is None else (tensor(rng, (shape[1],), param_dtype),
                                                             tensor(rng, (shape[1],), param_dtype))
    kernels = forward(x, num_groups, weight, bias, 1e-5, activation)
    # y is (x - mean) * rstd * w, and x - mean cancels in a group of two close values: its rounding error is then a
    # unit in the last place of x times rstd * w, far above y's (seed 9478121151048597351: x = 2.2140 and 2.1995,
    # rstd 127, y's difference 1.5e-5 of its largest value). The scale is that of those terms, as for dx below.
    w_max = 1.0 if weight is None else float(weight.abs().max())
    x_terms = float(x.abs().max()) * float(kernels[2].max()) * w_max
    for label, mine, theirs in zip(("y", "mean", "rstd"), table[forward](x, num_groups, weight, bias, 1e-5, activation),
                                   kernels):
        assert_close(mine, theirs, f"forward {label}", rtol, scale=x_terms if label == "y" else 0.0)
    grad = tensor(rng, shape, dtype, memory_format)
    args = (grad, x, kernels[1], kernels[2], num_groups, weight, bias, activation)
    # dx is rstd * w * (g - two group means), which cancel almost entirely in groups of two: its rounding error is
    # one of those terms'.
    terms = float(grad.abs().max()) * float(kernels[2].max()) * w_max
    for label, mine, theirs in zip(("dx", "dw", "db"), table[backward](*args), backward(*args)):
        assert_close(mine, theirs, f"backward {label}", rtol, scale=terms if label == "dx" else 0.0)


def test_make_fx_with_the_decompositions_traces_torch_operators(rng):
    """A training step traced with decomposition_table=gnt.decompositions() holds neither operator and computes the
    same output and gradients as the eager step."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def train_step(x, weight, bias, grad):
        y = gnt.group_norm(x, 4, weight, bias, activation="silu")
        return (y,) + torch.autograd.grad(y, (x, weight, bias), grad)

    args = [tensor(rng, (2, 8, 5, 3), memory_format=torch.channels_last).requires_grad_(),
            tensor(rng, (8,)).requires_grad_(), tensor(rng, (8,)).requires_grad_(), tensor(rng, (2, 8, 5, 3))]
    graph = make_fx(train_step, decomposition_table=gnt.decompositions())(*args)
    assert not any("groupnorm" in str(node.target) for node in graph.graph.nodes)
    for label, mine, theirs in zip(("y", "dx", "dw", "db"), graph(*args), train_step(*args)):
        assert_close(mine, theirs, label)


@pytest.mark.parametrize("memory_format, dtype", [(torch.contiguous_format, torch.float32),
                                                   (torch.channels_last, torch.bfloat16)], ids=["float32", "bf16_nhwc"])
def test_opcheck_with_the_activation(rng, memory_format, dtype):
    """The operators with activation='silu' (the backward then reads bias): opcheck's checks, as above."""
    x = tensor(rng, (2, 6, 3, 4), dtype, memory_format).requires_grad_()
    params = [tensor(rng, (6,), torch.float32).requires_grad_() for _ in range(2)]
    results = torch.library.opcheck(torch.ops.groupnorm.group_norm_forward, (x, 3, *params, 1e-5, "silu"))
    _, mean, rstd = torch.ops.groupnorm.group_norm_forward(x, 3, *params, 1e-5, "silu")
    grad = tensor(rng, x.shape, dtype, memory_format)
    results_backward = torch.library.opcheck(torch.ops.groupnorm.group_norm_backward,
                                             (grad.requires_grad_(), x, mean, rstd, 3, *params, "silu"))
    failed = {k: v for k, v in {**results, **results_backward}.items() if v != "SUCCESS"}
    assert not failed, failed


@pytest.mark.parametrize("grad_shape, grad_dtype, message", [
    ((2, 4, 4), torch.float32, r"grad_output has shape \(2, 4, 4\); it must match the input's shape \(2, 4, 3\)"),
    ((2, 4, 3), torch.float64, r"grad_output has dtype torch.float64; it must match the input's dtype torch.float32"),
])
def test_backward_operator_checks_grad_output_on_fake_tensors(grad_shape, grad_dtype, message):
    """On meta tensors (the fake function), with the messages of the operator's real kernel."""
    x = torch.empty(2, 4, 3, device="meta")
    stats = torch.empty(2, 2, device="meta")
    with pytest.raises(ValueError, match=message):
        torch.ops.groupnorm.group_norm_backward(torch.empty(grad_shape, dtype=grad_dtype, device="meta"), x, stats,
                                                stats, 2, None)
    real = [torch.zeros(2, 4, 3), torch.zeros(2, 2), torch.ones(2, 2)]
    with pytest.raises(ValueError, match=message.replace("torch.", "")):
        torch.ops.groupnorm.group_norm_backward(torch.zeros(grad_shape, dtype=grad_dtype), real[0], real[1], real[2],
                                                2, None)


def test_the_operators_compute_what_torch_does(rng):
    """Against torch's native_group_norm (forward) and float64 autograd (backward), with the gradient in another
    layout than the input (which torch's own native_group_norm_backward does not take: its autograd formula passes
    matching layouts)."""
    x = tensor(rng, (2, 8, 5, 3), memory_format=torch.channels_last)
    weight, bias, grad = tensor(rng, (8,)), tensor(rng, (8,)), tensor(rng, (2, 8, 5, 3))
    y, mean, rstd = torch.ops.groupnorm.group_norm_forward(x, 4, weight, bias, 1e-5)
    expected = torch.ops.aten.native_group_norm(x, weight, bias, 2, 8, 15, 4, 1e-5)
    for label, mine, theirs in zip(("y", "mean", "rstd"), (y, mean, rstd), expected):
        assert_close(mine, theirs, label)
    assert y.stride() == x.stride(), "y is not in the input's (channels-last) layout"
    grads = torch.ops.groupnorm.group_norm_backward(grad, x, mean, rstd, 4, weight)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    torch.autograd.backward(torch_functional.group_norm(leaves[0], 4, leaves[1], leaves[2]), grad.double())
    for label, mine, leaf in zip(("dx", "dw", "db"), grads, leaves):
        assert_close(mine.double(), leaf.grad, label)
    assert grads[0].stride() == x.stride()


def test_results_are_laid_out_as_empty_like(rng):
    """The operators promise empty_like's strides (compiled code may assert them). The kernels' results differ from
    those where a dimension of size 1 has a stride that no dense layout would give it; such results are copied."""
    base = tensor(rng, (4, 8, 6, 10)).permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    for x in (base[:, :, 0:1, 0:1], base[:, :, ::2, 1:8]):
        y, _, _ = torch.ops.groupnorm.group_norm_forward(x, 2, None, None, 1e-5)
        assert y.stride() == torch.empty_like(x).stride(), x.stride()
        assert_close(y, torch_functional.group_norm(x, 2), f"y of strides {x.stride()}")
        grad = tensor(rng, tuple(x.shape))
        dx, _, _ = torch.ops.groupnorm.group_norm_backward(grad, x, *gnt._ops.group_norm_forward(x, 2, None, None,
                                                                                               1e-5)[1:], 2, None)
        assert dx.stride() == torch.empty_like(x).stride(), x.stride()


def test_eager_calls_keep_the_autograd_function(rng, kernel_calls):
    x = tensor(rng, (2, 8, 5)).requires_grad_()
    module = gnt.GroupNorm(4, 8)
    module(x).sum().backward()
    with torch.no_grad():
        gnt.group_norm(x, 4)
    assert kernel_calls == {"forward": 0, "backward": 0}


def test_a_parameter_as_input_goes_through_the_operators(rng, kernel_calls):
    """A tensor subclass (here nn.Parameter) may carry behaviour the NumPy crossing would skip: the operators."""
    x = torch.nn.Parameter(tensor(rng, (2, 8, 5)))
    reference = x.detach().clone().requires_grad_()
    grad = tensor(rng, (2, 8, 5))
    torch.autograd.backward(gnt.group_norm(x, 4), grad)
    torch.autograd.backward(torch_functional.group_norm(reference, 4), grad)
    assert kernel_calls == {"forward": 1, "backward": 1}
    assert_close(x.grad, reference.grad, "dx")


def test_a_second_derivative_through_the_operators_matches_torch(rng, kernel_calls):
    """A Parameter input takes the operators (as a traced call does): create_graph=True through the backward
    operator's node, whose derivative is torch's."""
    x = torch.nn.Parameter(tensor(rng, (2, 4, 3), torch.float64))
    grads = []
    for group_norm in (gnt.group_norm, torch_functional.group_norm):
        (grad_x,) = torch.autograd.grad((group_norm(x, 2) ** 3).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad((grad_x ** 2).sum(), x)[0])
    # The second backward runs the kernel's backward again, for the path through y**3's gradient 3 y**2.
    assert kernel_calls == {"forward": 1, "backward": 2}
    assert_close(grads[0], grads[1], "second derivative", FLOAT64_RTOL)


# ----------------------------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_compile_fullgraph_matches_torch(rng, kernel_calls, memory_format, dynamic):
    """One graph (fullgraph=True: no graph break), forward and backward through AOTAutograd, on two batch sizes."""
    torch._dynamo.reset()
    reference, ours = blocks(rng, memory_format)
    compiled = torch.compile(ours, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for batch in (2, 3):
        x = tensor(rng, (batch, 4, 6, 5), memory_format=memory_format)
        grad = tensor(rng, (batch, 16, 6, 5), memory_format=memory_format)
        for label, mine, theirs in zip(["y", "dx", "conv.weight", "conv.bias", "norm.weight", "norm.bias"],
                                       step(compiled, x, grad), step(reference, x, grad)):
            assert_close(mine, theirs, f"batch {batch}: {label}")
    assert kernel_calls["forward"] == 2 and kernel_calls["backward"] == 2


def test_compile_fullgraph_with_the_activation(rng, kernel_calls):
    """GroupNorm(activation='silu') in place of GroupNorm then SiLU: one graph, the same results as torch's pair."""
    torch._dynamo.reset()
    reference, ours = blocks(rng)
    fused = Block(gnt.GroupNorm(4, 16, activation="silu"))
    fused.load_state_dict(reference.state_dict())
    fused.forward = lambda x: fused.norm(fused.conv(x))  # the module's own SiLU, not a second one
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x, grad = tensor(rng, (2, 4, 6, 5)), tensor(rng, (2, 16, 6, 5))
    for label, mine, theirs in zip(["y", "dx", "conv.weight", "conv.bias", "norm.weight", "norm.bias"],
                                   step(compiled, x, grad), step(reference, x, grad)):
        assert_close(mine, theirs, label)
    assert kernel_calls["forward"] == 1 and kernel_calls["backward"] == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # Inductor's own
@pytest.mark.asan_heavy  # the generated C++ compiles and loads under ASan for minutes; nothing of groupnorm's is new
def test_compile_inductor_channels_last(rng, kernel_calls):
    """The default backend: Inductor generates the conv's neighbours and calls the operators as extern kernels, and
    checks the strides the fake functions promised."""
    torch._dynamo.reset()
    reference, ours = blocks(rng, torch.channels_last)
    compiled = torch.compile(ours, fullgraph=True)
    x = tensor(rng, (2, 4, 6, 5), memory_format=torch.channels_last)
    grad = tensor(rng, (2, 16, 6, 5), memory_format=torch.channels_last)
    for label, mine, theirs in zip(["y", "dx", "conv.weight", "conv.bias", "norm.weight", "norm.bias"],
                                   step(compiled, x, grad), step(reference, x, grad)):
        assert_close(mine, theirs, label, rtol=1e-4)  # Inductor's own conv and SiLU round differently
    assert kernel_calls["forward"] == 1 and kernel_calls["backward"] == 1


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_compile_for_inference(rng, mode):
    torch._dynamo.reset()
    module = gnt.GroupNorm(4, 16)
    x = tensor(rng, (2, 16, 5, 5), memory_format=torch.channels_last)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with getattr(torch, mode)():
        y = compiled(x)
    assert y.stride() == x.stride()
    assert_close(y, torch_functional.group_norm(x, 4, module.weight.detach(), module.bias.detach()), "y")


def exception_chain(error):
    """The messages of an exception and of every exception it was raised from or during."""
    messages = []
    while error is not None:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


@pytest.mark.parametrize("x_shape, x_dtype, num_groups, weight_size, eps, message", [
    ((2, 4, 3), torch.float32, 3, None, 1e-5, r"ValueError: num_groups=3 must divide the number of channels \(4\)"),
    ((2, 4, 3), torch.float32, 0, None, 1e-5, r"ValueError: num_groups=0 must be positive"),
    ((2, 4, 3), torch.int32, 2, None, 1e-5, r"TypeError: input has dtype torch.int32"),
    ((2, 4, 3), torch.float32, 2, None, -1.0, r"ValueError: eps=-1.0"),
    ((4,), torch.float32, 2, None, 1e-5,
     r"ValueError: input has shape \(4,\) \(1 dimension\(s\)\); it needs at least 2"),
    ((2, 4, 3), torch.float32, 2, 3, 1e-5,
     r"ValueError: weight has shape \(3,\); it must be \(4,\), one value per channel"),
])
def test_compile_fails_with_the_eager_error(x_shape, x_dtype, num_groups, weight_size, eps, message):
    """Bad arguments fail while tracing (the fake function checks them), with the message the eager call gives."""
    torch._dynamo.reset()
    weight = None if weight_size is None else torch.ones(weight_size)
    compiled = torch.compile(functools.partial(gnt.group_norm, num_groups=num_groups, weight=weight, eps=eps),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as raised:
        compiled(torch.zeros(x_shape, dtype=x_dtype))
    assert pytest.importorskip("re").search(message, exception_chain(raised.value)), exception_chain(raised.value)
    with pytest.raises((TypeError, ValueError), match=message.split(": ", 1)[1]):  # the eager call's own
        gnt.group_norm(torch.zeros(x_shape, dtype=x_dtype), num_groups, weight, eps=eps)


# ------------------------------------------------------------------------------ export, make_fx, jit.trace

@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_export_records_the_operator(rng, strict):
    reference, ours = blocks(rng)
    exported = torch.export.export(ours, (tensor(rng, (2, 4, 6, 5)),), strict=strict)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.groupnorm.group_norm_forward.default in targets
    x = tensor(rng, (2, 4, 6, 5))  # fresh data: the graph computes, it did not record the traced output
    with torch.no_grad():
        assert_close(exported.module()(x), reference(x), "exported y")


def test_make_fx_traces_forward_and_backward(rng):
    from torch.fx.experimental.proxy_tensor import make_fx

    def train_step(x, weight, bias, grad):
        y = gnt.group_norm(x, 4, weight, bias)
        return torch.autograd.grad(y, (x, weight, bias), grad)

    args = [tensor(rng, (2, 8, 5)).requires_grad_(), tensor(rng, (8,)).requires_grad_(),
            tensor(rng, (8,)).requires_grad_(), tensor(rng, (2, 8, 5))]
    graph = make_fx(train_step)(*args)
    targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert {torch.ops.groupnorm.group_norm_forward.default,
            torch.ops.groupnorm.group_norm_backward.default} <= targets
    fresh = [tensor(rng, tuple(a.shape)).requires_grad_(a.requires_grad) for a in args]
    leaves = [a.detach().clone().requires_grad_() for a in fresh[:3]]
    expected = torch.autograd.grad(torch_functional.group_norm(leaves[0], 4, leaves[1], leaves[2]), leaves,
                                   fresh[3])
    for label, mine, theirs in zip(("dx", "dw", "db"), graph(*fresh), expected):
        assert_close(mine, theirs, label)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace(_method)?` is deprecated:DeprecationWarning")
def test_jit_trace_records_the_operator(rng):
    """Before the operators, the trace held the traced call's output as a constant (and its check failed)."""
    reference, ours = blocks(rng)
    traced = torch.jit.trace(ours, (tensor(rng, (2, 4, 6, 5)),))
    assert "groupnorm::group_norm_forward" in str(traced.inlined_graph)
    x = tensor(rng, (3, 4, 6, 5))
    with torch.no_grad():
        assert_close(traced(x), reference(x), "traced y")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous",
                                                                                              "channels_last"])
def test_jit_script_compiles_the_module(rng, kernel_calls, memory_format, tmp_path):
    """torch.jit.script (which compiles torch.nn.GroupNorm) compiles GroupNorm's forward to the operator: outputs,
    gradients and the memory format as torch's module gives, on groupnorm's kernels, and through a save and load;
    with activation='silu' and without affine parameters too."""
    reference, ours = blocks(rng, memory_format)
    scripted = torch.jit.script(ours)
    assert "groupnorm::group_norm_forward" in str(scripted.norm.graph)
    x, grad = tensor(rng, (3, 4, 6, 5), memory_format=memory_format), tensor(rng, (3, 16, 6, 5))
    for mine, theirs, what in zip(step(scripted, x, grad), step(reference, x, grad),
                                  ["y", "dx", "conv.weight", "conv.bias", "norm.weight", "norm.bias"]):
        assert_close(mine, theirs, what)
    assert kernel_calls == {"forward": 1, "backward": 1}
    assert step(scripted, x, grad)[0].is_contiguous(memory_format=memory_format)
    torch.jit.save(scripted, str(tmp_path / "block.pt"))
    loaded = torch.jit.load(str(tmp_path / "block.pt"))
    with torch.no_grad():
        assert_close(loaded(x), reference(x), "loaded y")
    fused, plain = gnt.GroupNorm(4, 16, affine=False, activation="silu"), torch.nn.GroupNorm(4, 16, affine=False)
    y = tensor(rng, (2, 16, 3, 3), memory_format=memory_format)
    assert_close(torch.jit.script(fused)(y), torch_functional.silu(plain(y)), "silu, no affine")


# ----------------------------------------------------------------------------------------- torch.func transforms

FLOAT64_RTOL = 1e-10


def test_vmap_folds_the_batch_into_one_call(rng, kernel_calls):
    x, weight, bias = tensor(rng, (5, 2, 8, 3)), tensor(rng, (8,)), tensor(rng, (8,))
    y = torch.vmap(lambda t: gnt.group_norm(t, 4, weight, bias))(x)
    assert kernel_calls["forward"] == 1
    assert_close(y, torch.vmap(lambda t: torch_functional.group_norm(t, 4, weight, bias))(x), "y")


@pytest.mark.parametrize("in_dims", [(0, 0), (None, 0), (2, 0)], ids=["both", "weight_only", "x_on_axis_2"])
def test_vmap_over_weights(rng, kernel_calls, in_dims):
    """Batched parameters (an ensemble of models): the batch folded into the channels, still one call."""
    x = tensor(rng, (5, 2, 8, 3)).movedim(0, in_dims[0]) if in_dims[0] is not None else tensor(rng, (2, 8, 3))
    weights, bias = tensor(rng, (5, 8)), tensor(rng, (8,))
    ours = torch.vmap(lambda t, w: gnt.group_norm(t, 4, w, bias), in_dims=in_dims)(x, weights)
    theirs = torch.vmap(lambda t, w: torch_functional.group_norm(t, 4, w, bias), in_dims=in_dims)(x, weights)
    assert_close(ours, theirs, "y")
    assert kernel_calls["forward"] == 1


def loss_of(function):
    return lambda x, weight, bias: function(x, 4, weight, bias).pow(3).sum()


def test_grad_matches_torch(rng):
    args = (tensor(rng, (2, 8, 3), torch.float64), tensor(rng, (8,), torch.float64), tensor(rng, (8,), torch.float64))
    ours = torch.func.grad(loss_of(gnt.group_norm), argnums=(0, 1, 2))(*args)
    theirs = torch.func.grad(loss_of(torch_functional.group_norm), argnums=(0, 1, 2))(*args)
    for label, mine, reference in zip(("dx", "dw", "db"), ours, theirs):
        assert_close(mine, reference, label, FLOAT64_RTOL)


@pytest.mark.parametrize("n", [1, 2])
def test_per_sample_gradients(rng, kernel_calls, n):
    """vmap(grad): the gradients of each sample on its own, as differentially private training takes them; one
    forward and one backward call for the whole batch (n = 1 folds it as a view, n = 2 through a copy)."""
    x = tensor(rng, (6, n, 8, 5), torch.float64)
    weight, bias = tensor(rng, (8,), torch.float64), tensor(rng, (8,), torch.float64)
    per_sample = torch.vmap(torch.func.grad(loss_of(gnt.group_norm), argnums=(0, 1, 2)), in_dims=(0, None, None))
    dx, dw, db = per_sample(x, weight, bias)
    assert dx.shape == x.shape and dw.shape == db.shape == (6, 8)
    for i in range(6):
        leaves = [t.clone().requires_grad_() for t in (x[i], weight, bias)]
        loss_of(torch_functional.group_norm)(*leaves).backward()
        for label, mine, leaf in zip(("dx", "dw", "db"), (dx[i], dw[i], db[i]), leaves):
            assert_close(mine, leaf.grad, f"sample {i}: {label}", FLOAT64_RTOL)
    assert kernel_calls == {"forward": 1, "backward": 1}


def test_per_sample_gradients_with_the_activation_and_batched_bias(rng, kernel_calls):
    """vmap(grad) over samples and an ensemble's biases with activation='silu': the backward operator folds the
    bias into the channels too (the SiLU's input needs it)."""
    x, weight = tensor(rng, (4, 1, 8, 5), torch.float64), tensor(rng, (8,), torch.float64)
    biases = tensor(rng, (4, 8), torch.float64)

    def ours(x, w, b):
        return gnt.group_norm(x, 4, w, b, activation="silu").pow(3).sum()

    def theirs(x, w, b):
        return torch_functional.silu(torch_functional.group_norm(x, 4, w, b)).pow(3).sum()

    dx, dw, db = torch.vmap(torch.func.grad(ours, argnums=(0, 1, 2)), in_dims=(0, None, 0))(x, weight, biases)
    for i in range(4):
        leaves = [t.clone().requires_grad_() for t in (x[i], weight, biases[i])]
        theirs(*leaves).backward()
        for label, mine, leaf in zip(("dx", "dw", "db"), (dx[i], dw[i], db[i]), leaves):
            assert_close(mine, leaf.grad, f"sample {i}: {label}", FLOAT64_RTOL)
    assert kernel_calls == {"forward": 1, "backward": 1}


def test_jacrev_matches_torch(rng):
    x, weight = tensor(rng, (2, 4, 3), torch.float64), tensor(rng, (4,), torch.float64)
    ours = torch.func.jacrev(lambda t: gnt.group_norm(t, 2, weight))(x)
    theirs = torch.func.jacrev(lambda t: torch_functional.group_norm(t, 2, weight))(x)
    assert_close(ours, theirs, "jacobian", FLOAT64_RTOL)


SECOND_ORDER_TRANSFORMS = {
    "jacrev_grad": lambda f: torch.func.jacrev(torch.func.grad(f)),
    "hessian": torch.func.hessian,  # jacfwd(jacrev): forward mode over the backward operator
    "jacfwd_grad": lambda f: torch.func.jacfwd(torch.func.grad(f)),
    "vmap_hessian": lambda f: torch.vmap(torch.func.hessian(f)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward mode
@pytest.mark.parametrize("transform", SECOND_ORDER_TRANSFORMS)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_second_derivatives_in_transforms_match_torch(rng, kernel_calls, transform, activation):
    """Hessians by reverse over reverse, forward over reverse, and batched: torch's, with the kernels giving the
    first-order values."""
    weight, bias = tensor(rng, (4,), torch.float64), tensor(rng, (4,), torch.float64)
    x = tensor(rng, (3, 2, 4, 3) if transform == "vmap_hessian" else (2, 4, 3), torch.float64)

    def ours(t):
        return gnt.group_norm(t, 2, weight, bias, activation=activation).pow(3).sum()

    def theirs(t):
        y = torch_functional.group_norm(t, 2, weight, bias)
        return (torch_functional.silu(y) if activation else y).pow(3).sum()

    make = SECOND_ORDER_TRANSFORMS[transform]
    assert_close(make(ours)(x), make(theirs)(x), "hessian", FLOAT64_RTOL)
    assert kernel_calls["forward"] >= 1 and kernel_calls["backward"] >= 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward mode
def test_forward_mode_jvp_matches_torch(rng):
    """torch.func.jvp in input, weight and bias."""
    primals = (tensor(rng, (2, 6, 5), torch.float64), tensor(rng, (6,), torch.float64),
               tensor(rng, (6,), torch.float64))
    tangents = tuple(torch.randn_like(t) for t in primals)
    ours = torch.func.jvp(lambda x, w, b: gnt.group_norm(x, 3, w, b, activation="silu"), primals, tangents)
    theirs = torch.func.jvp(lambda x, w, b: torch_functional.silu(torch_functional.group_norm(x, 3, w, b)),
                            primals, tangents)
    assert_close(ours[0], theirs[0], "primal", FLOAT64_RTOL)
    assert_close(ours[1], theirs[1], "tangent", FLOAT64_RTOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward mode
def test_forward_mode_tangent_runs_the_kernels(rng, kernel_calls):
    """A tangent of the input alone costs one backward call (xhat's tangent) beside the forward's: no torch.func
    re-derivation of group_norm in torch's operations; tangents of the parameters alone add one forward call (xhat)
    and no backward call."""
    x, w, b = tensor(rng, (2, 6, 5)), tensor(rng, (6,)), tensor(rng, (6,))
    torch.func.jvp(lambda v: gnt.group_norm(v, 3, w, b), (x,), (torch.randn_like(x),))
    assert kernel_calls == {"forward": 1, "backward": 1}
    kernel_calls.update(forward=0, backward=0)
    torch.func.jvp(lambda u, c: gnt.group_norm(x, 3, u, c), (w, b), (torch.randn_like(w), torch.randn_like(b)))
    assert kernel_calls == {"forward": 2, "backward": 0}


FORWARD_MODE_TRANSFORMS = {  # the tangent differentiated again: its calls' own jvp and vjp
    "jvp_of_jvp": lambda f, primals, first, second: torch.func.jvp(lambda *p: torch.func.jvp(f, p, first)[1],
                                                                   primals, second)[1],
    "grad_of_jvp": lambda f, primals, first, second: torch.func.grad(
        lambda *p: (torch.func.jvp(f, p, first)[1] * second[0]).sum(), argnums=(0, 1, 2))(*primals),
    "jacfwd_jacfwd": lambda f, primals, first, second: torch.func.jacfwd(torch.func.jacfwd(
        lambda v: f(v, *primals[1:])))(primals[0]),
    "vmap_jvp": lambda f, primals, first, second: torch.vmap(
        lambda t: torch.func.jvp(f, primals, (t,) + first[1:])[1])(torch.stack([first[0], second[0]])),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward mode
@pytest.mark.parametrize("transform", FORWARD_MODE_TRANSFORMS)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_forward_mode_transforms_match_torch(rng, transform, activation):
    """Second derivatives through the forward-mode tangent (forward over forward, reverse over forward) and a
    batch of tangents, in input, weight and bias: torch's, in float64. (Forward over forward runs in torch's
    operations: torch gives zero for the outer derivative of an autograd.Function's jvp, pytorch/pytorch#197867.)"""
    primals = (tensor(rng, (2, 6, 5), torch.float64), tensor(rng, (6,), torch.float64),
               tensor(rng, (6,), torch.float64))
    first = tuple(torch.randn_like(t) for t in primals)
    second = tuple(torch.randn_like(t) for t in primals)

    def ours(x, w, b):
        return gnt.group_norm(x, 3, w, b, activation=activation)

    def theirs(x, w, b):
        y = torch_functional.group_norm(x, 3, w, b)
        return torch_functional.silu(y) if activation else y

    make = FORWARD_MODE_TRANSFORMS[transform]
    mine, want = make(ours, primals, first, second), make(theirs, primals, first, second)
    for got, expected in zip(*((m,) if isinstance(m, torch.Tensor) else m for m in (mine, want))):
        assert_close(got, expected, transform, FLOAT64_RTOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward mode
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_the_operators_called_directly_carry_tangents(rng, memory_format):
    """torch.ops.groupnorm's operators called on dual tensors (torch.autograd.forward_ad) give their outputs'
    tangents, as torch's group_norm does, rather than dropping them: the forward's output (its mean and rstd are not
    differentiable, as native_group_norm's are not), and the backward's gradients (linear in grad_output, so their
    tangent in it is the backward of the tangent)."""
    import torch.autograd.forward_ad as forward_ad

    forward, backward = torch.ops.groupnorm.group_norm_forward, torch.ops.groupnorm.group_norm_backward
    shape, groups = (2, 6, 3, 4), 3
    x, tx = tensor(rng, shape, torch.float64, memory_format), tensor(rng, shape, torch.float64, memory_format)
    w, tw, b, tb = (tensor(rng, (6,), torch.float64) for _ in range(4))
    expected = torch.func.jvp(  # contiguous: torch's forward-mode group_norm fails on channels_last
        lambda x, w, b: torch_functional.silu(torch_functional.group_norm(x, groups, w, b)),
        (x.contiguous(), w, b), (tx.contiguous(), tw, tb))[1]
    with forward_ad.dual_level():
        y, mean, rstd = forward(forward_ad.make_dual(x, tx), groups, forward_ad.make_dual(w, tw),
                                forward_ad.make_dual(b, tb), 1e-5, "silu")
        tangent = forward_ad.unpack_dual(y).tangent
        assert forward_ad.unpack_dual(mean).tangent is None and forward_ad.unpack_dual(rstd).tangent is None
    assert tangent is not None, "the tangent of y was dropped"
    assert_close(tangent, expected, "tangent of y", FLOAT64_RTOL)

    _, mean, rstd = forward(x, groups, w, b, 1e-5, "silu")
    g, tg = tensor(rng, shape, torch.float64, memory_format), tensor(rng, shape, torch.float64, memory_format)
    expected = backward(tg, x, mean, rstd, groups, w, b, "silu")
    with forward_ad.dual_level():
        outputs = backward(forward_ad.make_dual(g, tg), x, mean, rstd, groups, w, b, "silu")
        tangents = [forward_ad.unpack_dual(output).tangent for output in outputs]
    for label, mine, theirs in zip(("dx", "dw", "db"), tangents, expected):
        assert mine is not None, f"the tangent of {label} was dropped"
        assert_close(mine, theirs, f"tangent of {label}", FLOAT64_RTOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward mode
@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_the_operators_called_directly_in_a_torch_func_transform_refuse(rng, transform):
    """torch.func differentiates a direct call of the operator only through group_norm, which makes the node at the
    transform's level: the operator refuses with a message naming that way, rather than a derivative of zero or
    torch's internal error."""
    x, w = tensor(rng, (2, 4, 3), torch.float64), tensor(rng, (4,), torch.float64)

    def direct(x):
        return torch.ops.groupnorm.group_norm_forward(x, 2, w, None, 1e-5, None)[0].square().sum()

    with pytest.raises(RuntimeError, match="called directly inside a torch.func transform.*groupnorm.torch.group_norm"):
        if transform == "grad":
            torch.func.grad(direct)(x)
        else:
            torch.func.jvp(direct, (x,), (torch.ones_like(x),))
