"""Setting up a service's /dev/rsdrv endpoint: rsd's work, as root.

Drivers never open /dev/rsdrv (it is 0600 root): for every incarnation rsd
opens an endpoint, grants it exactly the service's [resources] and grant
peers, labels it with the incarnation's generation and seals it; the driver
inherits the sealed fd (libdrv.rsdrv.Endpoint.inherited) and can use it
but never widen it.  The set-up lives here, not in libdrv, which every
driver links: libdrv only binds the module's calls (which a driver's
sealed endpoint refuses), rsd decides what an endpoint gets.
"""

import os

from libdrv.rsdrv import DEVICE, Endpoint

PCI_DEVICES = "/sys/bus/pci/devices"


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


def for_service(label, generation=0, io=(), irq=(), mem=(), pci=(), grant_to=(), path=DEVICE):
    """Open, set up from a service's [resources] and seal, in one call.

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
    ep = Endpoint.open(path)
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
