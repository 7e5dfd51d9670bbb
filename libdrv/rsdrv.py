"""/dev/rsdrv endpoints: how rsd sets privileges and how a driver gets its endpoint.

rsd (root, CAP_SYS_RAWIO) sets endpoints up from a service's [resources]
(rsd/endpoint.py); step by step, with these bindings:
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
_inherited = {}     # fd -> Endpoint: one owner per inherited fd


def module_loaded():
    return os.path.exists("/sys/module/rsdrv")


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
