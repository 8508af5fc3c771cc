# test_fuzz.py — Hypothesis fuzzing of group_norm, group_norm_forward, group_norm_backward and GroupNorm, valid and
# garbage calls mixed: a spec from the docstrings names the faulty arguments; valid calls match the float64 reference,
# invalid ones raise TypeError/ValueError naming the argument; nothing but out= changes (guard bytes around all).
import dataclasses
import decimal
import faulthandler
import fractions
import numbers
import operator
import os
import re
import sys
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import groupnorm as gn
from isa_levels import DEFAULT_ISA, ISA_LEVELS, isa_unavailable_reason, use_isa
from reference import (GRAD_TOLERANCE, TOLERANCE, assert_grads_match, assert_matches_reference, finite_max,
                       group_norm_backward_reference, group_norm_reference)

try:
    import ml_dtypes
except ImportError:  # bfloat16 arrays need ml_dtypes; without it the fuzzer leaves bfloat16 out
    ml_dtypes = None

# As in test_properties: on a failure Hypothesis imports its patch writer (libcst), whose DeprecationWarning would
# turn the failure report into an INTERNALERROR under -W error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

FUZZ = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES_SCALE = float(os.environ.get("GROUPNORM_FUZZ_SCALE", "1"))  # e.g. 20 for a long soak
HANG_SECONDS = 60   # a call still running after this is a hang: faulthandler dumps every stack and exits
SLOW_SECONDS = 10   # every fuzzed call is tiny; one taking this long is a bug even if it finishes
GUARD_BYTES = 64    # random bytes before and after every array's memory

ISA_CHOICES = [DEFAULT_ISA] * 3 + [name for name in ISA_LEVELS
                                   if name != DEFAULT_ISA and isa_unavailable_reason(name) is None]

DTYPES = {
    "float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
    ">f2": np.dtype(">f2"), ">f4": np.dtype(">f4"), ">f8": np.dtype(">f8"),
    "int32": np.dtype(np.int32), "int64": np.dtype(np.int64), "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_), "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
    "longdouble": np.dtype(np.longdouble), "object": np.dtype(object), "<U1": np.dtype("<U1"),
    "structured": np.dtype([("a", "<f4"), ("b", "<i2")]),
}
if ml_dtypes is not None:
    DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
BFLOAT16 = DTYPES.get("bfloat16")
FLOAT_DTYPES = [name for name in ("float16", "bfloat16", "float32", "float64") if name in DTYPES]
WRONG_DTYPES = ["int32", "int64", "uint8", "bool", "complex64", "complex128", "longdouble", "object", "<U1",
                "structured"]

# The kernels' accuracy domain: every |x| of a group at most this. Every finite value since the forward kernels take
# the groups whose squares leave the compute dtype's range in a wider type (see test_extreme_group at the end);
# lower it for a dtype to leave its huge groups unchecked while a kernel is reworked.
HUGE_LIMIT = {"float16": np.inf, "bfloat16": np.inf, "float32": np.inf, "float64": np.inf}


def examples(n):
    """max_examples for a test: n, times GROUPNORM_FUZZ_SCALE."""
    return max(1, int(n * EXAMPLES_SCALE))


class Omit:
    """An argument left out of the call (its default applies)."""

    def __repr__(self):
        return "OMIT"


OMIT = Omit()


# ------------------------------------------------------------------------------------------------- memory

@dataclasses.dataclass(frozen=True)
class ArrayRecipe:
    """One array argument: logical shape and dtype, its place in memory, and what it holds."""
    shape: tuple
    dtype: str
    perm: tuple = ()            # memory order of the logical axes (empty: C order)
    steps: tuple = ()           # per axis 1, -1 (reversed) or 2 (every other element); empty: all 1
    broadcast: tuple = ()       # axes stored once and broadcast with stride 0
    writeable_broadcast: bool = False
    unaligned: bool = False
    phase: int = 0              # the first stored element's address modulo 64, in elements
    readonly: bool = False
    data: str = "normal"        # see _values
    specials: tuple = ()        # ("nan" | "inf" | "-inf" | "subnormal" | "max", count) put at random elements
    seed: int = 0
    as_list: bool = False       # pass .tolist() instead of the array


@dataclasses.dataclass(frozen=True)
class Alias:
    """An array made from another argument's memory: "input" is the input object itself; "input_view" a C-order
    view of the input's shape and dtype starting `shift` elements from the input's first byte; "out_memory" a 1-D
    view of `length` elements, step `step`, starting `at` (a fraction) of the way into out's memory (the input's
    without out)."""
    target: str
    shift: int = 0
    step: int = 1
    length: int = 0
    at: float = 0.0


@dataclasses.dataclass(frozen=True)
class Stats:
    """mean or rstd of a valid forward of the input, passed in form `form` (see _stats_form)."""
    which: str
    form: str


class Arena:
    """Every buffer a call sees: random bytes, arrays carved out of them with guard bytes around each."""

    def __init__(self, rng):
        self.rng = rng
        self.roots = []

    def buffer(self, nbytes):
        root = np.frombuffer(self.rng.bytes(nbytes + 2 * GUARD_BYTES), np.uint8).copy()
        self.roots.append(root)
        return root

    def root_of(self, a):
        """The buffer holding array a's memory, or None (object arrays, arrays NumPy made)."""
        if not isinstance(a, np.ndarray) or a.size == 0:
            return None
        lo, _ = _extent(a)
        for root in self.roots:
            start = root.__array_interface__["data"][0]
            if start <= lo < start + root.nbytes:
                return root
        return None


def _extent(a):
    """Byte range [lo, hi) that array a's elements occupy."""
    lo = hi = a.__array_interface__["data"][0]
    for n, s in zip(a.shape, a.strides):
        if s > 0:
            hi += s * (n - 1)
        else:
            lo += s * (n - 1)
    return lo, hi + a.itemsize


def _element_offsets(a, root):
    """Byte offset in `root` of every element of a (a's shape)."""
    start = a.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    positions = np.arange(root.nbytes, dtype=np.int64)
    return np.lib.stride_tricks.as_strided(positions[start:], a.shape, [s * 8 for s in a.strides])


def _footprint(a, root):
    """Mask over root's bytes: those a's elements occupy."""
    mask = np.zeros(root.nbytes, bool)
    if a.size:
        offsets = _element_offsets(a, root).reshape(-1, 1) + np.arange(a.itemsize)
        mask[offsets.ravel()] = True
    return mask


def _values(recipe, rng, count, dtype_name):
    """`count` float64 values of data mode recipe.data, kept inside dtype_name's range where the mode says so."""
    family = _family(DTYPES[dtype_name]) or "float64"
    info = _finfo(family)
    normal = rng.standard_normal(count)
    mode = recipe.data
    if mode == "normal":
        return normal
    if mode == "offset":
        return rng.choice([100.0, 1e4, -3e3]) + normal
    if mode == "scaled":
        exponent = rng.choice([-3, 3] if family == "float16" else [-30, -8, 8, 30])
        return normal * 10.0 ** exponent
    if mode == "mixed":  # a different magnitude per element, over 30 decades where the dtype has them
        exponents = rng.integers(-4, 4, count) if family == "float16" else rng.integers(-15, 16, count) * 2
        return normal * 10.0 ** exponents
    if mode == "constant":
        return np.full(count, rng.choice([0.0, 1.0, -2.5, 1e3]))
    if mode == "subnormal":
        return float(info.smallest_subnormal) * rng.integers(-300, 300, count)
    if mode == "huge":  # inside the kernels' accuracy domain
        return rng.uniform(-1, 1, count) * min(HUGE_LIMIT[family], 0.99 * float(info.max))
    if mode == "beyond":  # up to the dtype's max: outside the accuracy domain for float32/float64
        return rng.uniform(-1, 1, count) * 0.99 * float(info.max)
    raise ValueError(f"unknown data mode {mode!r}")


def _fill(view, recipe, rng):
    """Write the recipe's data into `view` (logical, not broadcast): elements the view skips keep random bytes."""
    dt = view.dtype
    count = view.size
    if dt.kind == "f" or dt == BFLOAT16:
        values = _values(recipe, rng, count, recipe.dtype)
        info = _finfo(_family(dt) or "float64")
        for kind, n in recipe.specials:
            where = rng.integers(0, count, n) if count else []
            values[where] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf,
                             "subnormal": float(info.smallest_subnormal) * 3,
                             "max": float(info.max) * rng.choice([-1, 1])}[kind]
    elif dt.kind in "iu":
        values = rng.integers(0 if dt.kind == "u" else -3, 4, count)
    elif dt.kind == "b":
        values = rng.integers(0, 2, count).astype(bool)
    elif dt.kind == "c":
        values = rng.standard_normal(count) + 1j * rng.standard_normal(count)
    elif dt.kind == "O":
        values = np.array([float(v) for v in rng.integers(-3, 4, count)], dtype=object)
    elif dt.kind == "U":
        values = np.full(count, "a")
    else:
        values = np.zeros(count, dt)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view[...] = np.asarray(values).astype(dt).reshape(view.shape)


def build_array(recipe, arena, rng, extra_bytes=0):
    """The array (or list) a recipe describes, carved from a fresh arena buffer."""
    dt = DTYPES[recipe.dtype]
    ndim = len(recipe.shape)
    perm = recipe.perm or tuple(range(ndim))
    steps = recipe.steps or (1,) * ndim
    stored = [1 if a in recipe.broadcast else n * abs(s) for a, (n, s) in enumerate(zip(recipe.shape, steps))]
    memory_shape = [stored[a] for a in perm]
    if dt.hasobject:  # NumPy makes no object array over raw memory
        base = np.empty(memory_shape, dt)
    else:
        count = int(np.prod(memory_shape, dtype=np.int64))
        root = arena.buffer(count * dt.itemsize + extra_bytes + 64 + 1)
        # SIMD kernels may take another path at another alignment: place the array at the recipe's phase.
        address = root.__array_interface__["data"][0] + GUARD_BYTES
        offset = GUARD_BYTES + (recipe.phase * dt.itemsize - address) % 64
        offset += 1 if recipe.unaligned and dt.itemsize > 1 else 0
        base = np.ndarray(memory_shape, dt, buffer=root, offset=offset)
    logical = base.transpose(np.argsort(perm))
    if ndim:  # indexing a 0-d array with () would give a scalar
        logical = logical[tuple(slice(None, None, s) for s in steps)]
    _fill(logical, recipe, rng)
    if recipe.broadcast:
        if recipe.writeable_broadcast:
            strides = [0 if a in recipe.broadcast else s for a, s in enumerate(logical.strides)]
            logical = np.lib.stride_tricks.as_strided(logical, recipe.shape, strides, writeable=True)
        else:
            logical = np.broadcast_to(logical, recipe.shape)
    if recipe.readonly:
        logical = logical.view()
        logical.flags.writeable = False
    if recipe.as_list:
        return logical.tolist()
    return logical


