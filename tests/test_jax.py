"""groupnorm.jax: the kernels as XLA custom calls, against float64 references, under jit, grad and vmap.

Runs where jax is installed and groupnorm was built with the custom calls (a build that found jaxlib's FFI headers:
pip install --no-build-isolation with jax installed); skips elsewhere, saying which. The CPU custom calls run here;
the CUDA ones on a GPU (marked gpu).
"""
import numpy as np
import pytest

import groupnorm as gn
from groupnorm import _core
from reference import group_norm_reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

if _core.JAX_BUILD_NOTE != "built":
    pytest.skip(f"this build has no JAX custom calls: {_core.JAX_BUILD_NOTE}", allow_module_level=True)

import groupnorm.jax as gnj  # noqa: E402

TOLERANCE = {"float32": 2e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}  # of max|ref| + 1


def close(got, want, dtype, what):
    got = np.asarray(jnp.asarray(got).astype(jnp.float64) if dtype == "float64" else
                     jnp.asarray(got).astype(jnp.float32), np.float64)
    err = np.abs(got - want).max() / (np.abs(want).max() + 1)
    assert err <= TOLERANCE[dtype], f"{what}: max error {err:.3g} of the scale"


CPU = jax.devices("cpu")[0]


def data(shape, dtype, seed, offset=0.0, device=CPU):
    """Random values of `dtype` on `device` (the CPU unless said: the CPU custom calls, even where JAX's default
    device is a GPU)."""
    values = np.random.default_rng(seed).standard_normal(shape) * 2 + offset
    return jax.device_put(jnp.asarray(values.astype(np.float32)).astype(dtype), device)


def reference_grads(x, groups, weight, bias, eps, silu, cotangent):
    """float64 gradients of sum(y * cotangent) by torch's autograd, or skips without torch."""
    torch = pytest.importorskip("torch")
    xr = torch.from_numpy(np.array(x, np.float64)).requires_grad_()
    wr = torch.from_numpy(np.array(weight, np.float64)).requires_grad_()
    br = torch.from_numpy(np.array(bias, np.float64)).requires_grad_()
    y = torch.nn.functional.group_norm(xr, groups, wr, br, eps)
    if silu:
        y = torch.nn.functional.silu(y)
    (y * torch.from_numpy(np.array(cotangent, np.float64))).sum().backward()
    return xr.grad.numpy(), wr.grad.numpy(), br.grad.numpy()


