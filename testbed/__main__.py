"""python -m testbed run|shell|info|build: the testbed for a person or a script.

Exit status of `run`: the command's own, 124 if it timed out, 125 if the testbed failed.
"""

import argparse
import os
import sys

from . import initramfs, machine
from .errors import CommandTimeout, TestbedError
from .kernel import DEFAULT_SERIES, find_kernel
from .vm import REPO_ROOT, Testbed, guest_python

EXIT_TIMEOUT, EXIT_TESTBED = 124, 125
GUEST_PRIVATE_DIRS = ("/tmp", "/run", "/dev", "/proc", "/sys")
KERNEL_HELP = ("kernel series (6.1, 6.12) or full version; default: $RSD_TESTBED_KERNEL, "
               "else " + DEFAULT_SERIES)


def _machine_options(parser):
    parser.add_argument("--disk-mb", type=int, default=64, help="size of the fresh AHCI disk (MiB)")
    parser.add_argument("--disk", default=None, help="use this raw image instead of a fresh one")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--kernel", default=None, help=KERNEL_HELP)
    parser.add_argument("--append", action="append", default=[], metavar="WORD",
                        help="extra kernel command-line word (repeatable)")
    parser.add_argument("--boot-timeout", type=float, default=None)
    parser.add_argument("--init", choices=("testbed", "systemd"), default="testbed",
                        help="PID 1 of the guest: the testbed's own init (default) or systemd")


def _testbed(args, **extra):
    return Testbed(disk_size_mb=args.disk_mb, disk_image=args.disk, memory_mb=args.memory_mb,
                   cpus=args.cpus, kernel=args.kernel, kernel_args=args.append,
                   boot_timeout=args.boot_timeout, init=args.init, **extra)


def cmd_run(args):
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("testbed run: give a command after --, e.g. python -m testbed run -- uname -r",
              file=sys.stderr)
        return 2
    with _testbed(args, echo_console=args.verbose) as tb:
        if args.verbose:
            print(f"testbed: ready in {tb.boot_seconds:.1f}s", file=sys.stderr)
        try:
            data = sys.stdin.buffer.read() if args.stdin else None
            result = tb.run(command, timeout=args.timeout, cwd=_guest_cwd(), input=data,
                            on_output=_echo)
        except CommandTimeout:
            print(f"testbed: {command[0]} timed out after {args.timeout}s", file=sys.stderr)
            return EXIT_TIMEOUT
        return result.rc if result.rc >= 0 else 128 - result.rc


def _guest_cwd():
    """Our cwd, which the guest shares, unless it is in one of the guest's own tmpfs mounts."""
    cwd = os.getcwd()
    for private in GUEST_PRIVATE_DIRS:
        if REPO_ROOT.startswith(private + "/"):
            continue  # the guest keeps the host's directory when the checkout is in it
        if cwd.startswith(private + "/"):
            print(f"testbed: {cwd} is not shared with the guest ({private} is its own); "
                  f"running in {REPO_ROOT}", file=sys.stderr)
            return REPO_ROOT
    return cwd


def _echo(fd, data):
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.buffer.write(data)
    stream.flush()


def cmd_shell(args):
    if not sys.stdin.isatty():
        print("testbed shell: needs a terminal on stdin; use `run` for scripts", file=sys.stderr)
        return 2
    print("testbed: booting; `exit` in the guest powers off, Ctrl-A x kills QEMU, "
          "Ctrl-A c toggles the QEMU monitor", file=sys.stderr)
    tb = _testbed(args, mode="shell", interactive=True)
    try:
        tb.start()
        tb.wait_ready()
        return tb.proc.wait()
    finally:
        tb.close()


def cmd_info(args):
    k = find_kernel(args.kernel)
    print(f"kernel:       {k.version} ({k.image}; headers {k.build_dir})")
    print(f"qemu:         {machine.find_qemu()}")
    print(f"busybox:      {initramfs.find_busybox()}")
    print(f"initramfs:    {initramfs.build(k)}")
    print(f"guest python: {guest_python()}")
    print(f"kernel args:  {' '.join(machine.BASE_KERNEL_ARGS)}")
    print(f"devices:      e1000 {machine.E1000_BDF}, ahci {machine.AHCI_BDF}, "
          f"VGA {machine.VGA_BDF}, COM2 {machine.COM2_PORT:#x} IRQ {machine.COM2_IRQ}")
    return 0


def cmd_build(args):
    print(initramfs.build(find_kernel(args.kernel)))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="boot, run one command in the guest, power off")
    _machine_options(run)
    run.add_argument("--timeout", type=float, default=600.0, help="command timeout (s)")
    run.add_argument("-v", "--verbose", action="store_true", help="show the guest console")
    run.add_argument("--stdin", action="store_true", help="feed this process's stdin to CMD")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    shell = sub.add_parser("shell", help="boot to an interactive root shell on the console")
    _machine_options(shell)
    info = sub.add_parser("info", help="show the kernel, QEMU and initramfs the testbed uses")
    info.add_argument("--kernel", default=None, help=KERNEL_HELP)
    build = sub.add_parser("build", help="build (or find) the cached initramfs; print its path")
    build.add_argument("--kernel", default=None, help=KERNEL_HELP)
    args = parser.parse_args(argv)
    handler = {"run": cmd_run, "shell": cmd_shell, "info": cmd_info, "build": cmd_build}[args.verb]
    try:
        return handler(args)
    except (TestbedError, ValueError) as e:
        print(f"testbed: {e}", file=sys.stderr)
        return EXIT_TESTBED


if __name__ == "__main__":
    sys.exit(main())