def build_alias(alias, x, out, arena):
    """The array an Alias describes (None when its target has no arena memory or the view would not fit)."""
    if alias.target == "input":
        return x
    source = out if alias.target == "out_memory" and isinstance(out, np.ndarray) else x
    root = arena.root_of(source)
    if root is None:
        return None
    item = source.itemsize
    lo, hi = _extent(source)
    start = lo - root.__array_interface__["data"][0] + (alias.shift + int(alias.at * (hi - lo) / item)) * item
    if alias.target == "input_view":
        shape, strides = source.shape, None
        lo, hi = start, start + source.size * item
    else:
        shape, strides = (alias.length,), (alias.step * item,)
        last = start + max(alias.length - 1, 0) * alias.step * item
        lo, hi = min(start, last), max(start, last) + item
    if lo < 0 or hi > root.nbytes:
        return None
    return np.ndarray(shape, source.dtype, buffer=root, offset=start, strides=strides)


# --------------------------------------------------------------------------------------------------- spec
# What the docstrings (and tests/test_errors.py) promise, written without the library: each check adds
# (exception type, argument name) for a faulty argument. A call is valid when no fault is found; an invalid call
# may raise for any of its faults (the order of the checks is the library's business).

def _family(dt):
    """"float16" / "bfloat16" / "float32" / "float64" for a dtype the kernels take (any byte order), else None."""
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        return {2: "float16", 4: "float32", 8: "float64"}[dt.itemsize]
    if BFLOAT16 is not None and dt == BFLOAT16:
        return "bfloat16"
    return None


def _finfo(family):
    return ml_dtypes.finfo(BFLOAT16) if family == "bfloat16" else np.finfo(np.dtype(family))


def _compute(family):
    """The compute dtype (of parameters and statistics) for data of `family`."""
    return np.dtype(np.float64) if family == "float64" else np.dtype(np.float32)


def _native(dt):
    """dt in the machine's byte order."""
    return dt if dt.isnative else dt.newbyteorder("=")


def spec_array(value, name, faults):
    """value as NumPy sees it (str/bytes refused as TypeError; what NumPy cannot convert raises as it does)."""
    if isinstance(value, (str, bytes)):
        faults.append((TypeError, name))
        return None
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        faults.append((type(e), name))
        return None


def spec_data(value, name, faults):
    """An input or grad_output: a float16/bfloat16/float32/float64 array of 2 to 32 dimensions."""
    a = spec_array(value, name, faults)
    if a is None:
        return None
    bad = False
    if _family(a.dtype) is None:
        faults.append((TypeError, name))
        bad = True
    if not 2 <= a.ndim <= 32:
        faults.append((ValueError, name))
        bad = True
    return None if bad else a


def spec_int(value, name, faults):
    """An integer (operator.index, not bool) in int64's range."""
    if isinstance(value, (bool, np.bool_)):
        faults.append((TypeError, name))
        return None
    try:
        n = operator.index(value)
    except TypeError:
        faults.append((TypeError, name))
        return None
    if not -2**63 <= n < 2**63:
        faults.append((ValueError, name))
        return None
    return n


