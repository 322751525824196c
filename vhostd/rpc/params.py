"""Params of every RPC method as pydantic models: SPDK's names, types and required flags (its
schema.yaml).  Models forbid unknown keys and coerce nothing (strict): SPDK's JSON decoders reject
an unknown key, a wrong JSON type or a missing required key.  ``rpc_schema/`` is generated from
these models (vhostd/rpc/schema.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

U8 = Annotated[int, Field(ge=0, le=0xFF)]
U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[int, Field(ge=0, le=0xFFFFFFFFFFFFFFFF)]
I32 = Annotated[int, Field(ge=-0x80000000, le=0x7FFFFFFF)]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Relaxed(BaseModel):
    """SPDK's _relaxed decoders ignore unknown keys."""

    model_config = ConfigDict(extra="ignore", strict=True)


# -- framework, app, log ----------------------------------------------------------------------
class RpcGetMethods(Params):
    current: bool = False
    include_aliases: bool = False


class FrameworkGetConfig(Params):
    name: str
    with_batches: bool = False


class SpdkKillInstance(Params):
    sig_name: Literal["SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1"]


LogLevel = Literal["ERROR", "WARNING", "NOTICE", "INFO", "DEBUG"]


class LogSetLevel(Params):
    level: LogLevel


class BdevSetOptions(Params):
    bdev_io_pool_size: U32 | None = None
    bdev_io_cache_size: U32 | None = None
    bdev_auto_examine: bool | None = None
    iobuf_small_cache_size: U32 | None = None
    iobuf_large_cache_size: U32 | None = None


# -- bdevs ------------------------------------------------------------------------------------
class MetadataParams(Params):
    """Metadata and protection information: accepted as SPDK spells them; vhostd has neither, so
    anything but the defaults is refused with a clear error by the handler."""

    md_size: U32 = 0
    md_interleave: bool = False
    dif_type: I32 = 0
    dif_is_head_of_md: bool = False
    dif_pi_format: U32 = 0


class BdevMallocCreate(MetadataParams):
    block_size: U32
    num_blocks: U64
    name: str | None = None
    uuid: str | None = None
    optimal_io_boundary: U32 = 0
    physical_block_size: U32 = 0
    numa_id: I32 = -1


class NameOnly(Params):
    name: str


class BdevNullCreate(MetadataParams):
    name: str
    block_size: U32
    num_blocks: U64
    uuid: str | None = None
    physical_block_size: U32 = 0
    preferred_write_granularity: U32 = 0
    preferred_write_alignment: U32 = 0
    optimal_write_size: U32 = 0
    preferred_unmap_granularity: U32 = 0
    preferred_unmap_alignment: U32 = 0


class BdevResize(Params):
    """bdev_null_resize, bdev_rbd_resize."""

    name: str
    new_size: U64            # MiB


class BdevAioCreate(Params):
    name: str
    filename: str
    block_size: U32 = 0
    readonly: bool = False
    fallocate: bool = False
    nowait: bool = False
    uuid: str | None = None


class BdevUringCreate(Params):
    filename: str
    name: str
    block_size: U32 = 0
    uuid: str | None = None


class BdevRbdRegisterCluster(Params):
    name: str
    user_id: str | None = None               # without the "client." prefix
    config_param: dict[str, str] | None = None
    config_file: str | None = None
    key_file: str | None = None
    core_mask: str | None = None


class BdevRbdGetClustersInfo(Params):
    name: str | None = None


class BdevRbdCreate(Params):
    name: str | None = None
    user_id: str | None = None
    pool_name: str
    rbd_name: str
    block_size: U32
    config: dict[str, str] | None = None     # present (even null): no config file is read
    cluster_name: str | None = None
    uuid: str | None = None
    read_only: bool = False


class BdevGetBdevs(Params):
    name: str | None = None
    timeout: U64 = 0


class BdevGetIostat(Params):
    name: str | None = None              # removed in SPDK 26.05; still accepted
    names: list[str] | None = Field(default=None, max_length=1024)
    per_channel: bool = False
    reset_mode: Literal["all", "maxmin", "error", "none"] = "none"


class BdevSetQosLimit(Params):
    name: str
    rw_ios_per_sec: U64 | None = None
    rw_mbytes_per_sec: U64 | None = None
    r_mbytes_per_sec: U64 | None = None
    w_mbytes_per_sec: U64 | None = None


