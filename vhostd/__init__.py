"""vhostd: an SPDK-compatible vhost-user storage target."""

__version__ = "0.1.0"