def spec_eps(eps, faults):
    """A real number (not bool), >= 0 and not NaN; the float it converts to."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        faults.append((TypeError, "eps"))
        return None
    try:
        value = float(eps)
    except OverflowError:
        faults.append((ValueError, "eps"))
        return None
    if not value >= 0:
        faults.append((ValueError, "eps"))
        return None
    return value


def spec_param(value, name, C, faults):
    """weight / bias / an optional per-channel array: None, or C real numbers."""
    if value is None:
        return None
    a = spec_array(value, name, faults)
    if a is None:
        return None
    if not (a.dtype.kind in "fiu" or a.dtype == BFLOAT16):
        faults.append((TypeError, name))
        return None
    if C is not None and a.shape != (C,):
        faults.append((ValueError, name))
        return None
    return a


def spec_stats(value, name, N, G, faults):
    """mean / rstd: an (N, G) array of real numbers; None refused as TypeError."""
    if value is None:
        faults.append((TypeError, name))
        return None
    a = spec_param(value, name, None, faults)
    if a is not None and N is not None and G is not None and a.shape != (N, G):
        faults.append((ValueError, name))
        return None
    return a


def spec_geometry(x, num_groups, channel_axis, faults):
    """(channel axis, C, G) of a valid input; None for whichever cannot be known."""
    ax = C = None
    if x is not None:
        axis = spec_int(channel_axis, "channel_axis", faults)
        if axis is not None:
            if not -x.ndim <= axis < x.ndim or axis % x.ndim == 0:
                faults.append((ValueError, "channel_axis"))  # out of range, or the batch axis
            else:
                ax = axis % x.ndim
                C = x.shape[ax]
    G = spec_int(num_groups, "num_groups", faults)
    if G is not None and (G <= 0 or (C is not None and C % G != 0)):
        faults.append((ValueError, "num_groups"))
        G = None
    return ax, C, G


def spec_group_norm(args):
    """(faults, x, ax, G, eps) for a group_norm / group_norm_forward call with arguments `args`."""
    faults = []
    x = spec_data(args["input"], "input", faults)
    channel_axis = args.get("channel_axis", OMIT)
    ax, C, G = spec_geometry(x, args["num_groups"], 1 if channel_axis is OMIT else channel_axis, faults)
    eps = spec_eps(1e-5 if args.get("eps", OMIT) is OMIT else args["eps"], faults)
    activation = args.get("activation", OMIT)
    if activation is not OMIT and activation is not None:
        if not isinstance(activation, str):
            faults.append((TypeError, "activation"))
        elif activation != "silu":
            faults.append((ValueError, "activation"))
    for name in ("weight", "bias"):
        spec_param(None if args.get(name, OMIT) is OMIT else args[name], name, C, faults)
    out = args.get("out", OMIT)
    if out is not OMIT and out is not None:
        if not isinstance(out, np.ndarray):
            faults.append((TypeError, "out"))
        elif x is not None:
            if out.shape != x.shape or _family(out.dtype) != _family(x.dtype) or not out.dtype.isnative:
                faults.append((ValueError, "out"))
            elif not out.flags.writeable:
                faults.append((ValueError, "out"))
    return faults, x, ax, G, eps


def spec_backward(args):
    """(faults, G) for a group_norm_backward call."""
    faults = []
    x = spec_data(args["input"], "input", faults)
    dy = spec_data(args["grad_output"], "grad_output", faults)
    if x is not None and dy is not None and (dy.shape != x.shape or _family(dy.dtype) != _family(x.dtype)):
        faults.append((ValueError, "grad_output"))
    _, C, G = spec_geometry(x, args["num_groups"], 1, faults)
    spec_param(args.get("weight"), "weight", C, faults)
    N = x.shape[0] if x is not None else None
    for name in ("mean", "rstd"):
        spec_stats(args[name], name, N, G, faults)
    return faults, G


def spec_positive_int(value, name, faults):
    n = spec_int(value, name, faults)
    if n is not None and n <= 0:
        faults.append((ValueError, name))
        return None
    return n


def spec_layer(kwargs):
    """(faults, G, C, eps, dtype) for GroupNorm(**kwargs)."""
    faults = []
    G = spec_positive_int(kwargs["num_groups"], "num_groups", faults)
    C = spec_positive_int(kwargs["num_channels"], "num_channels", faults)
    if G is not None and C is not None and C % G != 0:
        faults.append((ValueError, "num_groups"))
    eps = spec_eps(kwargs.get("eps", 1e-5), faults)
    affine = kwargs.get("affine", True)
    if not isinstance(affine, (bool, np.bool_)):
        faults.append((TypeError, "affine"))
    dtype = None
    try:
        dtype = np.dtype(kwargs.get("dtype", np.float32))
    except TypeError:
        faults.append((TypeError, "dtype"))
    if dtype is not None and dtype not in (np.float32, np.float64):
        faults.append((TypeError, "dtype"))
    return faults, G, C, eps, dtype


def _spellings(value):
    """Ways a message may write `value`."""
    spellings = {repr(value), str(value)}
    try:
        spellings.add(str(operator.index(value)))
    except TypeError:
        pass
    return spellings


VALUE_NAMED = ("num_groups", "num_channels", "channel_axis", "eps", "activation")


def check_refusal(error, faults, args):
    """`error` is one of the spec's faults: its type, a message opening with the argument's name and, for a
    scalar argument, spelling its value."""
    message = str(error)
    matches = [name for kind, name in faults if type(error) is kind and re.match(rf"{re.escape(name)}\b", message)]
    assert matches, (f"raised {type(error).__name__}({message!r}); the spec expects one of "
                     f"{[(kind.__name__, name) for kind, name in faults]}")
    name = matches[0]
    value = args.get(name, OMIT)
    if name in VALUE_NAMED and value is not OMIT and len(repr(value)) < 40:
        assert any(s in message for s in _spellings(value)), f"{message!r} does not show {name}={value!r}"


# -------------------------------------------------------------------------------------------- expectations

def _group_ids(shape, ax, G):
    """Per element of an input of `shape` (channels on axis ax): its (sample, group) index n*G + g."""
    moved = (shape[0], shape[ax]) + tuple(n for i, n in enumerate(shape) if i not in (0, ax))
    N, C = moved[:2]
    per_group = int(np.prod(moved[2:], dtype=np.int64)) * (C // G)
    ids = np.broadcast_to(np.arange(N * G).reshape(N, G, 1), (N, G, per_group))
    return np.moveaxis(ids.reshape(moved), 1, ax)


@dataclasses.dataclass
class ForwardExpectation:
    y: np.ndarray          # reference output (accumulator dtype), input's shape
    checked: np.ndarray    # elements a valid call must match
    floor: np.ndarray      # absolute slack per element (subnormal range; see forward_expectation)
    mean: np.ndarray       # (N, G) reference statistics
    rstd: np.ndarray
    var: np.ndarray
    groups_checked: np.ndarray  # (N, G)
    groups_nonfinite: np.ndarray  # (N, G): holding a NaN or an infinity
    family: str
    activation: object
    terms: float           # max over checked elements of |x_hat * w| + |b|, plus max|w|: what an output sums


def forward_expectation(x, G, weight, bias, eps, activation, ax):
    """The reference for group_norm(x, ...) and which elements it binds. A group is left unchecked when its data leaves
    the kernels' accuracy domain (HUGE_LIMIT), a channel when its scale rstd*|w| overflows the compute dtype (eps=0
    and subnormal data: torch folds the same scale and gives inf/NaN there too), and an element when its true value
    overflows the output dtype. Values below the compute dtype's normal range are known to its subnormal spacing,
    amplified by rstd*|w| and |x - mean|*|w|: that is the floor."""
    family = _family(x.dtype)
    compute = _compute(family)
    info_c = np.finfo(compute)
    acc = np.longdouble if family == "float64" else np.float64
    with np.errstate(all="ignore"):
        w = None if weight is None else np.asarray(weight, np.float64)
        b = None if bias is None else np.asarray(bias, np.float64)
        y = group_norm_reference(x, G, w, b, eps, activation, ax)
        xc = np.moveaxis(np.asarray(x), ax, 1).astype(acc)
        N, C = xc.shape[:2]
        if xc.size == 0:
            mean = var = rstd = np.full((N, G), np.nan, acc)
            dev = absmax = np.zeros((N, G))
            nonfinite = np.zeros((N, G), bool)
        else:
            groups = xc.reshape(N, G, -1)
            mean = groups.mean(axis=2)
            var = np.square(groups - mean[..., None]).mean(axis=2)
            rstd = 1 / np.sqrt(var + acc(eps))
            dev = np.abs(groups - mean[..., None]).max(axis=2).astype(np.float64)
            absmax = np.abs(groups).max(axis=2).astype(np.float64)
            nonfinite = ~np.isfinite(groups).all(axis=2)
        rstd64 = rstd.astype(np.float64)
        groups_checked = ~(absmax > HUGE_LIMIT[family]) & ~(rstd64 > float(info_c.max) / 2)
        w_max = max(1.0, finite_max(w)) if w is not None else 1.0
        sub = float(info_c.smallest_subnormal)
        floor_g = 2 * sub * (1 + np.nan_to_num(rstd.astype(np.float64), posinf=0.0) * w_max
                             + np.nan_to_num(dev, posinf=0.0) * w_max)
        floor_g += float(_finfo(family).smallest_subnormal)
        # The reference's own rounding of the mean (a constant group's is not its value), times rstd * |w|.
        floor_g += 4 * float(np.finfo(acc).eps) * np.nan_to_num(
            np.abs(mean.astype(np.float64)) * rstd.astype(np.float64), posinf=0.0) * w_max
        ids = _group_ids(x.shape, ax, G) if x.size else np.zeros(x.shape, np.int64)
        checked = groups_checked.reshape(-1)[ids] if x.size else np.zeros(x.shape, bool)
        if w is not None and x.size:
            per_channel = [1] * x.ndim
            per_channel[ax] = C
            scale = rstd64.reshape(-1)[ids] * np.abs(w).reshape(per_channel)
            checked &= ~(scale > float(info_c.max) / 2)
        checked &= ~(np.abs(y.astype(np.float64)) > float(_finfo(family).max) * (1 - 2.0**-8))
        floor = floor_g.reshape(-1)[ids] if x.size else np.zeros(x.shape)
        scaled = group_norm_reference(x, G, w, None, eps, None, ax)  # x_hat * w
        if b is not None and x.size:
            per_channel = [1] * x.ndim
            per_channel[ax] = C
            scaled = np.abs(scaled) + np.abs(b).reshape(per_channel)
        terms = finite_max(np.where(checked, scaled, 0.0)) + w_max  # |w|: x_hat is known to ulps even where 0
    return ForwardExpectation(y, checked, floor, mean, rstd, var, groups_checked, nonfinite, family, activation,
                              terms)


def _ulp(r, family):
    """The spacing of `family` (float16 / bfloat16) at each |r|."""
    mantissa, min_exp = (10, -14) if family == "float16" else (7, -126)
    r = np.abs(np.asarray(r, np.float64))
    _, exponent = np.frexp(np.where(np.isfinite(r), r, 1.0))
    exponent = np.where(r == 0, min_exp, np.maximum(exponent - 1, min_exp))
    return np.ldexp(1.0, exponent - mantissa)


def output_ok(y, exp):
    """Per element: NaN where the reference is NaN, else within the tolerance of the output dtype — the float32 /
    float64 target times max|y_ref| (or the size of the terms an output sums, where w*x_hat + b cancels to less),
    or for float16/bfloat16 one ulp of the output plus 2^-18 of its terms — plus the floor. Unchecked elements are
    ok."""
    yf = np.asarray(y).astype(np.float64)
    r = exp.y
    nan_r = np.isnan(r)
    scale = finite_max(r[exp.checked & ~nan_r])
    with np.errstate(all="ignore"):
        if exp.family in ("float32", "float64"):
            bound = TOLERANCE[(np.dtype(exp.family), exp.activation == "silu")] * max(scale, exp.terms) + exp.floor
        else:
            bound = _ulp(r, exp.family) + 2.0**-18 * exp.terms + exp.floor
        err = np.abs(yf.astype(r.dtype) - r)
        ok = np.where(nan_r, np.isnan(yf), err <= bound)
    return ok | ~exp.checked, err, bound


def assert_output(y, exp, what, *, aliasing=None):
    """y matches the reference (output_ok everywhere). With `aliasing` (the byte offset of every element of an out=
    whose elements share memory), each memory location need only hold the value of one of its elements."""
    ok, err, bound = output_ok(y, exp)
    if aliasing is not None:
        _, location = np.unique(aliasing.ravel(), return_inverse=True)
        location_ok = np.bincount(location, weights=ok.ravel()) > 0
        ok = location_ok[location].reshape(ok.shape)
    if not ok.all():
        i = tuple(int(k) for k in np.argwhere(~ok)[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} element(s) differ from the reference; first "
                             f"at {i}: got {np.asarray(y)[i]!r}, expected {exp.y[i]!r} (err {float(err[i]):.3e}, "
                             f"bound {float(bound[i]):.3e}); dtype {np.asarray(y).dtype}, shape {np.shape(y)}")


def assert_statistics(mean, rstd, exp, N, G):
    """mean to an ulp of the compute dtype plus its target times std, rstd to its target; NaN where the
    reference's are; groups outside the domain unchecked. A group holding a NaN or an infinity has a NaN rstd and
    a mean that is NaN or infinite (the IEEE mean of [inf, 1] is inf, a shifted sum's is NaN: both will do)."""
    compute = _compute(exp.family)
    assert mean.shape == rstd.shape == (N, G), f"statistics of shape {mean.shape}, {rstd.shape}; expected {(N, G)}"
    assert mean.dtype == rstd.dtype == compute, f"statistics of dtype {mean.dtype}; expected {compute}"
    tol = TOLERANCE[(compute, False)]
    sub = float(np.finfo(compute).smallest_subnormal)
    eps_c = float(np.finfo(compute).eps)
    with np.errstate(all="ignore"):
        for name, got, ref, bound in (
                ("mean", mean, exp.mean, eps_c * np.abs(exp.mean) + tol * np.sqrt(exp.var) + sub),
                ("rstd", rstd, exp.rstd, tol * exp.rstd + sub)):
            got = got.astype(ref.dtype)
            ok = np.where(np.isnan(ref), np.isnan(got), np.abs(got - ref) <= bound)
            ok = np.where(exp.groups_nonfinite, np.isnan(got) | (name == "mean") & np.isinf(got), ok)
            ok |= ~exp.groups_checked
            assert ok.all(), (f"group_norm_forward: {name} differs from the reference at {np.argwhere(~ok)[0]}: "
                              f"got {got[~ok][0]!r}, expected {ref[~ok][0]!r}")


def _gradient_expectation(x, dy, G, weight, eps):
    """Which elements of grad_input, grad_weight and grad_bias the backward binds, and for each the scale of the terms
    it sums and an absolute floor, as three (checked, terms, floor) triples of grad_input's and (C,) shape.

    A group is checked unless the terms the backward forms in the compute dtype from its finite values leave that
    dtype's range (|rstd * w * dy|, |x_hat| * rstd * |w * dy * x_hat|, and the sums over the group of dy, dy * (x -
    mean) and x - mean, bounded by the group's size times their largest terms): torch, computing in the same dtype,
    gives inf or NaN there too. In a checked group a NaN or an infinity must make every grad_input non-finite, and
    the grad_weight / grad_bias where the reference's is. A channel's grad_weight / grad_bias is checked when its
    group is in every sample.

    The floor covers values below the compute dtype's normal range, known only to its subnormal spacing `sub`: each
    product the backward forms in it (dy * (x - mean), dy * w, dy * rstd * w, the coefficients) is rounded to that
    spacing (dy * w's error then grows by rstd), and a mean of subnormal data is only known to it too (the backward
    takes the forward's, rounded). An error in sum dy*(x - mean) reaches grad_input amplified by |x - mean| * rstd^3
    * |w|; one of the mean, sub * rstd in x_hat, reaches grad_input times rstd * |w * dy| and grad_weight times sum
    |dy|."""
    family = _family(x.dtype)
    compute = _compute(family)
    sub = float(np.finfo(compute).smallest_subnormal)
    limit = float(np.finfo(compute).max) / 2**10
    N, C = x.shape[:2]
    D = C // G
    if x.size == 0:
        return ((np.ones(x.shape, bool), np.zeros(x.shape), np.zeros(x.shape)),
                (np.ones(C, bool), np.zeros(C), np.zeros(C)), (np.ones(C, bool), np.zeros(C), np.zeros(C)))
    acc = np.longdouble if family == "float64" else np.float64
    HW = x.size // (N * C)
    M = D * HW
    w = np.ones(C, acc) if weight is None else np.asarray(weight).astype(acc)
    w_el = np.repeat(w, HW).reshape(1, G, D * HW)
    with np.errstate(all="ignore"):
        groups = np.asarray(x).astype(acc).reshape(N, G, D * HW)
        dy_g = np.asarray(dy).astype(acc).reshape(N, G, D * HW)
        mean = groups.mean(axis=2, keepdims=True)
        dev = groups - mean
        rstd = 1 / np.sqrt(np.square(dev).mean(axis=2, keepdims=True) + acc(eps))
        x_hat = dev * rstd
        w_dy = dy_g * w_el
        dev_max = np.abs(dev).max(axis=2)
        rstd_2d = rstd[..., 0]
        # The terms, from the finite values alone: a NaN in one channel leaves the others' grad_weight finite.
        fx, fdy = (np.where(np.isfinite(a), a, 0) for a in (groups, dy_g))
        f_dev = fx - fx.mean(axis=2, keepdims=True)
        f_rstd = 1 / np.sqrt(np.square(f_dev).mean(axis=2, keepdims=True) + acc(eps))
        f_dev_max, f_w_dy = np.abs(f_dev).max(axis=2), fdy * w_el
        terms = np.maximum.reduce([
            np.abs(f_rstd * f_w_dy).max(axis=2), M * np.abs(fdy).max(axis=2) * np.maximum(f_dev_max, 1),
            M * f_dev_max, np.abs(f_dev * f_rstd).max(axis=2) * f_rstd[..., 0] * np.abs(
                f_w_dy * f_dev * f_rstd).max(axis=2)]).astype(np.float64)
        group_ok = ~(terms > limit)
        dx_terms = np.nan_to_num(np.abs(rstd * w_dy).max(axis=2).astype(np.float64), nan=0.0, posinf=0.0)
        # Per channel: the root sum of squares of dy * x_hat and of dy over samples and positions.
        per_channel = (N, G, D, HW)
        dw_terms = np.sqrt(np.square(dy_g * x_hat).reshape(per_channel).sum(axis=(0, 3))).reshape(C)
        db_terms = np.sqrt(np.square(dy_g).reshape(per_channel).sum(axis=(0, 3))).reshape(C)
        w_max = max(1.0, finite_max(weight)) if weight is not None else 1.0
        rstd64 = np.nan_to_num(rstd_2d.astype(np.float64), nan=0.0, posinf=0.0)
        dev64 = np.nan_to_num(dev_max.astype(np.float64), nan=0.0, posinf=0.0)
        dy_max = np.nan_to_num(np.abs(dy_g).max(axis=2).astype(np.float64), nan=0.0, posinf=0.0)
        dx_floor = 2 * sub * (3 + rstd64 * w_max + dev64 + dev64 * rstd64**3 * w_max * M
                              + rstd64**2 * w_max * dy_max * (1 + dev64 * rstd64))
        dy_sum = np.nan_to_num(np.abs(dy_g).reshape(per_channel).sum(axis=(0, 3)).astype(np.float64),
                               nan=0.0, posinf=0.0).reshape(C)
        ok_rstd = np.where(group_ok, rstd64, 0.0).max(axis=0).repeat(D)  # per channel, over checked groups
        ok_dev = np.where(group_ok, dev64, 0.0).max(axis=0).repeat(D)
        dw_floor = 2 * sub * (M * N * (1 + ok_rstd * (1 + ok_dev)) + ok_rstd * dy_sum)
        dw_terms, db_terms = (np.nan_to_num(t.astype(np.float64), nan=0.0, posinf=0.0) for t in (dw_terms, db_terms))
    channel_ok = group_ok.all(axis=0).repeat(D)

    def per_element(a):
        return np.repeat(a.reshape(N, G, 1), D * HW, axis=2).reshape(x.shape)

    dx_floor = per_element(dx_floor) + float(_finfo(family).smallest_subnormal)
    return ((per_element(group_ok), per_element(dx_terms), dx_floor),
            (channel_ok, dw_terms, dw_floor), (channel_ok, db_terms, np.zeros(C)))


def assert_gradients(grads, x, dy, G, weight, eps):
    """The three gradients against the float64 reference where _gradient_expectation binds them: non-finite exactly
    where the reference is (a NaN or an infinity in a group's input or grad_output reaches every grad_input of that
    group and the grad_weight / grad_bias of its channels); elsewhere within the target of the compute dtype
    (GRAD_TOLERANCE) times the larger of the largest checked reference value and the element's term scale, plus the
    floor, and for float16 / bfloat16 grad_input one ulp of its dtype on top."""
    family = _family(x.dtype)
    ref = group_norm_backward_reference(dy, x, G, None if weight is None else np.asarray(weight, np.float64), eps)
    tol = GRAD_TOLERANCE[np.dtype(family if family in ("float32", "float64") else np.float32)]
    expectations = _gradient_expectation(x, dy, G, weight, eps)
    for name, g, g_ref, (checked, terms, floor) in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref,
                                                       expectations):
        if g is None:  # grad_weight / grad_bias of a layer without affine parameters
            continue
        want = x.dtype if name == "grad_input" else _compute(family)
        assert g.dtype == _native(want) and g.shape == g_ref.shape, f"{name}: {g.dtype} {g.shape}"
        if g.size == 0:
            continue
        got = np.asarray(g).astype(np.float64 if family != "float64" else g_ref.dtype)
        with np.errstate(invalid="ignore"):  # a true value past the output dtype's range may come out as inf
            checked = checked & ~(np.abs(g_ref) > float(_finfo(_family(g.dtype)).max) * (1 - 2.0**-8))
        wrong = (np.isfinite(g_ref) != np.isfinite(got)) & checked
        if wrong.any():
            at = tuple(int(k) for k in np.argwhere(wrong)[0])
            raise AssertionError(f"group_norm_backward: {name} is {int(wrong.sum())} time(s) finite where the "
                                 f"reference is not or the other way round; first at {at}: got {got[at]!r}, "
                                 f"expected {g_ref[at]!r}")
        finite = np.isfinite(g_ref) & checked
        scale = np.maximum(finite_max(np.where(finite, g_ref, 0.0)), terms)
        bound = tol * scale + floor + (_ulp(g_ref, family) if name == "grad_input" and family not in (
            "float32", "float64") else 0.0)
        with np.errstate(invalid="ignore"):
            err = np.where(finite, np.abs(got - g_ref), 0.0)
        if not (err <= bound).all():
            worst = tuple(int(k) for k in np.unravel_index(np.argmax(err - bound), err.shape))
            raise AssertionError(f"group_norm_backward: {name} off by {float(np.max(err)):.3e} (bound "
                                 f"{float(bound[worst]):.3e}, scale {float(scale[worst]):.3e}); worst at {worst}: "
                                 f"got {got[worst]!r}, expected {g_ref[worst]!r}; dtype {g.dtype}, shape {g.shape}")