def up(x):
    """x in float64 for the references and the comparisons (16-bit values widened exactly)."""
    x = jnp.asarray(x)
    return np.asarray(x if x.dtype == jnp.float64 else x.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("silu", [False, True])
def test_forward_and_grad_match_float64(dtype, layout, silu):
    in_dtype(check_forward_and_grad, dtype, layout, silu)


def in_dtype(check, dtype, *args):
    """check(dtype, *args), with jax_enable_x64 scoped around it for float64."""
    if dtype != "float64":
        return check(dtype, *args)
    if not hasattr(jax, "enable_x64"):
        pytest.skip("float64 needs jax.enable_x64 (a scoped jax_enable_x64)")
    with jax.enable_x64(True):
        return check(dtype, *args)


def check_forward_and_grad(dtype, layout, silu):
    shape = (2, 12, 5, 7)
    x = data(shape, dtype, 1, offset=3.0)
    w, b = data((12,), dtype, 2), data((12,), dtype, 3)
    g = data(shape, dtype, 4)
    xn = x if layout == "channels_first" else jnp.moveaxis(x, 1, -1)
    gn_ = g if layout == "channels_first" else jnp.moveaxis(g, 1, -1)
    axis = 1 if layout == "channels_first" else -1
    activation = "silu" if silu else None

    wide = jnp.float64 if dtype == "float64" else jnp.float32

    def loss(xv, wv, bv):
        y = gnj.group_norm(xv, 3, wv, bv, 1e-5, activation=activation, channel_axis=axis)
        return (y.astype(wide) * gn_.astype(wide)).sum(), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(xn, w, b)
    want = group_norm_reference(up(x), 3, up(w), up(b), 1e-5, "silu" if silu else None)
    y = y if layout == "channels_first" else jnp.moveaxis(y, -1, 1)
    assert y.dtype == x.dtype
    close(y, want, dtype, "y")
    dx, dw, db = grads
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and db.dtype == b.dtype
    dx = dx if layout == "channels_first" else jnp.moveaxis(dx, -1, 1)
    rx, rw, rb = reference_grads(up(x), 3, up(w), up(b), 1e-5, silu, up(g))
    scale = 1 if dtype == "float64" else 4  # the gradients' reductions round more than y does
    for name, got, truth in (("dx", dx, rx), ("dw", dw, rw), ("db", db, rb)):
        err = np.abs(up(got) - truth).max() / (np.abs(truth).max() + 1)
        assert err <= scale * TOLERANCE[dtype] * (1 if name == "dx" else 10), f"{name}: {err:.3g}"


def reference_penalty_grads(x, groups, weight, bias, eps, silu):
    """float64 gradients, in x, weight and bias, of the penalty |d sum(y**3) / d(x, weight)|**2 (second derivatives
    of group_norm), by torch's autograd."""
    torch = pytest.importorskip("torch")
    leaves = [torch.from_numpy(np.array(v, np.float64)).requires_grad_() for v in (x, weight, bias)]
    y = torch.nn.functional.group_norm(leaves[0], groups, leaves[1], leaves[2], eps)
    y = torch.nn.functional.silu(y) if silu else y
    first = torch.autograd.grad((y ** 3).sum(), leaves[:2], create_graph=True)
    penalty = sum((g ** 2).sum() for g in first)
    return [g.numpy() for g in torch.autograd.grad(penalty, leaves)]


@pytest.mark.parametrize("dtype, layout, silu", [("float64", "channels_first", False),
                                                 ("float64", "channels_last", True),
                                                 ("float32", "channels_first", True),
                                                 ("float32", "channels_last", False)])
def test_second_derivatives_match_float64(dtype, layout, silu):
    """grad of a gradient penalty (reverse over reverse) and jax.hessian (forward over reverse): torch's second
    derivatives, while the custom calls still compute the values and first derivatives; and a third derivative
    against one of a jax.numpy group norm."""
    in_dtype(check_second_derivatives, dtype, layout, silu)


def check_second_derivatives(dtype, layout, silu):
    shape = (2, 6, 3, 2)
    x, w, b = data(shape, dtype, 11, offset=1.0), data((6,), dtype, 12), data((6,), dtype, 13)
    axis = 1 if layout == "channels_first" else -1
    moved = (lambda v: v) if layout == "channels_first" else (lambda v: jnp.moveaxis(v, 1, -1))
    back = (lambda v: v) if layout == "channels_first" else (lambda v: jnp.moveaxis(v, -1, 1))
    activation = "silu" if silu else None

    def cubed(xv, wv, bv):
        return (gnj.group_norm(xv, 3, wv, bv, 1e-5, activation=activation, channel_axis=axis) ** 3).sum()

    def penalty(xv, wv, bv):
        gx, gw = jax.grad(cubed, argnums=(0, 1))(xv, wv, bv)
        return (gx ** 2).sum() + (gw ** 2).sum()

    step = jax.jit(jax.grad(penalty, argnums=(0, 1, 2)))
    assert "groupnorm_backward" in str(jax.make_jaxpr(step)(moved(x), w, b))  # the first derivative's custom call
    got = step(moved(x), w, b)
    want = reference_penalty_grads(up(x), 3, up(w), up(b), 1e-5, silu)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    for name, g, truth in zip(("x", "weight", "bias"), (back(got[0]), got[1], got[2]), want):
        err = np.abs(up(g) - truth).max() / np.abs(truth).max()
        assert err <= rtol, f"penalty's gradient in {name}: {err:.3g}"

    def in_x(xv):
        return cubed(xv, w, b)

    torch = pytest.importorskip("torch")
    xr, wr, br = (torch.tensor(up(v)) for v in (x, w, b))

    def cubed_ref(t):
        y = torch.nn.functional.group_norm(t, 3, wr, br, 1e-5)
        return (torch.nn.functional.silu(y) if silu else y).pow(3).sum()

    hessian_ref = torch.autograd.functional.hessian(cubed_ref, xr).numpy()
    h = jax.hessian(in_x)(moved(x))
    if layout == "channels_last":  # (N, H, W, C) twice: back to (N, C, H, W) on both halves
        h = jnp.moveaxis(jnp.moveaxis(h, 3, 1), 7, 5)
    err = np.abs(up(h) - hessian_ref).max() / np.abs(hessian_ref).max()
    assert err <= rtol, f"hessian: {err:.3g}"

    def in_x_reference(xv):  # channels first, in jax.numpy (no custom call)
        grouped = xv.reshape(xv.shape[0], 3, -1)
        centred = grouped - grouped.mean(-1, keepdims=True)
        y = (centred / jnp.sqrt(jnp.square(centred).mean(-1, keepdims=True) + 1e-5)).reshape(xv.shape)
        y = y * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
        return ((y * jax.nn.sigmoid(y) if silu else y) ** 3).sum()

    def third(f):  # a third derivative: the rules themselves differentiated
        return jax.grad(lambda xv: (jax.grad(lambda u: (jax.grad(f)(u) ** 2).sum())(xv) ** 2).sum())

    got, truth = up(back(third(in_x)(moved(x)))), up(third(in_x_reference)(x))
    assert np.abs(got - truth).max() / np.abs(truth).max() <= rtol * 10, "third derivative"


def test_higher_derivatives_of_channels_last_arrays_transpose_nothing():
    """The jax.numpy forms behind second derivatives read channels-last arrays as they are (a reshape to
    (N, S, G, D)): a Hessian-vector product (forward over reverse), grad of grad and a jvp lower to no transpose,
    where moving channels to axis 1 put eight in each."""
    x, w, b = data((2, 5, 6, 16), "float32", 81), data((16,), "float32", 82), data((16,), "float32", 83)

    def f(v):
        return (gnj.group_norm(v, 4, w, b, activation="silu", channel_axis=-1) ** 2).sum()

    for name, transform in (("hvp", lambda v, t: jax.jvp(jax.grad(f), (v,), (t,))[1]),
                            ("grad of grad", lambda v, t: jax.grad(lambda u: (jax.grad(f)(u) ** 2).sum())(v)),
                            ("jvp", lambda v, t: jax.jvp(f, (v,), (t,))[1])):
        assert "transpose" not in jax.jit(transform).lower(x, x).as_text(), name


def reference_jvp(x, groups, weight, bias, eps, silu, tangents):
    """float64 tangent of y for tangents (tx, tw, tb) of (x, weight, bias), by torch's forward mode; a tangent of
    None is zero."""
    torch = pytest.importorskip("torch")
    primals = tuple(torch.from_numpy(np.array(v, np.float64)) for v in (x, weight, bias))
    tangents = tuple(torch.zeros_like(p) if t is None else torch.from_numpy(np.array(t, np.float64))
                     for p, t in zip(primals, tangents))

    def f(xv, wv, bv):
        y = torch.nn.functional.group_norm(xv, groups, wv, bv, eps)
        return torch.nn.functional.silu(y) if silu else y

    return torch.func.jvp(f, primals, tangents)[1].numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func imports it
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("silu", [False, True])
def test_jvp_matches_float64(dtype, layout, silu):
    """Forward mode (jax.jvp) with tangents for x, weight and bias, each alone and all three: torch's float64
    forward mode; a tangent for x alone runs the backward custom call, one for the parameters alone does not."""
    in_dtype(check_jvp, dtype, layout, silu)


def check_jvp(dtype, layout, silu):
    shape = (2, 12, 5, 7)
    x = data(shape, dtype, 41, offset=2.0)
    w, b = data((12,), "float32" if dtype != "float64" else dtype, 42), data((12,), w_dtype(dtype), 43)
    tx, tw, tb = data(shape, dtype, 44), data((12,), w.dtype, 45), data((12,), b.dtype, 46)
    axis = 1 if layout == "channels_first" else -1
    moved = (lambda v: v) if layout == "channels_first" else (lambda v: jnp.moveaxis(v, 1, -1))
    back = (lambda v: v) if layout == "channels_first" else (lambda v: jnp.moveaxis(v, -1, 1))
    activation = "silu" if silu else None

    def f(xv, wv, bv):
        return gnj.group_norm(xv, 3, wv, bv, 1e-5, activation=activation, channel_axis=axis)

    for given in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        def partial(*args, given=given):
            full = iter(args)
            return f(*[next(full) if g else v for g, v in zip(given, (moved(x), w, b))])

        primals = tuple(v for g, v in zip(given, (moved(x), w, b)) if g)
        tangents = tuple(v for g, v in zip(given, (moved(tx), tw, tb)) if g)
        run = jax.jit(lambda p, t, partial=partial: jax.jvp(partial, p, t))
        if given == (True, False, False):
            assert "groupnorm_backward" in run.lower(primals, tangents).as_text()
        if given == (False, True, False):
            assert "groupnorm_backward" not in run.lower(primals, tangents).as_text()
        y, ty = run(primals, tangents)
        assert ty.dtype == x.dtype and ty.shape == y.shape
        assert np.array_equal(np.asarray(y), np.asarray(f(moved(x), w, b)))
        want = reference_jvp(up(x), 3, up(w), up(b), 1e-5, silu,
                             [up(t) if g else None for g, t in zip(given, (tx, tw, tb))])
        err = np.abs(up(back(ty)) - want).max() / (np.abs(want).max() + 1)
        assert err <= TOLERANCE[dtype], f"tangent for {given}: {err:.3g}"


def w_dtype(dtype):
    """The parameters' dtype beside `dtype` data: float32 for 16-bit data (the mixed rule), else the data's."""
    return "float32" if dtype != "float64" else dtype


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func imports it
def test_forward_mode_transforms():
    """jacfwd equals jacrev; jacfwd of jacfwd and grad of a jvp (the tangent differentiated, forward and reverse)
    match torch's float64 second derivatives; vmap of jvp and jvp of vmap give the per-element bits, vmap with shared
    parameters in one backward call; jax.linearize's linear map matches jvp."""
    torch = pytest.importorskip("torch")
    x, w, b = data((2, 6, 5), "float32", 51, offset=1.0), data((6,), "float32", 52), data((6,), "float32", 53)
    t = data((2, 6, 5), "float32", 54)

    def f(xv):
        return gnj.group_norm(xv, 3, w, b, activation="silu")

    forward, reverse = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    assert np.abs(np.asarray(forward) - np.asarray(reverse)).max() <= 1e-5 * np.abs(np.asarray(reverse)).max()

    xr, wr, br = (torch.tensor(up(v)) for v in (x, w, b))

    def f_ref(xv):
        return torch.nn.functional.silu(torch.nn.functional.group_norm(xv, 3, wr, br, 1e-5))

    second = torch.func.jacfwd(torch.func.jacfwd(f_ref))(xr).numpy()
    got = up(jax.jacfwd(jax.jacfwd(f))(x))
    assert np.abs(got - second).max() <= 1e-4 * np.abs(second).max(), "jacfwd of jacfwd"

    def full(xv, wv, bv, axis=1):
        return gnj.group_norm(xv, 3, wv, bv, activation="silu", channel_axis=axis)

    def full_ref(xv, wv, bv):
        return torch.nn.functional.silu(torch.nn.functional.group_norm(xv, 3, wv, bv, 1e-5))

    first = (t, data((6,), "float32", 58), data((6,), "float32", 59))  # forward over forward, in all three
    second = (data((2, 6, 5), "float32", 60), data((6,), "float32", 61), data((6,), "float32", 62))
    want = torch.func.jvp(lambda *p: torch.func.jvp(full_ref, p, tuple(torch.tensor(up(v)) for v in first))[1],
                          (xr, wr, br), tuple(torch.tensor(up(v)) for v in second))[1].numpy()
    for axis in (1, -1):
        moved = (lambda v: v) if axis == 1 else (lambda v: jnp.moveaxis(v, 1, -1))
        got = jax.jvp(lambda *p: jax.jvp(lambda *q: full(*q, axis=axis), p, (moved(first[0]),) + first[1:])[1],
                      (moved(x), w, b), (moved(second[0]),) + second[1:])[1]
        got = up(got if axis == 1 else jnp.moveaxis(got, -1, 1))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), f"jvp of jvp, channel_axis={axis}"

    def directional(xv):  # d/dx of sum(jvp(f)(x, t)**2): reverse over forward
        return (jax.jvp(f, (xv,), (t,))[1] ** 2).sum()

    tr = torch.tensor(up(t))
    xg = xr.clone().requires_grad_()
    (torch.func.jvp(f_ref, (xg,), (tr,))[1] ** 2).sum().backward()
    got = up(jax.grad(directional)(x))
    assert np.abs(got - xg.grad.numpy()).max() <= 1e-4 * np.abs(xg.grad.numpy()).max(), "grad of jvp"

    xs, ts = data((3, 2, 6, 5), "float32", 55), data((3, 2, 6, 5), "float32", 56)
    each = [np.asarray(jax.jvp(f, (a,), (c,))[1]) for a, c in zip(xs, ts)]
    mapped = jax.jit(jax.vmap(lambda a, c: jax.jvp(f, (a,), (c,))[1]))
    assert mapped.lower(xs, ts).as_text().count("groupnorm_backward") == 1
    assert np.array_equal(np.asarray(mapped(xs, ts)), np.stack(each))
    outer = jax.jvp(jax.vmap(f), (xs,), (ts,))[1]
    assert np.array_equal(np.asarray(outer), np.stack(each))
    ws = data((3, 6), "float32", 57)
    per_weight = jax.vmap(lambda v, c: jax.jvp(lambda a: gnj.group_norm(a, 3, v), (x,), (c,))[1])(ws, ts)
    for v, c, got in zip(ws, ts, per_weight):
        assert np.array_equal(np.asarray(got), np.asarray(jax.jvp(lambda a: gnj.group_norm(a, 3, v), (x,), (c,))[1]))

    y, linear = jax.linearize(f, x)
    assert np.array_equal(np.asarray(linear(t)), np.asarray(jax.jvp(f, (x,), (t,))[1]))

    # the batching rule in channels-last, with a tangent for the weight alone (the input's left out of the call),
    # and with the weight's tangent mapped (one call per element)
    xl, tl = data((3, 2, 5, 4, 6), "float32", 63), data((3, 2, 5, 4, 6), "float32", 64)
    tws = data((3, 6), "float32", 65)

    def g(v, u):
        return gnj.group_norm(v, 3, u, b, activation="silu", channel_axis=-1)

    cases = (("x and w", lambda v, c: jax.jvp(g, (v, w), (c, first[1]))[1], (xl, tl)),
             ("w alone", lambda v: jax.jvp(lambda u: g(v, u), (w,), (first[1],))[1], (xl,)),
             ("w's tangent mapped", lambda c: jax.jvp(lambda u: g(xl[0], u), (w,), (c,))[1], (tws,)))
    for name, one, args in cases:
        each = np.stack([np.asarray(one(*sliced)) for sliced in zip(*args)])
        assert np.array_equal(np.asarray(jax.vmap(one)(*args)), each), name


