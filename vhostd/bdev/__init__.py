"""Block devices: the Bdev interface and its kinds (base.py), the registry (registry.py)."""

from .base import AioBdev, Bdev, MallocBdev, NullBdev, UringBdev, VirtioBlkBdev
from .registry import BdevRegistry, OSFailure

__all__ = ["AioBdev", "Bdev", "BdevRegistry", "MallocBdev", "NullBdev", "OSFailure", "UringBdev",
           "VirtioBlkBdev"]
