"""The guest with systemd as PID 1 (Testbed(init="systemd")).

guest_init.py, PID 1 right after switch_root, calls prepare() and exec()s systemd. prepare()
writes into the tmpfs overlay only (the host's root below stays untouched): a default target
that wants the agent's unit, the agent's unit, masks for what cannot work or is slow in the
guest, a volatile journal, an empty fstab and a machine id of the guest's own.
Standard library only: this runs before anything else in the guest.
"""

import ctypes
import ctypes.util
import os
import subprocess
import time

SYSTEMD = "/lib/systemd/systemd"
UNIT_DIR = "/etc/systemd/system"
TARGET = "testbed.target"
AGENT_UNIT = "testbed-agent.service"
SHELL_UNIT = "testbed-shell.service"

# Masked (linked to /dev/null). The guest has no udev (as in the default testbed, nothing
# autoloads drivers, the e1000 and AHCI stay unbound), no getty (the console is the log, the
# agent is the way in), no network configuration, no clock sync, no timers (apt-daily and
# friends would run at once: their stamps are old), no AppArmor profiles to load, nothing that
# only a first boot or a TPM needs.
MASKED = (
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "getty.target", "getty@tty1.service", "serial-getty@ttyS0.service",
    "console-getty.service",
    "networking.service", "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service", "ifupdown-wait-online.service",
    "systemd-timesyncd.service", "timers.target", "apparmor.service", "systemd-pstore.service",
    "systemd-firstboot.service", "systemd-repart.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "systemd-machine-id-commit.service",
    "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service",
    "e2scrub_reap.service", "remote-fs.target",
    # Nothing here uses them; each costs about a second of a TCG boot.
    "dev-hugepages.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount", "modprobe@fuse.service", "modprobe@configfs.service",
    # multi-user.target's own: logins and their bookkeeping (the agent is the way in).
    "systemd-logind.service", "systemd-user-sessions.service",
    "systemd-update-utmp-runlevel.service", "systemd-ask-password-wall.path",
)
# The host's enablements in multi-user.target (redis, postgresql, supervisor ...) are the
# host's business: the guest's multi-user.target starts what the guest enables.
HOST_WANTS = "/etc/systemd/system/multi-user.target.wants"

# multi-user.target, as a server boots, so what the guest enables starts at its next boot
# (with a root disk, Testbed(root_disk_mb=), that survives tb.reboot()); what the host enabled
# there is removed from the guest's view (prepare()).
TARGET_TEXT = """\
[Unit]
Description=rsd testbed: a server's boot (multi-user.target) and the testbed agent
Requires=basic.target
Wants=multi-user.target {agent}
After=basic.target
AllowIsolate=yes
"""

AGENT_TEXT = """\
[Unit]
Description=rsd testbed agent: the host's commands over virtio-serial
# No Conflicts=shutdown.target (a default dependency): a reboot (tb.reboot()) stops every
# unit in order while the agent runs on; only systemd-shutdown's last kill ends it. Were it
# stopped with the others, its SuccessAction would turn the reboot into a forced power-off.
DefaultDependencies=no
After=basic.target

# The guest exists for the agent: when it ends, so does the guest.
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=simple
ExecStart={python} {init} --agent-service
WorkingDirectory=/
{environment}
StandardOutput=journal+console
StandardError=journal+console
"""

SHELL_TEXT = """\
[Unit]
Description=rsd testbed shell on the console
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=simple
ExecStart={shell} --noprofile --norc -i
WorkingDirectory={cwd}
{environment}
Environment="PS1=testbed:\\\\w# "
StandardInput=tty-force
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TTYReset=yes
"""

JOURNALD_CONF = """\
# The testbed's journal lives in /run (the guest's RAM) and takes everything.
[Journal]
Storage=volatile
RateLimitIntervalSec=0
ForwardToConsole=no
"""

SYSTEM_CONF = """\
# Under TCG every console line costs time; units that hang should not hold a stop for 90 s.
# Starts keep Debian's 90 s: on a loaded host a restarted rsd adopting its services took
# more than 30 s under TCG, and systemd's timeout then stopped every service.
[Manager]
ShowStatus=no
DefaultTimeoutStartSec=90s
DefaultTimeoutStopSec=10s
"""


TMP_MOUNT = """\
# As the default testbed has it: a fresh /tmp, not the host's.
[Unit]
Description=the guest's own /tmp
DefaultDependencies=no
Conflicts=umount.target
Before=local-fs.target umount.target

[Mount]
What=tmpfs
Where=/tmp
Type=tmpfs
Options=mode=1777,nosuid,nodev
"""

# Debian's tmp.conf says "D /tmp": at boot, empty it. The guest's /tmp is a fresh tmpfs, or the
# host's own when the checkout lives there (which must not vanish from the guest's view).
TMPFILES_TMP = """\
d /tmp 1777 root root -
"""


