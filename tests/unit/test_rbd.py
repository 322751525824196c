"""RBD without a cluster: librbd missing at run time (a real dlopen failure of a soname that does
not exist)."""

import pytest

from vhostd import _dataplane as dp

MISSING = "libvhostd-test-missing.so.1"


def test_a_missing_librbd_is_a_clear_error_and_loads_nothing():
    with pytest.raises(dp.RbdUnavailable) as exc:
        dp.rbd_load(MISSING)
    assert MISSING in str(exc.value)
