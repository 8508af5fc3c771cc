"""groupnorm.torch under torch.onnx.export, both exporters (TorchScript's tracer, dynamo=False, and torch.export's,
dynamo=True): an ONNX graph cannot call groupnorm's kernels, so while exporting groupnorm.torch calls torch's own
group_norm (and silu), whose ONNX translations ONNX Runtime runs. The exported model must compute what the
eager module computes, at other batch sizes than the traced one, and hold no operator of groupnorm's.
"""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import groupnorm.torch as gnt  # noqa: E402

if getattr(gnt, "_ops", None) is None:
    pytest.skip("this torch has no torch.library.register_fake (torch < 2.4)", allow_module_level=True)

EXPORTERS = ["torchscript", "dynamo"]


class Model(torch.nn.Module):
    """conv -> GroupNorm + SiLU (fused) -> conv -> GroupNorm without bias -> the functional call without parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.norm1 = gnt.GroupNorm(2, 8, activation="silu")
        self.conv2 = torch.nn.Conv2d(8, 12, kernel_size=1)
        self.norm2 = gnt.GroupNorm(3, 12, eps=1e-3, bias=False)

    def forward(self, x):
        y = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return gnt.group_norm(y, 4, activation="silu")


def seeded_model(seed):
    torch.manual_seed(seed)
    model = Model().eval()
    with torch.no_grad():
        for param in model.parameters():  # not GroupNorm's ones and zeros, which would hide a dropped weight or bias
            param.uniform_(-1.5, 1.5)
    return model


def export(model, x, path, exporter):
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True; the dynamo exporter may warn about
        # what it cannot check. Neither concerns groupnorm.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript")
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session, x):
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return y


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exported_model_matches_the_eager_module(exporter, tmp_path):
    """ONNX Runtime's result from the exported model is the eager result (groupnorm's kernels) to float32 rounding,
    at the traced batch size and at others, and the graph holds only standard ONNX operators."""
    rng = np.random.default_rng(5)
    model = seeded_model(5)
    session = export(model, torch.randn(2, 3, 7, 9), tmp_path / "model.onnx", exporter)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {node.domain for node in graph.node}
    for batch in (2, 1, 5):
        x = torch.from_numpy(rng.standard_normal((batch, 3, 7, 9)).astype(np.float32) * 3 + 1)
        with torch.no_grad():
            expected = model(x).numpy()
        actual = run(session, x)
        assert actual.shape == expected.shape
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        assert error < 1e-5, (batch, error)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_leaves_eager_calls_on_the_kernels(exporter, tmp_path, monkeypatch):
    """The fallback is for the export only: the eager calls before and after it run groupnorm's kernels."""
    model = seeded_model(6)
    x = torch.randn(2, 3, 5, 5)
    calls = []
    real = gnt._core.group_norm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gnt._core, "group_norm", counted)
    with torch.no_grad():
        before = model(x)
    assert len(calls) == 3
    export(model, x, tmp_path / "model.onnx", exporter)
    calls.clear()
    with torch.no_grad():
        after = model(x)
    assert len(calls) == 3
    assert torch.equal(before, after)


def test_export_checks_the_activation(tmp_path):
    """An unknown activation is refused while exporting as it is in an eager call."""
    class Bad(torch.nn.Module):
        def forward(self, x):
            return gnt.group_norm(x, 2, activation="gelu")

    with pytest.raises(ValueError, match="activation"):
        export(Bad(), torch.randn(2, 4, 3), tmp_path / "bad.onnx", "torchscript")


# torch 2.13's own deprecation, raised inside ExportedProgram.run_decompositions (its deepcopy of a pytree spec).
LEAFSPEC_WARNING = "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"


@pytest.mark.filterwarnings(LEAFSPEC_WARNING)
@pytest.mark.parametrize("table", ["groupnorm only", "core ATen too"])
def test_exported_program_converts_after_decomposition(table, tmp_path):
    """An ExportedProgram that recorded groupnorm's operator (torch.export of the model itself) holds none after
    run_decompositions(gnt.decompositions()), computes the eager result, and torch.onnx.export converts it; ONNX
    Runtime then matches the eager module at batch sizes other than the traced one."""
    pytest.importorskip("onnxscript")
    model = seeded_model(7)
    x = torch.randn(2, 3, 7, 9)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    assert any("groupnorm" in str(node.target) for node in program.graph.nodes)
    decompositions = gnt.decompositions()
    if table == "core ATen too":
        merged = torch.export.default_decompositions()
        merged.update(decompositions)
        decompositions = merged
    program = program.run_decompositions(decompositions)
    assert not any("groupnorm" in str(node.target) for node in program.graph.nodes)
    rng = np.random.default_rng(7)
    inputs = [torch.from_numpy(rng.standard_normal((batch, 3, 7, 9)).astype(np.float32) * 3 + 1) for batch in (2, 5)]
    with torch.no_grad():
        expected = [model(x).numpy() for x in inputs]
        for x, want in zip(inputs, expected):
            got = program.module()(x).numpy()
            assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, (x,), str(tmp_path / "program.onnx"), dynamo=True, input_names=["x"],
                          output_names=["y"])
    session = onnxruntime.InferenceSession(str(tmp_path / "program.onnx"), providers=["CPUExecutionProvider"])
    for x, want in zip(inputs, expected):
        got = run(session, x)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
