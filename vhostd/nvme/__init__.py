"""The emulated NVMe controller (issue 11): registers, PCI function, served over vfio-user."""
