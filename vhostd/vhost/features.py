"""Feature bits: virtio (transport, ring, blk, scsi) and vhost-user protocol features, in one place.

Values are bit numbers, as in the virtio spec; ``bit(n)`` gives the mask.
"""

from enum import IntEnum


def bit(n: int) -> int:
    """Mask of feature bit n."""
    return 1 << n


class VirtioFeature(IntEnum):
    """Device-independent virtio feature bits (virtio 1.x §6) and vhost's own transport bits."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VHOST_USER_PROTOCOL_FEATURES = 30   # vhost-user: GET/SET_PROTOCOL_FEATURES available
    VHOST_LOG_ALL = 26                  # vhost: dirty logging for live migration
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    NOTIFICATION_DATA = 38
    RING_RESET = 40


class BlkFeature(IntEnum):
    """virtio-blk feature bits (virtio 1.x §5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16


class ScsiFeature(IntEnum):
    """virtio-scsi feature bits (virtio 1.x §5.6.3)."""

    INOUT = 0
    HOTPLUG = 1
    CHANGE = 2
    T10_PI = 3


class ProtocolFeature(IntEnum):
    """vhost-user protocol feature bits (QEMU docs/interop/vhost-user.rst)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def mask(*bits: int) -> int:
    """Mask with every given feature bit set."""
    value = 0
    for b in bits:
        value |= 1 << b
    return value


def names(value: int, enum: type[IntEnum]) -> list[str]:
    """Names of the bits of ``enum`` set in value (for logs and errors)."""
    return [member.name for member in enum if value & (1 << member.value)]