# --------------------------------------------------------------------------------------------------- harness

def snapshot(values, arena):
    """What every argument holds now: the bytes of every arena buffer, copies of other arrays, reprs of the rest."""
    return ([r.copy() for r in arena.roots],
            [np.array(v, copy=True) if isinstance(v, np.ndarray) else repr(v) for v in values])


def assert_untouched(before, values, arena, out=None, out_root=None):
    """Every byte of every buffer as before, except those of `out` (when the call wrote it); every other argument
    as before."""
    roots_before, others_before = before
    for root, old in zip(arena.roots, roots_before):
        changed = root != old
        if out is not None and root is out_root:
            changed &= ~_footprint(out, root)
        assert not changed.any(), (f"{int(changed.sum())} byte(s) changed outside out= (first at byte "
                                   f"{int(np.argmax(changed))} of a {root.nbytes}-byte buffer)")
    for v, old in zip(values, others_before):
        if isinstance(v, np.ndarray) and arena.root_of(v) is None:
            assert v.dtype == old.dtype and (v.dtype.hasobject or v.tobytes() == old.tobytes()) and (
                not v.dtype.hasobject or v.tolist() == old.tolist()), "an argument array changed"
        elif not isinstance(v, np.ndarray):
            assert repr(v) == old, f"argument {old} became {v!r}"


def guarded_call(fn, *args, **kwargs):
    """fn(*args, **kwargs) -> (result, exception): a hang dumps all stacks and exits; a slow call fails."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.__stderr__)  # pytest may capture sys.stderr
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 — the oracle decides which exceptions are right
        return None, e
    finally:
        faulthandler.cancel_dump_traceback_later()
        elapsed = time.perf_counter() - start
        assert elapsed < SLOW_SECONDS, f"{fn.__name__} took {elapsed:.1f} s"


def _event(text):
    """Hypothesis's event() (shown by --hypothesis-show-statistics); nothing outside a test."""
    if currently_in_test_context():
        event(text)


def check_outcome(result, error, faults, args, *, resource=False):
    """Invalid call: it raised one of its faults. Valid call: it returned (`resource`: a MemoryError or NumPy's
    ValueError for an array too large to allocate is also fine). Returns True when the result needs checking."""
    _event("invalid: " + ", ".join(sorted({name for _, name in faults})) if faults else "valid")
    if faults:
        assert error is not None, (f"accepted a call the spec refuses for "
                                   f"{[(kind.__name__, name) for kind, name in faults]}")
        check_refusal(error, faults, args)
        return False
    if error is not None:
        if resource and isinstance(error, (MemoryError, ValueError)):
            return False
        raise AssertionError(f"refused a valid call: {type(error).__name__}: {error}") from error
    return True


# ------------------------------------------------------------------------------------------------ strategies

@st.composite
def faulty_arguments(draw, names):
    """The arguments to draw from their garbage strategies: none in about half the calls (shrinks towards none)."""
    count = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    return set(draw(st.permutations(names))[:count])


def argument(draw, name, faulty, good, bad):
    """Draw argument `name` from `bad` when it is one of the faulty ones, else from `good`."""
    return draw(bad if name in faulty else good)


@st.composite
def geometries(draw, channels_first=False):
    """(shape, channel axis, G): N and spatial sizes with 0s and 1s and odd tails, C = G * D (C may be 0), 2 to 5
    dimensions."""
    N = draw(st.sampled_from([1, 0, 1, 1, 2, 2, 3, 3]))
    G = draw(st.integers(1, 6))
    D = draw(st.sampled_from([1, 0, 1, 1, 2, 3, 4, 5, 1, 2]))
    spatial = draw(st.lists(st.sampled_from([1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 17, 33, 1, 2, 3, 5]), min_size=0,
                            max_size=3))
    while int(np.prod(spatial, dtype=np.int64)) * max(N, 1) * G * max(D, 1) > 3000:
        spatial[spatial.index(max(spatial))] = 1
    ax = 1 if channels_first else draw(st.integers(1, len(spatial) + 1))
    shape = [N] + spatial
    shape.insert(ax, G * D)
    return tuple(shape), ax, G


def kernel_orders(ndim, ax):
    """The memory orders the kernels read in place: C order, channels first and channels last (axis ax holding C)."""
    rest = [a for a in range(1, ndim) if a != ax]
    return [tuple(range(ndim)), tuple([0, ax] + rest), tuple([0] + rest + [ax])]


