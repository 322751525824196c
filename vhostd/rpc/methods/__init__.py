"""RPC method modules: importing this package registers every method and subsystem."""

from . import bdev, framework, log, nvmf, rbd, vhost  # noqa: F401
