"""RBD without a cluster: params as SPDK decodes them, and librbd missing at run time (a real
dlopen failure of a soname that does not exist)."""

import pytest
from pydantic import ValidationError

from vhostd import _dataplane as dp
from vhostd.bdev import rbd
from vhostd.rpc import params as P

MISSING = "libvhostd-test-missing.so.1"


def test_create_params_need_pool_image_and_block_size_and_take_string_maps():
    p = P.BdevRbdCreate.model_validate({"pool_name": "rbd", "rbd_name": "i", "block_size": 512,
                                        "config": {"mon_host": "10.0.0.1"}})
    assert p.config == {"mon_host": "10.0.0.1"} and p.read_only is False
    assert "config" in p.model_fields_set
    assert "config" in P.BdevRbdCreate.model_validate(
        {"pool_name": "rbd", "rbd_name": "i", "block_size": 512, "config": None}).model_fields_set
    bad = [
        {"rbd_name": "i", "block_size": 512},                                   # no pool_name
        {"pool_name": "rbd", "rbd_name": "i"},                                  # no block_size
        {"pool_name": "rbd", "rbd_name": "i", "block_size": "512"},             # wrong type
        {"pool_name": "rbd", "rbd_name": "i", "block_size": 512, "config": {"a": 1}},
        {"pool_name": "rbd", "rbd_name": "i", "block_size": 512, "config": "a=b"},
        {"pool_name": "rbd", "rbd_name": "i", "block_size": 512, "snap": "s"},  # unknown key
    ]
    for params in bad:
        with pytest.raises(ValidationError):
            P.BdevRbdCreate.model_validate(params)


def test_register_cluster_params():
    p = P.BdevRbdRegisterCluster.model_validate({"name": "c", "config_param": {"k": "v"}})
    assert p.config_param == {"k": "v"} and p.user_id is None
    for params in ({}, {"name": "c", "config_param": ["k=v"]}, {"name": "c", "core_mask": 3}):
        with pytest.raises(ValidationError):
            P.BdevRbdRegisterCluster.model_validate(params)


def test_a_missing_librbd_is_a_clear_error_and_loads_nothing():
    with pytest.raises(dp.RbdUnavailable) as exc:
        dp.rbd_load(MISSING)
    assert MISSING in str(exc.value)


def test_the_domain_layer_names_the_package_when_librbd_is_missing(monkeypatch):
    monkeypatch.setenv(rbd.LIBRBD_ENV, MISSING)
    with pytest.raises(rbd.RbdUnavailable) as exc:
        rbd.connect("admin", {}, None, None, False)
    assert "librbd1" in str(exc.value) and MISSING in str(exc.value)
