# vhostd — the commands: `make run`, `make test` and `make demo`. Each does every set-up step on a
# fresh Debian 12 machine (as root, or with sudo): system packages, a virtualenv, the extension build.
#   make run    vhostd with the demo config, until Ctrl-C
#   make test   the whole test suite
#   make demo   vhostd with the demo config serving a QEMU guest's I/O job, a summary, then stop
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SOCKET_DIR ?= /var/tmp
RPC_SOCKET ?= /var/tmp/spdk.sock
PYTEST_ARGS ?=

.PHONY: run test demo deps sysdeps venv build guest qemu-root clean

run: deps
	@echo "vhostd: demo config scripts/demo-config.json: blk controller vhost.0 (Malloc0, 64 MiB),"
	@echo "        scsi controller vhost.1 (target 0 Malloc1 64 MiB, target 1 Null0 128 MiB)."
	@echo "Attach a guest (guest RAM must be shared memory):"
	@echo "  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \\"
	@echo "    -numa node,memdev=mem -chardev socket,id=c0,path=$(SOCKET_DIR)/vhost.0,reconnect=1 \\"
	@echo "    -device vhost-user-blk-pci,chardev=c0,num-queues=1 \\"
	@echo "    -chardev socket,id=c1,path=$(SOCKET_DIR)/vhost.1 -device vhost-user-scsi-pci,chardev=c1 \\"
	@echo "    ...your disk image/kernel options..."
	@echo "RPC: .venv/bin/spdk-rpc -s $(RPC_SOCKET) bdev_get_bdevs   metrics: http://127.0.0.1:9250/metrics"
	$(BIN)/vhostd -S $(SOCKET_DIR) -r $(RPC_SOCKET) -m 0x1 --json scripts/demo-config.json --http 127.0.0.1:9250

test: deps guest qemu-root
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Boots the test guest on the demo config's blk and scsi controllers; tests/e2e/test_demo.py runs it.
demo: deps guest
	$(BIN)/python scripts/demo.py --guest build/guest --config scripts/demo-config.json

deps: sysdeps venv build

sysdeps:
	scripts/install-system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet 'setuptools>=77' wheel 'Cython>=3.0'
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test]'
	$(BIN)/python scripts/build-sma-protos.py
	touch $@

# Rebuild the data-plane extension in place after a change under ext/.
build: venv
	$(BIN)/python setup.py --quiet build_ext --inplace

# The e2e test guest: Debian cloud kernel + busybox initramfs with the virtio modules.
guest:
	scripts/build-guest.sh build/guest

# QEMU 11.1 (vfio-user client) in a Debian 13 root, for the NVMe tests; the host keeps its own QEMU.
qemu-root:
	scripts/build-qemu-root.sh build/qemu-root

clean:
	rm -rf build $(VENV) vhostd/*.so ext/*.c *.egg-info