def _write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _link(target, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def _environment_lines(env):
    # systemd unquotes "KEY=VALUE" words; $ and % are its own expansions: escape them.
    return "\n".join('Environment="%s=%s"' % (k, v.replace("%", "%%").replace("$", "$$"))
                     for k, v in env.items())


def prepare(python, init_path, env, shell=False, hostname="rsd-testbed", root="/"):
    """Write the guest's systemd configuration into the overlay under root."""
    def at(path):
        return os.path.join(root, path.lstrip("/"))

    units = at(UNIT_DIR)
    environment = _environment_lines(env)
    _write(os.path.join(units, AGENT_UNIT), AGENT_TEXT.format(
        python=python, init=init_path, environment=environment))
    wanted = [AGENT_UNIT]
    if shell:
        bash = "/bin/bash" if os.path.exists(at("/bin/bash")) else "/bin/sh"
        _write(os.path.join(units, SHELL_UNIT), SHELL_TEXT.format(
            shell=bash, cwd=env.get("tb_cwd", "/"), environment=environment))
        wanted.append(SHELL_UNIT)
    _write(os.path.join(units, TARGET), TARGET_TEXT.format(agent=" ".join(wanted)))
    _link(TARGET, os.path.join(units, "default.target"))
    for name in MASKED:
        _link("/dev/null", os.path.join(units, name))
    wants = at(HOST_WANTS)
    for name in os.listdir(wants) if os.path.isdir(wants) else ():
        os.unlink(os.path.join(wants, name))   # a whiteout in the overlay: the host keeps it
    checkout = env.get("tb_cwd", "/")
    if not checkout.startswith("/tmp/"):
        _write(os.path.join(units, "tmp.mount"), TMP_MOUNT)
        _link("../tmp.mount", os.path.join(units, "local-fs.target.wants", "tmp.mount"))
    _write(at("/etc/tmpfiles.d/tmp.conf"), TMPFILES_TMP)
    _write(at("/etc/systemd/journald.conf.d/testbed.conf"), JOURNALD_CONF)
    _write(at("/etc/systemd/system.conf.d/testbed.conf"), SYSTEM_CONF)
    # The host's fstab names the host's disks: systemd would wait for them.
    _write(at("/etc/fstab"), "# testbed: the root is the overlay /init mounted; nothing else\n")
    # The host's machine id would put the guest's journal beside the host's.
    _write(at("/etc/machine-id"), os.urandom(16).hex() + "\n", 0o444)
    _write(at("/etc/hostname"), hostname + "\n")
    # A host that is a container (/.dockerenv) would make systemd believe the guest is one.
    for marker in ("/.dockerenv", "/run/.containerenv"):
        if os.path.lexists(at(marker)):
            os.unlink(at(marker))


# With a root disk (tb_root_disk=/dev/vda, Testbed(root_disk_mb=)): an ext4 disk holds the
# upper layer of a second overlay over the root, so what the guest writes survives a reboot.
PERSIST_DIR = "/.testbed"                  # mount points, in the RAM layer below
MS_MOVE = 8192
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source, target, fstype, flags=0, options=""):
    os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                   flags, options.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _umount(target):
    if _libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def root_on_disk(device):
    """Make the root an overlay whose upper layer is on `device` (ext4, made by the host): the
    lower layer is the root as the initramfs made it (the host's files under the RAM layer
    that prepare() wrote), so every boot starts from the testbed's configuration and what the
    guest wrote on earlier boots is on top of it."""
    disk, new_root = PERSIST_DIR + "/disk", PERSIST_DIR + "/root"
    # The initramfs unmounted these before switch_root; systemd mounts its own.
    api = (("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs"))
    for source, target, fstype in api:
        _mount(source, target, fstype)
    try:
        subprocess.run(["/sbin/modprobe", "-a", "virtio_blk", "ext4"], check=True,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 10
        while not os.path.exists(device):
            if time.monotonic() > deadline:
                raise RuntimeError(f"root disk {device} did not appear")
            time.sleep(0.05)
        _mount(device, disk, "ext4")
    finally:
        for _, target, _ in reversed(api):
            _umount(target)
    os.makedirs(disk + "/upper", exist_ok=True)
    os.makedirs(disk + "/work", exist_ok=True)
    _mount("testbed-root-disk", new_root, "overlay", 0,
           f"lowerdir=/,upperdir={disk}/upper,workdir={disk}/work")
    os.chdir(new_root)   # as switch_root does: the new root moved onto /, then chroot
    _mount(".", "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def exec_systemd():
    """Replace this PID 1 by systemd (never returns); first, with a root disk, the root is
    moved onto it (root_on_disk)."""
    device = os.environ.get("tb_root_disk")
    if device:
        root_on_disk(device)
    if not os.access(SYSTEMD, os.X_OK):
        raise RuntimeError(f"{SYSTEMD} not found in the host root: install the Debian "
                           "package systemd (`make setup`)")
    os.execve(SYSTEMD, [SYSTEMD], {"LANG": "C.UTF-8"})
