"""Peer comparison: ``python -m groupnorm.bench`` times groupnorm against every peer installed here.

Peers (each only if importable): torch.nn.functional.group_norm (NCHW and channels_last, forward and
forward+backward), ONNX Runtime's GroupNormalization (opset 21), a JAX function, Flax's GroupNorm module
(nnx, else linen; channels-last and 2-D inputs, its native layout), groupnorm.jax (groupnorm's kernels as JAX
custom calls, where the build has them) and a NumPy reference. All run in one
process, interleaved round by round with the same thread count; each figure is the median over rounds of
(time of a batch of k calls) / k, k calibrated so a batch lasts >= ``--min-batch-ms``. The copy floor is
np.copyto of the input's bytes into a preallocated buffer (half a page from the input modulo 4 KiB, so free of 4K
aliasing), timed in the same rounds. float16 and bfloat16 (ml_dtypes) data is drawn in float64 and rounded;
every peer gets the same rounded weight and bias, groupnorm as float32 (its parameter type), the others in the
input's dtype (Flax as float32 parameters). A peer that
cannot run a case (a layout, a dtype or a pass it lacks) is absent from that row, with the reason in the JSON.
The timing and machine helpers here are shared with bench/bench_forward.py. torch, onnxruntime, jax, flax,
tqdm and matplotlib are imported only when used.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

# (shape, num_groups): the case list; every 4-D case can also run channels-last.
CASE_SPECS = [
    ((4, 256, 28, 28), 32),
    ((2, 512, 14, 14), 32),
    ((1, 64, 32, 32), 8),
    ((1, 320, 64, 64), 32),
    ((1, 128, 256, 256), 32),
    ((8, 64, 4096), 16),
    ((1, 256, 56, 56), 1),
    ((1, 256, 56, 56), 256),
    ((16, 32), 4),
]
# --quick: tiny cases that still cover both layouts, a 3-D shape and the 2-D one.
QUICK_SPECS = [
    ((2, 32, 8, 8), 8),
    ((2, 16, 64), 4),
    ((16, 32), 4),
]
EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------
# Shared helpers (also used by bench/bench_forward.py and bench/bench_training.py)

def case_id_of(shape, num_groups) -> str:
    """The case name used on the command line and in the table, e.g. '4x256x28x28-g32'."""
    return "x".join(str(d) for d in shape) + f"-g{num_groups}"


def contiguous_layout_name(ndim: int) -> str:
    """NC, NCL, NCHW, NCDHW for a contiguous array of this rank."""
    return {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}.get(ndim, f"contig{ndim}d")


def all_case_specs(case_specs=CASE_SPECS) -> list:
    """(case_id, shape, num_groups, layout) for every case, channels-last after each 4-D one."""
    specs = []
    for shape, num_groups in case_specs:
        layouts = [contiguous_layout_name(len(shape))] + (["NHWC"] if len(shape) == 4 else [])
        for layout in layouts:
            specs.append((case_id_of(shape, num_groups), shape, num_groups, layout))
    return specs


def time_batch_ns(fn, k: int) -> int:
    """Wall time in ns of k back-to-back calls of fn."""
    loop = range(k)
    start = time.perf_counter_ns()
    for _ in loop:
        fn()
    return time.perf_counter_ns() - start


SETTLE_SECONDS = 0.002  # idle time before each timed batch of the peer comparison


def settled_batch_ns(fn, k: int) -> int:
    """time_batch_ns after the other runtimes' thread pools have settled: a short sleep lets a pool that spins
    after its last call (JAX's XLA, ONNX Runtime's) go idle, and one untimed call wakes fn's own threads, so no
    contender is timed against another's spinning threads."""
    time.sleep(SETTLE_SECONDS)
    fn()
    return time_batch_ns(fn, k)


def copy_destination_for(source):
    """An empty array shaped like `source` (C-contiguous) whose data starts half a page from source's modulo
    4 KiB: the copy floor's destination. A buffer allocated just after its source tends to start a few bytes
    past it modulo 4 KiB (and 1 MiB), where each load waits on the store before it ("4K aliasing"): np.copyto
    of [8,64,4096] float16 took 1.5x as long into such a buffer. The floor is the copy at its best."""
    raw = np.empty(source.nbytes + 4096, np.uint8)
    start = (source.ctypes.data + 2048 - raw.ctypes.data) % 4096
    return raw[start:start + source.nbytes].view(source.dtype).reshape(source.shape)


