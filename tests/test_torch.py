"""groupnorm.torch against torch: gradcheck in float64, agreement with torch.nn.functional.group_norm in float32
(NCHW, channels_last, 2-D to 5-D), zero-copy through DLPack, the nn.Module drop-in for torch.nn.GroupNorm, clear
errors for devices and dtypes the kernels cannot serve, and a short training run that follows torch's step by step.
"""
import contextlib
import copy
import doctest
import inspect
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as torch_functional  # noqa: E402

import groupnorm  # noqa: E402
import groupnorm.torch as gnt  # noqa: E402
from reference import group_norm_reference, silu_grad_reference  # noqa: E402

# float32 results agree with torch's to this fraction of the largest magnitude of torch's result.
FLOAT32_RTOL = 1e-5
# Losses of the two training runs agree to this relative difference at every step.
TRAINING_RTOL = 1e-5

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def tensor(rng, shape, dtype=torch.float32, memory_format=None, offset=0.0, scale=1.0):
    """Fresh standard-normal data (from the test's seeded generator) as a tensor in the given memory format."""
    values = torch.from_numpy(rng.standard_normal(shape) * scale + offset).to(dtype)
    return values if memory_format is None else values.contiguous(memory_format=memory_format)


def layout_of(shape, layout):
    """The torch memory format for a layout name: 'contiguous' or 'channels_last' (4-D and 5-D)."""
    return CHANNELS_LAST[len(shape)] if layout == "channels_last" else None