@st.composite
def layouts(draw, shape, dtype, data, *, ax=1, broadcast=True, specials=(), as_list=False):
    """An ArrayRecipe of `shape` and `dtype`: often in an order the kernels read in place, else any permutation of
    the axes, each maybe reversed or strided."""
    ndim = len(shape)
    orders = kernel_orders(ndim, ax) if ndim >= 2 else [tuple(range(ndim))]
    perm = draw(st.sampled_from(orders + [None]))
    plain = draw(st.booleans())
    return ArrayRecipe(
        shape=tuple(shape), dtype=dtype,
        perm=perm if perm is not None else tuple(draw(st.permutations(range(ndim)))),
        steps=(1,) * ndim if plain else tuple(draw(st.lists(st.sampled_from([1, 1, 1, -1, 2]), min_size=ndim,
                                                                max_size=ndim))),
        broadcast=tuple(a for a in range(ndim) if broadcast and draw(st.integers(0, 9)) == 0),
        unaligned=draw(st.integers(0, 9)) == 0,
        phase=draw(st.integers(0, 31)),
        readonly=draw(st.integers(0, 9)) == 0,
        data=data, specials=specials, seed=draw(st.integers(0, 2**32 - 1)),
        as_list=as_list and dtype in ("float32", "float64") and draw(st.integers(0, 9)) == 0)


DATA_MODES = ["normal"] * 6 + ["offset", "scaled", "mixed", "constant", "subnormal", "huge", "beyond"]
SPECIALS = st.lists(st.tuples(st.sampled_from(["nan", "inf", "-inf", "subnormal", "max"]), st.integers(1, 3)),
                    max_size=2).map(tuple)


@st.composite
def data_arrays(draw, shape, *, ax=1):
    """A valid input array recipe of `shape`: any float dtype (big-endian too), any layout, any data."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 3 + [">f4", ">f8", ">f2"]))
    return draw(value_arrays(shape, dtype, ax=ax))


@st.composite
def value_arrays(draw, shape, dtype, *, ax=1):
    """An array recipe of `shape` and `dtype` in any layout holding any data, with NaN, infinities, subnormals or
    the dtype's largest values at a few elements now and then."""
    data = draw(st.sampled_from(DATA_MODES))
    specials = draw(SPECIALS) if draw(st.integers(0, 3)) == 0 else ()
    return draw(layouts(shape, dtype, data, ax=ax, specials=specials, as_list=True))


@st.composite
def garbage_data(draw, shape):
    """An input that is not a 2..32-dimensional float array (or not an array at all)."""
    kind = draw(st.sampled_from(["dtype", "dtype", "0d", "1d", "33d", "str", "bytes", "None", "ragged", "float",
                                 "dict", "int_list"]))
    if kind == "dtype":
        return draw(layouts(shape, draw(st.sampled_from(WRONG_DTYPES)), "normal"))
    if kind == "0d":
        return ArrayRecipe(shape=(), dtype=draw(st.sampled_from(FLOAT_DTYPES + ["int32"])))
    if kind == "1d":
        return ArrayRecipe(shape=(draw(st.integers(0, 5)),), dtype=draw(st.sampled_from(FLOAT_DTYPES)))
    if kind == "33d":
        return ArrayRecipe(shape=(1, 2) + (1,) * 31, dtype="float32")
    return {"str": "abc", "bytes": b"\x00\x01", "None": None, "ragged": [[1.0, 2.0], [3.0]], "float": 2.5,
            "dict": {}, "int_list": [[1, 2], [3, 4]]}[kind]


def num_groups_values(G, C):
    """Valid spellings of G, and garbage num_groups for C channels."""
    good = st.sampled_from([G, G, G, np.int64(G), np.uint8(G), np.int16(G), np.array(G)])
    not_dividing = [g for g in (C + 1, G + 1, 2 * C + 3) if C % g]
    bad = st.sampled_from([0, -1, -G, 2.0, 2.5, float(G), True, False, np.True_, "2", b"2", None, [G], np.array([G]),
                           np.float64(G), 1 + 0j, 2**40, 2**62, 2**63, -2**63 - 1, 2**70, 10**400, np.uint64(2**64 - 1),
                           decimal.Decimal(2)] + not_dividing)
    return good, bad


EPS_GOOD = st.sampled_from([1e-5, 1e-5, 1e-5, 1e-3, 0.1, 1.0, 0.0, -0.0, 0, 3, np.float32(1e-5), np.float16(1e-3),
                            np.float64(0.5), np.int64(1), np.longdouble(1e-4), fractions.Fraction(1, 1000), 5e-324,
                            1e-45, 1e-300, 1e30, 1e39, 1e300, float("inf")])
EPS_BAD = st.sampled_from([-1e-5, -1, float("nan"), np.float32("nan"), -float("inf"), np.float64(-0.5), "1e-5", None,
                           True, np.True_, 1j, [1e-5], np.array(1e-5), np.array([1e-5]), decimal.Decimal("1e-5"),
                           10**400, fractions.Fraction(10**400, 3), b"0"])
ACTIVATION_GOOD = st.sampled_from([OMIT, None, "silu", np.str_("silu")])
ACTIVATION_BAD = st.sampled_from(["SiLU", "relu", "", " silu", 1, 0.0, True, b"silu", ["silu"], np.array("silu")])


@st.composite
def params(draw, C, data_dtype, *, backward=False):
    """A valid weight or bias for C channels: None, or C values in any real dtype, layout or container; for the
    forward also a view of out='s memory, or holding a NaN."""
    kinds = ["none", "array", "array", "array", "list", "int_list"] + ([] if backward else ["alias", "alias"])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    if kind == "list":
        return [float(v) for v in np.random.default_rng(draw(st.integers(0, 99))).standard_normal(C)]
    if kind == "int_list":
        return list(range(-1, C - 1))
    if kind == "alias":
        return draw(param_aliases(C))
    compute = "float64" if _family(DTYPES[data_dtype]) == "float64" else "float32"
    dtype = draw(st.sampled_from([compute] * 4 + FLOAT_DTYPES + [">f4", "int32", "uint8", "longdouble"]))
    specials = (("nan", 1),) if not backward and dtype in FLOAT_DTYPES and draw(st.integers(0, 9)) == 0 else ()
    return draw(layouts((C,), dtype, "normal", broadcast=False, specials=specials))


def param_aliases(C):
    """A weight or bias that is a view of out='s memory (the input's when there is no out=)."""
    return st.builds(Alias, st.just("out_memory"), step=st.sampled_from([1, 1, 2, -1]), length=st.just(C),
                     at=st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]))


@st.composite
def aliasing_calls(draw):
    """A valid float32/float64 group_norm call whose out= (fresh, the input itself, or a view of the input's
    memory) holds weight and/or bias: y must be computed from the parameters as they were before the call."""
    shape, ax, G = draw(geometries())
    dtype = draw(st.sampled_from(["float32", "float64"]))
    x = dataclasses.replace(draw(layouts(shape, dtype, "normal", ax=ax, broadcast=False)), readonly=False)
    out = draw(st.one_of(st.just(Alias("input")), st.builds(Alias, st.just("input_view"), shift=st.integers(-3, 3)),
                         layouts(shape, dtype, "normal", ax=ax, broadcast=False).map(
                             lambda r: dataclasses.replace(r, readonly=False))))
    weight, bias = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    args = {"input": x, "num_groups": G, "out": out, "channel_axis": ax,
            "weight": draw(param_aliases(shape[ax])) if weight else draw(params(shape[ax], dtype)),
            "bias": draw(param_aliases(shape[ax])) if bias else draw(params(shape[ax], dtype)),
            "activation": draw(ACTIVATION_GOOD)}
    return Call("group_norm", draw(st.sampled_from(ISA_CHOICES)), draw(st.sampled_from([0, 0, 1])), args, G)


@st.composite
def bad_params(draw, C):
    """A weight or bias that is not C real numbers."""
    kind = draw(st.sampled_from(["shape", "shape", "dtype", "scalar", "zero_d", "str", "bytes", "ragged", "strs",
                                 "dict"]))
    if kind == "shape":
        shape = draw(st.sampled_from([(C + 1,), (max(C - 1, 0) if C > 1 else C + 2,), (1, C), (C, 1), (C, C)]))
        return draw(layouts(shape, "float32", "normal", broadcast=False))
    if kind == "dtype":
        return draw(layouts((C,), draw(st.sampled_from(["bool", "complex64", "object", "<U1", "structured"])),
                            "normal", broadcast=False))
    return {"scalar": np.float32(1.0), "zero_d": np.array(1.0), "str": "abcdef", "bytes": b"\x00" * 4,
            "ragged": [[1.0], [2.0, 3.0]], "strs": ["a"] * C, "dict": {"w": 1}}[kind]


def _native_name(name):
    """The DTYPES name of the native-order twin of dtype `name`."""
    return {">f2": "float16", ">f4": "float32", ">f8": "float64"}.get(name, name)


@st.composite
def outs(draw, shape, data_dtype, ax):
    """A valid out= for an input of `shape` and `data_dtype`, channels on axis ax (or OMIT / None)."""
    kind = draw(st.sampled_from(["omit", "none", "fresh", "fresh", "fresh", "input", "input", "input_view",
                                 "input_view", "self_overlap"]))
    if kind == "omit":
        return OMIT
    if kind == "none":
        return None
    if kind == "input":
        return Alias("input")
    if kind == "input_view":
        return Alias("input_view", shift=draw(st.integers(-6, 6)))
    recipe = draw(layouts(shape, _native_name(data_dtype), "normal", ax=ax, broadcast=kind == "self_overlap"))
    return dataclasses.replace(recipe, readonly=False, writeable_broadcast=True)


@st.composite
def bad_outs(draw, shape, data_dtype):
    """An out= that is refused: wrong type, shape or dtype, or read-only."""
    kind = draw(st.sampled_from(["shape", "dtype", "dtype", "readonly", "broadcast", "list", "tuple", "scalar",
                                 "str", "int"]))
    if kind == "shape":
        bad_shape = draw(st.sampled_from([shape[:-1], shape + (1,), tuple(n + 1 for n in shape), shape[::-1]]))
        return draw(layouts(bad_shape, _native_name(data_dtype), "normal", broadcast=False))
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in FLOAT_DTYPES + [">f4", ">f8", "int32", "object"] if d != data_dtype]))
        return dataclasses.replace(draw(layouts(shape, dtype, "normal", broadcast=False)), readonly=False)
    if kind in ("readonly", "broadcast"):
        recipe = draw(layouts(shape, data_dtype, "normal", broadcast=kind == "broadcast"))
        return dataclasses.replace(recipe, readonly=True, broadcast=recipe.broadcast or (0,))
    return {"list": [[0.0]], "tuple": (1.0, 2.0), "scalar": np.float32(0.0), "str": "out", "int": 5}[kind]