class CreateBdev(BaseModel):
    """The design card's generic create: ``type`` picks the kind, the other keys are that kind's
    params (checked against its own model by the handler)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["malloc", "null", "aio", "uring"]


class BdevVirtioAttachController(Params):
    name: str
    trtype: Literal["pci", "user", "vfio-user"]
    traddr: str
    dev_type: Literal["blk", "scsi"]
    vq_count: U32 | None = None
    vq_size: U32 | None = None


# -- vhost ------------------------------------------------------------------------------------
class VhostCreateBlkController(Relaxed):
    ctrlr: str
    dev_name: str
    cpumask: str | None = None
    readonly: bool = False
    packed_ring: bool = False
    transport: str | None = None


class VhostCreateScsiController(Params):
    ctrlr: str
    cpumask: str | None = None
    delay: bool = False


class CtrlrOnly(Params):
    ctrlr: str


class VhostScsiControllerAddTarget(Params):
    ctrlr: str
    scsi_target_num: I32
    bdev_name: str


class VhostScsiControllerRemoveTarget(Params):
    ctrlr: str
    scsi_target_num: U32


class VhostControllerSetCoalescing(Params):
    ctrlr: str
    delay_base_us: U32
    iops_threshold: U32


class VhostGetControllers(Params):
    name: str | None = None


class VhostGetQueueStats(Params):
    name: str | None = None


class AddLun(Params):
    """The design card's add_lun: a bdev as LUN 0 of a target (first free slot by default)."""

    ctrlr: str
    bdev_name: str
    scsi_target_num: I32 = -1


# -- nvmf (NVMe over vfio-user) ------------------------------------------------------------------
class NvmfCreateTransport(Relaxed):
    """SPDK's client sends every flag; keys meant for other transports are accepted and ignored."""

    trtype: str
    tgt_name: str | None = None
    max_queue_depth: U32 | None = None
    max_io_qpairs_per_ctrlr: U32 | None = None
    in_capsule_data_size: U32 | None = None
    max_io_size: U32 | None = None
    max_aq_depth: U32 | None = None
    io_unit_size: U32 | None = None
    no_srq: bool = False
    c2h_success: bool = True
    zcopy: bool = False
    dif_insert_or_strip: bool = False
    no_wr_batching: bool = False
    disable_mappable_bar0: bool = False
    disable_adaptive_irq: bool = False
    disable_shadow_doorbells: bool = False
    disable_command_passthru: bool = False
    abort_timeout_sec: U32 | None = None


class NvmfGetTransports(Params):
    trtype: str | None = None
    tgt_name: str | None = None


class NvmfCreateSubsystem(Params):
    nqn: str
    tgt_name: str | None = None
    serial_number: str = "00000000000000000000"
    model_number: str = "SPDK bdev Controller"
    allow_any_host: bool = False
    ana_reporting: bool = False
    passthrough: bool = False
    enable_nssr: bool = False
    max_namespaces: U32 = 0
    min_cntlid: Annotated[int, Field(ge=1, le=0xFFEF)] = 1
    max_cntlid: Annotated[int, Field(ge=1, le=0xFFEF)] = 0xFFEF
    dmrsl: U32 | None = None
    wzsl: U32 | None = None


class NvmfSubsystemOnly(Params):
    nqn: str
    tgt_name: str | None = None


class NvmfNamespace(Params):
    """The namespace of nvmf_subsystem_add_ns: a bdev and, optionally, its NSID and identifiers
    (``nguid`` 16 and ``eui64`` 8 bytes in hex)."""

    bdev_name: str
    nsid: U32 | None = None
    uuid: str | None = None
    nguid: str | None = None
    eui64: str | None = None
    ptpl_file: str | None = None
    anagrpid: U32 | None = None
    no_auto_visible: bool = False
    hide_metadata: bool = False


class NvmfSubsystemAddNs(Params):
    nqn: str
    namespace: NvmfNamespace
    tgt_name: str | None = None


class NvmfSubsystemRemoveNs(Params):
    nqn: str
    nsid: Annotated[int, Field(ge=1, le=0xFFFFFFFE)]
    tgt_name: str | None = None


class NvmfGetSubsystems(Params):
    nqn: str | None = None
    tgt_name: str | None = None


class ListenAddress(Params):
    trtype: str
    traddr: str
    adrfam: str | None = None
    trsvcid: str | None = None


class NvmfSubsystemListener(Params):
    """nvmf_subsystem_add_listener / nvmf_subsystem_remove_listener."""

    nqn: str
    listen_address: ListenAddress
    tgt_name: str | None = None
    secure_channel: bool = False
    ana_state: str | None = None
    sock_impl: str | None = None
