"""vfio-user server: the protocol by which QEMU's ``vfio-user-pci`` reaches an emulated PCI device
(vhostd's NVMe controller) in another process."""
