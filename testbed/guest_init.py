"""PID 1 of the guest, after the initramfs switched into the host's root (overlay).

Mounts the pseudo file systems, brings up lo, then forks the agent (and, in shell mode, a
shell on the console). PID 1 itself only reaps orphans, so the agent's own subprocess waits
are never stolen; when the agent (or the shell) exits, the guest powers off.
With tb_init_system=systemd it instead writes the guest's systemd configuration into the
overlay and exec()s systemd (guest_systemd.py), which runs `guest_init.py --agent-service`
as a unit: the same agent, as a service.
Standard library only: this runs before anything else in the guest.
"""

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct
import sys
import time

HOSTNAME = "rsd-testbed"
AGENT_PORT_NAME = "rsd.agent"
RB_POWER_OFF = 0x4321FEDC
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# (source, target, fstype, flags, options); all fresh instances over the overlay's dirs.
MOUNTS = [
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    # As a systemd host has it: rsd contains each service in a cgroup here.
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "nsdelegate"),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("debugfs", "/sys/kernel/debug", "debugfs", 0, ""),
]


def log(message):
    print(f"testbed-init: {message}", file=sys.stderr, flush=True)


def mount(source, target, fstype, flags, options):
    os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                   options.encode() or None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype} on {target}: {os.strerror(errno)}")


def setup_system():
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for spec in MOUNTS:
        if spec[2] == "tmpfs" and checkout.startswith(spec[1] + "/"):
            # A fresh tmpfs there would hide the checkout (e.g. CI cloning into /tmp);
            # the overlay's own tmpfs upper layer keeps writes off the host anyway.
            log(f"keeping {spec[1]} from the host root: the checkout {checkout} lives there")
            continue
        try:
            mount(*spec)
        except OSError as e:
            if spec[1] != "/sys/kernel/debug":
                raise
            log(f"warning: {e}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        if not os.path.lexists(f"/dev/{name}"):
            os.symlink(target, f"/dev/{name}")
    socket.sethostname(HOSTNAME)
    _loopback_up()


def _loopback_up():
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req + b"\0" * 22)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP) + b"\0" * 22)


def find_port(name, wait_s=10.0):
    """/dev/vportNpM of the virtio-serial port called `name` (there is no udev for links)."""
    deadline = time.monotonic() + wait_s
    while True:
        base = "/sys/class/virtio-ports"
        for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            try:
                with open(f"{base}/{port}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{port}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name!r} not found under {base}")
        time.sleep(0.05)


def guest_env(python):
    return {
        "PATH": os.path.dirname(python)
        + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/sh",
        "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "linux"),
        "RSD_TESTBED_GUEST": "1",
    }


def start_agent(env):
    fd = os.open(find_port(AGENT_PORT_NAME), os.O_RDWR)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.environ.clear()
            os.environ.update(env)
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import agent
            agent.Agent(fd, env).serve()
        except BaseException as e:
            log(f"agent died: {type(e).__name__}: {e}")
        os._exit(1)
    os.close(fd)
    return pid


def start_shell(env):
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            tty = os.open("/dev/console", os.O_RDWR)
            fcntl.ioctl(tty, 0x540E, 1)  # TIOCSCTTY: the console becomes our controlling tty
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
            shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
            os.chdir(os.environ.get("tb_cwd") or "/")
            # --norc: the host's bashrc (bash-completion) takes ~7 s to load under TCG.
            args = [shell, "--noprofile", "--norc", "-i"] if shell.endswith("bash") else [shell, "-i"]
            os.execve(shell, args, dict(env, SHELL=shell, PS1=r"testbed:\w# "))
        except BaseException as e:
            log(f"shell failed: {e}")
        os._exit(1)
    return pid


def power_off(reason):
    log(f"powering off: {reason}")
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    while True:  # reboot() does not return for PID 1; never exit (that would panic)
        time.sleep(1)


def serve_agent_as_service():
    """The agent in the foreground, as systemd's testbed-agent.service runs it."""
    os.chdir("/")
    fd = os.open(find_port(AGENT_PORT_NAME), os.O_RDWR)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import agent
    agent.Agent(fd, dict(os.environ)).serve()


def become_systemd():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import guest_systemd
    env = guest_env(sys.executable)
    env["tb_cwd"] = os.environ.get("tb_cwd") or "/"
    guest_systemd.prepare(sys.executable, os.path.abspath(__file__), env,
                          shell=os.environ.get("tb_mode") == "shell", hostname=HOSTNAME)
    guest_systemd.exec_systemd()


def main():
    if sys.argv[1:] == ["--agent-service"]:
        serve_agent_as_service()
        return
    if os.environ.get("tb_init_system") == "systemd":
        try:
            become_systemd()
        except BaseException as e:
            power_off(f"cannot start systemd: {type(e).__name__}: {e}")
    try:
        setup_system()
        env = guest_env(sys.executable)
        essential = {start_agent(env): "agent"}
        if os.environ.get("tb_mode") == "shell":
            essential[start_shell(env)] = "shell"
    except BaseException as e:
        power_off(f"init failed: {type(e).__name__}: {e}")
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            power_off("no children left")
        except InterruptedError:
            continue
        if pid in essential:
            power_off(f"{essential[pid]} exited with status {status}")


if __name__ == "__main__":
    main()