def calibrate(fn, min_batch_ns: int) -> int:
    """The smallest k (roughly) for which a batch of k calls takes at least min_batch_ns."""
    fn()
    fn()
    k = 1
    while True:
        elapsed = time_batch_ns(fn, k)
        if elapsed >= min_batch_ns:
            return k
        grow = min_batch_ns / max(elapsed, 1) * 1.2
        k = max(k + 1, int(math.ceil(k * min(grow, 100.0))))


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def cpu_model() -> str:
    """The CPU model name from lscpu, falling back to platform.processor()."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def loaded_openmp_runtimes() -> list:
    """Paths of the OpenMP runtimes mapped into this process (Linux); two of them would oversubscribe."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    return sorted(p for p in paths if os.path.basename(p).startswith(names))


# ---------------------------------------------------------------------------------------------------------
# Peers: each binds, for one case, a forward callable and (where it can) a forward+backward callable
# ("train"); "check", where given, returns the forward's result as an (N, C, *) array for the sanity check.
# A peer that cannot run a case raises Unsupported with the reason; NO_BACKWARD says why a peer has no "train".

HALF_DTYPES = ("float16", "bfloat16")


class Unsupported(Exception):
    """A peer cannot run this case (its layout, dtype or shape); the message says why."""


def _installed(*modules) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a --dtype name (bfloat16: ml_dtypes')."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The parameter and arithmetic type for data of `dtype`: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


class CaseData:
    """The arrays of one case: x in its layout (an (N, C, *) view), weight and bias in x's dtype and in the compute
    dtype (the same values), dy, and a float64 reference."""

    def __init__(self, case_id, shape, num_groups, layout, dtype, rng):
        self.case_id, self.shape, self.num_groups, self.layout = case_id, tuple(shape), num_groups, layout
        x_nchw = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
        if layout == "NHWC":
            self.storage = np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))
            self.x = np.moveaxis(self.storage, -1, 1)
        else:
            self.storage = x_nchw
            self.x = x_nchw
        channels = shape[1]
        self.weight = rng.standard_normal(channels).astype(dtype)
        self.bias = rng.standard_normal(channels).astype(dtype)
        compute = compute_dtype(self.x.dtype)
        self.weight_compute, self.bias_compute = self.weight.astype(compute), self.bias.astype(compute)
        self.dy = np.empty_like(self.x)
        self.dy[...] = rng.standard_normal(shape).astype(dtype)
        self.reference = numpy_group_norm(self.x.astype(np.float64), num_groups, self.weight.astype(np.float64),
                                          self.bias.astype(np.float64))

    @property
    def name(self) -> str:
        return f"{self.case_id}:{self.layout.lower()}"

    @property
    def dtype_name(self) -> str:
        return self.x.dtype.name

    def channels_last_storage(self, array: np.ndarray) -> np.ndarray:
        """An (N, C, *) array of this case as contiguous (N, *, C) memory."""
        return np.ascontiguousarray(np.moveaxis(array, 1, -1))


def numpy_group_norm(x, num_groups, weight, bias, eps=EPS):
    """The NumPy reference: torch.nn.functional.group_norm's definition, in the input's dtype."""
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, -1)
    mean = grouped.mean(axis=-1, keepdims=True)
    var = grouped.var(axis=-1, keepdims=True)
    normed = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape)
    extra = (1,) * (x.ndim - 2)
    return normed * weight.reshape(c, *extra) + bias.reshape(c, *extra)


def bind_groupnorm(case: CaseData, threads: int) -> dict:
    import groupnorm as gn

    out = np.empty_like(case.x)
    weight, bias = case.weight_compute, case.bias_compute

    def train():
        _y, mean, rstd = gn.group_norm_forward(case.x, case.num_groups, weight, bias, EPS)
        gn.group_norm_backward(case.dy, case.x, mean, rstd, case.num_groups, weight)

    return {"forward": lambda: gn.group_norm(case.x, case.num_groups, weight, bias, EPS, out=out),
            "train": train}


def bind_numpy(case: CaseData, threads: int) -> dict:
    if case.dtype_name not in HALF_DTYPES:
        return {"forward": lambda: numpy_group_norm(case.x, case.num_groups, case.weight, case.bias)}

    def forward():  # 16-bit data computes in float32, as torch and groupnorm do
        x = case.x.astype(np.float32)
        y = numpy_group_norm(x, case.num_groups, case.weight_compute, case.bias_compute)
        return y.astype(case.x.dtype)

    return {"forward": forward}


