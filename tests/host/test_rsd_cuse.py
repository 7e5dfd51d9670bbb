"""[resources] cuse (rsd/cuse.py): the key as a service file gives it, and what rsd checks of a
front end's cuse_open before it touches /dev/cuse.  The host kernel has no CUSE, so a request
that passes every check gets the error that says to load the module; the registration itself,
the node's owner and mode, and the refusals that need a kernel are tested in the guest
(tests/vm/test_cuse.py)."""

import pytest

from rsd import cuse
from rsd.service import ConfigError, from_dict, load_file

PROGRAM = 'program = "frontends.cuse"\n[resources]\n'


def test_the_cuse_key_is_a_device_name_with_an_optional_group_and_mode(tmp_path):
    path = tmp_path / "serial0-cuse.toml"
    path.write_text(PROGRAM + 'cuse = "ttyRSD1"\n')
    r = load_file(str(path)).resources
    assert (r.cuse, r.cuse_group, r.cuse_mode) == ("ttyRSD1", "dialout", 0o660)
    path.write_text(PROGRAM + 'cuse = { name = "ttyRSD1", group = "root", mode = "0640" }\n')
    spec = load_file(str(path))
    assert (spec.resources.cuse, spec.resources.cuse_gid, spec.resources.cuse_mode) == ("ttyRSD1", 0, 0o640)
    # what rsd records (spawners.json) reads back the same
    d = spec.to_dict()
    d.pop("source")
    assert from_dict(d).resources == spec.resources
    for bad, why in (('"tty/RSD1"', "must be a name"), ('"../sda"', "must be a name"), ('"1tty"', "must be a name"),
                     ('""', "must be a name"), ('"cuse"', "must be a name"), ('7', "must be a name"),
                     ('"%s"' % ("t" * 33), "must be a name"),
                     ('{ name = "ttyX", group = "no-such-group-here" }', "does not exist"),
                     ('{ name = "ttyX", mode = 0o4755 }', "mode must be"), ('{ name = "ttyX", mode = "rw" }', "mode"),
                     ('{ name = "ttyX", owner = "root" }', "unknown key")):
        path.write_text(PROGRAM + "cuse = %s\n" % bad)
        with pytest.raises(ConfigError, match=r"resources\.cuse.*%s" % why):
            load_file(str(path))


def spec(name="ttyRSD1"):
    return from_dict({"label": "serial0-cuse", "program": "frontends.cuse",
                      "resources": {"cuse": name} if name else {}})


def test_rsd_refuses_a_name_the_service_file_does_not_give():
    assert cuse.check_request(spec(), {"name": "ttyRSD1"})[0] == "ttyRSD1"
    for asked in ("ttyRSD2", "sda", None, 3):
        with pytest.raises(cuse.CuseError, match="its service file gives 'ttyRSD1'"):
            cuse.check_request(spec(), {"name": asked})
    with pytest.raises(cuse.CuseError, match=r"has no \[resources\] cuse"):
        cuse.check_request(spec(None), {"name": "ttyRSD1"})


def test_an_existing_node_that_is_not_a_cuse_device_is_refused():
    with pytest.raises(cuse.CuseError, match="/dev/null exists and is not a CUSE device"):
        cuse.register("null", 0, 0o660)


def test_without_cuse_in_the_kernel_the_error_says_to_load_it():
    with pytest.raises(cuse.CuseError, match="modprobe cuse"):
        cuse.register("ttyRSDhost", 0, 0o660)
