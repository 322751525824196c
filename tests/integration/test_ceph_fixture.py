"""The test cluster itself (tests/helpers/ceph.py): what every RBD test relies on."""


def test_cluster_is_healthy_and_images_are_private_to_a_test(ceph_cluster, rbd_image):
    assert ceph_cluster.ceph("health").startswith("HEALTH_OK")
    first, second = rbd_image(4 << 20), rbd_image(8 << 20)
    assert first != second
    assert ceph_cluster.image_size(first) == 4 << 20
    assert ceph_cluster.export_image(second) == bytes(8 << 20)