def torch_view(array: np.ndarray):
    """A tensor on array's memory with its strides (bfloat16 by its bits: groupnorm._dlpack.as_torch)."""
    import torch  # noqa: F401  (as_torch finds it in sys.modules)

    from . import _dlpack
    return _dlpack.as_torch(array)


def bind_torch(case: CaseData, threads: int) -> dict:
    import torch
    import torch.nn.functional as functional

    x = torch_view(case.x)
    if case.layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch_view(case.weight), torch_view(case.bias)
    dy = torch_view(case.dy)
    if case.layout == "NHWC":
        dy = dy.contiguous(memory_format=torch.channels_last)
    x_grad = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    weight_grad = weight.detach().clone().requires_grad_(True)
    bias_grad = bias.detach().clone().requires_grad_(True)

    def forward():  # no input requires grad, so autograd records nothing
        return functional.group_norm(x, case.num_groups, weight, bias, EPS)

    def train():
        x_grad.grad = weight_grad.grad = bias_grad.grad = None
        y = functional.group_norm(x_grad, case.num_groups, weight_grad, bias_grad, EPS)
        y.backward(dy)

    return {"forward": forward, "check": lambda: forward().to(torch.float64).numpy(), "train": train}


def bind_onnxruntime(case: CaseData, threads: int) -> dict:
    if case.layout == "NHWC":
        raise Unsupported("GroupNormalization takes (N, C, *) contiguous tensors only")
    import onnxruntime
    from onnx import TensorProto, helper
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE, "float16": TensorProto.FLOAT16,
            "bfloat16": TensorProto.BFLOAT16}[case.dtype_name]
    shape = list(case.shape)
    node = helper.make_node("GroupNormalization", ["X", "scale", "bias"], ["Y"], num_groups=case.num_groups,
                            epsilon=EPS)
    graph = helper.make_graph([node], "group_norm",
                              [helper.make_tensor_value_info("X", elem, shape),
                               helper.make_tensor_value_info("scale", elem, [shape[1]]),
                               helper.make_tensor_value_info("bias", elem, [shape[1]])],
                              [helper.make_tensor_value_info("Y", elem, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's pool spins after each run by default, holding both cores for whoever is timed next (groupnorm
    # measured 5-50x slower right after it); its threads block instead, as OpenMP's and NumPy's do.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
    except OrtNotImplemented as error:  # e.g. no CPU kernel for an operator of the expanded function in bfloat16
        raise Unsupported(f"{case.dtype_name}: {error}") from None
    feeds = {"X": case.x, "scale": case.weight, "bias": case.bias}
    return {"forward": lambda: session.run(None, feeds)[0]}


def _jax_inputs(case: CaseData, channels_last: bool):
    """x and dy as JAX arrays, in channels-last (N, *, C) memory if asked, else (N, C, *)."""
    import jax
    import jax.numpy as jnp

    if case.x.dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        raise Unsupported("float64: JAX computes in float32 unless jax_enable_x64 is set at startup")
    if channels_last:
        return jnp.asarray(case.channels_last_storage(case.x)), jnp.asarray(case.channels_last_storage(case.dy))
    return jnp.asarray(case.x), jnp.asarray(case.dy)


def _bind_jax_function(forward, channels_last: bool, x, params, dy) -> dict:
    """forward(x, params) as jitted forward, forward+backward (the vjp in x and params) and check callables."""
    import jax

    forward = jax.jit(forward)

    @jax.jit
    def train(x, params, dy):
        _y, vjp = jax.vjp(forward, x, params)
        return vjp(dy)

    def check():
        y = np.asarray(forward(x, params))
        return np.moveaxis(y, -1, 1) if channels_last else y

    return {"forward": lambda: forward(x, params).block_until_ready(), "check": check,
            "train": lambda: jax.block_until_ready(train(x, params, dy))}


def bind_jax(case: CaseData, threads: int) -> dict:
    import jax
    import jax.numpy as jnp

    channels_last = case.layout == "NHWC"
    x, dy = _jax_inputs(case, channels_last)
    num_groups = case.num_groups

    def group_norm(x, params):
        weight, bias = params
        dtype = x.dtype  # 16-bit data computes in float32, as torch and groupnorm do
        x = x.astype(jnp.promote_types(dtype, jnp.float32))
        if channels_last:
            x = jnp.moveaxis(x, -1, 1)
        n, c = x.shape[:2]
        grouped = x.reshape(n, num_groups, -1)
        mean = grouped.mean(axis=-1, keepdims=True)
        var = grouped.var(axis=-1, keepdims=True)
        extra = (1,) * (x.ndim - 2)
        y = ((grouped - mean) * jax.lax.rsqrt(var + EPS)).reshape(x.shape)
        y = y * weight.reshape(c, *extra) + bias.reshape(c, *extra)
        return (jnp.moveaxis(y, 1, -1) if channels_last else y).astype(dtype)

    return _bind_jax_function(group_norm, channels_last, x, (jnp.asarray(case.weight), jnp.asarray(case.bias)), dy)


def bind_groupnorm_jax(case: CaseData, threads: int) -> dict:
    """groupnorm.jax: groupnorm's kernels as JAX custom calls, jitted as the other JAX peers are (the thread count
    is groupnorm's, which set_threads sets)."""
    import jax.numpy as jnp

    import groupnorm.jax as gnj

    usable, reason = gnj.available()
    if not usable:
        raise Unsupported(reason)
    channels_last = case.layout == "NHWC" and case.x.ndim > 2
    x, dy = _jax_inputs(case, channels_last)
    axis = -1 if channels_last else 1

    def group_norm(x, params):
        weight, bias = params
        return gnj.group_norm(x, case.num_groups, weight, bias, EPS, channel_axis=axis)

    return _bind_jax_function(group_norm, channels_last, x, (jnp.asarray(case.weight), jnp.asarray(case.bias)), dy)


def flax_api() -> str:
    """"nnx" where the installed flax has it (this imports flax), else "linen"."""
    return "nnx" if importlib.util.find_spec("flax.nnx") is not None else "linen"


def flax_group_norm(case: CaseData, api=None):
    """Flax's GroupNorm for this case as (api, params, apply(x, params)); api is "nnx" (preferred) or "linen",
    whichever the installed flax has unless asked. Its parameters are float32 holding the case's weight and bias;
    the input's dtype is the computation's (Flax takes the statistics in float32)."""
    import jax
    import jax.numpy as jnp

    api = api or flax_api()

    def constant(values):
        return lambda _key, shape, dtype=jnp.float32: jnp.asarray(values, dtype).reshape(shape)

    settings = {"num_groups": case.num_groups, "epsilon": EPS, "dtype": jnp.dtype(case.x.dtype),
                "param_dtype": jnp.float32, "scale_init": constant(case.weight_compute),
                "bias_init": constant(case.bias_compute)}
    if api == "nnx":
        from flax import nnx

        graphdef, params = nnx.split(nnx.GroupNorm(case.shape[1], rngs=nnx.Rngs(0), **settings))
        return api, params, lambda x, params: nnx.merge(graphdef, params)(x)
    from flax import linen

    module = linen.GroupNorm(**settings)
    sample = jnp.zeros((1,) + tuple(case.shape[2:]) + (case.shape[1],), case.x.dtype)
    return api, module.init(jax.random.key(0), sample), lambda x, params: module.apply(params, x)


def bind_flax(case: CaseData, threads: int) -> dict:
    if case.layout != "NHWC" and case.x.ndim > 2:
        raise Unsupported(f"Flax's GroupNorm takes channels-last (N, *, C) input; {case.layout} would add "
                          "transposes")
    channels_last = case.x.ndim > 2
    x, dy = _jax_inputs(case, channels_last)
    _api, params, apply = flax_group_norm(case)
    return _bind_jax_function(apply, channels_last, x, params, dy)


# name -> (modules it needs, binder); groupnorm always runs, the rest only where installed.
PEERS = {
    "groupnorm": ((), bind_groupnorm),
    "torch": (("torch",), bind_torch),
    "onnxruntime": (("onnxruntime", "onnx"), bind_onnxruntime),
    "jax": (("jax",), bind_jax),
    "flax": (("flax", "jax"), bind_flax),
    "groupnorm.jax": (("jax",), bind_groupnorm_jax),
    "numpy": ((), bind_numpy),
}
# Why a peer has no forward+backward ("train") figure.
NO_BACKWARD = {
    "onnxruntime": "an inference runtime: GroupNormalization has no gradient here",
    "numpy": "the NumPy reference has no backward",
}
# Sanity check of each forward against the float64 reference, relative to max(1, max |reference|); float64 is
# loose because ONNX's epsilon attribute is a float32 (1e-5 becomes 9.99999975e-06); the 16-bit types allow
# about two ulps of the largest outputs.
TOLERANCE = {"float32": 1e-4, "float64": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
PASSES = ("forward", "train")  # train = forward + backward
# Minimal bytes of a pass over the input's size in bytes: forward reads x and writes y; train adds reading x
# and dy and writing dx. The copy floor of a pass is that many bytes' worth of np.copyto (2 per copy).
PASS_TRAFFIC = {"forward": 2, "train": 5}


def available_peers(requested=None) -> list:
    names = [name for name, (modules, _bind) in PEERS.items() if _installed(*modules)]
    if requested:
        unknown = [r for r in requested if r not in PEERS]
        if unknown:
            raise SystemExit(f"--peers: unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
        names = [n for n in names if n in requested or n == "groupnorm"]
    return names


def set_threads(peers: list, threads: int) -> None:
    """The same thread count for everyone who can be told (ONNX Runtime gets it per session)."""
    import groupnorm as gn

    gn.set_num_threads(threads)
    if "torch" in peers:
        import torch

        torch.set_num_threads(threads)


def peer_versions(peers: list) -> dict:
    """The installed version of groupnorm, NumPy and each peer, read from package metadata (no import)."""
    versions = {}
    for name in ["groupnorm", "numpy"] + [p for p in peers if p not in ("groupnorm", "numpy")]:
        try:
            versions[name] = importlib.metadata.version(name.split(".")[0])  # groupnorm.jax: groupnorm's
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    if "flax" in peers:
        versions["flax"] += f" ({flax_api()})"
    return versions


# ---------------------------------------------------------------------------------------------------------
# Running

class Progress:
    """tqdm if installed, else a plain bar on stderr; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self._bar = total, 0, enabled, None
        if enabled and _installed("tqdm"):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False)

    def update(self, text: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def check_forward(case: CaseData, fn) -> float:
    """Max |y - reference| / max(1, max |reference|) of one forward call."""
    y = np.asarray(fn()).astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(case.reference))))
    return float(np.max(np.abs(y - case.reference))) / scale


def run(args) -> dict:
    """Build the cases, bind every peer, time them in interleaved rounds and return header + rows."""
    peers = available_peers(args.peers)
    set_threads(peers, args.threads)
    header = machine_header(args, peers)
    dtype = numpy_dtype(args.dtype)
    rng = np.random.default_rng(20240611)
    cases = [CaseData(*spec, dtype, rng) for spec in args.specs]

    # entries: (case, pass, contender) -> callable; the copy floor is one more contender per case.
    entries = {}
    errors = {}
    absent = {}  # (case, pass) -> {peer: why it has no figure there}
    for case in cases:
        copy_destination = copy_destination_for(case.storage)
        entries[(case.name, "forward", "copy")] = (lambda d=copy_destination, s=case.storage: np.copyto(d, s))
        for name in peers:
            try:
                bound = PEERS[name][1](case, args.threads)
            except Unsupported as reason:
                bound = {}
                missing = {pass_name: str(reason) for pass_name in args.passes}
            else:
                errors[(case.name, name)] = check_forward(case, bound.get("check", bound["forward"]))
                missing = {pass_name: NO_BACKWARD[name] for pass_name in args.passes if pass_name not in bound}
            for pass_name in args.passes:
                if pass_name in bound:
                    entries[(case.name, pass_name, name)] = bound[pass_name]
                else:
                    absent.setdefault((case.name, pass_name), {})[name] = missing[pass_name]

    keys = list(entries)
    progress = Progress(len(keys) + args.rounds, args.progress)
    batch = {}
    for key in keys:
        time.sleep(SETTLE_SECONDS)
        batch[key] = calibrate(entries[key], int(args.min_batch_ms * 1e6))
        progress.update(f"calibrate {key[0]} {key[2]}")
    samples = {key: [] for key in keys}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(args.rounds):
            # Rotate the order so no contender always runs first (cold-ish caches) or last.
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                samples[key].append(settled_batch_ns(entries[key], batch[key]) / batch[key])
            progress.update(f"round {round_index + 1}/{args.rounds}")
    finally:
        if gc_was_enabled:
            gc.enable()
        progress.close()

    rows = []
    for case in cases:
        copy_us = statistics.median(samples[(case.name, "forward", "copy")]) / 1e3
        for pass_name in args.passes:
            timings = {name: statistics.median(samples[(case.name, pass_name, name)]) / 1e3
                       for name in peers if (case.name, pass_name, name) in samples}
            if "groupnorm" not in timings:
                continue
            gn_us = timings["groupnorm"]
            copy_floor_us = copy_us * PASS_TRAFFIC[pass_name] / 2
            rows.append({
                "case": case.case_id,
                "layout": case.layout,
                "shape": list(case.shape),
                "num_groups": case.num_groups,
                "dtype": args.dtype,
                "pass": pass_name,
                "elements": int(case.x.size),
                "bytes": int(case.x.nbytes) * PASS_TRAFFIC[pass_name],
                "copy_us": copy_us,
                "copy_floor_us": copy_floor_us,
                "copy_fraction": copy_floor_us / gn_us,
                "median_us": timings,
                "speedup": {name: us / gn_us for name, us in timings.items() if name != "groupnorm"},
                "max_rel_err": {name: errors[(case.name, name)] for name in timings
                                if (case.name, name) in errors} if pass_name == "forward" else {},
                "absent": absent.get((case.name, pass_name), {}),
                "tolerance": TOLERANCE[args.dtype],
                "rounds": args.rounds,
            })
    return {"header": header, "rows": rows}


def machine_header(args, peers: list) -> dict:
    import groupnorm as gn

    config = gn.config()
    return {
        "machine": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": args.threads,
        "groupnorm_isa": config.get("isa"),
        "groupnorm_openmp": config.get("openmp"),
        "openmp_runtimes": loaded_openmp_runtimes(),
        "peers": peers,
        "versions": peer_versions(peers),
        "python_version": platform.python_version(),
        "dtype": args.dtype,
        "rounds": args.rounds,
        "min_batch_ms": args.min_batch_ms,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), "-m", "groupnorm.bench"] + args.argv),
        "speedup_definition": "peer median us / groupnorm median us (> 1: groupnorm is faster)",
        "copy_definition": "np.copyto of the input's bytes into a preallocated buffer; a pass's floor is the "
                           "copy time scaled to its minimal bytes (forward: x + y, train: x + y + x + dy + dx)",
        "thread_note": "groupnorm, torch and ONNX Runtime use --threads; NumPy, JAX and Flax their own defaults",
        "dtype_note": "16-bit data: groupnorm gets float32 weight and bias, Flax float32 parameters, the others the "
                      "input's dtype, all holding the same values; NumPy and JAX compute in float32",
    }


# ---------------------------------------------------------------------------------------------------------
# Output

def header_lines(header: dict) -> list:
    h = header
    load = h["load_average_at_start"]
    versions = "  ".join(f"{k} {v}" for k, v in h["versions"].items())
    return [
        f"machine:  {h['machine']} ({h['logical_cpus']} logical CPUs"
        + (f", load average {load[0]:.2f}" if load else "") + ")",
        f"threads:  {h['threads']} ({h['thread_note']})",
        f"groupnorm ISA {h['groupnorm_isa']}, OpenMP {h['groupnorm_openmp']}; "
        f"OpenMP runtimes: {', '.join(h['openmp_runtimes']) or 'none found'}",
        f"peers:    {versions}",
        f"dtype:    {h['dtype']}    rounds: {h['rounds']}    batch >= {h['min_batch_ms']} ms    date: {h['date']}",
        f"command:  {h['command']}",
    ] + ([f"params:   {h['dtype_note']}"] if h["dtype"] in HALF_DTYPES else []) + [
        "figures:  median us per call; (x.xx) = peer / groupnorm, above 1 groupnorm is faster; "
        "copy% = copy floor / groupnorm (fraction of copy bandwidth reached)",
    ]


def text_table(columns: list, cell_rows: list, left: int = 2) -> str:
    """An aligned text table: the first `left` columns flush left, the rest flush right."""
    lines = [columns] + cell_rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = []
    for index, line in enumerate(lines):
        text.append("  ".join(cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
                              for i, cell in enumerate(line)))
        if index == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown_table(columns: list, cell_rows: list, left: int = 2) -> str:
    """A markdown table: the first `left` columns flush left, the rest flush right."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(columns) - left)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in cell_rows]
    return "\n".join(lines)


def table_columns(peers: list) -> list:
    others = [p for p in peers if p != "groupnorm"]
    return ["case", "layout", "pass", "groupnorm us", "copy floor us", "copy%"] + [f"{p} us (speedup)" for p in others]


def table_cells(row: dict, peers: list) -> list:
    bad = [p for p, e in row["max_rel_err"].items() if e > row["tolerance"]]
    cells = [row["case"] + (" MISMATCH:" + ",".join(bad) if bad else ""), row["layout"], row["pass"],
             f"{row['median_us']['groupnorm']:.1f}", f"{row['copy_floor_us']:.1f}", f"{row['copy_fraction']:.0%}"]
    for p in peers:
        if p != "groupnorm":
            us = row["median_us"].get(p)
            cells.append("-" if us is None else f"{us:.1f} ({row['speedup'][p]:.2f}x)")
    return cells


def format_table(rows: list, peers: list, markdown: bool = False) -> str:
    """The peer table, as aligned text or markdown; "-" where a peer is absent (see absent_lines)."""
    render = markdown_table if markdown else text_table
    return render(table_columns(peers), [table_cells(r, peers) for r in rows], left=3)


def summary_lines(rows: list, peers: list) -> list:
    lines = []
    for pass_name in PASSES:
        for peer in peers:
            values = [r["speedup"][peer] for r in rows if r["pass"] == pass_name and peer in r["speedup"]]
            if values:
                lines.append(f"{pass_name:<8} vs {peer:<12} geometric mean speedup {geometric_mean(values):.2f}x, "
                             f"min {min(values):.2f}x over {len(values)} case(s)")
    return lines


def absent_lines(rows: list) -> list:
    """Why a peer has no figure ("-") in some rows: one line per peer and reason, naming the rows."""
    where = {}
    for r in rows:
        for peer, reason in r["absent"].items():
            where.setdefault((peer, reason), []).append(f"{r['case']} {r['layout']} {r['pass']}")
    lines = []
    for (peer, reason), places in where.items():
        count = len(places)
        shown = ", ".join(places[:3]) + (f" and {count - 3} more" if count > 3 else "")
        lines.append(f"absent: {peer} in {count} row(s) ({shown}): {reason}")
    return lines


def markdown_lines(result: dict, plot_link=None) -> list:
    """The run as a markdown section for bench/RESULTS.md: header, table, summary, absences, the plot if given."""
    header, rows = result["header"], result["rows"]
    lines = [f"## Peers, {header['dtype']}, {header['threads']} threads — {header['date']}", ""]
    lines += [f"- {line}" for line in header_lines(header)]
    lines += ["", format_table(rows, header["peers"], markdown=True), ""]
    lines += [f"- {line}" for line in summary_lines(rows, header["peers"]) + absent_lines(rows)]
    if plot_link:
        lines += ["", f"![groupnorm's speedup over each peer and its fraction of the copy bandwidth, per case]"
                      f"({plot_link})"]
    return lines + [""]


def write_plot(path: str, result: dict) -> None:
    """Per case (x axis) and pass (one panel each): groupnorm's speedup over each peer (log scale); below, the
    fraction of the copy bandwidth groupnorm reached in each pass."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    header = result["header"]
    cases = list(dict.fromkeys((r["case"], r["layout"]) for r in rows))
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    by_key = {(r["case"], r["layout"], r["pass"]): r for r in rows}
    peers = [p for p in header["peers"] if p != "groupnorm" and any(p in r["speedup"] for r in rows)]
    positions = np.arange(len(cases))
    fig, axes = plt.subplots(len(passes) + 1, 1, figsize=(max(8.0, 0.75 * len(cases) + 2), 3.6 * (len(passes) + 1)),
                             sharex=True)
    width = 0.8 / max(len(peers), 1)
    for ax, pass_name in zip(axes, passes):
        for index, peer in enumerate(peers):
            values = [by_key[key + (pass_name,)]["speedup"].get(peer, np.nan) if key + (pass_name,) in by_key
                      else np.nan for key in cases]
            ax.bar(positions + (index - (len(peers) - 1) / 2) * width, values, width, label=peer,
                   color=f"C{index}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if peers:
            ax.set_yscale("log")
            ax.legend(fontsize=8, ncol=len(peers))
        ax.set_ylabel(f"{pass_name}: peer time / groupnorm time")
    axes[0].set_title(f"groupnorm vs peers ({header['dtype']}, {header['threads']} threads, {header['machine']}): "
                      "above 1, groupnorm is faster")
    ax_copy = axes[-1]
    width = 0.8 / max(len(passes), 1)
    for index, pass_name in enumerate(passes):
        values = [100.0 * by_key[key + (pass_name,)]["copy_fraction"] if key + (pass_name,) in by_key else np.nan
                  for key in cases]
        ax_copy.bar(positions + (index - (len(passes) - 1) / 2) * width, values, width, label=pass_name,
                    color=f"C{len(peers) + index}")
    ax_copy.axhline(100.0, color="black", linewidth=0.8)
    ax_copy.legend(fontsize=8)
    ax_copy.set_ylabel("groupnorm: % of the copy bandwidth")
    ax_copy.set_xticks(positions)
    ax_copy.set_xticklabels([f"{case}\n{layout}" for case, layout in cases], rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m groupnorm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for groupnorm, torch and ONNX Runtime alike (default: all logical CPUs)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny cases, 2 rounds, short batches")
    parser.add_argument("--cases", default=None,
                        help="comma list of case names (4x256x28x28-g32, or 4x256x28x28-g32:nhwc for one layout)")
    parser.add_argument("--dtype", choices=list(TOLERANCE), default="float32",
                        help="the data's dtype (bfloat16 needs ml_dtypes); peers without it are absent")
    parser.add_argument("--peers", default=None, help="comma list of peers to run (default: every one installed)")
    parser.add_argument("--forward-only", action="store_true", help="skip the forward+backward (train) pass")
    parser.add_argument("--min-batch-ms", type=float, default=None, help="calibrate batches to at least this long")
    parser.add_argument("--json", default=None, metavar="PATH", help="write header and rows as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="draw speedups and copy fractions (matplotlib)")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write a markdown section (header, table, summary; the plot embedded if drawn)")
    parser.add_argument("--list", action="store_true", help="list the case names and the installed peers, then exit")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.rounds is None:
        args.rounds = 2 if args.quick else 15
    if args.min_batch_ms is None:
        args.min_batch_ms = 0.2 if args.quick else 1.0
    if args.rounds < 1 or args.threads < 1 or args.min_batch_ms <= 0:
        parser.error("--rounds and --threads must be >= 1 and --min-batch-ms > 0")
    if args.plot and not _installed("matplotlib"):
        parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib")
    if args.dtype == "bfloat16" and not _installed("ml_dtypes"):
        parser.error("--dtype bfloat16 needs ml_dtypes, which is not installed: pip install ml_dtypes")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else None
    args.passes = ("forward",) if args.forward_only else PASSES
    known = list({(s[0], s[3]): s for s in all_case_specs(QUICK_SPECS) + all_case_specs()}.values())
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        names = {s[0] for s in known} | {f"{s[0]}:{s[3].lower()}" for s in known}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            parser.error(f"--cases: unknown case(s) {unknown}; run with --list to see the names")
        args.specs = [s for s in known if s[0] in wanted or f"{s[0]}:{s[3].lower()}" in wanted]
    else:
        args.specs = all_case_specs(QUICK_SPECS) if args.quick else all_case_specs()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        quick = {(s[0], s[3]) for s in all_case_specs(QUICK_SPECS)}
        every = {(s[0], s[3]): s for s in all_case_specs() + all_case_specs(QUICK_SPECS)}
        for case_id, _shape, _groups, layout in every.values():
            print(f"{case_id}:{layout.lower()}" + ("  (--quick)" if (case_id, layout) in quick else ""))
        print("peers installed:", ", ".join(available_peers()))
        return 0
    result = run(args)
    for line in header_lines(result["header"]):
        print(line)
    print()
    print(format_table(result["rows"], result["header"]["peers"]))
    print()
    for line in summary_lines(result["rows"], result["header"]["peers"]) + absent_lines(result["rows"]):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.plot:
        write_plot(args.plot, result)
        print(f"plot written to {args.plot}")
    if args.markdown:
        markdown_dir = os.path.dirname(os.path.abspath(args.markdown))
        plot_link = os.path.relpath(os.path.abspath(args.plot), markdown_dir) if args.plot else None
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write("\n".join(markdown_lines(result, plot_link)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
