# cython: language_level=3
"""vhostd's data plane: guest memory, virtqueues, block devices, device emulation and reactors.

One compiled module built from the parts below (declarations in dataplane.pxd).  The per-I/O path
is C-level, `noexcept nogil`, and holds no Python object; the GIL is released in one place, the
reactor loop.  The Python classes are the control plane's handles on that C state.
"""

import os
import time

from dataplane cimport *

include "platform.pxi"
include "guestmem.pxi"
include "bdev.pxi"
include "rbd.pxi"
include "iov.pxi"
include "vring.pxi"
include "vring_packed.pxi"
include "blk.pxi"
include "reactor.pxi"
include "scsi.pxi"
include "initiator.pxi"
include "nvme.pxi"

tick_rate()