@dataclasses.dataclass
class Call:
    """One fuzzed call: the entry point, the ISA level and thread count it runs at, its arguments (recipes or plain
    values; OMIT leaves an argument out) and the valid geometry the arguments were drawn around."""
    entry: str
    isa: str
    threads: int
    args: dict
    G: int
    eps: object = 1e-5   # group_norm_backward: the eps of the forward its statistics come from


@st.composite
def functional_calls(draw, entry):
    """A group_norm or group_norm_forward call; about half are valid."""
    shape, ax, G = draw(geometries(channels_first=entry != "group_norm"))
    ndim, C = len(shape), shape[ax]
    names = ["input", "num_groups", "eps", "weight", "bias"]
    if entry == "group_norm":
        names += ["activation", "channel_axis", "out"]
    faulty = draw(faulty_arguments(names))

    x = argument(draw, "input", faulty, data_arrays(shape, ax=ax), garbage_data(shape))
    x_dtype = x.dtype if isinstance(x, ArrayRecipe) else "float64"
    good_g, bad_g = num_groups_values(G, C)
    args = {"input": x, "num_groups": argument(draw, "num_groups", faulty, good_g, bad_g),
            "eps": argument(draw, "eps", faulty, st.one_of(st.just(OMIT), EPS_GOOD), EPS_BAD)}
    for name in ("weight", "bias"):
        args[name] = argument(draw, name, faulty, params(C, x_dtype), bad_params(C))
    if entry == "group_norm":
        args["activation"] = argument(draw, "activation", faulty, ACTIVATION_GOOD, ACTIVATION_BAD)
        good_axis = st.sampled_from([ax, ax - ndim, np.int64(ax)] + ([OMIT] if ax == 1 else []))
        bad_axis = st.sampled_from([0, -ndim, ndim, -ndim - 1, 100, 2**70, 1.0, True, "1", None, np.array([1])])
        args["channel_axis"] = argument(draw, "channel_axis", faulty, good_axis, bad_axis)
        args["out"] = argument(draw, "out", faulty, outs(shape, x_dtype, ax), bad_outs(shape, x_dtype))
    return Call(entry, draw(st.sampled_from(ISA_CHOICES)), draw(st.sampled_from([0, 0, 1])), args, G)


STATS_FORMS = ["as_is", "as_is", "as_is", "float64", "list", "strided", "fortran", "big_endian", "unaligned",
               "readonly"]


@st.composite
def backward_calls(draw):
    """A group_norm_backward call: statistics from a valid forward of the input, passed in many forms; about half
    are valid."""
    shape, _, G = draw(geometries(channels_first=True))
    C = shape[1]
    names = ["input", "grad_output", "num_groups", "weight", "mean", "rstd"]
    faulty = draw(faulty_arguments(names))

    x = argument(draw, "input", faulty, data_arrays(shape), garbage_data(shape))
    x_dtype = x.dtype if isinstance(x, ArrayRecipe) else "float64"
    dy_good = value_arrays(shape, x_dtype)
    dy_bad = st.one_of(garbage_data(shape),
                       layouts(tuple(n + 1 for n in shape), x_dtype, "normal"),
                       layouts(shape, draw(st.sampled_from([d for d in FLOAT_DTYPES if d != _family(DTYPES[x_dtype])]
                                                           or ["int32"])), "normal"))
    good_g, bad_g = num_groups_values(G, C)
    args = {"grad_output": argument(draw, "grad_output", faulty, dy_good, dy_bad), "input": x,
            "num_groups": argument(draw, "num_groups", faulty, good_g, bad_g)}
    for which in ("mean", "rstd"):
        N = shape[0]
        bad_stats = st.one_of(
            st.sampled_from([None, "mean", b"", 1.0, [[1.0], [2.0, 3.0]], {"m": 1}]),
            st.sampled_from([(N, G + 1), (G + 1, N), (N,), (N, G, 1), (N * G,)]).map(
                lambda s: ArrayRecipe(shape=s, dtype="float32")),
            st.sampled_from(["complex64", "bool", "object", "<U1"]).map(lambda d: ArrayRecipe(shape=(N, G), dtype=d)))
        good_stats = st.sampled_from(STATS_FORMS).map(lambda form, which=which: Stats(which, form))
        args[which] = argument(draw, which, faulty, good_stats, bad_stats)
    args["weight"] = argument(draw, "weight", faulty, st.one_of(st.just(OMIT), params(C, x_dtype, backward=True)),
                              bad_params(C))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]))
    return Call("group_norm_backward", draw(st.sampled_from(ISA_CHOICES)), draw(st.sampled_from([0, 0, 1])), args,
                G, eps)


# ----------------------------------------------------------------------------------------------- materialise

def _stats_form(stat, form, arena):
    """A valid (N, G) statistic in the form `form`: as returned, float64, a list, a strided / Fortran /
    big-endian / unaligned / read-only copy."""
    if form == "as_is":
        return stat
    if form == "float64":
        return stat.astype(np.float64)
    if form == "list":
        return stat.tolist()
    if form == "fortran":
        return np.asfortranarray(stat)
    recipe = ArrayRecipe(shape=stat.shape, dtype=">f4" if form == "big_endian" and stat.dtype == np.float32
                         else (">f8" if form == "big_endian" else stat.dtype.name),
                         steps=(1, 2) if form == "strided" else (), unaligned=form == "unaligned")
    a = build_array(recipe, arena, np.random.default_rng(0))
    a[...] = stat
    if form == "readonly":
        a.flags.writeable = False
    return a


def materialise(call, rng):
    """(arena, argument dict of real objects) for a Call."""
    arena = Arena(rng)
    built = {}

    def make(value, extra_bytes=0):
        if isinstance(value, ArrayRecipe):
            return build_array(value, arena, np.random.default_rng(value.seed), extra_bytes)
        return value

    x_recipe = call.args["input"]
    x_bytes = (int(np.prod(x_recipe.shape)) * DTYPES[x_recipe.dtype].itemsize + 64
               if isinstance(x_recipe, ArrayRecipe) else 0)
    built["input"] = make(x_recipe, x_bytes)  # room behind the input for an out= view shifted into it
    for name in ("grad_output", "num_groups", "eps", "activation", "channel_axis"):
        if name in call.args:
            built[name] = make(call.args[name])
    if "out" in call.args:
        out = call.args["out"]
        if isinstance(out, Alias):
            out = build_alias(out, built["input"], None, arena)
            if out is None:  # the input has no memory of ours to alias (a list, an object array): no out=
                out = OMIT
        else:
            out = make(out)
        if isinstance(out, np.ndarray) and out.flags.writeable and out is not built["input"]:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if _family(out.dtype):  # a finite poison: a weight aliasing out= reads sane values
                    out[...] = (100 + 3 * rng.standard_normal(out.shape)).astype(out.dtype)
        built["out"] = out
    for name in ("weight", "bias"):
        if name in call.args:
            value = call.args[name]
            if isinstance(value, Alias):
                value = build_alias(value, built["input"], built.get("out"), arena)
                if isinstance(value, np.ndarray) and value.flags.writeable and _family(value.dtype):
                    # sane values, not the random bits of guard bytes (a signalling NaN warns when cast)
                    value[...] = rng.standard_normal(value.shape).astype(value.dtype)
            built[name] = make(value)
    if "mean" in call.args:
        stats = None
        for which in ("mean", "rstd"):
            value = call.args[which]
            if isinstance(value, Stats):
                if stats is None:
                    stats = _valid_stats(built["input"], call.G, call.eps, rng)
                value = _stats_form(stats[0 if which == "mean" else 1], value.form, arena)
            built[which] = make(value)
    return arena, {k: v for k, v in built.items() if v is not OMIT}


def _valid_stats(x, G, eps, rng):
    """mean and rstd from group_norm_forward of x when that is a valid call, else random (N, G) float32 ones."""
    try:
        _, mean, rstd = gn.group_norm_forward(x, G, None, None, eps)
        return mean, rstd
    except (TypeError, ValueError):
        N = x.shape[0] if isinstance(x, np.ndarray) and x.ndim else 1
        return (rng.standard_normal((N, G)).astype(np.float32),
                np.abs(rng.standard_normal((N, G))).astype(np.float32) + 0.5)


# ---------------------------------------------------------------------------------------------------- tests

def _run(call, fn, args, kwargs):
    with use_isa(call.isa):
        gn.set_num_threads(call.threads)
        try:
            return guarded_call(fn, *args, **kwargs)
        finally:
            gn.set_num_threads(0)


def _reference_inputs(built):
    """Native-order copies of the input and parameters as NumPy sees them before the call (out= may overwrite
    them)."""
    copies = {}
    for name in ("input", "weight", "bias", "grad_output"):
        value = built.get(name)
        if value is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    copy = np.array(value, copy=True)
                except (TypeError, ValueError):  # garbage (a ragged list): the spec refuses the call anyway
                    continue
            # Native byte order: reference.accumulator_dtype takes '>f8' for other than float64.
            copies[name] = copy.astype(_native(copy.dtype))
    return copies


SEEDS = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("entry", ["group_norm", "group_norm_forward"])
@settings(FUZZ, max_examples=examples(600))
@given(data=st.data())
def test_forward_calls(entry, data):
    """group_norm / group_norm_forward: valid calls match the reference, invalid ones raise the right error, and
    nothing outside out= changes."""
    check_forward_call(data.draw(functional_calls(entry), label="call"), data.draw(SEEDS, label="seed"))


