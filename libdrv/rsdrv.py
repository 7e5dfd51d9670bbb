"""/dev/rsdrv endpoints: how rsd sets privileges and how a driver gets its endpoint.

rsd (root, CAP_SYS_RAWIO), in one call from a service's [resources]:
    ep = Endpoint.for_service(label, generation, io=((0x2f8, 0x2ff),), irq=(3,),
                              grant_to=("tty",))
    fds.append(("rsdrv", ep.detach()))     # RSD_RESOURCE_FDS="rsdrv=N"; rsd closes it later
or step by step:
    ep = Endpoint.open()
    gen = ep.set_label("serial0", 0)      # 0: the module picks a fresh generation
    ep.allow_io(0x2f8, 8); ep.allow_irq(3)
    ep.allow_mem(0xb8000, 0x8000); ep.allow_pci("0000:00:02.0")
    ep.allow_grant_to("tty")
    ep.seal()
    env = ep.pass_to_child()              # {"RSDRV_FD": "<fd>"}, fd made inheritable
    ... spawn the driver with that fd and env, then ep.close()

driver (unprivileged):
    ep = Endpoint.inherited()             # from $RSD_RESOURCE_FDS (rsdrv=N) or $RSDRV_FD
"""
import os

from libdrv._rsdrv import RawEndpoint
from libdrv.rsdrv_errors import ModuleNotLoaded, RsdrvError

DEVICE = "/dev/rsdrv"
ENV_FD = "RSDRV_FD"
ENV_RESOURCE_FDS = "RSD_RESOURCE_FDS"     # rsd's "name=fd,..." list
RESOURCE_NAME = "rsdrv"
PCI_DEVICES = "/sys/bus/pci/devices"
_inherited = {}     # fd -> Endpoint: one owner per inherited fd


def module_loaded():
    return os.path.exists("/sys/module/rsdrv")


def resolve_pci(ident, devices_dir=PCI_DEVICES):
    """A BDF ("0000:00:02.0") as is; a vendor:device id ("8086:100e") -> the one BDF."""
    ident = ident.lower()
    if "." in ident or ident.count(":") != 1:     # a BDF, with or without its domain
        return ident
    vendor, device = ident.split(":")
    found = []
    for bdf in sorted(os.listdir(devices_dir)):
        try:
            with open(os.path.join(devices_dir, bdf, "vendor")) as f:
                v = f.read().strip()
            with open(os.path.join(devices_dir, bdf, "device")) as f:
                d = f.read().strip()
        except OSError:
            continue
        if v == "0x" + vendor and d == "0x" + device:
            found.append(bdf)
    if len(found) != 1:
        raise ValueError(f"PCI id {ident}: {len(found)} devices match "
                         f"({', '.join(found) or 'none'}); name the device by its address")
    return found[0]


def module_not_loaded(detail):
    return ModuleNotLoaded(
        2, f"rsdrv kernel module not loaded ({detail}): build it with `make -C kmod` and load "
           "it with `insmod kmod/rsdrv.ko` (or `modprobe rsdrv` after a DKMS install)")


class Endpoint(RawEndpoint):
    """An endpoint of /dev/rsdrv; see RawEndpoint for the operations."""

    @classmethod
    def open(cls, path=DEVICE):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise module_not_loaded(f"{path} does not exist") from None
        except PermissionError as e:
            raise RsdrvError(e.errno, f"rsdrv: cannot open {path}: {e.strerror} (only root "
                                      "opens it; drivers inherit a sealed endpoint)") from None
        return cls(fd)

    @classmethod
    def from_fd(cls, fd):
        """Adopt fd (ownership moves to the Endpoint); checks it is an rsdrv endpoint."""
        ep = cls(fd)
        try:
            ep.info()
        except OSError as e:
            ep.detach()
            if not module_loaded():
                raise module_not_loaded(f"fd {fd} is not an rsdrv endpoint") from None
            raise RsdrvError(e.errno, f"rsdrv: fd {fd} is not an rsdrv endpoint: "
                                      f"{e.strerror}") from None
        return ep

    @classmethod
    def for_service(cls, label, generation=0, io=(), irq=(), mem=(), pci=(), grant_to=(),
                    path=DEVICE):
        """rsd's one call: open, set up from a service's [resources] and seal.

        io and mem are inclusive (first, last) pairs as rsd's config gives them; mem must
        cover whole pages (never widened silently); pci holds at most one device, as a
        BDF or a vendor:device id.  Returns the sealed Endpoint (close it after the spawn).
        """
        if len(pci) > 1:
            raise ValueError(f"{label}: rsdrv gives an endpoint one PCI device, not {len(pci)}")
        for first, last in mem:
            if first % 4096 or (last + 1) % 4096:
                raise ValueError(f"{label}: memory range {first:#x}-{last:#x} must cover whole "
                                 "4 KiB pages (start ...000, end ...fff)")
        ep = cls.open(path)
        try:
            ep.set_label(label, generation)
            for first, last in io:
                ep.allow_io(first, last - first + 1)
            for line in irq:
                ep.allow_irq(line)
            for first, last in mem:
                ep.allow_mem(first, last - first + 1)
            for dev in pci:
                ep.allow_pci(resolve_pci(dev))
            for peer in grant_to:
                ep.allow_grant_to(peer)
            ep.seal()
        except BaseException:
            ep.close()
            raise
        return ep

    @classmethod
    def inherited(cls, environ=None):
        """The endpoint rsd passed to this driver: $RSD_RESOURCE_FDS "rsdrv=N" (rsd's
        convention) or $RSDRV_FD."""
        env = os.environ if environ is None else environ
        value = env.get(ENV_FD)
        for item in filter(None, env.get(ENV_RESOURCE_FDS, "").split(",")):
            name, _, fd = item.partition("=")
            if name == RESOURCE_NAME:
                value = fd
        if value is None:
            missing = (f"neither ${ENV_RESOURCE_FDS} names {RESOURCE_NAME!r} nor is "
                       f"${ENV_FD} set")
            if not module_loaded():
                raise module_not_loaded(f"and {missing}")
            raise RsdrvError(2, f"rsdrv: no endpoint was passed to this process ({missing}): "
                                "drivers get theirs from rsd")
        try:
            fd = int(value)
        except ValueError:
            raise RsdrvError(22, f"rsdrv: ${ENV_FD}={value!r} is not a file descriptor") from None
        # One owner per inherited fd, however often a driver asks for it.
        ep = _inherited.get(fd)
        if ep is None or ep.fd != fd:
            ep = _inherited[fd] = cls.from_fd(fd)
        return ep

    def pass_to_child(self):
        """Make the fd inheritable; returns the environment entry that names it."""
        os.set_inheritable(self.fileno(), True)
        return {ENV_FD: str(self.fileno())}

    @property
    def label(self):
        return self.info()["label"]

    @property
    def generation(self):
        return self.info()["generation"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.fd < 0:
            return "<rsdrv.Endpoint closed>"
        i = self.info()
        return (f"<rsdrv.Endpoint fd={self.fd} {i['label'] or '-'}/{i['generation']}"
                f"{' sealed' if i['sealed'] else ''}>")
