"""Admin command handlers: submission bytes in, status + DW0 + data + effects out."""

import struct

import pytest

from vhostd.nvme import admin as a
from vhostd.nvme import identify as ident
from vhostd.nvme import status as st
from vhostd.nvme.command import Completion, Submission


def submit(commands, opcode, cid=1, nsid=0, prp1=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, flags=0):
    entry = Submission(opcode, flags, cid, nsid, 0, prp1, 0, cdw10, cdw11, cdw12, cdw13).encode()
    assert len(entry) == 64
    return commands.execute(Submission.decode(entry))


@pytest.fixture
def commands():
    mapped = (0x100000, 0x1ff800)          # guest RAM the queues may use

    def memory_ok(addr, size, writable):
        return mapped[0] <= addr and addr + size <= mapped[1]
    cmds = a.AdminCommands(ident.ControllerInfo(), max_queue_entries=256, max_io_queues=4,
                           msix_vectors=8, memory_ok=memory_ok)
    cmds.namespaces[1] = ident.NamespaceInfo(1, 512, 2048, nguid=bytes(range(1, 17)),
                                             uuid=bytes(range(16, 32)))
    return cmds


def test_completion_entry_layout_and_phase():
    entry = Completion(0x1234, st.INVALID_FIELD, dw0=7, sq_head=3, sq_id=0).encode(phase=1)
    assert struct.unpack("<IIHHHH", entry) == (7, 0, 3, 0, 0x1234, (0x02 | 1 << 14) << 1 | 1)
    assert Completion.decode(entry) == (Completion(0x1234, st.INVALID_FIELD, 7, 3, 0), 1)


def test_identify_controller_fields_linux_reads(commands):
    data = submit(commands, a.Opcode.IDENTIFY, cdw10=1).data
    assert len(data) == 4096
    assert struct.unpack_from("<H", data, 0)[0] == 0x4E58
    assert data[4:24].rstrip() == b"VHOSTD0000000001"
    assert data[24:64].rstrip() == b"vhostd NVMe controller"
    assert data[77] == 7 and struct.unpack_from("<I", data, 80)[0] == 0x00010400
    assert data[111] == 1 and data[512] == 0x66 and data[513] == 0x44
    assert struct.unpack_from("<I", data, 516)[0] == 32
    assert struct.unpack_from("<H", data, 520)[0] & ident.ONCS_DSM
    assert data[525] == ident.VWC_PRESENT | ident.VWC_NO_BROADCAST_FLUSH


def test_identify_namespace_size_and_block_size(commands):
    data = submit(commands, a.Opcode.IDENTIFY, nsid=1, cdw10=0).data
    assert struct.unpack_from("<QQ", data, 0) == (2048, 2048)
    assert data[104:120] == bytes(range(1, 17))
    assert struct.unpack_from("<I", data, 128)[0] >> 16 & 0xFF == 9
    assert submit(commands, a.Opcode.IDENTIFY, nsid=5, cdw10=0).data == bytes(4096)


def test_active_namespace_list_and_descriptors(commands):
    commands.namespaces[3] = ident.NamespaceInfo(3, 4096, 100)
    data = submit(commands, a.Opcode.IDENTIFY, nsid=0, cdw10=2).data
    assert struct.unpack_from("<3I", data) == (1, 3, 0)
    assert struct.unpack_from("<2I", submit(commands, a.Opcode.IDENTIFY, nsid=1, cdw10=2).data) == (3, 0)
    desc = submit(commands, a.Opcode.IDENTIFY, nsid=1, cdw10=3).data
    assert desc[:4] == bytes([2, 16, 0, 0]) and desc[4:20] == bytes(range(1, 17))
    assert desc[20:24] == bytes([3, 16, 0, 0]) and desc[24:40] == bytes(range(16, 32))
    assert desc[40] == 0


@pytest.mark.parametrize("nsid, cns, expected", [(0, 0, st.INVALID_NAMESPACE),
                                                 (9, 3, st.INVALID_NAMESPACE),
                                                 (0, 6, st.INVALID_FIELD)])
def test_identify_errors(commands, nsid, cns, expected):
    assert submit(commands, a.Opcode.IDENTIFY, nsid=nsid, cdw10=cns).status == expected


