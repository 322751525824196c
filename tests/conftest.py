"""Shared pytest hooks (remember whether a test's call phase failed: fixtures print logs then) and
the session's Ceph cluster."""

import os
import uuid

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call_failed = report.failed


def _ceph_cluster(tmp_path_factory, dirname):
    from tests.helpers.ceph import CephCluster, missing_tools

    missing = missing_tools()
    if missing:
        message = "RBD tests need " + ", ".join(missing)
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(message + " (CI=true: run scripts/install-system-deps.sh)", pytrace=False)
        pytest.skip(message + "; run scripts/install-system-deps.sh (or `make test`)")
    cluster = CephCluster(tmp_path_factory.mktemp(dirname))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory):
    """A one-node Ceph cluster (tests/helpers/ceph.py), started once per test session."""
    yield from _ceph_cluster(tmp_path_factory, "ceph")


@pytest.fixture(scope="module")
def own_ceph_cluster(tmp_path_factory):
    """A second one-node cluster for one test module (own directory, own ports): for tests that
    kill or stop its daemons, which must never happen to the session's ``ceph_cluster``."""
    yield from _ceph_cluster(tmp_path_factory, "ceph-own")


@pytest.fixture
def rbd_image(ceph_cluster, request):
    """``rbd_image(size_bytes=64 MiB) -> name``: a new image in the test pool, removed at teardown."""
    names = []

    def create(size_bytes: int = 64 << 20) -> str:
        name = "img-%s-%d" % (uuid.uuid4().hex[:8], len(names))
        ceph_cluster.create_image(name, size_bytes)
        names.append(name)
        return name

    yield create
    for name in names:
        ceph_cluster.remove_image(name)
