# The two commands a newcomer runs: `make demo` and `make test`.
# Both set everything up themselves (apt packages, a venv with the project
# installed editable); `make setup` does only that part.
SHELL := /bin/bash
# Debian's interpreter: world-executable, so services can run as unprivileged users.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Two guest kernels: Debian 12's own 6.1 (the testbed's default) and its 6.12.
APT_PACKAGES := python3-venv python3-dev gcc make libcap-dev libsystemd-dev pkg-config kmod \
	qemu-system-x86 linux-image-amd64 linux-headers-amd64 \
	linux-image-6.12-amd64 linux-headers-6.12-amd64 busybox-static \
	redis-server dkms s6 runit supervisor systemd util-linux libseccomp2 \
	iperf3 iputils-ping iproute2 lintian fio e2fsprogs python3-serial
export PYTEST_DISABLE_PLUGIN_AUTOLOAD := 1

.PHONY: setup demo test test-host test-vm bench wheels venv dkms-tarball deb install uninstall clean
setup: .stamp-apt $(VENV)/.stamp-install

.stamp-apt: Makefile    # a package added to the list is installed on the next run
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "== installing Debian packages: $$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

$(VENV)/.stamp-install: pyproject.toml setup.py $(wildcard libdrv/*.pyx libdrv/*.pxd libdrv/*.h drivers/*/*.pyx frontends/*.pyx)
	@echo "== creating $(VENV) and installing the project (editable)"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: setup
	$(PY) -m testbed.demo

# Everything on the default 6.1 kernel, then again on 6.12: the module's and the serial
# driver's guest tests (one more session guest and test_kmod's 2-CPU guest: 2-3 min) and the
# deployment under systemd up to a reboot (make install with the module built for 6.12,
# enable --now, restart, reload, kill -9 of rsd under load, the reboot: 3.3 min; the
# kernel-independent rest, DS kills, logs, uninstall, packages, runs on 6.1 only).
# Both runs always run; either failing fails the target.
KERNEL_612_SYSTEMD := $(addprefix tests/vm/test_systemd.py::test_,\
	enable_now_brings_up_the_module_and_every_service rsctl_restart_gives_a_fresh_driver \
	systemctl_reload_rereads_services_d kill_9_of_rsd_under_load \
	a_reboot_brings_back_the_units_the_modules_and_every_service)
KERNEL_612_TESTS := tests/vm/test_kmod.py tests/vm/test_serial.py $(KERNEL_612_SYSTEMD)
test: setup
	@rc=0; \
	$(PY) -m pytest -p no:cacheprovider tests/host tests/vm || rc=1; \
	echo "== on the 6.12 kernel: test_kmod, test_serial, test_systemd up to its reboot"; \
	RSD_TESTBED_KERNEL=6.12 $(PY) -m pytest -p no:cacheprovider $(KERNEL_612_TESTS) || rc=1; \
	exit $$rc

test-host: setup
	$(PY) -m pytest -p no:cacheprovider tests/host

test-vm: setup
	$(PY) -m pytest -p no:cacheprovider tests/vm

bench: setup
	$(PY) bench/run_all.py

# Deployment on a server (as root): the project in its own venv built on
# Debian's python3 (service uids must be able to run it), the commands in
# /usr/local/bin, units, policy scripts, example services, and the module
# through DKMS so it is rebuilt for every new kernel.  docs/deploy.md.
PREFIX_VENV ?= /opt/rsd
KMOD_VERSION := $(shell sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' kmod/dkms.conf)
# The project and its dependencies as wheels (pip wheel: the only step that needs the
# network and a compiler for the Cython extensions); install takes them from here alone.
WHEELS := build/wheels
PROJECT_SOURCES := $(shell git ls-files rsd datastore libdrv drivers frontends 2>/dev/null)
wheels: $(WHEELS)/.stamp
$(WHEELS)/.stamp: pyproject.toml setup.py $(PROJECT_SOURCES) | .stamp-apt
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	rm -rf $(WHEELS)
	$(PY) -m pip wheel -q -w $(WHEELS) .
	@touch $@

# The module built once for KERNEL (default: this machine's), as a DKMS tarball another
# machine installs without compiling: make install DKMS_TARBALL=build/rsdrv-dkms.tar.gz.
# DKMS's own trees are kept under build/dkms; only its signing key is the machine's.
KERNEL ?= $(shell uname -r)
DKMS_BUILD := build/dkms
DKMS_PRIVATE = --dkmstree $(CURDIR)/$(DKMS_BUILD)/tree --sourcetree $(CURDIR)/$(DKMS_BUILD)/src
dkms-tarball: .stamp-apt
	rm -rf $(DKMS_BUILD) && mkdir -p $(DKMS_BUILD)/tree $(DKMS_BUILD)/src
	cp -r kmod $(DKMS_BUILD)/src/rsdrv-$(KMOD_VERSION)
	dkms add -m rsdrv -v $(KMOD_VERSION) $(DKMS_PRIVATE)
	dkms build -m rsdrv -v $(KMOD_VERSION) -k $(KERNEL) $(DKMS_PRIVATE)
	dkms mktarball -m rsdrv -v $(KMOD_VERSION) -k $(KERNEL) $(DKMS_PRIVATE) \
		--archive $(CURDIR)/build/rsdrv-dkms.tar.gz

# The venv install puts in PREFIX_VENV, staged here from the wheels and byte-compiled for it
# (systemd/stage-venv.sh): the server runs no pip and compiles no Python.
VENV_STAGE := build/venv$(PREFIX_VENV)
VENV_STAMP := build/venv/.stamp$(subst /,-,$(PREFIX_VENV))
venv: $(VENV_STAMP)
$(VENV_STAMP): $(WHEELS)/.stamp systemd/stage-venv.sh
	systemd/stage-venv.sh $(WHEELS) $(VENV_STAGE) $(PREFIX_VENV) compile
	@touch $@

DKMS_TARBALL ?=
install: .stamp-apt $(VENV_STAMP)
	@[ "$$(id -u)" = 0 ] || { echo "make install must run as root (sudo make install)"; exit 1; }
	@# The staged venv, copied whole as root's files; a running rsd keeps what it loaded.
	rm -rf $(PREFIX_VENV).new $(PREFIX_VENV).old
	cp -R --preserve=mode,timestamps $(VENV_STAGE) $(PREFIX_VENV).new
	[ ! -e $(PREFIX_VENV) ] || mv $(PREFIX_VENV) $(PREFIX_VENV).old
	mv $(PREFIX_VENV).new $(PREFIX_VENV) && rm -rf $(PREFIX_VENV).old
	ln -sf $(PREFIX_VENV)/bin/rsd $(PREFIX_VENV)/bin/rsctl $(PREFIX_VENV)/bin/datastore /usr/local/bin/
	install -d -m 755 /etc/rsd/services.d /etc/rsd/policy.d /usr/local/share/doc/rsd/examples
	install -m 755 policy.d/* /etc/rsd/policy.d/
	install -m 644 docs/examples/*.toml /usr/local/share/doc/rsd/examples/
	install -m 644 docs/*.md /usr/local/share/doc/rsd/
	install -m 644 systemd/datastore.service systemd/rsd.service systemd/rsd-cgroup.service /etc/systemd/system/
	install -m 644 systemd/rsd-tmpfiles.conf /usr/lib/tmpfiles.d/rsd.conf
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/rsd.conf   # now, not at the next boot
	install -D -m 644 systemd/rsd-modules.conf /usr/lib/modules-load.d/rsd.conf
	/lib/systemd/systemd-modules-load /usr/lib/modules-load.d/rsd.conf   # now, and at every boot
ifeq ($(DKMS_TARBALL),)
	rm -rf /usr/src/rsdrv-$(KMOD_VERSION) && cp -r kmod /usr/src/rsdrv-$(KMOD_VERSION)
	dkms status -m rsdrv -v $(KMOD_VERSION) | grep -q . || dkms add -m rsdrv -v $(KMOD_VERSION)
else
	dkms ldtarball --force $(DKMS_TARBALL)   # the source and the module built for its kernel
endif
	dkms install -m rsdrv -v $(KMOD_VERSION) --force
	rm -f /etc/modules-load.d/rsdrv.conf   # rsd.service loads the module (ExecStartPre)
	getent group rsdnet >/dev/null || groupadd --system rsdnet   # eth0 and its front end (examples)
	systemctl daemon-reload
	@# Over a running rsd: it hands over to the new one, which adopts every running service.
	! systemctl --quiet is-active rsd.service || systemctl kill --kill-who=main --signal=SIGUSR2 rsd.service
	@echo "Installed. Put service files in /etc/rsd/services.d (examples in /usr/local/share/doc/rsd/examples),"
	@echo "then: systemctl enable --now rsd"

# Debian packages from staging trees (systemd/deb/): rsd (the venv in /usr/lib/rsd, units,
# scripts) and rsdrv-dkms; lintian must find no error. DKMS_TARBALL= puts a prebuilt module
# into rsdrv-dkms. docs/deploy.md, "Debian packages".
DEB_OUT := build/deb
deb: .stamp-apt $(WHEELS)/.stamp
	systemd/deb/build-debs.sh $(WHEELS) $(DEB_OUT) $(DKMS_TARBALL)
	lintian --fail-on error --suppress-tags-from-file systemd/deb/lintian-accepted $(DEB_OUT)/*.deb

# Everything install put in place, except /etc/rsd (configuration), /var/lib/rsd (state)
# and the rsdnet group (named by configuration).
uninstall:
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall must run as root (sudo make uninstall)"; exit 1; }
	-systemctl disable --now rsd.service datastore.service
	-systemctl stop rsd-cgroup.service
	rm -f /etc/systemd/system/rsd.service /etc/systemd/system/datastore.service \
		/etc/systemd/system/rsd-cgroup.service /usr/lib/tmpfiles.d/rsd.conf \
		/usr/lib/modules-load.d/rsd.conf
	-systemctl daemon-reload
	-modprobe -r rsdrv
	rm -f /usr/local/bin/rsd /usr/local/bin/rsctl /usr/local/bin/datastore /etc/modules-load.d/rsdrv.conf
	-dkms remove -m rsdrv -v $(KMOD_VERSION) --all
	rm -rf $(PREFIX_VENV) $(PREFIX_VENV).new $(PREFIX_VENV).old /usr/src/rsdrv-$(KMOD_VERSION) /usr/local/share/doc/rsd /run/rsd
	@echo "Uninstalled. Left in place: /etc/rsd (your configuration), /var/lib/rsd (state: the data"
	@echo "store's journal, service logs, crash info) and the rsdnet group; remove them by hand if unwanted."

clean:
	rm -rf build *.egg-info libdrv/*.c libdrv/*.so .stamp-apt