def test_number_of_queues_is_granted_up_to_the_controller_limit(commands):
    result = submit(commands, a.Opcode.SET_FEATURES, cdw10=a.Feature.NUMBER_OF_QUEUES, cdw11=0x001F001F)
    assert result.dw0 == 0x00030003
    assert submit(commands, a.Opcode.GET_FEATURES, cdw10=a.Feature.NUMBER_OF_QUEUES).dw0 == 0x00030003
    assert submit(commands, a.Opcode.SET_FEATURES, cdw10=a.Feature.NUMBER_OF_QUEUES,
                  cdw11=0xFFFF).status == st.INVALID_FIELD


def test_async_event_config_and_unknown_features(commands):
    assert submit(commands, a.Opcode.SET_FEATURES, cdw10=0x0B, cdw11=0x100).status == st.SUCCESS
    assert submit(commands, a.Opcode.GET_FEATURES, cdw10=0x0B).dw0 == 0x100
    assert submit(commands, a.Opcode.SET_FEATURES, cdw10=0x7E).status == st.INVALID_FIELD
    assert submit(commands, a.Opcode.SET_FEATURES, cdw10=0x80000006, cdw11=1).status == st.FEATURE_NOT_SAVEABLE


def create_cq(commands, qid, entries=256, addr=0x110000, vector=1, ien=True, pc=True):
    cdw11 = int(pc) | int(ien) << 1 | vector << 16
    return submit(commands, a.Opcode.CREATE_IO_CQ, prp1=addr, cdw10=qid | (entries - 1) << 16, cdw11=cdw11)


def create_sq(commands, qid, cqid, entries=256, addr=0x120000):
    return submit(commands, a.Opcode.CREATE_IO_SQ, prp1=addr, cdw10=qid | (entries - 1) << 16,
                  cdw11=1 | cqid << 16)


def test_create_and_delete_io_queues(commands):
    result = create_cq(commands, 1)
    assert result.status == st.SUCCESS
    assert result.effects == [a.CreateQueue("cq", a.QueueConfig(1, 0x110000, 256, vector=1, interrupts=True))]
    assert create_sq(commands, 1, 1).effects == [a.CreateQueue("sq", a.QueueConfig(1, 0x120000, 256, cqid=1))]
    assert submit(commands, a.Opcode.DELETE_IO_CQ, cdw10=1).status == st.INVALID_QUEUE_DELETION
    assert submit(commands, a.Opcode.DELETE_IO_SQ, cdw10=1).effects == [a.DeleteQueue("sq", 1)]
    assert submit(commands, a.Opcode.DELETE_IO_CQ, cdw10=1).effects == [a.DeleteQueue("cq", 1)]
    assert submit(commands, a.Opcode.DELETE_IO_CQ, cdw10=1).status == st.INVALID_QUEUE_IDENTIFIER


@pytest.mark.parametrize("kwargs, expected", [
    (dict(qid=0), st.INVALID_QUEUE_IDENTIFIER),
    (dict(qid=5), st.INVALID_QUEUE_IDENTIFIER),               # above the controller's queues
    (dict(qid=1, entries=257), st.INVALID_QUEUE_SIZE),         # above MQES
    (dict(qid=1, entries=1), st.INVALID_QUEUE_SIZE),
    (dict(qid=1, vector=8), st.INVALID_INTERRUPT_VECTOR),
    (dict(qid=1, pc=False), st.INVALID_FIELD),
    (dict(qid=1, addr=0x110800), st.INVALID_PRP_OFFSET),
    (dict(qid=1, addr=0x1ff000), st.DATA_TRANSFER_ERROR),      # runs past mapped memory
    (dict(qid=1, addr=0x900000), st.DATA_TRANSFER_ERROR),      # unmapped
], ids=["qid0", "qid-high", "size-high", "size-1", "vector", "pc", "unaligned", "past-end", "unmapped"])
def test_hostile_create_cq_gets_the_named_status_and_no_effect(commands, kwargs, expected):
    result = create_cq(commands, **kwargs)
    assert (result.status, result.effects) == (expected, [])
    assert commands.cqs == {}


def test_create_sq_needs_its_cq_and_a_fresh_qid(commands):
    assert create_sq(commands, 1, 2).status == st.COMPLETION_QUEUE_INVALID
    create_cq(commands, 1)
    assert create_sq(commands, 1, 1).status == st.SUCCESS
    assert create_sq(commands, 1, 1).status == st.INVALID_QUEUE_IDENTIFIER


