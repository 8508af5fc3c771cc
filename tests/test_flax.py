"""groupnorm.flax: drop-ins for flax.linen.GroupNorm and flax.nnx.GroupNorm. Each must hold the same parameters as
Flax's (names, shapes, dtypes, initial values), give Flax's results and gradients (in Flax's result dtype) through
groupnorm's custom calls, and hand what the kernels do not take (a mask, other reduction axes, no batch axis) to
Flax's own code. Runs where flax is installed and groupnorm was built with the JAX custom calls; skips elsewhere.
"""
import numpy as np
import pytest

from groupnorm import _core

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
linen = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

if _core.JAX_BUILD_NOTE != "built":
    pytest.skip(f"this build has no JAX custom calls: {_core.JAX_BUILD_NOTE}", allow_module_level=True)

import groupnorm.flax as gnf  # noqa: E402

# Ours against Flax's, of the largest magnitude of Flax's: float32 rounding, and two units in the last place of
# 16-bit results (both compute in float32 and round once, in different orders).
RTOL = {"float32": 2e-5, "bfloat16": 2.0**-6, "float16": 2.0**-9}


def close(got, want, what, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    got, want = np.asarray(got.astype(jnp.float32), np.float64), np.asarray(want.astype(jnp.float32), np.float64)
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert error <= RTOL[dtype], f"{what}: {error:.3g} of the largest value > {RTOL[dtype]:g}"


def data(shape, dtype, seed):
    values = np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5
    return jnp.asarray(values.astype(np.float32)).astype(dtype)


def perturbed(variables, seed):
    """Parameters away from the initial ones and zeros, which would hide a dropped scale or bias."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [(a + jax.random.normal(k, a.shape)).astype(a.dtype)
                                               for a, k in zip(leaves, keys)])


def custom_calls(function, *args):
    """How many of groupnorm's forward custom calls function's jaxpr holds."""
    return str(jax.make_jaxpr(function)(*args)).count("groupnorm_forward")


LINEN_CASES = [  # (input shape, input dtype, module fields)
    ((2, 5, 7, 64), "float32", {"num_groups": 8}),
    ((2, 5, 7, 64), "bfloat16", {"num_groups": 32}),
    ((3, 11, 24), "float16", {"num_groups": None, "group_size": 4, "epsilon": 1e-3}),
    ((4, 48), "float32", {"num_groups": 6, "use_bias": False}),
    ((2, 3, 4, 5, 16), "float32", {"num_groups": 4, "use_scale": False}),
    ((2, 6, 6, 32), "bfloat16", {"num_groups": 8, "param_dtype": jnp.bfloat16}),
    ((2, 6, 6, 32), "float32", {"num_groups": 8, "dtype": jnp.bfloat16}),
    ((2, 6, 6, 32), "float32", {"num_groups": 8, "reduction_axes": (1, 2, 3)}),
]


@pytest.mark.parametrize("shape, dtype, fields", LINEN_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_linen_matches_flax(shape, dtype, fields):
    """Same parameter tree and initial values as flax.linen.GroupNorm, then the same output, gradients and jax.jvp
    tangents (of the parameters and of the input) with other parameter values, through one forward custom call."""
    x = data(shape, dtype, 1)
    theirs, ours = linen.GroupNorm(**fields), gnf.GroupNorm(**fields)
    initial = theirs.init(jax.random.key(0), x)
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(initial)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(initial)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    variables = perturbed(initial, 2)
    close(ours.apply(variables, x), theirs.apply(variables, x), "output", str(jnp.dtype(fields.get("dtype", x.dtype))))
    assert custom_calls(lambda x: ours.apply(variables, x), x) == 1

    def loss(module):
        return lambda v, x: (module.apply(v, x).astype(jnp.float32) * data(shape, "float32", 3)).sum()

    mine, want = (jax.jit(jax.grad(loss(m), argnums=(0, 1)))(variables, x) for m in (ours, theirs))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(mine), jax.tree_util.tree_leaves(want)):
        close(a, b, f"gradient {jax.tree_util.keystr(path)}", str(b.dtype) if b.dtype != jnp.float64 else "float32")

    tangents = (perturbed(variables, 4), data(shape, dtype, 5))  # forward mode, in the parameters and the input
    mine, want = (jax.jit(lambda v, x, m=m: jax.jvp(m.apply, (v, x), tangents)[1])(variables, x)
                  for m in (ours, theirs))
    close(mine, want, "tangent", str(jnp.dtype(fields.get("dtype", x.dtype))))


def test_linen_under_jit_and_vmap():
    """The module's apply under jit, and vmapped over a leading axis (a batch of batches), as Flax's."""
    x = data((3, 2, 4, 4, 16), "float32", 4)
    theirs, ours = linen.GroupNorm(num_groups=4), gnf.GroupNorm(num_groups=4)
    variables = perturbed(theirs.init(jax.random.key(0), x[0]), 5)
    for transform in (jax.jit, lambda f: jax.jit(jax.vmap(f))):
        if transform is jax.jit:
            got = transform(lambda x: ours.apply(variables, x))(x[0])
            want = theirs.apply(variables, x[0])
        else:
            got = transform(lambda x: ours.apply(variables, x))(x)
            want = jax.vmap(lambda x: theirs.apply(variables, x))(x)
        close(got, want, "output", "float32")


@pytest.mark.parametrize("call", ["mask", "reduction_axes", "no_batch_axis", "integer_input"])
def test_linen_hands_other_calls_to_flax(call):
    """What the kernels do not take runs Flax's own code: the results are Flax's exactly, with no custom call."""
    x = data((2, 4, 4, 16), "float32", 6)
    fields, kwargs = {"num_groups": 4}, {}
    if call == "mask":
        kwargs["mask"] = jnp.asarray(np.random.default_rng(7).random(x.shape) > 0.3)
    elif call == "reduction_axes":
        fields["reduction_axes"] = (2, 3)
    elif call == "no_batch_axis":
        x = x[0, 0, 0]
    else:
        x = jnp.asarray(np.arange(2 * 4 * 4 * 16).reshape(2, 4, 4, 16) % 7)
    theirs, ours = linen.GroupNorm(**fields), gnf.GroupNorm(**fields)
    variables = perturbed(theirs.init(jax.random.key(0), x, **kwargs), 8)
    got, want = ours.apply(variables, x, **kwargs), theirs.apply(variables, x, **kwargs)
    assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
    assert custom_calls(lambda x: ours.apply(variables, x, **kwargs), x) == 0


@pytest.mark.parametrize("fields, message", [
    ({"num_groups": 5}, r"Number of groups \(5\) does not divide the number of channels \(16\)"),
    ({"num_groups": None, "group_size": 3}, r"Number of channels \(16\) is not multiple of the group size \(3\)"),
    ({"num_groups": 4, "group_size": 4}, "Either `num_groups` or `group_size` should be specified"),
])
def test_linen_refuses_what_flax_refuses(fields, message):
    x = data((2, 3, 16), "float32", 9)
    for module in (linen.GroupNorm(**fields), gnf.GroupNorm(**fields)):
        with pytest.raises(ValueError, match=message):
            module.init(jax.random.key(0), x)


NNX_CASES = [  # (input shape, input dtype, constructor keywords)
    ((2, 5, 7, 64), "float32", {"num_groups": 8}),
    ((2, 5, 7, 64), "bfloat16", {"num_groups": 16}),
    ((3, 11, 24), "float16", {"num_groups": None, "group_size": 4, "epsilon": 1e-3, "use_bias": False}),
    ((2, 6, 6, 32), "bfloat16", {"num_groups": 8, "dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}),
    ((2, 6, 6, 32), "float32", {"num_groups": 8, "use_scale": False}),
]


@pytest.mark.parametrize("shape, dtype, keywords", NNX_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_nnx_matches_flax(shape, dtype, keywords):
    """Same state as flax.nnx.GroupNorm built with the same seed, then the same output and gradients with other
    parameter values."""
    x = data(shape, dtype, 10)
    theirs = nnx.GroupNorm(shape[-1], rngs=nnx.Rngs(0), **keywords)
    ours = gnf.NnxGroupNorm(shape[-1], rngs=nnx.Rngs(0), **keywords)
    mine, initial = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
    assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(initial)
    values = perturbed(initial, 11)
    nnx.update(theirs, values)
    nnx.update(ours, values)
    out_dtype = str(theirs(x).dtype)
    close(ours(x), theirs(x), "output", out_dtype)
    assert custom_calls(lambda x: ours(x), x) == 1

    cotangent = data(shape, "float32", 12)

    def loss(module, x):
        return (module(x).astype(jnp.float32) * cotangent).sum()

    (mine, mine_x), (want, want_x) = (nnx.jit(nnx.grad(loss, argnums=(0, 1)))(module, x) for module in (ours, theirs))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(mine, nnx.Param)),
                            jax.tree_util.tree_leaves(nnx.state(want, nnx.Param))):
        close(a, b, f"gradient {jax.tree_util.keystr(path)}", out_dtype)
    close(mine_x, want_x, "gradient of the input", dtype)


def test_nnx_hands_a_mask_to_flax():
    x = data((2, 4, 4, 16), "float32", 13)
    mask = jnp.asarray(np.random.default_rng(14).random(x.shape) > 0.3)
    theirs = nnx.GroupNorm(16, num_groups=4, rngs=nnx.Rngs(0))
    ours = gnf.NnxGroupNorm(16, num_groups=4, rngs=nnx.Rngs(0))
    assert np.array_equal(np.asarray(ours(x, mask=mask)), np.asarray(theirs(x, mask=mask)))
    assert custom_calls(lambda x: ours(x, mask=mask), x) == 0
