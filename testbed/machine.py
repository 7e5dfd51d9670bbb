"""The standard machine: the QEMU command line and the guest kernel's command line.

Fixed PCI addresses, so drivers and tests can name devices by BDF:
  00:01.0 VGA (std)            00:02.0 e1000 (82540EM, 8086:100e), user-mode net "net0"
  00:03.0 ich9-ahci (8086:2922), one raw disk on port 0
  00:04.0 virtio-serial (agent) 00:05.0 virtio-9p (host root)
  00:06.0 virtio-blk: only with a root disk (Testbed(root_disk_mb=)), the root's writes
  00:1f.x q35's own LPC/SMBus/AHCI (the built-in AHCI has no disk; leave it alone)
ISA: COM1 (0x3f8, IRQ 4) is the console; COM2 (0x2f8, IRQ 3) goes to a host unix socket and
is left unclaimed by the kernel (8250.nr_uarts=1 on 6.1; on 6.12 the initramfs unbinds it).
"""

import shutil
from dataclasses import dataclass, field

from .errors import TestbedError

QEMU = "qemu-system-x86_64"
E1000_BDF = "0000:00:02.0"
AHCI_BDF = "0000:00:03.0"
VGA_BDF = "0000:00:01.0"
COM2_PORT, COM2_IRQ = 0x2F8, 3
AGENT_PORT_NAME = "rsd.agent"
GUEST_MAC = "52:54:00:12:34:56"
ROOT_DISK_BDF = "0000:00:06.0"
ROOT_DISK_DEVICE = "/dev/vda"   # the only virtio-blk disk

# Why each word: IOMMU with passthrough for the host's own devices; the kernel's 8250 stops at
# COM1 so COM2 is free for our driver (6.1; newer 8250s take every UART ACPI lists whatever
# nr_uarts says, so the initramfs's /init unbinds COM2 there); the i8042 keeps its hands off the PS/2 keyboard and
# mouse (IRQ 1 and 12 stay free for the console driver); vgacon never blanks the VGA screen
# behind the console driver's back; a panic exits at once (with -no-reboot, QEMU exits
# too); no_timer_check: on a loaded host the boot's check that the timer interrupt arrives
# through the interrupt-remapped IO-APIC can time out under TCG, and the kernel panics
# ("timer doesn't work through Interrupt-remapped IO-APIC"); quiet: every console line
# costs boot time under TCG.
BASE_KERNEL_ARGS = ("console=ttyS0", "intel_iommu=on", "iommu=pt", "8250.nr_uarts=1",
                    "i8042.nokbd", "i8042.noaux", "consoleblank=0", "panic=-1", "no_timer_check", "quiet")


@dataclass
class MachineConfig:
    kernel_image: str
    initramfs: str
    disk_image: str
    guest_python: str
    guest_init: str
    agent_socket: str
    com2_socket: str
    qmp_socket: str
    memory_mb: int = 512
    cpus: int = 1
    mode: str = "agent"            # "agent", or "shell" (a shell on the console too)
    interactive: bool = False      # console on the user's terminal, with QEMU's Ctrl-A keys
    kernel_args: tuple = ()
    extra_qemu_args: tuple = ()
    netdev: str = "user"           # the e1000's backend: "user" (hostfwd works) or e.g. a tap
    root_disk: str = ""            # an ext4 image for the root's upper layer (virtio-blk, vda)
    env_words: dict = field(default_factory=dict)


def find_qemu():
    path = shutil.which(QEMU)
    if path is None:
        raise TestbedError(f"{QEMU} not found on PATH: install the Debian package "
                           "qemu-system-x86 (`make setup`)")
    return path


def kernel_command_line(cfg):
    words = list(BASE_KERNEL_ARGS) + list(cfg.kernel_args)
    # Unknown KEY=VALUE words reach /init as environment variables.
    env = {"tb_python": cfg.guest_python, "tb_init": cfg.guest_init, "tb_mode": cfg.mode}
    env.update(cfg.env_words)
    if cfg.root_disk:
        env["tb_root_disk"] = ROOT_DISK_DEVICE
    for key, value in env.items():
        if not value or any(c.isspace() or c == '"' for c in value):
            raise TestbedError(f"cannot pass {key}={value!r} on the kernel command line "
                               "(empty, or contains spaces or quotes)")
        words.append(f"{key}={value}")
    line = " ".join(words)
    if len(line) > 2000:
        raise TestbedError(f"kernel command line too long ({len(line)} > 2000 bytes)")
    return line


def qemu_command(cfg):
    console = "stdio,id=con,signal=off" + (",mux=on" if cfg.interactive else "")
    cmd = [
        find_qemu(), "-nodefaults", "-no-user-config", "-no-reboot",
        "-accel", "tcg", "-cpu", "max", "-M", "q35",
        "-m", str(cfg.memory_mb), "-smp", str(cfg.cpus),
        "-display", "none",
        # intel-iommu must come before every other PCI device.
        "-device", "intel-iommu,intremap=on",
        "-device", "VGA,bus=pcie.0,addr=01.0",
        "-netdev", f"{cfg.netdev},id=net0",
        "-device", f"e1000,netdev=net0,bus=pcie.0,addr=02.0,mac={GUEST_MAC}",
        "-device", "ich9-ahci,id=ahci0,bus=pcie.0,addr=03.0",
        "-drive", f"file={_escape(cfg.disk_image)},if=none,id=disk0,format=raw",
        "-device", "ide-hd,drive=disk0,bus=ahci0.0",
        "-device", "virtio-serial-pci,id=vser0,bus=pcie.0,addr=04.0",
        "-chardev", f"socket,id=agent,path={_escape(cfg.agent_socket)}",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,bus=pcie.0,addr=05.0",
        # COM2 must be created before COM1: QEMU lists the last-created ISA device first in
        # ACPI, and the kernel's 8250 PNP probe gives ttyS0 (its only slot, nr_uarts=1) to
        # the first UART it meets. COM1 first would make COM2 the kernel's console.
        "-chardev", f"socket,id=com2,path={_escape(cfg.com2_socket)}",
        "-device", f"isa-serial,chardev=com2,index=1,iobase={COM2_PORT:#x},irq={COM2_IRQ}",
        "-chardev", console,
        "-device", "isa-serial,chardev=con,index=0,iobase=0x3f8,irq=4",
        "-chardev", f"socket,id=qmp,path={_escape(cfg.qmp_socket)}",
        "-mon", "chardev=qmp,mode=control",
    ]
    if cfg.root_disk:
        cmd += ["-drive", f"file={_escape(cfg.root_disk)},if=none,id=rootdisk,format=raw",
                "-device", "virtio-blk-pci,drive=rootdisk,bus=pcie.0,addr=06.0"]
    if cfg.interactive:
        cmd += ["-mon", "chardev=con,mode=readline"]
    cmd += ["-kernel", cfg.kernel_image, "-initrd", cfg.initramfs,
            "-append", kernel_command_line(cfg)]
    cmd += list(cfg.extra_qemu_args)
    return cmd


def _escape(path):
    # QEMU option values use "," as separator; a literal comma is written ",,".
    return str(path).replace(",", ",,")