def test_a_gradient_runs_the_two_calls_alone():
    """Reverse mode transposes the tangent into the backward call: a jitted vjp lowers to one forward and one
    backward custom call and no reduction of XLA's (the tangent's jax.numpy form is not in it), with or without a
    tangent for the parameters."""
    x, dz = data((2, 8, 5, 3), "float32", 61), data((2, 8, 5, 3), "float32", 62)
    w, b = data((8,), "float32", 63), data((8,), "float32", 64)
    for args in ((x, w, b), (x,), (w, b)):
        def f(*diff, n=len(args)):
            xv, wv, bv = (x, *diff) if n == 2 else diff if n == 3 else (diff[0], w, b)
            return gnj.group_norm(xv, 4, wv, bv)

        lowered = jax.jit(lambda *a: jax.vjp(f, *a)[1](dz)).lower(*args).as_text()
        assert lowered.count("groupnorm_forward") == 1 and lowered.count("groupnorm_backward") == 1, args
        assert "stablehlo.reduce" not in lowered, args


def test_without_parameters_and_other_axes():
    x = data((3, 6, 4, 5), "float32", 5)
    close(gnj.group_norm(x, 2), group_norm_reference(up(x), 2), "float32", "no parameters")
    close(gnj.group_norm(x, 6, bias=jnp.ones(6)), group_norm_reference(up(x), 6, None, np.ones(6)), "float32",
          "bias only")
    moved = jnp.moveaxis(x, 1, 2)  # channels on axis 2 of 4: moved to 1 and back by XLA
    got = gnj.group_norm(moved, 3, channel_axis=2)
    close(jnp.moveaxis(got, 2, 1), group_norm_reference(up(x), 3), "float32", "channel_axis=2")
    two_d = data((5, 8), "float32", 6)
    close(gnj.group_norm(two_d, 4), group_norm_reference(up(two_d), 4), "float32", "(N, C)")
    grads = jax.grad(lambda v: gnj.group_norm(v, 2).sum())(x)  # no weight: the parameters' branch is empty
    assert float(jnp.abs(grads).max()) < 1e-4  # y sums to 0 in each group whatever x is


