# The two commands a newcomer runs: `make demo` and `make test`.
# Both set everything up themselves (apt packages, a venv with the project
# installed editable); `make setup` does only that part.
SHELL := /bin/bash
# Debian's interpreter: world-executable, so services can run as unprivileged users.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := python3-venv python3-dev gcc make libcap-dev kmod \
	qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static \
	redis-server dkms s6 runit supervisor
export PYTEST_DISABLE_PLUGIN_AUTOLOAD := 1

.PHONY: setup demo test test-host test-vm bench install clean
setup: .stamp-apt $(VENV)/.stamp-install

.stamp-apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "== installing Debian packages: $$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

$(VENV)/.stamp-install: pyproject.toml setup.py $(wildcard libdrv/*.pyx libdrv/*.pxd libdrv/*.h)
	@echo "== creating $(VENV) and installing the project (editable)"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: setup
	$(PY) -m testbed.demo

test: setup
	$(PY) -m pytest -p no:cacheprovider tests/host tests/vm

test-host: setup
	$(PY) -m pytest -p no:cacheprovider tests/host

test-vm: setup
	$(PY) -m pytest -p no:cacheprovider tests/vm

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build *.egg-info libdrv/*.c libdrv/*.so .stamp-apt
