"""rsdrv in the guest: privileges, port I/O, IRQ, memory, grants, DMA (runs as root; the use
of each endpoint happens in forked children that have become `nobody`).

Needs: the rsdrv module loaded, or $RSDRV_KO naming the .ko to insmod (tests/vm/test_kmod.py
builds it); COM2 (0x2f8, IRQ 3) left alone by the guest kernel; VGA text memory at 0xb8000;
the e1000 at 0000:00:02.0 (DMA buffers).  A missing piece fails with the reason.
"""
import errno
import os
import time
import pickle
import re
import socket
import subprocess
import traceback

import pytest

from libdrv.dma import DmaBuffer
from libdrv.grant import GRANT_READ, GRANT_WRITE, Grant, GrantRef, safecopy_from, safecopy_to, vsafecopy
from libdrv.irq import IrqLine
from libdrv.physmem import PhysMem
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint
from rsd.endpoint import for_service
from libdrv import rsdrv_errors as E

NOBODY = 65534
COM2, COM2_IRQ = 0x2F8, 3
SCR, IER, IIR, MCR = COM2 + 7, COM2 + 1, COM2 + 2, COM2 + 4
VGA_TEXT, VGA_TEXT_SIZE = 0xB8000, 0x8000
E1000_BDF = "0000:00:02.0"
DEBUGFS = "/sys/kernel/debug/rsdrv/endpoints"


# ---------------------------------------------------------------- helpers

class Nobody:
    """A forked child that has dropped to uid/gid `nobody` and runs module-level functions
    sent to it: call(fn, *args) runs fn(state, *args) there and returns or raises its result."""

    def __init__(self, keep_fds=None):
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # child
            try:
                parent.close()
                if keep_fds is not None:   # hold no other endpoint than those named
                    keep = set(keep_fds) | {0, 1, 2, child.fileno()}
                    for fd in map(int, os.listdir("/proc/self/fd")):
                        if fd not in keep:
                            try:
                                os.close(fd)
                            except OSError:
                                pass
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                self._serve(child)
            finally:
                os._exit(0)
        child.close()
        self.pid, self.sock = pid, parent
        self.file = parent.makefile("rwb")

    @staticmethod
    def _serve(sock):
        f = sock.makefile("rwb")
        state = {}
        while True:
            try:
                fn, args = pickle.load(f)
            except EOFError:
                return
            try:
                reply = ("ok", fn(state, *args))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the test
                try:
                    pickle.dumps(e)
                    reply = ("err", e, traceback.format_exc())
                except Exception:
                    reply = ("err", RuntimeError(repr(e)), traceback.format_exc())
            pickle.dump(reply, f)
            f.flush()

    def call(self, fn, *args):
        self.start(fn, *args)
        return self.result()

    def start(self, fn, *args):
        pickle.dump((fn, args), self.file)
        self.file.flush()

    def result(self):
        kind, *rest = pickle.load(self.file)
        if kind == "ok":
            return rest[0]
        exc, tb = rest
        exc.child_traceback = tb
        raise exc

    def kill(self):
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        self.pid = None
        self.file.close()
        self.sock.close()

    def close(self):
        if self.pid:
            # shutdown, not just close: later children hold copies of this socket.
            self.sock.shutdown(socket.SHUT_RDWR)
            self.file.close()
            self.sock.close()
            os.waitpid(self.pid, 0)
            self.pid = None


def debugfs():
    with open(DEBUGFS) as f:
        return f.read()


def debugfs_entry(label):
    text = debugfs()
    m = re.search(rf"^endpoint {re.escape(label)} .*?(?=^endpoint |\Z)", text, re.M | re.S)
    return m.group(0) if m else None


def refused_count(label):
    entry = debugfs_entry(label)
    assert entry, f"endpoint {label} not in {DEBUGFS}"
    return int(re.search(r"refused (\d+)", entry).group(1))


def make_endpoint(label, io=(), irqs=(), mem=(), pci=None, peers=(), seal=True):
    ep = Endpoint.open()
    try:
        ep.set_label(label)
        for base, count in io:
            ep.allow_io(base, count)
        for irq in irqs:
            ep.allow_irq(irq)
        for phys, size in mem:
            ep.allow_mem(phys, size)
        if pci:
            ep.allow_pci(pci)
        for peer in peers:
            ep.allow_grant_to(peer)
        if seal:
            ep.seal()
    except BaseException:
        ep.close()          # a refused set-up leaves nothing claimed
        raise
    return ep


@pytest.fixture(scope="module", autouse=True)
def rsdrv_module():
    if not os.path.exists("/sys/module/rsdrv"):
        ko = os.environ.get("RSDRV_KO")
        assert ko, "rsdrv is not loaded and $RSDRV_KO does not name a built rsdrv.ko"
        subprocess.run(["insmod", ko], check=True)
    if not os.path.exists(DEBUGFS):
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    yield


# Functions run inside the `nobody` child; `st` is its persistent state.
def _pio_roundtrip(st, fd, values):
    pio = PortIO(Endpoint(fd))
    out = []
    for v in values:
        pio.outb(SCR, v)
        out.append(pio.inb(SCR))
    pio.ep.detach()
    return out


def _pio_batch(st, fd):
    pio = PortIO(Endpoint(fd))
    b = pio.batch(8)
    b.add_out(SCR, 0x5A)
    i1 = b.add_in(SCR)
    b.add_out(SCR, 0xA5)
    i2 = b.add_in(SCR)
    pio.run(b)
    pio.ep.detach()
    return b.value(i1), b.value(i2)


def _pio_in(st, fd, port, width=1):
    ep = Endpoint(fd)
    try:
        return ep.pio_in(port, width)
    finally:
        ep.detach()