def check_forward_call(call, seed):
    """Run a group_norm / group_norm_forward Call and judge it by the spec and the reference."""
    entry = call.entry
    arena, built = materialise(call, np.random.default_rng(seed))
    faults, x, ax, G, eps = spec_group_norm(built)
    ref_inputs = _reference_inputs(built) if not faults else {}
    before = snapshot(list(built.values()), arena)

    keywords = {k: built[k] for k in ("weight", "bias", "eps", "activation", "channel_axis", "out") if k in built}
    fn = gn.group_norm if entry == "group_norm" else gn.group_norm_forward
    result, error = _run(call, fn, [built["input"], built["num_groups"]], keywords)

    out = built.get("out")
    wrote_out = error is None and isinstance(out, np.ndarray)
    if not faults and isinstance(out, np.ndarray) and out.size:
        _event("out= overlaps the input" if np.shares_memory(out, built["input"]) else "out= apart from the input")
        if any(isinstance(built.get(k), np.ndarray) and np.shares_memory(out, built[k]) for k in ("weight", "bias")):
            _event("out= overlaps weight or bias")
    assert_untouched(before, list(built.values()), arena, out if wrote_out else None,
                     arena.root_of(out) if wrote_out else None)
    # group_norm_forward allocates (N, G) statistics: C = 0 admits any G, and 2**62 groups cannot be had.
    too_big = entry == "group_norm_forward" and not faults and x.shape[0] * G > 2**28
    if not check_outcome(result, error, faults, built, resource=too_big):
        return

    y = result if entry == "group_norm" else result[0]
    x_ref = ref_inputs["input"]
    if isinstance(out, np.ndarray):
        assert y is out, "out= given: the same object must be returned"
    assert type(y) is np.ndarray and y.shape == x_ref.shape and y.dtype == _native(x_ref.dtype), (
        f"result {type(y).__name__} {getattr(y, 'dtype', None)} {np.shape(y)}; expected {x_ref.dtype} {x_ref.shape}")
    if x_ref.size == 0:  # nothing to compute; a group with no element has NaN statistics (C = 0 admits any G)
        if entry == "group_norm_forward":
            compute = _compute(_family(x_ref.dtype))
            assert all(s.shape == (x_ref.shape[0], G) and s.dtype == compute and np.isnan(s).all()
                       for s in result[1:]), f"statistics of empty input: {result[1]!r}, {result[2]!r}"
        return
    activation = built.get("activation")
    exp = forward_expectation(x_ref, G, ref_inputs.get("weight"), ref_inputs.get("bias"), eps,
                              activation if activation is not None else None, ax)
    root = arena.root_of(out) if isinstance(out, np.ndarray) else None
    aliasing = (_element_offsets(out, root) if root is not None and out.size and 0 in out.strides else None)
    assert_output(y, exp, entry, aliasing=aliasing)
    if entry == "group_norm_forward":
        assert_statistics(result[1], result[2], exp, x_ref.shape[0], G)


@settings(FUZZ, max_examples=examples(200))
@given(data=st.data())
def test_out_over_weight_and_bias(data):
    """out= overlapping weight / bias (and maybe the input): the result is computed from the parameters' values
    before the call, and nothing outside out= changes."""
    check_forward_call(data.draw(aliasing_calls(), label="call"), data.draw(SEEDS, label="seed"))


@settings(FUZZ, max_examples=examples(400))
@given(data=st.data())
def test_backward_calls(data):
    """group_norm_backward: valid calls match the reference gradients, invalid ones raise the right error, and no
    argument changes."""
    check_backward_call(data.draw(backward_calls(), label="call"), data.draw(SEEDS, label="seed"))


def check_backward_call(call, seed):
    """Run a group_norm_backward Call and judge it by the spec and the reference."""
    arena, built = materialise(call, np.random.default_rng(seed))
    faults, G = spec_backward(built)
    ref_inputs = _reference_inputs(built) if not faults else {}
    before = snapshot(list(built.values()), arena)
    positional = [built[k] for k in ("grad_output", "input", "mean", "rstd", "num_groups")]
    keywords = {"weight": built["weight"]} if "weight" in built else {}
    result, error = _run(call, gn.group_norm_backward, positional, keywords)
    assert_untouched(before, list(built.values()), arena)
    if not check_outcome(result, error, faults, built):
        return
    dx, dw, db = result
    x_ref, dy_ref = ref_inputs["input"], ref_inputs["grad_output"]
    assert type(dx) is np.ndarray and dx.shape == x_ref.shape and dx.dtype == _native(x_ref.dtype)
    compute = _compute(_family(x_ref.dtype))
    assert dw.dtype == db.dtype == compute and dw.shape == db.shape == (x_ref.shape[1],)
    assert_gradients((dx, dw, db), x_ref, dy_ref, G, ref_inputs.get("weight"), call.eps)


class Producer:
    """A bare DLPack producer: only __dlpack__ and __dlpack_device__, handing out a NumPy array's capsules."""

    def __init__(self, array):
        self.array = array

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)


def _exportable(value):
    """A floating NumPy array that NumPy itself hands out by DLPack (native byte order, a dtype DLPack names).
    Integer arrays stay NumPy arrays: as NumPy arrays (or lists) weight and bias may hold any real type, but a
    DLPack weight must be floating, as a torch tensor would be (test_dlpack checks that error)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        return False
    try:
        value.__dlpack__(max_version=(1, 0))
    except (BufferError, TypeError, ValueError):
        return False
    return True


def _argument_forms(built):
    """What a call's arguments are, apart from where their memory lies: kind, shape, strides, dtype of each array."""
    return {k: (type(v).__name__, v.shape, v.strides, v.dtype.str) if isinstance(v, np.ndarray) else type(v).__name__
            for k, v in built.items()}


def _as_numpy(value):
    """A result as NumPy sees it: NumPy arrays as they are, anything else through np.from_dlpack."""
    return value if isinstance(value, np.ndarray) else np.from_dlpack(value)


DLPACK_ENTRIES = {"group_norm": gn.group_norm, "group_norm_forward": gn.group_norm_forward,
                  "group_norm_backward": gn.group_norm_backward}


@settings(FUZZ, max_examples=examples(300))
@given(data=st.data())
def test_dlpack_arguments_match_numpy(data):
    """Every array argument NumPy can export, handed over instead by a bare DLPack producer: the call raises the
    same kind of error as with the NumPy arrays (a read-only out= is refused either way), or returns bitwise the same
    results (as producers of the result kind, or out= itself, read back by np.from_dlpack), out= written alike."""
    entry = data.draw(st.sampled_from(list(DLPACK_ENTRIES)), label="entry")
    call = data.draw(backward_calls() if entry == "group_norm_backward" else functional_calls(entry), label="call")
    seed = data.draw(SEEDS, label="seed")
    wrap = data.draw(st.sets(st.sampled_from(["input", "grad_output", "weight", "bias", "mean", "rstd", "out"]),
                             min_size=1), label="wrap")
    # The same arguments, afresh for each call. An alias reaching outside its source array fits in the arena or not
    # depending on where build_array placed the source (its phase padding follows the buffer's address), so the two
    # materialisations must resolve every alias alike, or the calls would differ (a bias on one, none on the other).
    materialised = [materialise(call, np.random.default_rng(seed))[1] for _ in range(2)]
    assume(_argument_forms(materialised[0]) == _argument_forms(materialised[1]))
    outcomes = []
    for producers, built in zip((False, True), materialised):
        out = built.get("out")
        if producers:
            wrapped = {k for k in wrap if _exportable(built.get(k))}
            if not wrapped:
                return
            _event("wrapped: " + ", ".join(sorted(wrapped)))
            built = {k: Producer(v) if k in wrapped else v for k, v in built.items()}
        if entry == "group_norm_backward":
            positional = [built[k] for k in ("grad_output", "input", "mean", "rstd", "num_groups")]
            keywords = {"weight": built["weight"]} if "weight" in built else {}
        else:
            positional = [built["input"], built["num_groups"]]
            keywords = {k: built[k] for k in ("weight", "bias", "eps", "activation", "channel_axis", "out")
                        if k in built}
        result, error = _run(call, DLPACK_ENTRIES[entry], positional, keywords)
        outcomes.append((result, error, out.copy() if isinstance(out, np.ndarray) else None))
    (direct, direct_error, direct_out), (result, error, out) = outcomes
    if direct_error is not None or error is not None:
        # Arguments are checked in another order when some arrive by DLPack, so a call with several faults may
        # name another of them (test_forward_calls / test_backward_calls judge which are right).
        refusals = (TypeError, ValueError)
        assert type(error) is type(direct_error) or (isinstance(error, refusals) and isinstance(
            direct_error, refusals)), f"by DLPack: {error!r}; as NumPy arrays: {direct_error!r}"
        return
    results = result if isinstance(result, tuple) else (result,)
    directs = direct if isinstance(direct, tuple) else (direct,)
    for got, want in zip(results, directs):
        if want is None:
            assert got is None
            continue
        got = _as_numpy(got)
        assert got.shape == want.shape and got.dtype == want.dtype and got.tobytes() == want.tobytes(), (
            f"by DLPack: {got!r}; as NumPy arrays: {want!r}")
    if direct_out is not None:
        assert out.tobytes() == direct_out.tobytes(), "out= written differently"


@st.composite
def layer_calls(draw):
    """GroupNorm(num_groups, num_channels, eps, affine, dtype), then forward / backward on fuzzed arrays."""
    shape, _, G = draw(geometries(channels_first=True))
    C = shape[1]
    names = ["num_groups", "num_channels", "eps", "affine", "dtype", "input", "grad_output"]
    faulty = draw(faulty_arguments(names))
    good_g, bad_g = num_groups_values(G, C or G)
    kwargs = {"num_groups": argument(draw, "num_groups", faulty, good_g, bad_g),
              "num_channels": argument(draw, "num_channels", faulty,
                                       st.sampled_from([C, np.int32(C)]) if C else st.just(G),
                                       st.sampled_from([0, -4, 4.0, True, "4", None, np.array([4])]))}
    for name, good, bad_values in (
            ("eps", st.one_of(st.just(OMIT), EPS_GOOD), EPS_BAD),
            ("affine", st.sampled_from([OMIT, True, False, np.True_]), st.sampled_from([1, 0, "yes", None, [True]])),
            ("dtype", st.sampled_from([OMIT, np.float32, np.float64, "float32", "f8", None]),
             st.sampled_from([np.float16, np.int32, "nonsense", 3, object, "bfloat16" if ml_dtypes else "U1"]))):
        value = argument(draw, name, faulty, good, bad_values)
        if value is not OMIT:
            kwargs[name] = value
    if not C:
        shape = (shape[0], G) + shape[2:]
    wrong_channels = data_arrays((shape[0], shape[1] + 1) + shape[2:])
    x = argument(draw, "input", faulty, data_arrays(shape), st.one_of(garbage_data(shape), wrong_channels))
    x_dtype = x.dtype if isinstance(x, ArrayRecipe) else "float64"
    dy = argument(draw, "grad_output", faulty, value_arrays(shape, x_dtype), garbage_data(shape))
    actions = draw(st.sampled_from(["forward", "forward_backward", "forward_backward", "backward_first"]))
    return Call("GroupNorm", draw(st.sampled_from(ISA_CHOICES)), draw(st.sampled_from([0, 0, 1])),
                {"ctor": kwargs, "input": x, "grad_output": dy, "actions": actions}, G)


