# test_errors.py — argument validation: TypeError for wrong types, ValueError for wrong values, each message
# naming the argument and the offending value; a failed call leaves out= and the input untouched.
import re

import numpy as np
import pytest

import groupnorm as gn
from reference import same_bits

SHAPE = (2, 6, 5, 4)  # C = 6


def message(*parts):
    """A `match=` pattern requiring every part (literally, in any order) somewhere in the message."""
    return "(?s)^" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def message_any(name, *alternatives):
    """The argument name plus at least one of several spellings of the value."""
    return "(?s)^" + f"(?=.*{re.escape(name)})" + "(?=.*(" + "|".join(re.escape(a) for a in alternatives) + "))"


def _x(dtype=np.float32):
    return np.random.default_rng().standard_normal(SHAPE).astype(dtype)


# (id, exception, pattern, kwargs builder). Builders take the (valid) input x and return keyword arguments;
# any `out` in them replaces the valid sentinel-filled out of the default call.
TYPE_ERRORS = [
    ("num_groups-float", message("num_groups", "2.5"), lambda x: dict(num_groups=2.5)),
    ("num_groups-bool", message_any("num_groups", "True", "bool"), lambda x: dict(num_groups=True)),
    ("num_groups-str", message_any("num_groups", "'3'", "str"), lambda x: dict(num_groups="3")),
    ("num_groups-None", message_any("num_groups", "None"), lambda x: dict(num_groups=None)),
    ("activation-int", message("activation", "5"), lambda x: dict(activation=5)),
    ("activation-bool", message_any("activation", "True", "bool"), lambda x: dict(activation=True)),
    ("out-list", message_any("out", "list"), lambda x: dict(out=np.zeros(SHAPE, np.float32).tolist())),
    ("out-tuple", message_any("out", "tuple"), lambda x: dict(out=(1.0, 2.0))),
    ("eps-str", message_any("eps", "'1e-5'", "str"), lambda x: dict(eps="1e-5")),
]


@pytest.mark.parametrize("pattern, build", [c[1:] for c in TYPE_ERRORS], ids=[c[0] for c in TYPE_ERRORS])
def test_type_errors(pattern, build):
    _check_refused(TypeError, pattern, build)


VALUE_ERRORS = [
    ("num_groups-zero", message("num_groups", "0"), lambda x: dict(num_groups=0)),
    ("num_groups-negative", message("num_groups", "-2"), lambda x: dict(num_groups=-2)),
    ("num_groups-not-dividing", message("num_groups", "4", "6"), lambda x: dict(num_groups=4)),
    ("num_groups-above-C", message("num_groups", "12", "6"), lambda x: dict(num_groups=12)),
    ("weight-short", message("weight", "5"), lambda x: dict(weight=np.ones(5, x.dtype))),
    ("weight-long", message("weight", "7"), lambda x: dict(weight=np.ones(7, x.dtype))),
    ("weight-2d", message("weight", "(1, 6)"), lambda x: dict(weight=np.ones((1, 6), x.dtype))),
    ("weight-scalar", message("weight", "()"), lambda x: dict(weight=np.float32(1.0))),
    ("bias-short", message("bias", "5"), lambda x: dict(bias=np.ones(5, x.dtype))),
    ("bias-2d", message("bias", "(6, 1)"), lambda x: dict(bias=np.ones((6, 1), x.dtype))),
    ("bias-only-wrong", message("bias", "3"), lambda x: dict(weight=np.ones(6, x.dtype), bias=np.ones(3, x.dtype))),
    ("eps-negative", message("eps", "-0.001"), lambda x: dict(eps=-1e-3)),
    ("eps-nan", message("eps", "nan"), lambda x: dict(eps=float("nan"))),
    ("activation-unknown", message("activation", "relu"), lambda x: dict(activation="relu")),
    ("activation-case", message("activation", "SiLU"), lambda x: dict(activation="SiLU")),
    ("out-shape", message("out", "(2, 6, 5, 3)"), lambda x: dict(out=np.zeros((2, 6, 5, 3), x.dtype))),
    ("out-transposed-shape", message("out", "(2, 5, 4, 6)"), lambda x: dict(out=np.zeros((2, 5, 4, 6), x.dtype))),
    ("out-dtype", message("out", "float64"), lambda x: dict(out=np.zeros(SHAPE, np.float64))),
    ("out-read-only", "(?s)^(?=.*out)(?=.*(writeable|writable|read-only|readonly))",
     lambda x: dict(out=_read_only(np.zeros(SHAPE, x.dtype)))),
    ("channel_axis-zero", message("channel_axis", "0"), lambda x: dict(channel_axis=0)),
    ("channel_axis-too-big", message("channel_axis", "4"), lambda x: dict(channel_axis=4)),
    ("channel_axis-too-negative", message("channel_axis", "-5"), lambda x: dict(channel_axis=-5)),
    ("channel_axis-negative-batch", message("channel_axis", "-4"), lambda x: dict(channel_axis=-4)),
]