def test_vmap_folds_shared_parameters_into_one_call():
    """Under vmap the forward is one call on the folded batch when weight and bias are shared (no loop in the
    jaxpr), one call per element when they are mapped; both give the bits of the per-element calls, and so do
    vmap(grad) and grad(vmap)."""
    xs = data((3, 2, 8, 5), "float32", 19)
    w, b = data((8,), "float32", 20), data((8,), "float32", 21)
    ws = data((3, 8), "float32", 22)

    def f(x, w):
        return gnj.group_norm(x, 4, w, b)

    def loss(x, w):
        return (f(x, w) ** 2).sum()

    shared = jax.jit(jax.vmap(f, in_axes=(0, None)))
    lowered = shared.lower(xs, w).as_text()
    assert lowered.count("groupnorm_forward") == 1 and "while" not in lowered
    assert "while" in jax.jit(jax.vmap(f)).lower(xs, ws).as_text()
    assert np.array_equal(np.asarray(shared(xs, w)), np.stack([np.asarray(f(x, w)) for x in xs]))
    assert np.array_equal(np.asarray(jax.vmap(f)(xs, ws)), np.stack([np.asarray(f(x, v)) for x, v in zip(xs, ws)]))
    assert np.array_equal(np.asarray(jax.vmap(f, in_axes=(None, 0))(xs[0], ws)),
                          np.stack([np.asarray(f(xs[0], v)) for v in ws]))
    each = [jax.grad(loss, argnums=(0, 1))(x, w) for x in xs]
    dx, dw = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(xs, w)
    assert np.array_equal(np.asarray(dx), np.stack([np.asarray(g[0]) for g in each]))
    assert np.array_equal(np.asarray(dw), np.stack([np.asarray(g[1]) for g in each]))
    summed = jax.grad(lambda x: (jax.vmap(f, in_axes=(0, None))(x, w) ** 2).sum())(xs)
    assert np.array_equal(np.asarray(summed), np.stack([np.asarray(g[0]) for g in each]))


