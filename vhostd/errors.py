"""Domain errors: what went wrong, with the errno SPDK reports for it.

Domain code (bdevs, controllers, the data plane's control side) raises these; the RPC layer maps
them to SPDK's JSON-RPC codes and messages per method family.  ``str(error)`` is a detail for
logs; the wire message is SPDK's (usually ``strerror(errno)``).
"""

import errno as _errno


class VhostdError(Exception):
    """Base of domain errors; ``errno`` is the positive errno value SPDK would report."""

    errno = _errno.EINVAL


class NotFound(VhostdError):
    errno = _errno.ENODEV


class AlreadyExists(VhostdError):
    errno = _errno.EEXIST


class InvalidArgument(VhostdError):
    errno = _errno.EINVAL


class Busy(VhostdError):
    errno = _errno.EBUSY


class NoSpace(VhostdError):
    errno = _errno.ENOSPC


class IOFailure(VhostdError):
    errno = _errno.EIO


class OutOfMemory(VhostdError):
    errno = _errno.ENOMEM


class NotSupported(VhostdError):
    errno = _errno.EOPNOTSUPP


class BackendFailure(VhostdError):
    """A storage back-end (Ceph) refused or failed: SPDK's modules answer a bare -1 (EPERM)."""

    errno = _errno.EPERM
