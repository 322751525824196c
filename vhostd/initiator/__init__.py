"""vhostd as a vhost-user front-end (QEMU's side): fast integration tests, the benchmark, and a bdev
that consumes another vhost-user target.

- ``channel``: the socket, requests with fds, replies checked as QEMU checks them.
- ``frontend``: negotiation, guest memory, rings, start/stop/reconnect (QEMU 7.2's sequences).
- ``blk`` / ``scsi``: device layers (requests built in Python on the same rings).
- ``targets``: qemu-storage-daemon and vhostd launchers; ``bench``: the ``vhostd-bench`` command.
The per-request path is C (ext/initiator.pxi: DriverQueue, LoadGenerator, vdrv_submit/vdrv_poll).
"""
