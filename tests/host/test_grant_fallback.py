"""libdrv on a host without the rsdrv module: grants fall back to process_vm_readv/writev
(marked unenforced), everything else says clearly that the module is not loaded."""
import errno
import os
import pickle
import socket

import pytest

from libdrv import rsdrv_errors as E
from libdrv.grant import GRANT_READ, GRANT_WRITE, Grant, GrantRef, safecopy_from, safecopy_to
from libdrv.irq import IrqLine
from libdrv.portio import PortIO
from libdrv.rsdrv import Endpoint, module_loaded
from rsd.endpoint import for_service, resolve_pci
from libdrv.wire import FrameReader, encode


def _granter(sock, size, access):
    """Child: grant a buffer, send the ref, then serve 'dump' until told to exit."""
    buf = bytearray(b"0123456789abcdef" * (size // 16))
    g = Grant(buf, "peer", access)
    sock.sendall(encode({"ref": g.ref.to_wire()}))
    f = sock.makefile("rb")
    for line in f:
        if line.strip() == b"dump":
            sock.sendall(pickle.dumps(bytes(buf)))
        else:
            break
    os._exit(0)


@pytest.fixture
def granter():
    procs = []

    def start(size=4096 * 3, access=GRANT_READ | GRANT_WRITE):
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            parent.close()
            _granter(child, size, access)
        child.close()
        reader = FrameReader(1 << 20)
        msgs = []
        while not msgs:
            data = parent.recv(65536)
            assert data, "granter exited before sending its grant"
            msgs = reader.feed(data)
        procs.append((pid, parent))
        return pid, parent, GrantRef.from_wire(msgs[0]["ref"])

    yield start
    for pid, sock in procs:
        sock.close()
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _dump(sock):
    sock.sendall(b"dump\n")
    data = b""
    while True:
        data += sock.recv(1 << 20)
        try:
            return pickle.loads(data)
        except (pickle.UnpicklingError, EOFError):
            continue


def test_fallback_grant_is_marked_unenforced_and_travels_over_the_wire(granter):
    pid, _, ref = granter()
    assert ref.unenforced and ref.pid == pid and ref.size == 4096 * 3
    assert ref.access == GRANT_READ | GRANT_WRITE


def test_fallback_copies_between_two_processes_across_pages(granter):
    pid, sock, ref = granter()
    out = bytearray(20)
    assert safecopy_from(ref, 4090, out) == 20
    expected = (b"0123456789abcdef" * 1000)[4090:4110]
    assert bytes(out) == expected
    safecopy_to(ref, 4094, b"XYZW")
    assert _dump(sock)[4090:4100] == expected[:4] + b"XYZW" + expected[8:10]


def test_fallback_checks_direction_and_range_advisorily(granter):
    _, _, ro = granter(access=GRANT_READ)
    with pytest.raises(E.GrantAccessDenied):
        safecopy_to(ro, 0, b"x")
    with pytest.raises(E.GrantRangeError):
        safecopy_from(ro, ro.size - 2, bytearray(3))
    with pytest.raises(E.GrantRangeError):
        safecopy_from(ro, -1, bytearray(1))


def test_fallback_copy_from_an_exited_granter_fails_clearly(granter):
    pid, sock, ref = granter()
    sock.sendall(b"exit\n")
    os.waitpid(pid, 0)
    with pytest.raises(E.GranterDead, match="gone"):
        safecopy_from(ref, 0, bytearray(4))


def test_enforced_and_unenforced_refs_are_not_mixed():
    enforced = GrantRef(granter="x", gen=1, id=1, size=10, access=GRANT_READ)
    with pytest.raises(ValueError, match="needs an rsdrv Endpoint"):
        safecopy_from(enforced, 0, bytearray(1))
    with pytest.raises(ValueError, match="malformed"):
        GrantRef.from_wire({"granter": "x"})


def test_without_the_module_open_says_module_not_loaded(tmp_path):
    assert not module_loaded(), "this host has rsdrv loaded; the test expects a host without it"
    with pytest.raises(E.ModuleNotLoaded, match="not loaded.*insmod kmod/rsdrv.ko"):
        Endpoint.open()
    with pytest.raises(E.ModuleNotLoaded):
        Endpoint.open(str(tmp_path / "rsdrv"))
    with pytest.raises(E.ModuleNotLoaded, match="RSD_RESOURCE_FDS.*RSDRV_FD"):
        Endpoint.inherited({})
    with pytest.raises(E.ModuleNotLoaded):
        for_service("serial0", io=((0x2F8, 0x2FF),))


def test_without_the_module_a_foreign_fd_is_refused_clearly():
    r, w = os.pipe()
    try:
        with pytest.raises(E.ModuleNotLoaded, match="not an rsdrv endpoint"):
            Endpoint.from_fd(r)
        with pytest.raises(E.ModuleNotLoaded):
            Endpoint.inherited({"RSDRV_FD": str(r)})
        with pytest.raises(E.ModuleNotLoaded, match=f"fd {r} is not"):
            Endpoint.inherited({"RSD_RESOURCE_FDS": f"uio=9,rsdrv={r}"})
        with pytest.raises(E.RsdrvError, match="not a file descriptor"):
            Endpoint.inherited({"RSDRV_FD": "three"})
    finally:
        os.close(r)
        os.close(w)


def test_hardware_wrappers_need_an_endpoint():
    with pytest.raises(TypeError, match="Endpoint"):
        PortIO(None)
    with pytest.raises(TypeError, match="Endpoint"):
        IrqLine(None, 3)


def test_errno_mapping_is_distinct_per_refusal():
    copy = {errno.ESRCH: E.GranterDead, errno.ESTALE: E.GranterRestarted,
            errno.ENOENT: E.NoSuchGrant, errno.EPERM: E.WrongGrantee,
            errno.EACCES: E.GrantAccessDenied, errno.ERANGE: E.GrantRangeError}
    for err, cls in copy.items():
        e = E.rsdrv_error(err, "safecopy", copy=True)
        assert type(e) is cls and e.errno == err and "rsdrv: safecopy:" in str(e)
    assert len(set(copy.values())) == len(copy)
    assert type(E.rsdrv_error(errno.EPERM, "in8 0x3f8")) is E.NotPermitted
    assert type(E.rsdrv_error(errno.EBADFD, "in8 0x2f8")) is E.NotSealed
    assert type(E.rsdrv_error(errno.EBUSY, "bind irq 3")) is E.LineBusy
    assert isinstance(E.rsdrv_error(errno.EPERM, "x"), OSError)


def test_for_service_refuses_what_it_cannot_grant_exactly():
    with pytest.raises(ValueError, match="whole 4 KiB pages"):
        for_service("vga", mem=((0xB8000, 0xB8FFE),))
    with pytest.raises(ValueError, match="one PCI device"):
        for_service("eth0", pci=("0000:00:02.0", "0000:00:03.0"))


def test_resolve_pci_by_address_or_unique_id(tmp_path):
    for bdf, vendor, device in (("0000:00:02.0", "0x8086", "0x100e"),
                                ("0000:00:03.0", "0x8086", "0x2922"),
                                ("0000:00:04.0", "0x8086", "0x2922")):
        d = tmp_path / bdf
        d.mkdir()
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
    assert resolve_pci("0000:00:05.0", str(tmp_path)) == "0000:00:05.0"
    assert resolve_pci("00:05.0", str(tmp_path)) == "00:05.0"
    assert resolve_pci("8086:100E", str(tmp_path)) == "0000:00:02.0"
    with pytest.raises(ValueError, match="2 devices match"):
        resolve_pci("8086:2922", str(tmp_path))
    with pytest.raises(ValueError, match="0 devices match"):
        resolve_pci("1234:5678", str(tmp_path))


def test_a_granted_bytearray_is_pinned_until_revoked():
    buf = bytearray(b"x" * 4096)
    g = Grant(buf, "peer", GRANT_READ | GRANT_WRITE)
    with pytest.raises(BufferError):
        buf.extend(b"more")            # would move the memory the peer copies into
    with pytest.raises(BufferError):
        del buf[:100]
    assert len(buf) == 4096 and g.active
    g.revoke()
    assert not g.active
    buf.extend(b"more")                # free again once revoked
    assert len(buf) == 4100
    with pytest.raises(E.NoSuchGrant):
        g.revoke()
    with Grant(buf, "peer", GRANT_READ):
        with pytest.raises(BufferError):
            buf.append(0)
    buf.append(0)


IOPORTS = """\
0000-0cf7 : PCI Bus 0000:00
  0000-001f : dma1
  03c0-03df : vga+
  03f8-03ff : serial
  02f8-02ff : rsdrv:serial0
0cf8-0cff : PCI conf1
0d00-ffff : PCI Bus 0000:00
  c000-c03f : 0000:00:02.0
    c000-c03f : e1000
"""


def test_busy_range_holders_are_the_deepest_entries_that_overlap(tmp_path, monkeypatch):
    f = tmp_path / "ioports"
    f.write_text(IOPORTS)
    assert E.range_holders("io", 0x3F8, 0x3FF, str(f)) == [(0x3F8, 0x3FF, "serial")]
    assert E.range_holders("io", 0x3F0, 0x3FB, str(f)) == [(0x3F8, 0x3FF, "serial")]
    assert E.range_holders("io", 0xC010, 0xC010, str(f)) == [(0xC000, 0xC03F, "e1000")]
    assert E.range_holders("io", 0x500, 0x510, str(f)) == [(0, 0xCF7, "PCI Bus 0000:00")]
    hidden = tmp_path / "hidden"
    hidden.write_text("0000-0000 : PCI Bus 0000:00\n  0000-0000 : serial\n")
    assert E.range_holders("io", 0x3F8, 0x3FF, str(hidden)) == []
    monkeypatch.setitem(E.PROC_FILES, "io", str(f))
    e = E.rsdrv_error(errno.EBUSY, "allow io 0x3f8-0x3ff", resource=("io", 0x3F8, 0x3FF))
    assert type(e) is E.RangeBusy and isinstance(e, E.ResourceBusy) and e.errno == errno.EBUSY
    assert "'serial' (0x3f8-0x3ff)" in str(e) and "kernel driver" in str(e), str(e)
    e = E.rsdrv_error(errno.EBUSY, "allow io 0x2f8-0x2ff", resource=("io", 0x2F8, 0x2FF))
    assert "'rsdrv:serial0'" in str(e) and "another service" in str(e), str(e)
    assert type(E.rsdrv_error(errno.EBUSY, "bind irq 3")) is E.LineBusy