def _pio_bad_batch(st, fd):
    pio = PortIO(Endpoint(fd))
    b = pio.batch(4)
    b.add_out(SCR, 0x11)
    b.add_out(0x3F8 + 7, 0x22)   # COM1's scratch: not in the entry
    try:
        pio.run(b)
    finally:
        pio.ep.detach()


def _call(st, fd, method, *args):
    ep = Endpoint(fd)
    try:
        return getattr(ep, method)(*args)
    finally:
        ep.detach()


# ---------------------------------------------------------------- privileges

def _open_device(st):
    Endpoint.open()


def test_nobody_cannot_open_and_cannot_set_privileges():
    ep = Endpoint.open()       # unsealed, passed to nobody
    p = Nobody()
    try:
        with pytest.raises(E.RsdrvError) as ei:
            p.call(_open_device)
        assert ei.value.errno == errno.EACCES
        for method, args in (("set_label", ("evil",)), ("allow_io", (0, 0x10000)),
                             ("allow_irq", (COM2_IRQ,)), ("allow_mem", (VGA_TEXT, 0x1000)),
                             ("allow_grant_to", ("x",)), ("seal", ())):
            with pytest.raises(E.NotPermitted):
                p.call(_call, ep.fileno(), method, *args)
        # Unsealed: nothing can be used either.
        with pytest.raises(E.NotSealed):
            p.call(_pio_in, ep.fileno(), SCR)
    finally:
        p.close()
        ep.close()