def _read_only(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("pattern, build", [c[1:] for c in VALUE_ERRORS], ids=[c[0] for c in VALUE_ERRORS])
def test_value_errors(pattern, build):
    _check_refused(ValueError, pattern, build)


def _check_refused(exception, pattern, build):
    """The call raises `exception` matching `pattern`; neither the input nor any out= array changes."""
    x = _x()
    x_before = x.copy()
    kwargs = dict(num_groups=3, out=np.full(SHAPE, -777.0, np.float32))
    kwargs.update(build(x))
    out = kwargs["out"]
    out_before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None
    num_groups = kwargs.pop("num_groups")
    with pytest.raises(exception, match=pattern):
        gn.group_norm(x, num_groups, **kwargs)
    assert same_bits(x, x_before), "a refused call modified the input"
    if out_before is not None:
        assert same_bits(out, out_before), "a refused call wrote into out="


INPUT_TYPE_ERRORS = [
    ("int32", np.zeros(SHAPE, np.int32), ["int32"]),
    ("int64", np.zeros(SHAPE, np.int64), ["int64"]),
    ("uint8", np.zeros(SHAPE, np.uint8), ["uint8"]),
    ("bool", np.zeros(SHAPE, np.bool_), ["bool"]),
    ("int16", np.zeros(SHAPE, np.int16), ["int16"]),
    ("structured", np.zeros(SHAPE, [("x", "<u2")]), ["('x', '<u2')"]),
    ("longdouble", np.zeros(SHAPE, np.longdouble), ["float128", "longdouble", "float96"]),
    ("complex64", np.zeros(SHAPE, np.complex64), ["complex64"]),
    ("complex128", np.zeros(SHAPE, np.complex128), ["complex128"]),
    ("object", np.zeros(SHAPE, object), ["object"]),
    ("unicode-array", np.full(SHAPE, "a"), ["<U1", "str"]),
    ("string", "abc", ["'abc'", "str"]),
    ("bytes", b"abc", ["b'abc'", "bytes"]),
    ("None", None, ["None", "object"]),
    ("int-list", [[1, 2], [3, 4]], ["int64", "int"]),
]


@pytest.mark.parametrize("value, spellings", [c[1:] for c in INPUT_TYPE_ERRORS], ids=[c[0] for c in INPUT_TYPE_ERRORS])
def test_input_type_errors(value, spellings):
    before = np.array(value, copy=True) if isinstance(value, np.ndarray) else None
    out = np.full((2, 2) if isinstance(value, list) else SHAPE, -777.0, np.float32)
    out_before = out.copy()
    with pytest.raises(TypeError, match=message_any("input", *spellings)):
        gn.group_norm(value, 1, out=out)
    assert same_bits(out, out_before)
    if before is not None:
        assert np.array_equal(value, before)


@pytest.mark.parametrize("value, spellings", [
    (np.float64(3.0), ["()", "0"]), (3.0, ["()", "0"]), (np.array(2.0, np.float32), ["()", "0"]),
    (np.ones(6, np.float32), ["(6,)", "1"]), ([1.0, 2.0], ["(2,)", "1"]),
], ids=["numpy-scalar", "python-float", "0d-array", "1d-array", "1d-list"])
def test_fewer_than_two_dimensions(value, spellings):
    with pytest.raises(ValueError, match=message_any("input", *spellings)):
        gn.group_norm(value, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_validation_before_writing_with_in_place_out(dtype):
    """out=x and a bad argument: x must come back unchanged."""
    x = _x(dtype)
    before = x.copy()
    with pytest.raises(ValueError, match=message("num_groups", "4")):
        gn.group_norm(x, 4, out=x)
    with pytest.raises(ValueError, match=message("weight")):
        gn.group_norm(x, 3, np.ones(5, dtype), out=x)
    with pytest.raises(TypeError, match=message("activation")):
        gn.group_norm(x, 3, activation=1, out=x)
    assert same_bits(x, before)


def test_weight_and_bias_of_non_numeric_type():
    x = _x()
    with pytest.raises(TypeError, match=message("weight")):
        gn.group_norm(x, 3, weight="abcdef")
    with pytest.raises(TypeError, match=message("bias")):
        gn.group_norm(x, 3, bias=np.array(["a"] * 6))


def test_positional_only_arguments_end_at_eps():
    """activation, channel_axis and out are keyword-only."""
    x = _x()
    with pytest.raises(TypeError):
        gn.group_norm(x, 3, None, None, 1e-5, "silu")


def test_valid_edge_values_are_accepted():
    x = _x()
    gn.group_norm(x, 6)
    gn.group_norm(x, 1, eps=0.0)
    gn.group_norm(x, 3, eps=np.float32(1e-5))
    gn.group_norm(x, 3, eps=1)
    gn.group_norm(x, 3, activation=None)
    gn.group_norm(x, 3, channel_axis=-3)
