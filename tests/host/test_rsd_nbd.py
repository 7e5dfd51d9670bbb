"""[resources] nbd (rsd/nbd.py): the key as a service file gives it, and what rsd checks of a
front end's nbd_connect before it asks the kernel.  The host kernel has no NBD, so a request
that passes every check gets the error that says to load the module; the real connection,
RECONFIGURE and disconnect are tested in the guest (tests/vm/test_blk_frontend.py)."""

import json
import os
import shutil
import tempfile

import pytest

from rsd import nbd
from rsd.service import ConfigError, from_dict, load_file
from services.rsdharness import wait_for

# A service that asks rsd for an NBD connection during its init and logs what it got.
ASKER = '''
import json, sys
from libdrv.sef import SEF
def init(sef):
    try:
        reply, fds = sef.request("nbd_connect", timeout=10, **json.loads(sys.argv[1]))
        print("NBD-RESULT ok %s fds=%d" % (json.dumps(reply), len(fds)), file=sys.stderr, flush=True)
    except RuntimeError as exc:
        print("NBD-RESULT refused %s" % exc, file=sys.stderr, flush=True)
def main():
    sef = SEF()
    sef.on_init_fresh(init)
    return sef.run()
if __name__ == "__main__":
    sys.exit(main())
'''

GOOD = {"size": 64 << 20, "block_size": 512, "flags": ["SEND_FLUSH", "SEND_FUA", "SEND_TRIM"]}


@pytest.fixture(scope="module")
def asker():
    d = tempfile.mkdtemp(prefix="rsd-nbd-")
    os.chmod(d, 0o755)  # the service runs as a dynamic uid
    path = os.path.join(d, "asker.py")
    with open(path, "w") as f:
        f.write(ASKER)
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(d)


def test_the_nbd_key_is_a_name(tmp_path):
    path = tmp_path / "disk0-blk.toml"
    path.write_text('program = "frontends.blk"\n[resources]\nnbd = "disk0"\n')
    spec = load_file(str(path))
    assert spec.resources.nbd == "disk0"
    assert spec.resources.to_dict()["nbd"] == "disk0"
    for bad in ('"disk/0"', '"../x"', '"0disk"', '""', '3', '["disk0"]', '"%s"' % ("d" * 64)):
        path.write_text('program = "frontends.blk"\n[resources]\nnbd = %s\n' % bad)
        with pytest.raises(ConfigError, match=r"key 'resources.nbd'.*blk/NAME"):
            load_file(str(path))


def spec(nbd_name="disk0"):
    resources = {"nbd": nbd_name} if nbd_name else {}
    return from_dict({"label": "disk0-blk", "program": "frontends.blk", "resources": resources})


def test_rsd_checks_the_geometry_and_flags_of_a_request():
    size, bs, flags = nbd.check_request(spec(), GOOD)
    assert (size, bs) == (64 << 20, 512)
    assert flags == nbd.SERVER_FLAGS["HAS_FLAGS"] | nbd.SERVER_FLAGS["SEND_FLUSH"] | \
        nbd.SERVER_FLAGS["SEND_FUA"] | nbd.SERVER_FLAGS["SEND_TRIM"]
    for bad, why in ((dict(GOOD, block_size=1024), "block_size"), (dict(GOOD, block_size="512"), "block_size"),
                     (dict(GOOD, size=0), "size"), (dict(GOOD, size=1000), "multiple of the block size"),
                     (dict(GOOD, size=True), "size"), (dict(GOOD, size=1 << 61), "size"),
                     (dict(GOOD, flags=["READ_ONLY"]), "flags"), (dict(GOOD, flags="SEND_FLUSH"), "flags"),
                     (dict(GOOD, flags=[1]), "flags")):
        with pytest.raises(nbd.NbdError, match=why):
            nbd.check_request(spec(), bad)
    with pytest.raises(nbd.NbdError, match=r"has no \[resources\] nbd"):
        nbd.check_request(spec(None), GOOD)


def test_a_name_another_service_holds_is_refused(tmp_path):
    nbd._write_record(str(tmp_path), "disk0", "other-blk", 3)
    assert os.readlink(nbd.link_path(str(tmp_path), "disk0")) == "/dev/nbd3"
    with pytest.raises(nbd.NbdError, match="is other-blk's"):
        nbd.connect(str(tmp_path), "disk0-blk", "disk0", 1 << 20, 512, 1)
    nbd.disconnect(str(tmp_path), "disk0-blk", "disk0")   # not its record: left alone
    assert nbd.read_record(str(tmp_path), "disk0") == {"label": "other-blk", "index": 3}


def ask(rsd, asker, label, request, resources):
    rsd.up(program=asker, label=label, args=[json.dumps(request)], resources=resources)
    wait_for(lambda: "NBD-RESULT" in rsd.service_log(label), timeout=20, what="the service's answer from rsd")
    line = [l for l in rsd.service_log(label).splitlines() if "NBD-RESULT" in l][-1]
    assert rsd.rsctl("down", label).returncode == 0
    return line


def test_rsd_answers_nbd_connect_on_the_control_channel(rsd, asker):
    line = ask(rsd, asker, "noblk", GOOD, {})
    assert "refused" in line and "no [resources] nbd" in line, line
    line = ask(rsd, asker, "badblk", dict(GOOD, block_size=1000), {"nbd": "badblk"})
    assert "refused" in line and "block_size 1000" in line, line
    line = ask(rsd, asker, "goodblk", GOOD, {"nbd": "goodblk"})
    # No NBD in the host kernel: the request passed rsd's checks and the kernel's absence is
    # reported with what to do.
    assert "refused" in line and "modprobe nbd" in line, line
    assert not os.path.exists(nbd.record_path(rsd.runtime_dir, "goodblk"))