def test_root_without_cap_sys_rawio_cannot_set_privileges():
    ep = Endpoint.open()
    try:
        code = ("import sys; from libdrv.rsdrv import Endpoint; from libdrv import rsdrv_errors as E\n"
                f"ep = Endpoint({ep.fileno()})\n"
                "try:\n    ep.set_label('nocap')\nexcept E.NotPermitted:\n    sys.exit(7)\n"
                "finally:\n    ep.detach()\n")
        r = subprocess.run(["setpriv", "--inh-caps=-sys_rawio", "--bounding-set=-sys_rawio",
                            "python", "-c", code], pass_fds=[ep.fileno()],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 7, r.stdout + r.stderr
        assert ep.set_label("withcap") > 0      # root with the capability may
    finally:
        ep.close()


def test_sealed_entry_cannot_be_widened_even_by_root():
    ep = make_endpoint("kseal", io=[(COM2, 8)])
    try:
        with pytest.raises(E.NotPermitted):
            ep.allow_io(0x3F8, 8)
        with pytest.raises(E.NotPermitted):
            ep.set_label("other")
        # A sealed endpoint of another driver, passed to nobody: no widening either.
        p = Nobody()
        try:
            with pytest.raises(E.NotPermitted):
                p.call(_call, ep.fileno(), "allow_io", 0x3F8, 8)
            with pytest.raises(E.NotPermitted):
                p.call(_pio_in, ep.fileno(), 0x3F8 + 7)
        finally:
            p.close()
        assert re.search(r"io 0x2f8-0x2ff\n  grants", debugfs_entry("kseal")), debugfs_entry("kseal")
    finally:
        ep.close()


def test_generations_are_never_reused():
    a = Endpoint.open()
    b = Endpoint.open()
    try:
        g1 = a.set_label("kgen")
        g2 = b.set_label("kgen")
        assert g2 > g1 > 0
        c = Endpoint.open()
        with pytest.raises(OSError) as ei:
            c.set_label("kgen", g1)          # an old generation
        assert ei.value.errno == errno.EEXIST
        g3 = c.set_label("kgen", g2 + 100)   # a higher one is fine
        assert g3 == g2 + 100
        c.close()
        d = Endpoint.open()
        assert d.set_label("kgen") == g2 + 101
        d.close()
        # Per label: another label has its own sequence (rsd numbers each label itself).
        e = Endpoint.open()
        assert e.set_label("kgen-other", g2 + 101) == g2 + 101
        e.close()
    finally:
        a.close()
        b.close()


def test_bad_arguments_are_refused_at_the_boundary():
    ep = Endpoint.open()
    try:
        with pytest.raises(ValueError):
            ep.set_label("has space")
        with pytest.raises(ValueError):
            ep.allow_io(0xFFFF, 2)
        ep.set_label("kbad")
        with pytest.raises(OSError) as ei:
            ep.allow_mem(0x100000, 0x1000)    # system RAM: never
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            ep.allow_pci("0000:00:1e.7")      # no such device
        assert ei.value.errno == errno.ENODEV
    finally:
        ep.close()


def _inherited_pio(st, environ):
    ep = Endpoint.inherited(environ)
    try:
        PortIO(ep).outb(SCR, 0x77)
        return PortIO(ep).inb(SCR), ep.info()
    finally:
        ep.detach()


def test_for_service_sets_up_and_seals_and_the_driver_inherits_it():
    ep = for_service("ksvc", 0, io=((COM2, COM2 + 7),), irq=(COM2_IRQ,),
                              mem=((VGA_TEXT, VGA_TEXT + VGA_TEXT_SIZE - 1),),
                              pci=("8086:100e",), grant_to=("tty", "ds"))
    p = Nobody()
    try:
        entry = debugfs_entry("ksvc")
        for want in ("sealed", "io 0x2f8-0x2ff", "irq 3", "mem 0xb8000-0xbffff",
                     "grant-to tty", "grant-to ds", "pci 0000:00:02.0"):
            assert want in entry, entry
        value, info = p.call(_inherited_pio, {"RSD_RESOURCE_FDS": f"uio=9,rsdrv={ep.fileno()}"})
        assert value == 0x77
        assert info["label"] == "ksvc" and info["sealed"] and info["dma"]
    finally:
        p.close()
        ep.close()


# ---------------------------------------------------------------- ports

def test_com2_scratch_register_reads_back_through_devio():
    ep = make_endpoint("kpio", io=[(COM2, 8)])
    p = Nobody()
    try:
        values = [0x00, 0x55, 0xAA, 0xFF, 0x42]
        assert p.call(_pio_roundtrip, ep.fileno(), values) == values
        assert p.call(_pio_batch, ep.fileno()) == (0x5A, 0xA5)
    finally:
        p.close()
        ep.close()


def test_port_outside_the_entry_is_refused_and_counted():
    ep = make_endpoint("kpio2", io=[(COM2, 8)])
    p = Nobody()
    try:
        before = refused_count("kpio2")
        with pytest.raises(E.NotPermitted):
            p.call(_pio_in, ep.fileno(), 0x3F8)            # COM1
        with pytest.raises(E.NotPermitted):
            p.call(_pio_in, ep.fileno(), COM2 + 6, 4)      # runs past the end of the range
        p.call(_pio_roundtrip, ep.fileno(), [0x33])
        with pytest.raises(E.NotPermitted):
            p.call(_pio_bad_batch, ep.fileno())
        # All or nothing: the refused batch did not write the scratch register.
        assert p.call(_pio_in, ep.fileno(), SCR) == 0x33
        assert refused_count("kpio2") == before + 3
        entry = debugfs_entry("kpio2")     # the last refusals, with who and what
        assert re.search(r"refused: pid \d+: port 0x3f8/1\n", entry), entry
        assert "refused: pid" in entry and "port 0x2fe/4" in entry, entry
    finally:
        p.close()
        ep.close()


# ---------------------------------------------------------------- IRQ

def _irq_twice(st, fd):
    ep = Endpoint(fd)
    pio = PortIO(ep)
    line = IrqLine(ep, COM2_IRQ)
    got = []
    try:
        line.take()
        pio.outb(IER, 0)
        pio.outb(MCR, 0x08)                  # OUT2: gates the UART's IRQ on a PC
        for _ in range(2):
            pio.outb(IER, 0)
            pio.outb(IER, 0x02)              # THR empty -> interrupt now
            n = line.wait(5.0)
            iir = pio.inb(IIR)               # reading IIR acknowledges THRE
            got.append((n, iir & 0x0F))
            pio.outb(IER, 0)
            line.reenable()
        # Masked-until-reenable: a new interrupt after reenable is delivered again.
        return got
    finally:
        pio.outb(IER, 0)
        pio.outb(MCR, 0)
        line.close()
        ep.detach()


def _irq_in_loop(st, fd):
    """A driver's shape: the IRQ eventfd in libdrv's event loop, handled, then re-enabled."""
    from libdrv.loop import Loop
    ep = Endpoint(fd)
    pio = PortIO(ep)
    line = IrqLine(ep, COM2_IRQ)
    loop = Loop()
    handled = []

    def on_irq():
        handled.append((line.take(), pio.inb(IIR) & 0x0F))
        pio.outb(IER, 0)
        line.reenable()

    try:
        loop.add_reader(line, on_irq)
        pio.outb(MCR, 0x08)
        for _ in range(3):
            pio.outb(IER, 0x02)
            loop.run_once(max_wait=5.0)
        return handled
    finally:
        pio.outb(IER, 0)
        pio.outb(MCR, 0)
        loop.close()
        line.close()
        ep.detach()


def _irq_bind(st, fd, irq):
    ep = Endpoint(fd)
    try:
        st.setdefault("lines", []).append(IrqLine(ep, irq))
    finally:
        ep.detach()


def test_16550_thr_empty_interrupt_arrives_on_eventfd_twice():
    ep = make_endpoint("kirq", io=[(COM2, 8)], irqs=[COM2_IRQ])
    p = Nobody()
    try:
        got = p.call(_irq_twice, ep.fileno())
        assert [n for n, _ in got] == [1, 1], got
        assert [iir for _, iir in got] == [0x02, 0x02], got   # IIR: THR empty pending
        entry = debugfs_entry("kirq")
        assert "irqs 2 " in entry, entry
    finally:
        p.close()
        ep.close()


def test_irq_line_in_the_libdrv_event_loop():
    ep = make_endpoint("kirqloop", io=[(COM2, 8)], irqs=[COM2_IRQ])
    p = Nobody()
    try:
        assert p.call(_irq_in_loop, ep.fileno()) == [(1, 0x02)] * 3
    finally:
        p.close()
        ep.close()


def test_irq_not_in_entry_refused_and_line_never_shared():
    ep = make_endpoint("kirq2", io=[(COM2, 8)], irqs=[COM2_IRQ])
    other = make_endpoint("kirq3", irqs=[COM2_IRQ, 4])
    p = Nobody()
    try:
        with pytest.raises(E.NotPermitted):
            p.call(_irq_bind, ep.fileno(), 4)
        p.call(_irq_bind, ep.fileno(), COM2_IRQ)
        with pytest.raises(E.LineBusy):
            p.call(_irq_bind, other.fileno(), COM2_IRQ)   # second endpoint, same line
        with pytest.raises(E.LineBusy):
            p.call(_irq_bind, other.fileno(), 4)          # COM1's line, owned by the kernel
    finally:
        p.kill()
        ep.close()
        other.close()
    # Unbound on close: the line can be bound again.
    again = make_endpoint("kirq4", irqs=[COM2_IRQ])
    try:
        line = IrqLine(again, COM2_IRQ)
        line.close()
    finally:
        again.close()


# ---------------------------------------------------------------- memory

def _vga(st, fd, phys, size):
    ep = Endpoint(fd)
    try:
        with PhysMem(ep, phys, size) as m:
            old = bytes(m.view[0:4])
            m.view[0:4] = b"R\x1fS\x1f"
            back = bytes(m.view[0:4])
            m.view[0:4] = old
            return back
    finally:
        ep.detach()


def test_vga_text_memory_maps_and_other_ranges_are_refused():
    ep = make_endpoint("kmem", mem=[(VGA_TEXT, VGA_TEXT_SIZE)])
    p = Nobody()
    try:
        assert p.call(_vga, ep.fileno(), VGA_TEXT, 0x1000) == b"R\x1fS\x1f"
        assert p.call(_vga, ep.fileno(), VGA_TEXT + 0x7000, 0x1000) == b"R\x1fS\x1f"
        with pytest.raises(E.NotPermitted):
            p.call(_vga, ep.fileno(), 0xA0000, 0x1000)          # VGA graphics window
        with pytest.raises(E.NotPermitted):
            p.call(_vga, ep.fileno(), VGA_TEXT + 0x7000, 0x2000)  # runs past the range
    finally:
        p.close()
        ep.close()


# ---------------------------------------------------------------- grants

def _granter_setup(st, fd, size, access, grantee, fill):
    ep = Endpoint(fd)
    st["ep"] = ep
    st["buf"] = bytearray(fill * size)
    g = Grant(st["buf"], grantee, access, endpoint=ep)
    st.setdefault("grants", []).append(g)
    return g.ref.to_wire()


def _granter_buf(st):
    return bytes(st["buf"])


def _granter_revoke_all(st):
    for g in st["grants"]:
        g.revoke()


def _copy_from(st, fd, ref, offset, n):
    ep = Endpoint(fd)
    try:
        buf = bytearray(n)
        safecopy_from(GrantRef.from_wire(ref), offset, buf, endpoint=ep)
        return bytes(buf)
    finally:
        ep.detach()


def _copy_to(st, fd, ref, offset, data):
    ep = Endpoint(fd)
    try:
        safecopy_to(GrantRef.from_wire(ref), offset, data, endpoint=ep)
    finally:
        ep.detach()


def _vcopy(st, fd, ref):
    ep = Endpoint(fd)
    try:
        r = GrantRef.from_wire(ref)
        a, b = bytearray(3), bytearray(3)
        done = vsafecopy(ep, [(r, 0, a, False), (r, 5000, b"XYZ", True), (r, 5000, b, False)])
        return done, bytes(a), bytes(b)
    finally:
        ep.detach()


def test_grant_copy_between_two_unprivileged_processes():
    a = make_endpoint("kgrA", peers=["kgrB"])
    b = make_endpoint("kgrB")
    granter, grantee = Nobody(), Nobody()
    try:
        size = 3 * 4096 + 100    # spans pages
        ref = granter.call(_granter_setup, a.fileno(), size, GRANT_READ | GRANT_WRITE, "kgrB", b"ab")
        assert grantee.call(_copy_from, b.fileno(), ref, 4094, 6) == b"ababab"
        grantee.call(_copy_to, b.fileno(), ref, 4090, b"0123456789")
        buf = granter.call(_granter_buf)
        assert buf[4090:4100] == b"0123456789" and len(buf) == 2 * size
        done, x, y = grantee.call(_vcopy, b.fileno(), ref)
        assert (done, x, y) == (3, b"aba", b"XYZ")
        big = grantee.call(_copy_from, b.fileno(), ref, 0, 2 * size)
        assert big == granter.call(_granter_buf)
        entry = debugfs_entry("kgrB")
        assert re.search(r"copies [1-9]", entry), entry
    finally:
        granter.close()
        grantee.close()
        a.close()
        b.close()


def test_grant_refusals_have_distinct_errors():
    a = make_endpoint("kgrC", peers=["kgrD"])
    b = make_endpoint("kgrD")
    c = make_endpoint("kgrE")
    granter, grantee, stranger = Nobody(), Nobody(), Nobody()
    try:
        ro = granter.call(_granter_setup, a.fileno(), 4096, GRANT_READ, "kgrD", b"r")
        with pytest.raises(E.GrantAccessDenied):
            grantee.call(_copy_to, b.fileno(), ro, 0, b"no")
        with pytest.raises(E.GrantRangeError):
            grantee.call(_copy_from, b.fileno(), ro, 4000, 97)
        with pytest.raises(E.WrongGrantee):
            stranger.call(_copy_from, c.fileno(), ro, 0, 1)
        with pytest.raises(E.NotPermitted):      # kgrE is not a permitted peer of kgrC
            granter.call(_granter_setup, a.fileno(), 16, GRANT_READ, "kgrE", b"x")
        bad = dict(ro, id=ro["id"] + 1000)
        with pytest.raises(E.NoSuchGrant):
            grantee.call(_copy_from, b.fileno(), bad, 0, 1)
        granter.call(_granter_revoke_all)
        with pytest.raises(E.NoSuchGrant):
            grantee.call(_copy_from, b.fileno(), ro, 0, 1)
    finally:
        for p in (granter, grantee, stranger):
            p.close()
        for ep in (a, b, c):
            ep.close()


def test_grants_die_with_the_granter_and_with_a_restart():
    b = make_endpoint("kgrG")
    try:
        # Exit: the granter is killed; its endpoint file is closed with it.
        a = make_endpoint("kgrF", peers=["kgrG"])
        granter = Nobody()
        ref = granter.call(_granter_setup, a.fileno(), 64, GRANT_READ, "kgrG", b"f")
        a.close()                      # only the granter holds the endpoint now
        grantee = Nobody()
        assert grantee.call(_copy_from, b.fileno(), ref, 0, 2) == b"ff"
        granter.kill()
        with pytest.raises(E.GranterDead):
            grantee.call(_copy_from, b.fileno(), ref, 0, 2)

        # Exit while someone else still holds the endpoint file: dead all the same.
        a2 = make_endpoint("kgrH", peers=["kgrG"])
        granter = Nobody()
        ref2 = granter.call(_granter_setup, a2.fileno(), 64, GRANT_READ, "kgrG", b"h")
        granter.kill()
        with pytest.raises(E.GranterDead):
            grantee.call(_copy_from, b.fileno(), ref2, 0, 2)
        a2.close()

        # Restart: a new incarnation of kgrF (new generation) makes old grants stale.
        a3 = make_endpoint("kgrF", peers=["kgrG"])
        granter = Nobody()
        ref3 = granter.call(_granter_setup, a3.fileno(), 64, GRANT_READ, "kgrG", b"n")
        assert ref3["gen"] > ref["gen"]
        with pytest.raises(E.GranterRestarted):
            grantee.call(_copy_from, b.fileno(), ref, 0, 2)
        assert grantee.call(_copy_from, b.fileno(), ref3, 0, 2) == b"nn"
        granter.close()
        a3.close()
        grantee.close()
    finally:
        b.close()


def _grant_churn(st, fd, rounds):
    """Grant and revoke over and over; returns the ids used."""
    if "ep" not in st:                 # one owner of the fd in this process
        st["ep"], st["buf"] = Endpoint(fd), bytearray(b"c" * 8192)
    ep, buf = st["ep"], st["buf"]
    ids = []
    for _ in range(rounds):
        g = Grant(buf, "kraceB", GRANT_READ, endpoint=ep)
        ids.append(g.ref.id)
        g.revoke()
    return ids


STORM_STARTED = "/tmp/kmod-copy-storm-started"


def _copy_storm(st, fd, granter_gen, first_id, max_rounds):
    """Copy from grants that come and go until the granter is seen dead a few times;
    only the expected outcomes are allowed."""
    ep = Endpoint(fd)
    seen = {}
    buf = bytearray(6000)
    try:
        for i in range(max_rounds):
            ref = GrantRef(granter="kraceA", gen=granter_gen, id=first_id + i % 400,
                           size=8192, access=GRANT_READ)
            try:
                safecopy_from(ref, 100, buf, endpoint=ep)
                key = "ok"
                assert buf[:1] == b"c"
            except (E.NoSuchGrant, E.GranterDead) as e:
                key = type(e).__name__
            seen[key] = seen.get(key, 0) + 1
            if i == 0:
                with open(STORM_STARTED, "w"):
                    pass  # the test lets the granter churn only once copies are going
            if seen.get("GranterDead", 0) >= 20:
                break
    finally:
        ep.detach()
    return seen


def test_copies_racing_revokes_and_granter_exit():
    a = make_endpoint("kraceA", peers=["kraceB"])
    b = make_endpoint("kraceB")
    granter, grantee = Nobody(keep_fds=[a.fileno()]), Nobody(keep_fds=[b.fileno()])
    try:
        gen, afd = a.info()["generation"], a.fileno()
        first = granter.call(_grant_churn, afd, 1)[0] + 1
        a.close()                                  # the granter child holds the only copy
        if os.path.exists(STORM_STARTED):
            os.unlink(STORM_STARTED)
        grantee.start(_copy_storm, b.fileno(), gen, first, 50000)
        deadline = time.monotonic() + 60
        while not os.path.exists(STORM_STARTED):  # a loaded guest may start it late
            assert time.monotonic() < deadline, "the copying process never started"
            time.sleep(0.01)
        ids = granter.call(_grant_churn, afd, 400)
        granter.kill()                             # the granter dies while copies go on
        seen = grantee.result()
        assert ids[0] == first
        assert set(seen) <= {"ok", "NoSuchGrant", "GranterDead"}, seen
        assert seen.get("NoSuchGrant", 0) > 0 and seen.get("GranterDead", 0) == 20, seen
    finally:
        grantee.close()
        if granter.pid:
            granter.close()
        b.close()


# ---------------------------------------------------------------- DMA

def _dma(st, fd, sizes):
    ep = Endpoint(fd)
    out = []
    try:
        bufs = [DmaBuffer(ep, n) for n in sizes]
        for i, buf in enumerate(bufs):
            buf.view[:] = bytes([i + 1]) * buf.size
        for i, buf in enumerate(bufs):
            out.append((buf.size, buf.bus_addr, bytes(buf.view[:4]), bytes(buf.view[-4:])))
        for buf in bufs:
            buf.close()
        return out
    finally:
        ep.detach()


def test_dma_buffers_for_the_allowed_device_and_marked_not_isolated():
    ep = make_endpoint("kdma", pci=E1000_BDF)
    no_pci = make_endpoint("kdma2")
    p = Nobody()
    try:
        out = p.call(_dma, ep.fileno(), [100, 8192])
        assert [o[0] for o in out] == [4096, 8192]
        for i, (size, bus, head, tail) in enumerate(out):
            assert bus and bus % 4096 == 0
            assert head == tail == bytes([i + 1]) * 4
        assert out[0][1] != out[1][1]
        entry = debugfs_entry("kdma")
        assert "dma-buffers 12288 bytes DMA-NOT-ISOLATED" in entry, entry
        with pytest.raises(E.NotPermitted):
            p.call(_dma, no_pci.fileno(), [4096])
        with pytest.raises(ValueError):
            p.call(_dma, ep.fileno(), [(4 << 20) + 1])
    finally:
        p.close()
        ep.close()
        no_pci.close()
    assert debugfs_entry("kdma") is None      # freed with the endpoint


# ---------------------------------------------------------------- claims

def proc_entries(path):
    """(first, last, name) of every line of /proc/ioports or /proc/iomem."""
    out = []
    with open(path) as f:
        for line in f:
            span, _, name = line.strip().partition(" : ")
            lo, _, hi = span.partition("-")
            out.append((int(lo, 16), int(hi, 16), name.strip()))
    return out


def test_ports_are_reserved_in_the_endpoints_name_and_a_second_claim_is_busy():
    ep = make_endpoint("kclaim", io=[(COM2, 8)])
    try:
        assert (COM2, COM2 + 7, "rsdrv:kclaim") in proc_entries("/proc/ioports")
        # The attack: a second endpoint (another service, or a second copy of this one)
        # asks for ports someone else holds, all of them or a part.
        for base, count in ((COM2, 8), (COM2 + 4, 2), (COM2 - 8, 16)):
            other = Endpoint.open()
            try:
                other.set_label("kclaim2")
                with pytest.raises(E.RangeBusy) as ei:
                    other.allow_io(base, count)
                assert ei.value.errno == errno.EBUSY
                assert ei.value.holders == [(COM2, COM2 + 7, "rsdrv:kclaim")], ei.value.holders
                assert "'rsdrv:kclaim' (0x2f8-0x2ff)" in str(ei.value), str(ei.value)
                assert "another service" in str(ei.value), str(ei.value)
            finally:
                other.close()
        with pytest.raises(E.RangeBusy):
            make_endpoint("kclaim3", io=[(0x2E8, 8), (COM2, 8)])
        assert debugfs_entry("kclaim3") is None     # its first range went with it
        assert [e for e in proc_entries("/proc/ioports") if "rsdrv:" in e[2]] == \
            [(COM2, COM2 + 7, "rsdrv:kclaim")]
    finally:
        ep.close()
    assert not [e for e in proc_entries("/proc/ioports") if "rsdrv:" in e[2]]
    again = make_endpoint("kclaim4", io=[(COM2, 8)])     # released: free to claim again
    try:
        assert (COM2, COM2 + 7, "rsdrv:kclaim4") in proc_entries("/proc/ioports")
    finally:
        again.close()


def test_a_range_held_by_the_endpoint_stays_held_while_a_driver_holds_the_file():
    ep = make_endpoint("kclaimfd", io=[(COM2, 8)])
    fd = ep.fileno()
    p = Nobody(keep_fds=[fd])                # the driver: holds the only other reference
    try:
        ep.close()
        assert (COM2, COM2 + 7, "rsdrv:kclaimfd") in proc_entries("/proc/ioports")
        assert p.call(_pio_roundtrip, fd, [0x5C]) == [0x5C]
    finally:
        p.kill()                             # the driver dies: its endpoint goes with it
    assert not [e for e in proc_entries("/proc/ioports") if "rsdrv:" in e[2]]


def test_com1_held_by_the_kernels_8250_is_refused():
    with open("/proc/cmdline") as f:
        cmdline = f.read().split()
    assert "8250.nr_uarts=1" in cmdline, f"the testbed keeps one 8250 UART (COM1): {cmdline}"
    assert (0x3F8, 0x3FF, "serial") in proc_entries("/proc/ioports"), \
        "the kernel's 8250 does not hold COM1 (0x3f8-0x3ff) in /proc/ioports"
    ep = Endpoint.open()
    try:
        ep.set_label("kcom1")
        with pytest.raises(E.RangeBusy) as ei:
            ep.allow_io(0x3F8, 8)
        assert ei.value.errno == errno.EBUSY
        assert (0x3F8, 0x3FF, "serial") in ei.value.holders, ei.value.holders
        msg = str(ei.value)
        assert "0x3f8-0x3ff" in msg and "'serial'" in msg and "kernel driver" in msg, msg
        assert "8250.nr_uarts" in msg, msg
        ep.seal()
        assert not re.search(r"^  io ", debugfs_entry("kcom1"), re.M)   # not in the entry
    finally:
        ep.close()
    assert (0x3F8, 0x3FF, "serial") in proc_entries("/proc/ioports")   # the kernel keeps it


def test_memory_ranges_are_reserved_and_kernel_held_memory_is_refused():
    ep = make_endpoint("kmemclaim", mem=[(VGA_TEXT, VGA_TEXT_SIZE)])
    try:
        assert (VGA_TEXT, VGA_TEXT + VGA_TEXT_SIZE - 1, "rsdrv:kmemclaim") in \
            proc_entries("/proc/iomem")
        other = Endpoint.open()
        try:
            other.set_label("kmemclaim2")
            with pytest.raises(E.RangeBusy) as ei:
                other.allow_mem(VGA_TEXT + 0x1000, 0x1000)
            assert ei.value.holders == [(VGA_TEXT, VGA_TEXT + VGA_TEXT_SIZE - 1,
                                         "rsdrv:kmemclaim")], ei.value.holders
            # A virtio device's registers, held by the kernel's virtio-pci driver.
            held = [(lo, hi) for lo, hi, name in proc_entries("/proc/iomem")
                    if name == "virtio-pci-modern"]
            assert held, "no memory held by virtio-pci in /proc/iomem"
            lo, hi = held[0]
            with pytest.raises(E.RangeBusy) as ei:
                other.allow_mem(lo, hi - lo + 1)
            assert (lo, hi, "virtio-pci-modern") in ei.value.holders, ei.value.holders
            assert "kernel driver" in str(ei.value)
        finally:
            other.close()
    finally:
        ep.close()
    assert not [e for e in proc_entries("/proc/iomem") if "rsdrv:" in e[2]]


def _pci_driver(bdf):
    try:
        return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/driver"))
    except FileNotFoundError:
        return None


def _driver_override(bdf):
    with open(f"/sys/bus/pci/devices/{bdf}/driver_override") as f:
        return f.read().strip()


def test_a_pci_device_bound_to_a_kernel_driver_is_refused_and_a_held_one_cannot_be_bound():
    virtio = "0000:00:04.0"                   # the agent's virtio-serial: virtio-pci has it
    assert _pci_driver(virtio) == "virtio-pci", _pci_driver(virtio)
    ep = Endpoint.open()
    try:
        ep.set_label("kpciclaim")
        with pytest.raises(E.DeviceBound) as ei:
            ep.allow_pci(virtio)
        assert ei.value.errno == errno.EBUSY and ei.value.driver == "virtio-pci"
        assert "bound to the kernel driver 'virtio-pci'" in str(ei.value), str(ei.value)
        assert _driver_override(virtio) == "(null)"          # left as it was
    finally:
        ep.close()

    assert _pci_driver(E1000_BDF) is None, "the e1000 must be unbound for this test"
    held = make_endpoint("kpciheld", pci=E1000_BDF)
    loaded = False
    try:
        assert _driver_override(E1000_BDF) == "rsdrv"
        with pytest.raises(E.DeviceBound) as ei:            # a second endpoint
            make_endpoint("kpciheld2", pci=E1000_BDF)
        assert ei.value.driver is None and "another rsdrv endpoint" in str(ei.value)
        # The kernel's own driver cannot take it while it is held: not on load ...
        r = subprocess.run(["modprobe", "e1000"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        loaded = True
        assert _pci_driver(E1000_BDF) is None
        # ... and not when root asks for it explicitly.
        with pytest.raises(OSError):
            with open("/sys/bus/pci/drivers/e1000/bind", "w") as f:
                f.write(E1000_BDF)
        assert _pci_driver(E1000_BDF) is None
    finally:
        held.close()
        if loaded:
            subprocess.run(["rmmod", "e1000"], check=True, timeout=120)
    assert _driver_override(E1000_BDF) == "(null)"          # released with the endpoint
    again = make_endpoint("kpciheld3", pci=E1000_BDF)
    again.close()


def test_allow_io_and_mem_need_the_label_first():
    ep = Endpoint.open()
    try:
        with pytest.raises(OSError) as ei:
            ep.allow_io(COM2, 8)
        assert ei.value.errno == errno.EINVAL and "set_label comes first" in str(ei.value)
        with pytest.raises(OSError) as ei:
            ep.allow_mem(VGA_TEXT, 0x1000)
        assert ei.value.errno == errno.EINVAL
    finally:
        ep.close()
    assert not [e for e in proc_entries("/proc/ioports") if "rsdrv:" in e[2]]


# ---------------------------------------------------------------- fork

def _rsdrv_mappings():
    """[(start, end, VmFlags)] of this process's mappings of /dev/rsdrv."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
            if m:
                cur = [int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip(), ""]
                if cur[2] == "/dev/rsdrv":
                    out.append(cur)
            elif line.startswith("VmFlags:") and cur is not None:
                cur[3] = line.split(":", 1)[1].split()
    return [(a, b, flags) for a, b, name, flags in out]


def _fork_child_touches(st, fd):
    """A driver maps a DMA buffer and device memory, then forks: what does the child get?"""
    import ctypes
    import mmap as mmap_mod
    ep = Endpoint(fd)
    dma = DmaBuffer(ep, 4096)
    vga = PhysMem(ep, VGA_TEXT, 0x1000)
    try:
        dma.view[0:4] = b"DMA!"
        maps = _rsdrv_mappings()
        refused = []
        for m in (dma.map, vga.map):           # the way back: MADV_DOFORK is refused
            try:
                m.madvise(mmap_mod.MADV_DOFORK)
                refused.append(None)
            except OSError as e:
                refused.append(e.errno)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, pickle.dumps(_rsdrv_mappings()))
                os.close(w)
                ctypes.string_at(maps[0][0], 4)    # the parent's DMA address: must fault
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            child_maps = pickle.loads(f.read())
        _, status = os.waitpid(pid, 0)
        return {"parent_maps": maps, "child_maps": child_maps, "refused": refused,
                "child_signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "parent_still_sees": bytes(dma.view[0:4])}
    finally:
        dma.close()
        vga.close()
        ep.detach()


def test_a_forked_child_of_a_driver_gets_no_dma_or_device_mapping():
    import signal
    ep = make_endpoint("kfork", mem=[(VGA_TEXT, VGA_TEXT_SIZE)], pci=E1000_BDF)
    p = Nobody()
    try:
        got = p.call(_fork_child_touches, ep.fileno())
    finally:
        p.close()
        ep.close()
    assert len(got["parent_maps"]) == 2, got
    for start, end, flags in got["parent_maps"]:
        assert {"dc", "de", "io"} <= set(flags), (hex(start), flags)   # VmFlags of smaps
    assert got["refused"] == [errno.EINVAL, errno.EINVAL], got
    assert got["child_maps"] == [], got
    assert got["child_signal"] == signal.SIGSEGV, got
    assert got["parent_still_sees"] == b"DMA!"


# ---------------------------------------------------------------- grant pinning and revoke

def _granter_resize(st, fd):
    ep = Endpoint(fd)
    buf = bytearray(b"g" * 8192)
    g = Grant(buf, "kpinB", GRANT_READ | GRANT_WRITE, endpoint=ep)
    out = {}
    for name, attack in (("extend", lambda: buf.extend(b"x" * (1 << 20))),
                         ("shrink", lambda: buf.__delitem__(slice(0, 4096))),
                         ("clear", buf.clear)):
        try:
            attack()
            out[name] = "resized"
        except BufferError:
            out[name] = "BufferError"
    out["len_while_granted"] = len(buf)
    g.revoke()
    buf.extend(b"x")
    out["len_after_revoke"] = len(buf)
    ep.detach()
    return out


def test_a_granted_bytearray_cannot_be_resized_under_its_grant():
    a = make_endpoint("kpinA", peers=["kpinB"])
    p = Nobody()
    try:
        got = p.call(_granter_resize, a.fileno())
    finally:
        p.close()
        a.close()
    assert got == {"extend": "BufferError", "shrink": "BufferError", "clear": "BufferError",
                   "len_while_granted": 8192, "len_after_revoke": 8193}, got


RACE_SIZE = 1 << 20          # 256 pages a copy: a revoke lands inside one


def _race_granter_setup(st, fd):
    st["ep"] = Endpoint(fd)
    st["buf"] = bytearray(b"I" * RACE_SIZE)
    st["grant"] = Grant(st["buf"], "kraceD", GRANT_READ | GRANT_WRITE, endpoint=st["ep"])
    return st["grant"].ref.to_wire()


def _race_granter_revoke(st):
    """As soon as the peer's first copy is landing, revoke, then at once fill with the
    sentinel, from the end backwards: a copy still running after revoke (it moves forwards)
    would overwrite sentinel bytes that are already in place."""
    import time
    buf, deadline = st["buf"], time.monotonic() + 60
    while buf[0] != ord("P"):
        assert time.monotonic() < deadline, "the peer's copies never arrived"
        time.sleep(0.001)
    st["grant"].revoke()
    chunk = 16384
    sentinel = b"S" * chunk
    for off in range(RACE_SIZE - chunk, -1, -chunk):
        buf[off:off + chunk] = sentinel    # same length: no resize
    return True


def _race_granter_check(st):
    buf = st["buf"]
    bad = [i for i in range(0, RACE_SIZE, 512) if buf[i:i + 512] != b"S" * 512]
    return {"intact": not bad, "first_bad": bad[:4]}


def _race_peer(st, fd, ref, after_revoke):
    """Copies into and out of the grant in a loop (16 MiB a system call, so a revoke finds
    one in flight) until `after_revoke` calls have been refused; reads must never see the
    sentinel, and nothing may succeed after a refusal."""
    ep = Endpoint(fd)
    r = GrantRef.from_wire(ref)
    data, back = b"P" * RACE_SIZE, bytearray(RACE_SIZE)
    batch = [(r, 0, data, True)] * 3 + [(r, 0, back, False)]
    batch *= 4
    ok = failed = late_ok = 0
    saw_sentinel = 0
    try:
        while failed < after_revoke:
            try:
                ok += vsafecopy(ep, batch)
                if b"S" in back:
                    saw_sentinel += 1
                if failed:
                    late_ok += 1
            except E.NoSuchGrant as e:
                ok += e.done
                if e.done > 3 and b"S" in back:   # a read done before the refusal
                    saw_sentinel += 1
                if failed and e.done:
                    late_ok += 1
                failed += 1
    finally:
        ep.detach()
    return {"ok": ok, "failed": failed, "late_ok": late_ok, "saw_sentinel": saw_sentinel}


def test_revoke_waits_for_copies_in_flight_and_nothing_lands_after_it():
    rounds = []
    for n in range(3):
        a = make_endpoint("kraceC", peers=["kraceD"])
        b = make_endpoint("kraceD")
        granter, peer = Nobody(keep_fds=[a.fileno()]), Nobody(keep_fds=[b.fileno()])
        try:
            ref = granter.call(_race_granter_setup, a.fileno())
            peer.start(_race_peer, b.fileno(), ref, 200)
            assert granter.call(_race_granter_revoke)
            seen = peer.result()                 # 200 copies refused after the revoke
            check = granter.call(_race_granter_check)
            rounds.append((seen, check))
        finally:
            granter.close()
            peer.close()
            a.close()
            b.close()
    for seen, check in rounds:
        assert check["intact"], (check, rounds)         # no byte landed after revoke returned
        assert seen["failed"] == 200, rounds       # refused (NoSuchGrant) ever after
        assert seen["late_ok"] == 0 and seen["saw_sentinel"] == 0, rounds


def _copy_into_fresh_mapping(st, fd, ref, n):
    """The copier's own pages are not present yet: the module faults them in and retries."""
    import mmap as mmap_mod
    ep = Endpoint(fd)
    dst = mmap_mod.mmap(-1, n)               # untouched: no page present
    src = mmap_mod.mmap(-1, n)
    try:
        safecopy_from(GrantRef.from_wire(ref), 0, dst, endpoint=ep)
        got = bytes(dst[:4]) + bytes(dst[n - 4:])
        safecopy_to(GrantRef.from_wire(ref), 0, src, endpoint=ep)   # zeros, faulted in
        return got
    finally:
        ep.detach()
        dst.close()
        src.close()


def test_copies_fault_in_the_copiers_own_pages():
    a = make_endpoint("kfaultA", peers=["kfaultB"])
    b = make_endpoint("kfaultB")
    granter, grantee = Nobody(), Nobody()
    try:
        n = 64 * 4096
        ref = granter.call(_granter_setup, a.fileno(), n, GRANT_READ | GRANT_WRITE, "kfaultB", b"q")
        assert grantee.call(_copy_into_fresh_mapping, b.fileno(), ref, n) == b"q" * 8
        assert granter.call(_granter_buf) == bytes(n)
    finally:
        granter.close()
        grantee.close()
        a.close()
        b.close()


# ---------------------------------------------------------------- module lifetime

def test_unload_refused_while_an_endpoint_is_open():
    ep = Endpoint.open()
    try:
        r = subprocess.run(["rmmod", "rsdrv"], capture_output=True, text=True)
        assert r.returncode != 0 and "in use" in r.stderr, r
    finally:
        ep.close()
