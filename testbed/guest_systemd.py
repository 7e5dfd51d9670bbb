"""The guest with systemd as PID 1 (Testbed(init="systemd")).

guest_init.py, PID 1 right after switch_root, calls prepare() and exec()s systemd. prepare()
writes into the tmpfs overlay only (the host's root below stays untouched): a default target
that wants the agent's unit, the agent's unit, masks for what cannot work or is slow in the
guest, a volatile journal, an empty fstab and a machine id of the guest's own.
Standard library only: this runs before anything else in the guest.
"""

import os

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
)

TARGET_TEXT = """\
[Unit]
Description=rsd testbed: basic system and the testbed agent
Requires=basic.target
Wants={agent}
After=basic.target
AllowIsolate=yes
"""

AGENT_TEXT = """\
[Unit]
Description=rsd testbed agent: the host's commands over virtio-serial
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
# Under TCG every console line costs time; units that hang should not hold a test for 90 s.
[Manager]
ShowStatus=no
DefaultTimeoutStartSec=30s
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


def exec_systemd():
    """Replace this PID 1 by systemd (never returns)."""
    if not os.access(SYSTEMD, os.X_OK):
        raise RuntimeError(f"{SYSTEMD} not found in the host root: install the Debian "
                           "package systemd (`make setup`)")
    os.execve(SYSTEMD, [SYSTEMD], {"LANG": "C.UTF-8"})
