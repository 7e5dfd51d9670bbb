"""A service given a PCI device on a machine without an IOMMU: rsd hands the device to the
rsdrv module (not to VFIO), so its DMA buffers come from the module and are not isolated.
It answers one line on its socket with what it was given."""

import json
import os

from libdrv.dma import DmaBuffer
from libdrv.rsdrv import Endpoint
from libdrv.sef import SEF


def main():
    sef = SEF()
    state = {}

    @sef.on_init_fresh
    def fresh(sef):
        ep = Endpoint.inherited()
        state["ep"] = ep
        state["buf"] = DmaBuffer(ep, 4096)

    @sef.on_accept
    def client(conn):
        conn.setblocking(True)
        with conn:
            info = state["ep"].info()
            conn.sendall((json.dumps({"resource_fds": os.environ.get("RSD_RESOURCE_FDS"),
                                      "dma": info.get("dma"), "bus_addr": state["buf"].bus_addr,
                                      "uid": os.getuid()}) + "\n").encode())

    return sef.run()