@settings(FUZZ, max_examples=examples(300))
@given(data=st.data())
def test_layer_calls(data):
    """GroupNorm: the constructor refuses exactly what the spec refuses; forward matches the reference (weight
    ones, bias zeros); backward before forward is a RuntimeError; backward matches the reference gradients."""
    check_layer_call(data.draw(layer_calls(), label="call"), data.draw(SEEDS, label="seed"))


def check_layer_call(call, seed):
    """Construct a GroupNorm from a Call, run its actions, and judge them by the spec and the reference."""
    rng = np.random.default_rng(seed)
    kwargs = call.args["ctor"]
    faults, G, C, eps, _ = spec_layer(kwargs)
    layer, error = _run(call, gn.GroupNorm, [], kwargs)
    if not check_outcome(layer, error, faults, kwargs):
        return
    arena = Arena(rng)
    x = build_array(call.args["input"], arena, rng) if isinstance(call.args["input"], ArrayRecipe) else \
        call.args["input"]
    dy = build_array(call.args["grad_output"], arena, rng) if isinstance(call.args["grad_output"], ArrayRecipe) \
        else call.args["grad_output"]
    before = snapshot([x, dy], arena)
    if call.args["actions"] == "backward_first":
        _, error = _run(call, layer.backward, [dy], {})
        assert isinstance(error, RuntimeError) and "forward" in str(error), f"backward before forward: {error!r}"
        return

    faults = []  # the layer checks the shape, then group_norm_forward the rest
    xa = spec_array(x, "input", faults)
    if isinstance(x, (str, bytes)):  # the layer makes a 0-d array of it: refused for its shape or its dtype
        faults.append((ValueError, "input"))
    if xa is not None:
        if xa.ndim < 2 or xa.ndim > 32 or xa.shape[1] != C:
            faults.append((ValueError, "input"))
        if _family(xa.dtype) is None:
            faults.append((TypeError, "input"))
    ref_inputs = _reference_inputs({"input": x, "grad_output": dy}) if not faults else {}
    params_before = [None if p is None else p.copy() for p in (layer.weight, layer.bias)]
    y, error = _run(call, layer.forward, [x], {})
    assert_untouched(before, [x, dy], arena)
    for p, p_before in zip((layer.weight, layer.bias), params_before):
        assert p is None or p.tobytes() == p_before.tobytes(), "forward changed the layer's parameters"
    if not check_outcome(y, error, faults, {"input": x}):
        return
    x_ref = ref_inputs["input"]
    exp = forward_expectation(x_ref, G, None, None, eps, None, 1)
    assert type(y) is np.ndarray and y.shape == x_ref.shape and y.dtype == _native(x_ref.dtype)
    assert_output(y, exp, "GroupNorm.forward")
    if call.args["actions"] == "forward":
        return

    faults = []
    dya = spec_data(dy, "grad_output", faults)
    if dya is not None and (dya.shape != x_ref.shape or _family(dya.dtype) != _family(x_ref.dtype)):
        faults.append((ValueError, "grad_output"))
    dx, error = _run(call, layer.backward, [dy], {})
    assert_untouched(before, [x, dy], arena)
    if not check_outcome(dx, error, faults, {"grad_output": dy}):
        return
    assert type(dx) is np.ndarray and dx.shape == x_ref.shape and dx.dtype == _native(x_ref.dtype)
    if layer.affine:
        assert layer.grad_weight.shape == layer.grad_bias.shape == (C,)
    recipe = call.args["input"]
    if 1e-8 <= eps <= 1e6:
        grads = (dx, layer.grad_weight, layer.grad_bias) if layer.affine else (dx, None, None)
        assert_gradients(grads, x_ref, ref_inputs["grad_output"], G, None, eps)


def _regression(entry, args, G=2, **extra):
    x = ArrayRecipe(shape=(2, 4, 3), dtype="float32", seed=1)
    return Call(entry, DEFAULT_ISA, 0, {"input": x, "num_groups": G, **args}, G, **extra)


# Calls the fuzzer found the library (or this file's oracle) wrong on once, replayed on every run.
FOUND_BY_FUZZING = {
    "out-is-input-weight-inside": _regression("group_norm", {"out": Alias("input"),
                                                             "weight": Alias("out_memory", length=4)}),
    "out-holds-weight-and-bias": _regression("group_norm", {
        "out": ArrayRecipe(shape=(2, 4, 3), dtype="float32", seed=2),
        "weight": Alias("out_memory", length=4, at=0.5), "bias": Alias("out_memory", length=4, step=-1, at=0.9)}),
    "num_groups-2**70": _regression("group_norm", {}, G=2**70),
    "num_groups-uint64-max": _regression("group_norm_forward", {}, G=np.uint64(2**64 - 1)),
    "channel_axis-2**70": _regression("group_norm", {"channel_axis": 2**70}),
    "eps-10**400": _regression("group_norm_forward", {"eps": 10**400}),
    "input-ragged": _regression("group_norm", {"input": [[1.0, 2.0], [3.0]]}),
    "weight-ragged": _regression("group_norm", {"weight": [[1.0], [2.0, 3.0]]}),
    "mean-ragged": Call("group_norm_backward", DEFAULT_ISA, 0, {
        "input": ArrayRecipe(shape=(2, 4, 3), dtype="float32", seed=1), "num_groups": 2,
        "grad_output": ArrayRecipe(shape=(2, 4, 3), dtype="float32", seed=3), "mean": [[1.0], [2.0, 3.0]],
        "rstd": Stats("rstd", "as_is")}, 2),
    "huge-bfloat16-in-place-channels-last": Call("group_norm", DEFAULT_ISA, 0, {
        "input": ArrayRecipe(shape=(1, 2, 2), dtype="bfloat16" if BFLOAT16 is not None else "float32", data="huge"),
        "num_groups": 2, "channel_axis": 2, "out": Alias("input")}, 2),
    "no-channels-any-num_groups": _regression("group_norm", {"input": ArrayRecipe((1, 0, 1, 1), "float16")}, G=2**40),
    "no-channels-no-samples": _regression("group_norm_forward", {"input": ArrayRecipe((0, 0, 3), "float32")}, G=2**40),
    "layer-eps-10**400": Call("GroupNorm", DEFAULT_ISA, 0, {"ctor": {"num_groups": 2, "num_channels": 4,
                                                                     "eps": 10**400}}, 2),
    "layer-input-ragged": Call("GroupNorm", DEFAULT_ISA, 0, {
        "ctor": {"num_groups": 2, "num_channels": 4}, "input": [[1.0, 2.0], [3.0]],
        "grad_output": None, "actions": "forward"}, 2),
}


@pytest.mark.parametrize("call", FOUND_BY_FUZZING.values(), ids=FOUND_BY_FUZZING.keys())
def test_found_by_fuzzing(call):
    check = {"group_norm_backward": check_backward_call, "GroupNorm": check_layer_call}.get(call.entry,
                                                                                            check_forward_call)
    check(call, 0)

# Groups the float sums of the forward kernels cannot hold (cpp/kernels/forward_impl.h: wide_group_stats): squares
# of deviations that overflow or underflow the compute dtype, spreads up to the dtype's max, a group whose every
# square underflows and whose deviations cancel. Each sits in a tensor beside an ordinary group, in both layouts.
EXTREME_GROUPS = {
    "float32-spread-near-max": ("float32", [3.3e38, -3.3e38, 1e38, -2e38, 0.0, 5.0]),
    "float32-offset-near-max": ("float32", [3.3e38, 3.2e38, 3.1e38, 3.0e38, 3.3e38, 1e37]),
    "float32-tiny-symmetric": ("float32", [-3e-30, 3e-30, 0.0, 0.0, 0.0, 0.0]),
    "float32-subnormal": ("float32", [1e-45, -3e-45, 7e-45, 0.0, 2e-44, -1e-44]),
    "float32-wide-dynamic-range": ("float32", [-5.3837076e+25, 1.4424001e-05, 9.1502493e-08, -1.4343923e+05,
                                               -3.0779739e-12, -8.7657699e+13]),
    "float64-spread-beyond-sqrt-max": ("float64", [1e160, -1e160, 3e159, 0.0, -7e158, 1.0]),
    "float64-spread-near-max": ("float64", [1.7e308, -1.7e308, 1e308, -5e307, 0.0, 2.0]),
    "float64-tiny-symmetric": ("float64", [-3e-170, 3e-170, 0.0, 0.0, 1e-171, -1e-171]),
    "bfloat16-spread-near-max": ("bfloat16", [3.3e38, -3.3e38, 1e38, -2e38, 0.0, 5.0]),
}


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("name", EXTREME_GROUPS)
def test_extreme_group(isa, name, activation, layout):
    family, values = EXTREME_GROUPS[name]
    if family not in DTYPES:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = DTYPES[family]
    rng = np.random.default_rng(7)
    for length in (6, 96, 5000):  # within one vector, several, several chunks' worth of rows
        data = np.empty((2, 4, length))
        data[:, :2] = rng.permutation(np.resize(values, 2 * length)).reshape(2, length)  # group 0: extreme
        data[:, 2:] = rng.standard_normal((2, 2, length))  # group 1: ordinary
        x = data.astype(dtype)
        if layout == "channels_last":
            x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        weight = rng.uniform(0.5, 2, 4).astype(_compute(family))
        bias = rng.standard_normal(4).astype(_compute(family))
        eps = 1e-70 if "tiny" in name or "subnormal" in name else 1e-5
        exp = forward_expectation(x, 2, weight, bias, eps, activation, 1)
        assert exp.groups_checked.all(), name
        what = f"{name}, length {length}, {layout}, activation {activation}"
        y = gn.group_norm(x, 2, weight, bias, eps, activation=activation)
        assert_output(y, exp, what)
        in_place = x.copy(order="K")
        assert gn.group_norm(in_place, 2, weight, bias, eps, activation=activation, out=in_place) is in_place
        assert in_place.tobytes() == y.tobytes(), f"in place: {what}"
        if activation is None:
            y, mean, rstd = gn.group_norm_forward(x, 2, weight, bias, eps)
            assert_output(y, exp, f"group_norm_forward: {name}, length {length}, {layout}")
            assert_statistics(mean, rstd, exp, 2, 2)