def test_forward_and_backward_functions():
    x = data((2, 8, 9), "float32", 7)
    w, b = data((8,), "float32", 8), data((8,), "float32", 9)
    y, mean, rstd = gnj.group_norm_forward(x, 4, w, b)
    close(y, group_norm_reference(up(x), 4, up(w), up(b)), "float32", "y")
    grouped = up(x).reshape(2, 4, -1)
    np.testing.assert_allclose(np.asarray(mean), grouped.mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rstd), 1 / np.sqrt(grouped.var(-1) + 1e-5), rtol=1e-5)
    dy = data((2, 8, 9), "float32", 10)
    dx, dw, db = gnj.group_norm_backward(dy, x, mean, rstd, 4, w)
    rx, rw, rb = reference_grads(up(x), 4, up(w), up(b), 1e-5, False, up(dy))
    for name, got, truth in (("dx", dx, rx), ("dw", dw, rw), ("db", db, rb)):
        assert np.abs(up(got) - truth).max() / (np.abs(truth).max() + 1) < 1e-5, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_backward_functions_with_the_activation(dtype):
    """activation='silu' in group_norm_forward, and in group_norm_backward with the forward's bias."""
    x = data((2, 8, 9), dtype, 11)
    w, b = data((8,), "float32", 12), data((8,), "float32", 13)
    z, mean, rstd = gnj.group_norm_forward(x, 4, w, b, activation="silu")
    close(z, group_norm_reference(up(x), 4, up(w), up(b), activation="silu"), dtype, "z")
    dz = data((2, 8, 9), dtype, 14)
    dx, dw, db = gnj.group_norm_backward(dz, x, mean, rstd, 4, w, bias=b, activation="silu")
    rx, rw, rb = reference_grads(up(x), 4, up(w), up(b), 1e-5, True, up(dz))
    for name, got, truth in (("dx", dx, rx), ("dw", dw, rw), ("db", db, rb)):
        close(got, truth, dtype, name)
    with pytest.raises(ValueError, match="activation='relu' is unknown"):
        gnj.group_norm_backward(dz, x, mean, rstd, 4, w, bias=b, activation="relu")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_silu_gradient_runs_in_the_backward_call(dtype, channels_last):
    """The SiLU's gradient is the backward custom call's (no sigmoid in the lowered gradient), with the bits of
    groupnorm.group_norm_backward(..., activation='silu') on the same data and statistics."""
    shape = (2, 5, 7, 16) if channels_last else (2, 16, 5, 7)
    x, dz = data(shape, dtype, 31), data(shape, dtype, 32)
    w, b = data((16,), "float32", 33), data((16,), "float32", 34)
    axis = -1 if channels_last else 1

    def f(x, w, b):
        return gnj.group_norm(x, 4, w, b, activation="silu", channel_axis=axis)

    grad = jax.jit(lambda x, w, b, dz: jax.vjp(f, x, w, b)[1](dz))
    lowered = grad.lower(x, w, b, dz).as_text()
    # jax.nn.sigmoid lowers to stablehlo.logistic or to exponential (the version decides)
    assert "groupnorm_backward" in lowered and "logistic" not in lowered and "exponential" not in lowered
    dx, dw, db = grad(x, w, b, dz)

    def host(a):  # NumPy's view with channels on axis 1; channels-last data keeps its strides
        a = np.asarray(a)
        return np.moveaxis(a, -1, 1) if channels_last else a

    w_np, b_np = np.asarray(w), np.asarray(b)
    _, mean, rstd = gn.group_norm_forward(host(x), 4, w_np, b_np, activation="silu")
    want = gn.group_norm_backward(host(dz), host(x), mean, rstd, 4, w_np, bias=b_np, activation="silu")
    for name, got, bits in (("dx", host(dx), want[0]), ("dw", dw, want[1]), ("db", db, want[2])):
        assert np.array_equal(np.asarray(got), bits), name