def assert_matches(actual, expected, what, rtol=FLOAT32_RTOL):
    """|actual - expected| <= rtol * max|expected| everywhere (float rounding, not a looser tolerance)."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    scale = max(float(expected.abs().max()), np.finfo(np.float32).tiny)
    error = float((actual.double() - expected.double()).abs().max()) / scale
    assert error <= rtol, f"{what}: max |groupnorm - torch| / max|torch| = {error:.3g} > {rtol:g}"


# ------------------------------------------------------------------------------------------- the package

def test_import_groupnorm_does_not_import_torch():
    code = "import groupnorm, sys; assert 'torch' not in sys.modules, 'import groupnorm imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(gnt, gnt.__name__, globs={"groupnorm": groupnorm})
    assert sum(len(t.examples) for t in tests) > 0, "no docstring examples found in groupnorm.torch"
    with warnings.catch_warnings():  # torch 2.13's own, from inside ExportedProgram.run_decompositions
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        for test in tests:
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# ------------------------------------------------------------------------------------- gradcheck, float64

GRADCHECK_CASES = [  # (shape, num_groups, layout)
    ((2, 6, 3, 4), 3, "contiguous"),
    ((2, 6, 3, 4), 3, "channels_last"),
    ((3, 4, 5), 2, "contiguous"),
    ((2, 4, 2, 3, 2), 2, "contiguous"),
    ((2, 4, 2, 3, 2), 4, "channels_last"),
    ((3, 6), 3, "contiguous"),
    ((2, 4, 1, 1), 1, "channels_last"),
]
AFFINE_MODES = ["weight_and_bias", "weight_only", "no_affine", "params_only"]


@pytest.mark.parametrize("affine", AFFINE_MODES)
@pytest.mark.parametrize("shape, num_groups, layout", GRADCHECK_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_gradcheck_float64(isa, rng, shape, num_groups, layout, affine):
    x = tensor(rng, shape, torch.float64, layout_of(shape, layout), offset=0.5, scale=2.0)
    x.requires_grad_(affine != "params_only")
    channels = shape[1]
    weight = bias = None
    if affine != "no_affine":
        weight = tensor(rng, (channels,), torch.float64).requires_grad_()
    if affine in ("weight_and_bias", "params_only"):
        bias = tensor(rng, (channels,), torch.float64).requires_grad_()
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def function(*args):
        it = iter(args)
        return gnt.group_norm(next(it), num_groups, next(it) if weight is not None else None,
                              next(it) if bias is not None else None, 0.25)  # eps large enough to matter

    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------- higher and forward-mode derivatives

HIGHER_CASES = [  # (shape, num_groups, layout, affine: "wb", "w" or "", activation)
    ((2, 4, 3, 3), 2, "contiguous", "wb", None),
    ((2, 4, 3, 3), 2, "channels_last", "wb", "silu"),
    ((3, 6, 5), 3, "contiguous", "w", "silu"),
    ((2, 4, 2, 3, 2), 4, "channels_last", "", None),
    ((4, 6), 2, "contiguous", "", "silu"),
]
HIGHER_IDS = ["nchw", "nhwc-silu", "weight_only-silu", "ndhwc-no_affine", "2d-silu-no_affine"]


def higher_inputs(rng, shape, layout, affine):
    """float64 input, weight and bias (those `affine` names), each requiring grad."""
    x = tensor(rng, shape, torch.float64, layout_of(shape, layout)).requires_grad_()
    w = tensor(rng, (shape[1],), torch.float64).requires_grad_() if "w" in affine else None
    b = tensor(rng, (shape[1],), torch.float64).requires_grad_() if "b" in affine else None
    return x, w, b


def torch_group_norm(x, num_groups, w, b, eps, activation):
    """torch's own, on a contiguous input (torch's forward-mode group_norm fails on channels_last tensors)."""
    y = torch_functional.group_norm(x.contiguous(), num_groups, w, b, eps)
    return torch_functional.silu(y) if activation else y


@pytest.mark.parametrize("shape, num_groups, layout, affine, activation", HIGHER_CASES, ids=HIGHER_IDS)
def test_gradgradcheck_float64(rng, shape, num_groups, layout, affine, activation):
    """Second derivatives (create_graph=True) against finite differences of the first."""
    x, w, b = higher_inputs(rng, shape, layout, affine)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def function(*args):
        it = iter(args)
        return gnt.group_norm(next(it), num_groups, next(it) if w is not None else None,
                              next(it) if b is not None else None, 0.25, activation=activation)

    assert torch.autograd.gradgradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape, num_groups, layout, affine, activation", HIGHER_CASES, ids=HIGHER_IDS)
def test_second_and_third_derivatives_match_torch(rng, shape, num_groups, layout, affine, activation):
    """A gradient penalty's gradient (second derivatives) and one more level (third), against torch's group_norm,
    in float64; the first-order gradients still come from the kernels (counted)."""
    x, w, b = higher_inputs(rng, shape, layout, affine)
    inputs = [t for t in (x, w, b) if t is not None]

    def derivatives(group_norm):
        y = group_norm(x, num_groups, w, b, 1e-5, activation)
        first = torch.autograd.grad((y ** 3).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in first), inputs, create_graph=True)
        third = torch.autograd.grad(sum((g ** 2).sum() for g in second), inputs)
        return [t.detach() for t in first + second + third]

    ours = derivatives(lambda *a: gnt.group_norm(*a[:5], activation=a[5]))
    for i, (mine, theirs) in enumerate(zip(ours, derivatives(torch_group_norm))):
        assert_matches(mine, theirs, f"derivative {i}", rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_penalty_in_low_precision(rng, dtype):
    """A gradient penalty's gradients for float32 and half-precision data with float32 parameters, channels_last,
    against torch's group_norm run in float64: within a few units of the data's rounding (over 60 seeds the worst
    was 2.4 bfloat16 and 1.7 float16 epsilons, and torch's own low-precision run came out no closer)."""
    values = [tensor(rng, shape, torch.float64) for shape in ((2, 8, 5, 5), (8,), (8,))]

    def gradients(group_norm, data_dtype, param_dtype):
        x = values[0].to(data_dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        w, b = (v.to(param_dtype).requires_grad_() for v in values[1:])
        first = torch.autograd.grad(group_norm(x, 4, w, b).double().square().sum(), (x, w), create_graph=True)
        penalty = sum(g.double().square().sum() for g in first)
        return [g.detach().double() for g in first] + [g.double() for g in torch.autograd.grad(penalty, (x, w, b))]

    expected = gradients(torch_functional.group_norm, torch.float64, torch.float64)
    rtol = FLOAT32_RTOL if dtype == torch.float32 else 6 * torch.finfo(dtype).eps
    for i, (mine, reference) in enumerate(zip(gradients(gnt.group_norm, dtype, torch.float32), expected)):
        assert_matches(mine, reference, f"gradient {i}", rtol=rtol)


def test_second_derivative_without_the_operators_is_refused(rng, monkeypatch):
    """Where torch lacks the operators (before 2.4), create_graph=True gradients refuse a second derivative rather
    than take it as zero."""
    monkeypatch.setattr(gnt, "_ops", None)
    monkeypatch.setattr(gnt, "_node", None)  # which needs the operators, and does not load without them
    x = tensor(rng, (2, 4, 3), torch.float64).requires_grad_()
    (grad_x,) = torch.autograd.grad((gnt.group_norm(x, 2) ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


# ------------------------------------------------------------------------------ float32 against torch

FLOAT32_CASES = [  # (shape, num_groups, layout)
    ((4, 32, 9, 7), 8, "contiguous"),
    ((4, 32, 9, 7), 8, "channels_last"),
    ((1, 320, 16, 16), 32, "contiguous"),
    ((1, 320, 16, 16), 32, "channels_last"),
    ((2, 64, 17), 16, "contiguous"),
    ((2, 16, 3, 5, 4), 4, "contiguous"),
    ((2, 16, 3, 5, 4), 4, "channels_last"),
    ((8, 32), 4, "contiguous"),
    ((2, 33, 7, 5), 11, "channels_last"),
    ((1, 256, 7, 7), 1, "channels_last"),
    ((1, 256, 7, 7), 256, "contiguous"),
]


def torch_reference(x, num_groups, weight, bias, grad):
    """torch.nn.functional.group_norm's output and gradients on copies of the same tensors."""
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(t.requires_grad)
              if t is not None else None for t in (x, weight, bias)]
    y = torch_functional.group_norm(leaves[0], num_groups, leaves[1], leaves[2], 1e-5)
    torch.autograd.backward(y, grad)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("grad_layout", ["like_output", "contiguous"])
@pytest.mark.parametrize("shape, num_groups, layout", FLOAT32_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_float32_matches_torch(isa, rng, shape, num_groups, layout, grad_layout):
    memory_format = layout_of(shape, layout)
    x = tensor(rng, shape, memory_format=memory_format, offset=1.5, scale=3.0).requires_grad_()
    weight = tensor(rng, (shape[1],)).requires_grad_()
    bias = tensor(rng, (shape[1],)).requires_grad_()
    grad = tensor(rng, shape, memory_format=memory_format if grad_layout == "like_output" else None)

    y = gnt.group_norm(x, num_groups, weight, bias)
    torch.autograd.backward(y, grad)
    y_ref, (dx_ref, dw_ref, db_ref) = torch_reference(x, num_groups, weight, bias, grad)

    assert_matches(y.detach(), y_ref, "output")
    assert_matches(x.grad, dx_ref, "grad_input")
    assert_matches(weight.grad, dw_ref, "grad_weight")
    assert_matches(bias.grad, db_ref, "grad_bias")
    # Layouts: the output and the input's gradient keep the input's memory format, as torch's do.
    if memory_format is not None:
        assert y.is_contiguous(memory_format=memory_format)
        assert x.grad.is_contiguous(memory_format=memory_format)
    else:
        assert y.is_contiguous() and x.grad.is_contiguous()
    assert y.stride() == y_ref.stride()
    assert x.grad.stride() == x.stride() == dx_ref.stride()


def test_float32_without_affine_and_weight_only_match_torch(rng):
    x = tensor(rng, (3, 12, 5, 4), memory_format=torch.channels_last).requires_grad_()
    weight = tensor(rng, (12,)).requires_grad_()
    grad = tensor(rng, x.shape)
    for params in ((None, None), (weight, None)):
        for t in (x, weight):
            t.grad = None
        y = gnt.group_norm(x, 4, *params)
        torch.autograd.backward(y, grad)
        y_ref, grads_ref = torch_reference(x, 4, *params, grad)
        assert_matches(y.detach(), y_ref, "output")
        assert_matches(x.grad, grads_ref[0], "grad_input")
        if params[0] is not None:
            assert_matches(weight.grad, grads_ref[1], "grad_weight")


def test_odd_layout_input_matches_torch(rng):
    """A strided view (every other row) is read through its strides, not assumed contiguous."""
    base = tensor(rng, (2, 8, 10, 6), offset=-2.0)
    x = base[:, :, ::2].requires_grad_()
    assert not x.is_contiguous()
    grad = tensor(rng, x.shape)
    y = gnt.group_norm(x, 4)
    torch.autograd.backward(y, grad)
    y_ref, (dx_ref, _, _) = torch_reference(x, 4, None, None, grad)
    assert_matches(y.detach(), y_ref, "output")
    assert_matches(x.grad, dx_ref, "grad_input")


def test_gradient_only_for_what_requires_it(rng):
    x = tensor(rng, (2, 8, 5))
    weight = tensor(rng, (8,)).requires_grad_()
    bias = tensor(rng, (8,))
    grad = tensor(rng, x.shape)
    torch.autograd.backward(gnt.group_norm(x, 2, weight, bias), grad)
    _, (dx_ref, dw_ref, db_ref) = torch_reference(x, 2, weight, bias, grad)
    assert x.grad is None and bias.grad is None and dx_ref is None and db_ref is None
    assert_matches(weight.grad, dw_ref, "grad_weight")


def test_backward_again_with_retained_graph(rng):
    x = tensor(rng, (2, 8, 5), memory_format=None).requires_grad_()
    weight = tensor(rng, (8,)).requires_grad_()
    grad = tensor(rng, x.shape)
    y = gnt.group_norm(x, 2, weight)
    torch.autograd.backward(y, grad, retain_graph=True)
    first = (x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    torch.autograd.backward(y, grad)
    assert torch.equal(x.grad, first[0]) and torch.equal(weight.grad, first[1])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.backward(y, grad)


def test_runs_without_autograd(rng):
    x = tensor(rng, (2, 8, 5))
    with torch.inference_mode():
        y = gnt.group_norm(x, 2)
    assert not y.requires_grad
    assert_matches(y, torch_functional.group_norm(x, 2), "output")
    with torch.no_grad():
        y = gnt.group_norm(x.requires_grad_(), 2)
    assert y.grad_fn is None


# ---------------------------------------------------------------------------------------------- zero copy

class _RecordingCore:
    """Stands in for groupnorm._core inside groupnorm.torch and keeps what each kernel call saw and returned."""

    def __init__(self):
        self.calls = {}

    def group_norm_forward(self, *args, **kwargs):
        result = groupnorm.group_norm_forward(*args, **kwargs)
        self.calls["forward"] = (args, result)
        return result

    def group_norm_backward(self, *args, **kwargs):
        result = groupnorm.group_norm_backward(*args, **kwargs)
        self.calls["backward"] = (args, result)
        return result

    def group_norm(self, *args, **kwargs):
        result = groupnorm.group_norm(*args, **kwargs)
        self.calls["inference"] = (args, result)
        return result


def data_address(array):
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tensors_cross_without_a_copy(rng, monkeypatch, layout):
    """The Python node's crossing into NumPy (the C++ node, which serves this call where it is built, passes the
    tensors' own pointers: tests/test_torch_node.py)."""
    core = _RecordingCore()
    monkeypatch.setattr(gnt, "_core", core)
    monkeypatch.setattr(gnt, "_node", None)
    shape = (2, 8, 6, 5)
    x = tensor(rng, shape, memory_format=layout_of(shape, layout)).requires_grad_()
    weight = tensor(rng, (8,)).requires_grad_()
    bias = tensor(rng, (8,)).requires_grad_()
    grad = tensor(rng, shape, memory_format=layout_of(shape, layout))
    seen_grad_input = []
    x.register_hook(seen_grad_input.append)

    y = gnt.group_norm(x, 4, weight, bias)
    (x_arg, _, w_arg, b_arg, _), (y_array, _, _) = core.calls["forward"]
    assert data_address(x_arg) == x.data_ptr() and x_arg.strides == tuple(4 * s for s in x.stride())
    assert data_address(w_arg) == weight.data_ptr() and data_address(b_arg) == bias.data_ptr()
    assert y.data_ptr() == data_address(y_array), "the output tensor is not the kernel's result array"

    torch.autograd.backward(y, grad)
    (dy_arg, x_again, _, _, _, w_again), (dx_array, dw_array, db_array) = core.calls["backward"]
    assert data_address(dy_arg) == grad.data_ptr()
    assert data_address(x_again) == x.data_ptr() and data_address(w_again) == weight.data_ptr()
    assert seen_grad_input[0].data_ptr() == data_address(dx_array)
    assert weight.grad.data_ptr() == data_address(dw_array)
    assert bias.grad.data_ptr() == data_address(db_array)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_inference_calls_the_kernel_without_autograd(rng, monkeypatch, mode):
    """No graph to record: the plain forward kernel runs (no statistics kept, no autograd.Function), on the
    tensors' own memory, with the bits of the differentiable call."""
    core = _RecordingCore()
    monkeypatch.setattr(gnt, "_core", core)
    shape = (2, 8, 6, 5)
    x = tensor(rng, shape, memory_format=torch.channels_last)
    weight, bias = tensor(rng, (8,)), tensor(rng, (8,))
    if mode != "nothing_requires_grad":
        weight.requires_grad_()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with context():
        y = gnt.group_norm(x, 4, weight, bias)
    assert y.grad_fn is None and not y.requires_grad and "forward" not in core.calls
    (x_arg, _, w_arg, b_arg, _), y_array = core.calls["inference"]
    assert data_address(x_arg) == x.data_ptr() and data_address(w_arg) == weight.data_ptr()
    assert data_address(b_arg) == bias.data_ptr() and y.data_ptr() == data_address(y_array)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, gnt.group_norm(x, 4, weight.detach().requires_grad_(), bias).detach())


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_negated_views_keep_their_sign(rng, which, differentiable):
    """A lazily negated view (torch._neg_view; ``z.conj().imag`` of a complex z) holds the negatives of its values
    in memory: groupnorm.torch reads its values, not its memory, on the inference path and the autograd one."""
    x, w, b = tensor(rng, (2, 8, 5)), tensor(rng, (8,)), tensor(rng, (8,))
    expected = gnt.group_norm(x, 4, w, b)
    args = {"input": x, "weight": w, "bias": b}
    args[which] = torch._neg_view(-args[which])
    assert args[which].is_neg() and torch.equal(args[which], {"input": x, "weight": w, "bias": b}[which])
    if differentiable:  # another argument requires grad: the call goes through the autograd.Function
        other = "bias" if which != "bias" else "weight"
        args[other] = args[other].clone().requires_grad_()
    y = gnt.group_norm(args["input"], 4, args["weight"], args["bias"])
    assert y.requires_grad == differentiable and torch.equal(y.detach(), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward_ad
@pytest.mark.parametrize("dtype, layout", [(torch.float64, "contiguous"), (torch.float64, "channels_last"),
                                           (torch.float32, "channels_last"), (torch.bfloat16, "contiguous")])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
def test_forward_mode_ad_matches_torch(rng, dtype, layout, activation, grad_mode):
    """Inside a dual level (torch.autograd.forward_ad) the output's tangent from the tangents of input, weight and
    bias, against torch's group_norm run in float64, to the dtype's rounding; the primal from the kernels, in the
    input's memory format."""
    import torch.autograd.forward_ad as forward_ad
    shape = (2, 8, 5, 4)
    memory_format = layout_of(shape, layout) or torch.contiguous_format
    values = [tensor(rng, s, torch.float64) for s in (shape, shape, (8,), (8,), (8,), (8,))]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def primal_and_tangent(group_norm, data_dtype, param_dtype):
        x, dx = (v.to(data_dtype).contiguous(memory_format=memory_format) for v in values[:2])
        w, dw, b, db = (v.to(param_dtype) for v in values[2:])
        with forward_ad.dual_level(), (torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()):
            y = group_norm(forward_ad.make_dual(x, dx), 4, forward_ad.make_dual(w, dw), forward_ad.make_dual(b, db),
                           1e-5, activation)
            return [t.clone() for t in forward_ad.unpack_dual(y)[:2]]

    primal, tangent = primal_and_tangent(lambda *a: gnt.group_norm(*a[:5], activation=a[5]), dtype, param_dtype)
    expected = primal_and_tangent(torch_group_norm, torch.float64, torch.float64)
    rtol = {torch.float64: 1e-12, torch.float32: FLOAT32_RTOL}.get(dtype, 4 * torch.finfo(dtype).eps)
    assert primal.dtype == tangent.dtype == dtype
    assert_matches(primal.double(), expected[0], "primal", rtol=rtol)
    assert_matches(tangent.double(), expected[1], "tangent", rtol=rtol)
    assert primal.is_contiguous(memory_format=memory_format)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward_ad
def test_forward_mode_ad_without_the_operators_is_refused_not_dropped(rng, monkeypatch):
    """Where torch lacks the operators (before 2.4), the autograd.Function says that it has no jvp rather than
    return the primal without its tangent."""
    import torch.autograd.forward_ad as forward_ad
    monkeypatch.setattr(gnt, "_ops", None)
    monkeypatch.setattr(gnt, "_node", None)  # which needs the operators, and does not load without them
    x = tensor(rng, (2, 8, 5))
    with forward_ad.dual_level(), torch.no_grad():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="jvp"):
            gnt.group_norm(dual, 2)


# -------------------------------------------------------------------------------------------- the module

def signature_of(function):
    """(name, kind, default) of each parameter: what a caller can rely on, annotations aside."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


MODULE_CONFIGS = [  # (args, kwargs)
    ((4, 16), {}),
    ((1, 6), {"eps": 1e-3}),
    ((3, 6), {"affine": False}),
    ((2, 8), {"bias": False}),
    ((8, 8), {"eps": 0.0, "dtype": torch.float64}),
]


def test_module_constructor_signature_is_torchs():
    """torch's parameters, in order, then groupnorm's keyword-only activation: every call torch's constructor
    takes, this one takes the same way."""
    ours = signature_of(gnt.GroupNorm.__init__)
    assert ours[:-1] == signature_of(torch.nn.GroupNorm.__init__)
    assert ours[-1] == ("activation", inspect.Parameter.KEYWORD_ONLY, None)
    assert gnt.GroupNorm.__constants__ == torch.nn.GroupNorm.__constants__


@pytest.mark.parametrize("args, kwargs", MODULE_CONFIGS, ids=lambda v: str(v))
def test_module_mirrors_torch(args, kwargs):
    ours, theirs = gnt.GroupNorm(*args, **kwargs), torch.nn.GroupNorm(*args, **kwargs)
    assert repr(ours) == repr(theirs)
    assert ours.extra_repr() == theirs.extra_repr()
    for name in ("num_groups", "num_channels", "eps", "affine"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
    for (name, mine), (_, reference) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert mine.dtype == reference.dtype and torch.equal(mine, reference), name
    for name in ("weight", "bias"):
        assert (getattr(ours, name) is None) == (getattr(theirs, name) is None), name


def test_module_state_dict_round_trips_with_torch(rng):
    theirs = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        theirs.weight.copy_(tensor(rng, (16,)))
        theirs.bias.copy_(tensor(rng, (16,)))
    ours = gnt.GroupNorm(4, 16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)

    with torch.no_grad():
        ours.weight.mul_(-2.0)
        ours.bias.add_(3.0)
    back = torch.nn.GroupNorm(4, 16)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(back.weight, ours.weight) and torch.equal(back.bias, ours.bias)

    x = tensor(rng, (2, 16, 5, 5))
    assert_matches(ours(x).detach(), back(x).detach(), "module output after the round trip")


def test_module_reset_parameters(rng):
    module = gnt.GroupNorm(2, 6)
    with torch.no_grad():
        module.weight.copy_(tensor(rng, (6,)))
        module.bias.copy_(tensor(rng, (6,)))
    weight_before = module.weight
    module.reset_parameters()
    assert module.weight is weight_before, "reset_parameters must reset in place, keeping the Parameter"
    assert torch.equal(module.weight, torch.ones(6)) and torch.equal(module.bias, torch.zeros(6))
    gnt.GroupNorm(2, 6, affine=False).reset_parameters()
    gnt.GroupNorm(2, 6, bias=False).reset_parameters()


def test_module_without_affine_has_no_parameters():
    module = gnt.GroupNorm(2, 6, affine=False)
    assert list(module.parameters()) == []
    assert module.weight is None and module.bias is None
    assert dict(module.state_dict()) == {}


def test_module_rejects_groups_that_do_not_divide_channels():
    with pytest.raises(ValueError, match="divisible"):
        torch.nn.GroupNorm(5, 64)
    with pytest.raises(ValueError, match="num_groups=5"):
        gnt.GroupNorm(5, 64)


def test_module_device_and_dtype_follow_torch():
    module = gnt.GroupNorm(2, 6, dtype=torch.float64)
    assert module.weight.dtype == torch.float64 and module.bias.dtype == torch.float64
    on_meta = gnt.GroupNorm(2, 6, device="meta")
    assert on_meta.weight.device.type == "meta"
    converted = gnt.GroupNorm(2, 6).double()
    assert converted.weight.dtype == torch.float64


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_forward_and_backward_match_torch(rng, layout):
    shape = (3, 12, 7, 6)
    theirs = torch.nn.GroupNorm(3, 12, eps=0.1)  # an eps that shows: the module must pass it on
    with torch.no_grad():
        theirs.weight.copy_(tensor(rng, (12,)))
        theirs.bias.copy_(tensor(rng, (12,)))
    ours = gnt.GroupNorm(3, 12, eps=0.1)
    ours.load_state_dict(theirs.state_dict())
    x = tensor(rng, shape, memory_format=layout_of(shape, layout), offset=0.3, scale=0.5)
    grad = tensor(rng, shape)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    torch.autograd.backward(y_ours, grad)
    torch.autograd.backward(y_theirs, grad)
    assert_matches(y_ours.detach(), y_theirs.detach(), "module output")
    assert_matches(x_ours.grad, x_theirs.grad, "grad_input")
    assert_matches(ours.weight.grad, theirs.weight.grad, "grad_weight")
    assert_matches(ours.bias.grad, theirs.bias.grad, "grad_bias")


# ------------------------------------------------------------------------------------------------ errors

def test_device_the_kernels_cannot_serve_raises_a_clear_error():
    x = torch.empty(2, 4, 3, device="meta")
    with pytest.raises(RuntimeError, match=r"input is on device meta.*CPU"):
        gnt.group_norm(x, 2)
    with pytest.raises(RuntimeError, match=r"weight is on device meta"):
        gnt.group_norm(torch.zeros(2, 4, 3), 2, torch.empty(4, device="meta"))
    module = gnt.GroupNorm(2, 4, device="meta")
    with pytest.raises(RuntimeError, match=r"device meta"):
        module(x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool])
def test_unsupported_dtypes_raise_type_error(dtype):
    x = torch.zeros(2, 4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).replace(".", r"\.")):
        gnt.group_norm(x, 2)


# ------------------------------------------------------------------------------ float16 / bfloat16

HALF_CASES = [((2, 32, 9, 7), 8, "contiguous"), ((2, 32, 9, 7), 8, "channels_last"),
              ((1, 64, 16, 16), 32, "channels_last"), ((2, 33, 17), 11, "contiguous")]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, num_groups, layout", HALF_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_half_precision_matches_float64_and_torch(isa, rng, shape, num_groups, layout, dtype, param_dtype):
    """float16/bfloat16 tensors (with parameters of their dtype, or float32 as torch allows): output and input
    gradient in the input's dtype and memory format, within an ulp (at the largest magnitude) of the float64
    result on the same values, and no farther from it than torch's own half-precision result."""
    memory_format = layout_of(shape, layout)
    pdtype = dtype if param_dtype == "same" else torch.float32
    x = tensor(rng, shape, dtype, memory_format, offset=1.5, scale=3.0).requires_grad_()
    weight = tensor(rng, (shape[1],), pdtype).requires_grad_()
    bias = tensor(rng, (shape[1],), pdtype).requires_grad_()
    grad = tensor(rng, shape, dtype, memory_format)
    y = gnt.group_norm(x, num_groups, weight, bias)
    torch.autograd.backward(y, grad)
    assert y.dtype == dtype and x.grad.dtype == dtype and weight.grad.dtype == pdtype
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()

    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64 = torch_functional.group_norm(exact[0], num_groups, exact[1], exact[2], 1e-5)
    torch.autograd.backward(y64, grad.double())
    y_half, grads_half = torch_reference(x, num_groups, weight, bias, grad)
    ulp = 2.0 ** -MANTISSA_BITS[dtype]
    for what, mine, theirs, truth, bound in (
            ("output", y.detach(), y_half, y64.detach(), ulp),
            ("grad_input", x.grad, grads_half[0], exact[0].grad, 2 * ulp),
            ("grad_weight", weight.grad, grads_half[1], exact[1].grad, ulp if pdtype == dtype else 1e-5),
            ("grad_bias", bias.grad, grads_half[2], exact[2].grad, ulp if pdtype == dtype else 1e-5)):
        scale = float(truth.abs().max())
        error = float((mine.double() - truth).abs().max()) / scale
        torch_error = float((theirs.double() - truth).abs().max()) / scale
        assert error <= bound, f"{what}: max error {error:.3g} of max|float64| > {bound:g}"
        assert error <= torch_error + ulp / 4, f"{what}: error {error:.3g} against torch's {torch_error:.3g}"


# ------------------------------------------------------------------------------------------- activation='silu'

def silu_reference(x, num_groups, weight, bias, grad):
    """silu(group_norm(...)) in float64 by torch's autograd: the output and the gradients of x, weight, bias."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    z = torch_functional.silu(torch_functional.group_norm(leaves[0], num_groups, leaves[1], leaves[2], 1e-5))
    torch.autograd.backward(z, grad.double())
    return z.detach(), [t.grad if t is not None else None for t in leaves]


def silu_term_magnitudes(x, num_groups, weight, bias, grad):
    """Per channel, in float64, sum |g*x_hat| and sum |g| over the samples and positions: the magnitudes of the
    terms that grad_weight and grad_bias sum, g = grad*silu'(u) at u = x_hat*w + b (reference.py's
    silu_grad_reference)."""
    x64, w64, b64, grad64 = (t.detach().double().numpy() for t in (x, weight, bias, grad))
    g = silu_grad_reference(grad64, x64, num_groups, w64, b64)
    x_hat = group_norm_reference(x64, num_groups)
    dims = tuple(d for d in range(x.dim()) if d != 1)
    return (torch.from_numpy(np.abs(g * x_hat).sum(dims).astype(np.float64)),
            torch.from_numpy(np.abs(g).sum(dims).astype(np.float64)))


@pytest.mark.parametrize("affine", ["weight_and_bias", "no_affine"])
@pytest.mark.parametrize("shape, num_groups, layout", GRADCHECK_CASES[:5], ids=lambda v: str(v).replace(" ", ""))
def test_silu_gradcheck_float64(rng, shape, num_groups, layout, affine):
    x = tensor(rng, shape, torch.float64, layout_of(shape, layout), offset=0.5, scale=2.0).requires_grad_()
    params = [tensor(rng, (shape[1],), torch.float64).requires_grad_() for _ in range(2)] if affine != "no_affine" \
        else []

    def function(x, *params):
        return gnt.group_norm(x, num_groups, *params, eps=0.25, activation="silu")

    assert torch.autograd.gradcheck(function, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, num_groups, layout", FLOAT32_CASES[:4] + FLOAT32_CASES[7:9],
                         ids=lambda v: str(v).replace(" ", ""))
def test_silu_matches_float64(isa, rng, shape, num_groups, layout, dtype):
    """The module with activation='silu' against silu(group_norm) in float64: output and gradients, in the input's
    dtype and memory format, within float32 rounding (an ulp of the largest value or two for 16-bit data, whose
    SiLU gradient is rounded to storage on the way, as torch's separate silu rounds it)."""
    memory_format = layout_of(shape, layout)
    x = tensor(rng, shape, dtype, memory_format, offset=0.5, scale=2.0).requires_grad_()
    module = gnt.GroupNorm(num_groups, shape[1], activation="silu")
    with torch.no_grad():
        module.weight.copy_(tensor(rng, (shape[1],)))
        module.bias.copy_(tensor(rng, (shape[1],)))
    grad = tensor(rng, shape, dtype, memory_format)
    z = module(x)
    torch.autograd.backward(z, grad)
    assert z.dtype == dtype and z.stride() == x.stride() and x.grad.stride() == x.stride()
    z64, (dx64, dw64, db64) = silu_reference(x, num_groups, module.weight, module.bias, grad)
    ulp = 2.0 ** -MANTISSA_BITS[dtype] if dtype in MANTISSA_BITS else 1e-5
    for what, mine, truth, bound in (("output", z.detach(), z64, ulp), ("grad_input", x.grad, dx64, 2 * ulp)):
        error = float((mine.double() - truth).abs().max()) / float(truth.abs().max())
        assert error <= bound, f"{what}: max error {error:.3g} of max|float64| > {bound:g}"
    # grad_weight and grad_bias sum, per channel, terms g*x_hat and g of the SiLU's gradient g, which 16-bit data
    # rounds to storage term by term (as torch's separate silu does): each term can be off by half an ulp of itself,
    # and where the terms cancel their sum's error is bounded by the sum of their magnitudes, not by the result
    # (an (8, 32) bfloat16 grad_weight once came out 1.1 ulp of max|float64| off). The bound: an ulp of the larger
    # of max|float64| and half the channel's sum of |terms|.
    abs_terms = silu_term_magnitudes(x, num_groups, module.weight, module.bias, grad)
    for what, mine, truth, terms in (("grad_weight", module.weight.grad, dw64, abs_terms[0]),
                                     ("grad_bias", module.bias.grad, db64, abs_terms[1])):
        error = (mine.double() - truth).abs()
        floor = terms / 2 if dtype in MANTISSA_BITS else torch.zeros_like(terms)
        allowed = ulp * torch.maximum(truth.abs().max(), floor)
        worst = int((error / allowed).argmax())
        assert bool((error <= allowed).all()), \
            f"{what}[{worst}]: error {float(error[worst]):.3g} > {float(allowed[worst]):.3g} allowed"


def test_silu_module_repr_and_errors():
    m = gnt.GroupNorm(2, 4, activation="silu")
    assert repr(m).endswith("activation='silu')") and "activation" not in repr(gnt.GroupNorm(2, 4))
    assert list(m.state_dict()) == list(torch.nn.GroupNorm(2, 4).state_dict())
    with pytest.raises(ValueError, match="activation='relu' is unknown; it must be None or 'silu'"):
        gnt.GroupNorm(2, 4, activation="relu")
    with pytest.raises(ValueError, match="activation='gelu' is unknown"):
        gnt.group_norm(torch.zeros(2, 4, 3, requires_grad=True), 2, activation="gelu")
    with pytest.raises(ValueError, match="activation='gelu' is unknown"):
        gnt.group_norm(torch.zeros(2, 4, 3), 2, activation="gelu")


def test_silu_inference_matches_training_output(rng):
    x = tensor(rng, (2, 8, 5, 5))
    w, b = tensor(rng, (8,)), tensor(rng, (8,))
    with torch.no_grad():
        inference = gnt.group_norm(x, 4, w, b, activation="silu")
    training = gnt.group_norm(x.requires_grad_(), 4, w, b, activation="silu")
    assert torch.equal(inference, training.detach())


def test_half_precision_parameters_must_match_or_be_float32():
    x = torch.zeros(2, 4, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"weight has dtype torch.bfloat16 but input has torch.float16"):
        gnt.group_norm(x, 2, torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"bias has dtype torch.float64 but input has torch.float16"):
        gnt.group_norm(x, 2, None, torch.ones(4, dtype=torch.float64))


def test_argument_errors_name_the_argument():
    x = torch.zeros(2, 4, 3)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float64.*input has torch.float32"):
        gnt.group_norm(x, 2, torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        gnt.group_norm(np.zeros((2, 4, 3), np.float32), 2)
    with pytest.raises(ValueError, match="num_groups=3"):
        gnt.group_norm(x, 3)


# ---------------------------------------------------------------------------------------------- training

def make_model(norm_class, memory_format):
    """conv -> GroupNorm -> SiLU -> linear, deterministic initial weights."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, kernel_size=3, padding=1),
        norm_class(4, 16),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 10),
    )
    return model.to(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_training_follows_torch_step_by_step(rng, memory_format):
    reference = make_model(torch.nn.GroupNorm, memory_format)
    ours = copy.deepcopy(reference)
    ours[1] = gnt.GroupNorm(4, 16)
    with torch.no_grad():  # GroupNorm starts at ones/zeros: make it non-trivial, identically in both
        reference[1].weight.copy_(tensor(rng, (16,), scale=0.5, offset=1.0))
        reference[1].bias.copy_(tensor(rng, (16,), scale=0.5))
    ours[1].load_state_dict(reference[1].state_dict())
    inputs = tensor(rng, (8, 3, 8, 8), memory_format=memory_format)
    targets = torch.from_numpy(rng.integers(0, 10, size=8))
    losses = {}
    for name, model in (("torch", reference), ("groupnorm", ours)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[name] = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = torch_functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["groupnorm"], losses["torch"], rtol=TRAINING_RTOL, atol=0)
    assert losses["torch"][-1] < losses["torch"][0], "the run did not train; the comparison would be vacuous"
    for (name, mine), (_, theirs) in zip(ours.named_parameters(), reference.named_parameters()):
        assert_matches(mine.detach(), theirs.detach(), f"parameter {name} after training", rtol=1e-4)
