"""groupnorm.torch.convert_group_norms: torch.nn.GroupNorm modules replaced in place by groupnorm.torch.GroupNorm,
with the same Parameter objects, state_dict, training mode and hooks, and (fuse_silu) GroupNorm -> SiLU pairs of a
plain Sequential fused; a model's outputs, gradients and a few optimizer steps agree with the unconverted model's.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import groupnorm.torch as gnt  # noqa: E402


class GroupNorm32(torch.nn.GroupNorm):
    """A subclass with its own forward (guided-diffusion's): the converter must leave it alone."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class Block(torch.nn.Module):
    """GroupNorm held as an attribute and called by forward, then an activation called separately."""

    def __init__(self, channels):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, channels, eps=1e-3)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.nn.functional.silu(self.norm(x)))


def make_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.GroupNorm(4, 16),
        torch.nn.SiLU(),
        Block(16),
        torch.nn.Sequential(torch.nn.GroupNorm(8, 16, affine=False), torch.nn.SiLU(inplace=True)),
        GroupNorm32(2, 16),
        torch.nn.GroupNorm(16, 16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 4, 1),
    )
    with torch.no_grad():  # parameters away from ones and zeros, so that sharing them is visible in the results
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def group_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]


def assert_close(mine, theirs, what):
    scale = max(float(theirs.detach().abs().max()), 1.0)
    np.testing.assert_allclose(mine.detach().numpy(), theirs.detach().numpy(), rtol=0, atol=1e-5 * scale,
                               err_msg=what)


@pytest.mark.parametrize("fuse_silu", [False, True])
def test_model_outputs_gradients_and_training_match(fuse_silu):
    reference = make_model()
    model = copy.deepcopy(reference)
    params_before = dict(model.named_parameters())
    values_before = {name: param.detach().clone() for name, param in params_before.items()}
    keys_before = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion, on purpose
    assert gnt.convert_group_norms(model, fuse_silu=fuse_silu) is model

    replaced = [m for m in model.modules() if type(m) is gnt.GroupNorm]
    assert len(replaced) == 4 and sum(type(m) is GroupNorm32 for m in model.modules()) == 1
    assert not any(type(m) is torch.nn.GroupNorm for m in model.modules())
    fused = [m for m in replaced if m.activation == "silu"]
    assert len(fused) == (2 if fuse_silu else 0)  # model[1]+model[2] and model[4]; Block's SiLU is a call
    assert (type(model[2]) is torch.nn.Identity) == fuse_silu and (type(model[4][1]) is torch.nn.Identity) == fuse_silu
    assert model[3].norm.eps == 1e-3 and model[4][0].affine is False and model[4][0].weight is None
    assert dict(model.named_parameters()) == params_before  # the very same Parameter objects
    assert list(model.state_dict()) == keys_before

    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    target = torch.from_numpy(rng.standard_normal((4, 4, 8, 8)).astype(np.float32))
    for step in range(3):
        outputs = {}
        for name, net, opt in (("torch", reference, reference_optimizer), ("groupnorm", model, optimizer)):
            opt.zero_grad()
            y = net(x)
            torch.nn.functional.mse_loss(y, target).backward()
            outputs[name] = (y, {n: p.grad.clone() for n, p in net.named_parameters()})
            opt.step()
        assert_close(outputs["groupnorm"][0], outputs["torch"][0], f"output, step {step}")
        for n, grad in outputs["torch"][1].items():
            assert_close(outputs["groupnorm"][1][n], grad, f"gradient of {n}, step {step}")
    for (n, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert_close(mine, theirs, f"{n} after 3 steps")
    assert not torch.equal(model[1].weight, values_before["1.weight"]), "the steps did not train the GroupNorm"


def test_a_group_norm_itself_is_replaced_and_the_rest_stays():
    norm = torch.nn.GroupNorm(2, 6, eps=1e-4).eval()
    new = gnt.convert_group_norms(norm)
    assert type(new) is gnt.GroupNorm and new is not norm
    assert new.weight is norm.weight and new.bias is norm.bias and new.eps == 1e-4 and not new.training
    assert repr(new) == repr(norm)
    subclass = GroupNorm32(2, 6)
    assert gnt.convert_group_norms(subclass) is subclass
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got ndarray"):
        gnt.convert_group_norms(np.zeros(3))


def test_hooks_move_with_the_module_and_block_fusion():
    model = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU(), torch.nn.GroupNorm(2, 4),
                                torch.nn.SiLU())
    seen = []
    handle = model[0].register_forward_hook(lambda module, args, output: seen.append(type(module)))
    model[2].register_full_backward_hook(lambda module, grad_input, grad_output: seen.append("backward"))
    model[3].register_forward_pre_hook(lambda module, args: None)
    gnt.convert_group_norms(model, fuse_silu=True)
    assert [type(m) for m in model] == [gnt.GroupNorm, torch.nn.SiLU, gnt.GroupNorm, torch.nn.SiLU]
    assert model[0].activation is None and model[2].activation is None  # a hook on either side keeps the pair
    x = torch.ones(2, 4, 3, requires_grad=True)
    model(x).sum().backward()
    assert seen == [gnt.GroupNorm, "backward"]
    handle.remove()  # the handle still reaches the hook table, now the replacement's
    model(x)
    assert seen == [gnt.GroupNorm, "backward"]


def test_a_shared_module_gets_one_replacement_and_is_not_fused():
    shared = torch.nn.GroupNorm(2, 4)
    model = torch.nn.Sequential(shared, torch.nn.SiLU(), shared)
    gnt.convert_group_norms(model, fuse_silu=True)
    assert model[0] is model[2] and type(model[0]) is gnt.GroupNorm and model[0].activation is None
    assert type(model[1]) is torch.nn.SiLU


def test_eval_mode_and_no_grad_inference_follow():
    model = make_model().eval()
    reference = copy.deepcopy(model)
    gnt.convert_group_norms(model, fuse_silu=True)
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, expected = model(x), reference(x)
    assert_close(y, expected, "eval output")
