"""Identify data structures (4 KiB each): controller, namespace, active namespace list, namespace
identification descriptors.  Byte offsets are those of the NVM Express base and NVM command set
specifications; Linux reads the fields listed in docs (spec §5.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

IDENTIFY_SIZE = 4096
MAX_ACTIVE_NSIDS = 1024

# Optional NVM commands (ONCS) and other capability bits the controller advertises.
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
OAES_NAMESPACE_ATTRIBUTE = 1 << 8
LPA_EXTENDED_DATA = 1 << 2
VWC_PRESENT = 1 << 0
VWC_NO_BROADCAST_FLUSH = 0b10 << 1   # Flush of NSID 0xffffffff: Invalid Namespace
NSFEAT_DEALLOCATE = 1 << 2

DESCRIPTOR_EUI64, DESCRIPTOR_NGUID, DESCRIPTOR_UUID = 1, 2, 3


@dataclass(frozen=True)
class ControllerInfo:
    """What Identify Controller reports."""

    serial: str = "VHOSTD0000000001"
    model: str = "vhostd NVMe controller"
    firmware: str = "1.0"
    vendor_id: int = 0x4E58
    ieee_oui: bytes = b"\x8d\x6b\x50"
    controller_id: int = 1
    version: int = 0x00010400
    mdts: int = 7                      # 2^7 × 4 KiB = 512 KiB per command
    aerl: int = 3                      # 4 Asynchronous Event Requests held at most (0-based)
    max_namespaces: int = 32
    max_commands: int = 0
    subnqn: str = "nqn.2016-06.io.spdk:vhostd"


@dataclass(frozen=True)
class NamespaceInfo:
    """One namespace: block size and count, and the stable identifiers the host tells apart."""

    nsid: int
    block_size: int
    num_blocks: int
    nguid: bytes = bytes(16)
    eui64: bytes = bytes(8)
    uuid: bytes = bytes(16)

    @property
    def lbads(self) -> int:
        return self.block_size.bit_length() - 1


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def identify_controller(info: ControllerInfo) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", data, 0, info.vendor_id, info.vendor_id)       # VID, SSVID
    data[4:24] = _ascii(info.serial, 20)
    data[24:64] = _ascii(info.model, 40)
    data[64:72] = _ascii(info.firmware, 8)
    data[72] = 6                                                           # RAB
    data[73:76] = info.ieee_oui
    data[77] = info.mdts
    struct.pack_into("<HI", data, 78, info.controller_id, info.version)    # CNTLID, VER
    struct.pack_into("<I", data, 92, OAES_NAMESPACE_ATTRIBUTE)
    data[111] = 1                                                          # CNTRLTYPE: I/O
    data[258] = 3                                                          # ACL (0-based)
    data[259] = info.aerl
    data[260] = 0x3                                                        # FRMW: slot 1 read-only
    data[261] = LPA_EXTENDED_DATA
    data[262] = 0                                                          # ELPE: 1 error entry
    data[512] = 0x66                                                       # SQES: 64 bytes
    data[513] = 0x44                                                       # CQES: 16 bytes
    struct.pack_into("<HI", data, 514, info.max_commands, info.max_namespaces)   # MAXCMD, NN
    struct.pack_into("<H", data, 520, ONCS_DSM | ONCS_WRITE_ZEROES)
    data[525] = VWC_PRESENT | VWC_NO_BROADCAST_FLUSH
    nqn = info.subnqn.encode()[:255]
    data[768:768 + len(nqn)] = nqn
    return bytes(data)


def identify_namespace(ns: NamespaceInfo | None) -> bytes:
    """Identify Namespace; all zeros for an inactive NSID."""
    data = bytearray(IDENTIFY_SIZE)
    if ns is None:
        return bytes(data)
    struct.pack_into("<QQQ", data, 0, ns.num_blocks, ns.num_blocks, ns.num_blocks)
    data[24] = NSFEAT_DEALLOCATE
    data[25] = 0                                                           # NLBAF: one format
    data[26] = 0                                                           # FLBAS: format 0
    data[104:120] = ns.nguid
    data[120:128] = ns.eui64
    struct.pack_into("<I", data, 128, ns.lbads << 16)                     # LBAF0: MS 0, LBADS
    return bytes(data)


def active_namespace_list(nsids: list[int], above: int) -> bytes:
    """Active NSIDs greater than ``above``, ascending, at most 1024."""
    chosen = sorted(n for n in nsids if n > above)[:MAX_ACTIVE_NSIDS]
    return struct.pack("<%dI" % len(chosen), *chosen).ljust(IDENTIFY_SIZE, b"\0")


def namespace_descriptors(ns: NamespaceInfo) -> bytes:
    """The identification descriptors (EUI64, NGUID, UUID) the namespace has (non-zero ones)."""
    out = bytearray()
    for kind, value in ((DESCRIPTOR_EUI64, ns.eui64), (DESCRIPTOR_NGUID, ns.nguid),
                        (DESCRIPTOR_UUID, ns.uuid)):
        if any(value):
            out += struct.pack("<BBxx", kind, len(value)) + value
    return bytes(out).ljust(IDENTIFY_SIZE, b"\0")