def test_get_log_page_sizes_offsets_and_unknown_logs(commands):
    smart = submit(commands, a.Opcode.GET_LOG_PAGE, cdw10=0x02 | (512 // 4 - 1) << 16)
    assert len(smart.data) == 512 and smart.data[3] == 100
    tail = submit(commands, a.Opcode.GET_LOG_PAGE, cdw10=0x03 | (8 // 4 - 1) << 16, cdw12=8)
    assert tail.data == b"1.0     "
    assert submit(commands, a.Opcode.GET_LOG_PAGE, cdw10=0x7F).status == st.INVALID_LOG_PAGE
    assert submit(commands, a.Opcode.GET_LOG_PAGE, cdw10=0x02, cdw12=2).status == st.INVALID_FIELD


def test_async_event_requests_are_held_up_to_aerl_plus_one(commands):
    for cid in range(4):
        assert submit(commands, a.Opcode.ASYNC_EVENT_REQUEST, cid=cid).held
    assert submit(commands, a.Opcode.ASYNC_EVENT_REQUEST, cid=9).status == st.ASYNC_EVENT_LIMIT_EXCEEDED
    assert commands.held_aers == [0, 1, 2, 3]


def test_abort_keep_alive_unknown_opcodes_and_fused_or_sgl_commands(commands):
    assert submit(commands, a.Opcode.ABORT, cdw10=1 | 5 << 16).dw0 == 1
    assert submit(commands, a.Opcode.KEEP_ALIVE).status == st.SUCCESS
    assert submit(commands, 0x7C).status == st.INVALID_OPCODE      # no Doorbell Buffer Config yet
    assert submit(commands, 0xC1).status == st.INVALID_OPCODE
    assert submit(commands, a.Opcode.IDENTIFY, cdw10=1, flags=0x40).status == st.INVALID_FIELD
    assert submit(commands, a.Opcode.IDENTIFY, cdw10=1, flags=0x01).status == st.INVALID_FIELD


def test_controller_reset_forgets_queues_features_and_held_events(commands):
    create_cq(commands, 1)
    submit(commands, a.Opcode.ASYNC_EVENT_REQUEST)
    submit(commands, a.Opcode.SET_FEATURES, cdw10=0x0B, cdw11=0x100)
    commands.reset()
    assert commands.cqs == {} and commands.held_aers == []
    assert submit(commands, a.Opcode.GET_FEATURES, cdw10=0x0B).dw0 == 0
    assert 1 in commands.namespaces


def test_every_opcode_with_junk_fields_completes_without_raising(commands):
    import random
    rng = random.Random(11)
    for opcode in range(256):
        for _ in range(20):
            sub = Submission(opcode, rng.choice([0, 0x40]), rng.randrange(65536), rng.randrange(1 << 32),
                             0, rng.randrange(1 << 64), rng.randrange(1 << 64),
                             *(rng.randrange(1 << 32) for _ in range(6)))
            result = commands.execute(sub)
            assert isinstance(result.status, st.Status)


def test_namespace_changes_complete_a_held_aer_once_until_log_04_is_read(commands):
    submit(commands, a.Opcode.SET_FEATURES, cdw10=a.Feature.ASYNC_EVENT_CONFIG,
           cdw11=ident.OAES_NAMESPACE_ATTRIBUTE)
    assert submit(commands, a.Opcode.ASYNC_EVENT_REQUEST, cid=9).held
    commands.namespaces_changed({2})
    commands.namespaces_changed({3})                   # masked: no second notice
    assert commands.take_event() == (9, 0x00040002)
    assert commands.take_event() is None
    log = submit(commands, a.Opcode.GET_LOG_PAGE, cdw10=a.LogPage.CHANGED_NAMESPACES | 1 << 15
                 | 1023 << 16).data
    assert struct.unpack_from("<3I", log) == (2, 3, 0)
    log = submit(commands, a.Opcode.GET_LOG_PAGE, cdw10=a.LogPage.CHANGED_NAMESPACES | 1023 << 16).data
    assert struct.unpack_from("<3I", log) == (2, 3, 0)   # read with RAE 0: cleared after
    assert submit(commands, a.Opcode.GET_LOG_PAGE,
                  cdw10=a.LogPage.CHANGED_NAMESPACES | 1023 << 16).data == bytes(4096)
    submit(commands, a.Opcode.ASYNC_EVENT_REQUEST, cid=10)
    commands.namespaces_changed({4})                   # unmasked again
    assert commands.take_event() == (10, 0x00040002)


def test_no_namespace_notice_unless_the_host_asked_for_it(commands):
    submit(commands, a.Opcode.ASYNC_EVENT_REQUEST, cid=9)
    commands.namespaces_changed({2})
    assert commands.take_event() is None
