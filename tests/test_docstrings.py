"""The examples in the public docstrings run and print what they claim."""
import doctest

import pytest

import groupnorm
from groupnorm import _config, _core


@pytest.mark.parametrize("module", [_core, _config], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, module.__name__, globs={"groupnorm": groupnorm})
    examples = sum(len(t.examples) for t in tests)
    assert examples > 0, f"no docstring examples found in {module.__name__}"
    try:
        for test in tests:
            runner.run(test)
    finally:
        groupnorm.set_num_threads(None)
    result = runner.summarize(verbose=False)
    assert result.failed == 0


def test_public_functions_documented():
    for name in groupnorm.__all__:
        obj = getattr(groupnorm, name)
        if callable(obj):
            assert obj.__doc__ and "Examples" in obj.__doc__, f"{name} lacks a docstring with examples"
