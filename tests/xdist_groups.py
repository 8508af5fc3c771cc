# xdist_groups.py — keeps pytest-xdist's --dist loadgroup grouping working under pytest 9.2 (conftest.py imports
# the hook; test_xdist_groups.py checks that the groups hold).
import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keeps pytest-xdist's --dist loadgroup grouping (test_huge.py's tests one at a time, test_gpu_path.py's
    library compiled once) under pytest 9.2: xdist names a grouped test's group by a suffix it writes to the item's
    legacy `_nodeid`, but pytest 9.2 takes node ids from the structured `_id`, so the suffix was lost and the
    groups spread over the workers (pytest-dev/pytest-xdist#1386). After xdist's hook, the suffixed id goes where
    pytest reads it. A no-op where xdist's suffix took effect, or where no suffix was written."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers under --dist loadgroup
        return
    for item in items:
        suffixed = getattr(item, "_nodeid", None)
        structured = getattr(item, "_id", None)
        if isinstance(suffixed, str) and structured is not None and hasattr(type(structured), "parse") \
                and str(item.nodeid) != suffixed:
            item._id = type(structured).parse(suffixed)
