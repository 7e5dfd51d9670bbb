"""rsdrv in the guest: privileges, port I/O, IRQ, memory, grants, DMA (runs as root; the use
of each endpoint happens in forked children that have become `nobody`).

Needs: the rsdrv module loaded, or $RSDRV_KO naming the .ko to insmod (tests/vm/test_kmod.py
builds it); COM2 (0x2f8, IRQ 3) left alone by the guest kernel; VGA text memory at 0xb8000;
the e1000 at 0000:00:02.0 (DMA buffers).  A missing piece fails with the reason.
"""
import errno
import os
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
    ep = Endpoint.for_service("ksvc", 0, io=((COM2, COM2 + 7),), irq=(COM2_IRQ,),
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
        grantee.start(_copy_storm, b.fileno(), gen, first, 50000)
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


# ---------------------------------------------------------------- module lifetime

def test_unload_refused_while_an_endpoint_is_open():
    ep = Endpoint.open()
    try:
        r = subprocess.run(["rmmod", "rsdrv"], capture_output=True, text=True)
        assert r.returncode != 0 and "in use" in r.stderr, r
    finally:
        ep.close()