def test_every_isa_level_and_thread_count_gives_the_numpy_calls_bits(isa):
    """The custom calls run _core's own kernels: the level the isa fixture selects, the thread count set."""
    x = data((2, 32, 17, 9), "float32", 11)
    w = data((32,), "float32", 12)
    host = np.asarray(x)
    want = gn.group_norm(host, 8, np.asarray(w))
    before = gn.get_num_threads()
    try:
        for threads in (1, 2):
            gn.set_num_threads(threads)
            assert np.array_equal(np.asarray(jax.jit(lambda v: gnj.group_norm(v, 8, w))(x)), want), threads
    finally:
        gn.set_num_threads(before)


def test_export_serializes_the_custom_calls():
    """jax.export with export_checks(): serialized and deserialized with its first derivative (vjp_order=1) and a
    symbolic batch, the module gives the bits of the live function and its gradient; without the checks JAX
    refuses."""
    export = pytest.importorskip("jax.export")
    def uncommitted(*args):  # data()'s arrays are committed to a device, which a symbolic export refuses
        return jnp.asarray(np.asarray(data(*args)))

    x, w = uncommitted((2, 8, 5), "float32", 71), uncommitted((8,), "float32", 72)
    f = jax.jit(lambda x, w: gnj.group_norm(x, 4, w, activation="silu"))
    with pytest.raises(ValueError, match="custom calls"):
        export.export(f)(x, w)
    batch = jax.ShapeDtypeStruct(export.symbolic_shape("n, 8, 5"), jnp.float32)
    exported = export.export(f, disabled_checks=gnj.export_checks())(batch, w)
    restored = export.deserialize(exported.serialize(vjp_order=1))
    for n in (2, 3):
        xn = uncommitted((n, 8, 5), "float32", 73 + n)
        assert np.array_equal(np.asarray(restored.call(xn, w)), np.asarray(f(xn, w)))

    def loss(g):
        return lambda x, w: (g(x, w) ** 2).sum()

    mine = jax.grad(loss(restored.call), argnums=(0, 1))(x, w)
    for got, want in zip(mine, jax.grad(loss(f), argnums=(0, 1))(x, w)):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_empty_and_errors():
    y, mean, rstd = gnj.group_norm_forward(jnp.zeros((2, 4, 0)), 2)
    assert y.shape == (2, 4, 0) and bool(jnp.isnan(mean).all()) and bool(jnp.isnan(rstd).all())
    w = jnp.ones(4)
    for shape, axis in (((0, 4, 3), 1), ((0, 3, 4), -1), ((2, 4, 0), 1), ((0, 4), 1)):  # empty, under every transform
        empty = jnp.zeros(shape)

        def f(v, axis=axis):
            return gnj.group_norm(v, 2, w, w, channel_axis=axis)

        assert jax.jvp(f, (empty,), (empty,))[1].shape == shape
        assert jax.jacfwd(jax.grad(lambda v: f(v).sum()))(empty).shape == shape * 2
        assert jax.vmap(lambda v: jax.jvp(f, (v,), (v,))[1])(jnp.zeros((0,) + shape)).shape == (0,) + shape
        assert jax.vmap(f)(jnp.zeros((0,) + shape)).shape == (0,) + shape
        assert jax.grad(lambda v: jax.vmap(f)(v).sum())(jnp.zeros((3,) + shape)).shape == (3,) + shape
    x = data((2, 4, 3), "float32", 12)
    cases = [
        (lambda: gnj.group_norm(x, 3), ValueError, r"num_groups=3 must divide the number of channels \(4\)"),
        (lambda: gnj.group_norm(x, 0), ValueError, "num_groups=0 must be positive"),
        (lambda: gnj.group_norm(x, 2.0), TypeError, "num_groups=2.0 must be an integer"),
        (lambda: gnj.group_norm(x, 2, jnp.ones(3)), ValueError, r"weight has shape \(3,\)"),
        (lambda: gnj.group_norm(x, 2, None, jnp.ones(4, jnp.complex64)), TypeError, "bias has dtype complex64"),
        (lambda: gnj.group_norm(x, 2, eps=-1.0), ValueError, "eps=-1.0 must be non-negative"),
        (lambda: gnj.group_norm(x, 2, activation="relu"), ValueError, "activation='relu' is unknown"),
        (lambda: gnj.group_norm(x, 2, channel_axis=0), ValueError, "channel_axis=0 names the batch axis"),
        (lambda: gnj.group_norm(x.astype(jnp.int32), 2), TypeError, "input has dtype int32"),
        (lambda: gnj.group_norm(jnp.ones(4), 2), ValueError, "it needs at least 2"),
        (lambda: gnj.group_norm([1.0, 2.0], 1), TypeError, "input must be a jax.Array"),
        (lambda: gnj.group_norm_backward(x[:1], x, jnp.zeros((2, 2)), jnp.ones((2, 2)), 2), ValueError,
         "grad_output has shape"),
        (lambda: gnj.group_norm_backward(x, x, jnp.zeros((2, 3)), jnp.ones((2, 2)), 2), ValueError,
         r"mean has shape \(2, 3\)"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    with pytest.raises(TypeError, match="eps"):  # eps is static: a traced eps cannot be a custom call's attribute
        jax.jit(lambda v, e: gnj.group_norm(v, 2, eps=e))(x, 1e-5)


def test_config_reports_the_custom_calls():
    assert gn.config()["jax"] is True and gn.config()["jax_reason"] == ""


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_custom_calls_match_float64(dtype):
    """On a GPU: the CUDA custom calls under jit and grad, and eager groupnorm.group_norm on JAX GPU arrays."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU here")
    if not gn.config()["cuda"]:
        pytest.skip(f"no CUDA backend: {gn.config()['cuda_reason']}")
    x = data((2, 64, 9, 7), dtype, 13, offset=1.0, device=device)
    w, b = data((64,), dtype, 14, device=device), data((64,), dtype, 15, device=device)
    want = group_norm_reference(up(x), 8, up(w), up(b))
    close(jax.jit(lambda v: gnj.group_norm(v, 8, w, b))(x), want, dtype, "jit")
    eager = gn.group_norm(x, 8, w, b)
    assert isinstance(eager, jax.Array) and eager.devices() == {device}
    close(eager, want, dtype, "eager")
    nhwc = jnp.moveaxis(x, 1, -1)
    close(jnp.moveaxis(gn.group_norm(nhwc, 8, w, b, channel_axis=-1), -1, 1), want, dtype, "channels last")
    g = data((2, 64, 9, 7), dtype, 16, device=device)
    dx = jax.grad(lambda v: (gnj.group_norm(v, 8, w, b).astype(jnp.float32) * g.astype(jnp.float32)).sum())(x)
    rx, _, _ = reference_grads(up(x), 8, up(w), up(b), 1e-5, False, up(g))
    assert np.abs(up(dx) - rx).max() / (np.abs(rx).max() + 1) <= 4 * TOLERANCE[dtype]
    y, mean, rstd = gn.group_norm_forward(x, 8, w, b)
    dx2, dw, db = gn.group_norm_backward(g, x, mean, rstd, 8, w)
    assert all(isinstance(t, jax.Array) for t in (y, mean, rstd, dx2, dw, db))
    assert np.abs(up(dx2) - rx).max() / (np.abs(rx).max() + 1) <= 4 * TOLERANCE[dtype]


def test_gpu_path_hands_jax_arrays_to_the_custom_calls(monkeypatch):
    """groupnorm._gpu sends JAX arrays (those in GPU memory, in eager calls) to groupnorm.jax; run here on CPU arrays
    through the same functions, with out= and stream= refused and the error of a build without the custom calls."""
    from groupnorm import _gpu
    monkeypatch.setattr(gnj, "has_cuda", lambda: True)  # as in a build with the CUDA backend
    x = data((2, 8, 5), "float32", 17)
    w = data((8,), "float32", 18)
    want = group_norm_reference(up(x), 4, up(w))
    y = _gpu.group_norm(x, 4, w, None, 1e-5, None, 1, None)
    assert isinstance(y, jax.Array)
    close(y, want, "float32", "y")
    y2, mean, rstd = _gpu.group_norm_forward(x, 4, w, None, 1e-5)
    close(y2, want, "float32", "forward")
    dx, dw, db = _gpu.group_norm_backward(x, x, mean, rstd, 4, w)
    assert dx.shape == x.shape and dw.shape == db.shape == (8,)
    with pytest.raises(ValueError, match="JAX arrays are immutable"):
        _gpu.group_norm(x, 4, w, None, 1e-5, None, 1, x)
    with pytest.raises(ValueError, match="JAX arrays run on XLA's own stream"):
        _gpu.group_norm(x, 4, w, None, 1e-5, None, 1, None, stream=1)
    monkeypatch.setattr(gnj, "has_cuda", lambda: False)
    with pytest.raises(ValueError, match="as a JAX array; this groupnorm build's JAX custom calls are for the CPU"):
        _gpu.group_norm(x, 4, w, None, 1e-5, None, 1, None)
    monkeypatch.setattr(_core, "JAX_BUILD_NOTE", "a reason")
    with pytest.raises(ValueError, match=r"as a JAX array; this groupnorm build has no JAX custom calls \(a reason"):
        _gpu.group_norm(x, 4, w, None, 1e-5, None, 1, None)


def test_a_build_without_the_custom_calls_says_so(monkeypatch):
    monkeypatch.setattr(gnj, "_state", "this groupnorm build has no JAX custom calls (a reason)")
    assert gnj.available() == (False, "this groupnorm build has no JAX custom calls (a reason)")
    assert not gnj.has_cuda()
    for call in (lambda: gnj.group_norm(jnp.ones((2, 4)), 2), lambda: gnj.group_norm_forward(jnp.ones((2, 4)), 2),
                 lambda: gnj.group_norm_backward(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.zeros((2, 2)),
                                                 jnp.ones((2, 2)), 2)):
        with pytest.raises(RuntimeError, match=r"^groupnorm.jax cannot run: this groupnorm build has no JAX custom "
                                               r"calls \(a reason\)"):
            call()


def test_the_custom_calls_check_their_buffers_too():
    """The handlers repeat the checks (a call past groupnorm.jax's own, say through jax.ffi directly, gets an error
    from them, not a crash)."""
    gnj.available()
    x = data((2, 4, 3), "float32", 23)
    empty = jnp.zeros((0,), jnp.float32)
    cases = [
        ((x, jnp.ones(3), empty, 2, True, False), "groupnorm: weight must hold C values of the compute type"),
        ((x, empty, empty, 3, False, False), r"num_groups=3 must be a positive divisor of the channels \(4\)"),
        ((x.astype(jnp.int32), empty, empty, 2, False, False), "the input must be float16, bfloat16, float32"),
    ]
    for (xv, w, b, groups, has_weight, has_bias), message in cases:
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(gnj._ffi_forward(xv, w, b, groups, 1e-5, False, has_weight, has_bias, False))
    y, mean, rstd = gnj._ffi_forward(x, empty, empty, 2, 1e-5, False, False, False, False)
    with pytest.raises(Exception, match="mean and rstd must hold N\\*num_groups values"):
        jax.block_until_ready(gnj._backward_call(x, x, mean[:1], rstd[:1], empty, empty, 2, False, False, False,
                                                 False))
    with pytest.raises(Exception, match="grad_output, input and grad_input must share a dtype"):
        jax.block_until_ready(gnj._backward_call(x.astype(jnp.float16), x, mean, rstd, empty, empty, 2, False, False,
                                                 False, False))
    with pytest.raises(Exception, match="groupnorm: bias must hold C values of the compute type"):
        jax.block_until_ready(gnj._backward_call(x, x, mean, rstd, empty, jnp.ones(3), 2, False, False, True, True))
