"""The service table: TOML files checked once, errors naming file, line and key."""

import os

import pytest

from rsd import policy
from rsd.service import ConfigError, from_dict, load_dir, load_file, start_order

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "services", "probe.py")


def write(d, name, text):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_full_file_loads_with_every_key(tmp_path):
    script = write(tmp_path, "giveup", "#!/bin/sh\n")
    os.chmod(script, 0o755)
    path = write(tmp_path, "eth0.toml", f'''
label = "eth0"
program = "{PROBE}"
args = ["-v", "--port", "2"]
class = "net"
user = "nobody"
group = "nogroup"
period = 0.5
script = "giveup"
backoff = false
init_timeout = 3
depends_on = ["ds0"]
stable_uptime = 60
script_timeout = 5

[resources]
io = ["0x2f8-0x2ff", "0x3f8+8", 0x80]
irq = [3, 4]
mem = ["0xfebc0000-0xfebdffff"]
pci = ["0000:00:03.0", "00:1f.2", "8086:100E"]

[ipc]
talk_to = ["tty"]
grant_to = ["inet"]
''')
    spec = load_file(path, policy_dir=str(tmp_path))
    assert (spec.label, spec.cls, spec.program_kind, spec.args) == ("eth0", "net", "pyfile", ("-v", "--port", "2"))
    assert (spec.user, spec.group, spec.period, spec.backoff) == ("nobody", "nogroup", 0.5, False)
    assert spec.script == script and spec.init_timeout == 3.0 and spec.depends_on == ("ds0",)
    assert spec.resources.io == ((0x2f8, 0x2ff), (0x3f8, 0x3ff), (0x80, 0x80))
    assert spec.resources.irq == (3, 4)
    assert spec.resources.mem == ((0xfebc0000, 0xfebdffff),)
    assert spec.resources.pci == ("0000:00:03.0", "0000:00:1f.2", "8086:100e")
    assert spec.ipc.talk_to == ("tty",) and spec.ipc.grant_to == ("inet",)


@pytest.mark.parametrize("text, line, key, words", [
    ('program = "x.y"\nperiod = "fast"\n', 2, "period", "must be a number"),
    ('program = "x.y"\ncolour = 1\n', 2, "colour", "unknown key"),
    ('program = "x.y"\nbackoff = "yes"\n', 2, "backoff", "true or false"),
    ('program = "x.y"\nclass = "gpu"\n', 2, "class", "net, blk, chr, server"),
    ('program = "x.y"\nargs = "a b"\n', 2, "args", "list of strings"),
    ('program = "x.y"\n\n[resources]\nirq = [300]\n', 4, "resources.irq", "0..255"),
    ('program = "x.y"\n[resources]\nio = ["0x10-0x5"]\n', 3, "resources.io", "range"),
    ('program = "x.y"\n[resources]\npci = ["nonsense"]\n', 3, "resources.pci", "PCI address"),
    ('program = "x.y"\n[resources]\ndma = 1\n', 3, "resources.dma", "unknown key"),
    ('program = "x.y"\n[ipc]\ntalk_to = ["9bad"]\n', 3, "ipc.talk_to", "not a valid label"),
    ('program = "x.y"\nuser = "no-such-user-here"\n', 2, "user", "no such user"),
    ('program = "x.y"\nuser = "root"\n', 2, "user", "may not run as root"),
    ('program = "x.y"\ninit_timeout = 0\n', 2, "init_timeout", "> 0"),
    ('label = "other"\nprogram = "x.y"\n', 1, "label", "file is named"),
    ('period = 1\n', None, "program", "is missing"),
    ('program = "/no/such/file.py"\n', 1, "program", "does not exist"),
    ('program = "relative/tool"\n', 1, "program", "absolute path"),
    ('program = "x.y"\nscript = "/no/such/script"\n', 2, "script", "not an executable"),
    ('program = "x.y"\ndepends_on = ["svc"]\n', 2, "depends_on", "itself"),
])
def test_bad_values_name_file_line_and_key(tmp_path, text, line, key, words):
    path = write(tmp_path, "svc.toml", text)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    e = err.value
    assert (e.source, e.line, e.key) == (path, line, key)
    assert words in str(e)
    prefix = path if line is None else "%s:%d" % (path, line)
    assert str(e).startswith("%s: key '%s': " % (prefix, key))


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "svc.toml", 'program = "x.y"\nperiod = = 3\n')
    with pytest.raises(ConfigError) as err:
        load_file(path)
    assert err.value.line == 2 and "not valid TOML" in str(err.value)


def test_one_bad_file_does_not_stop_the_others(tmp_path):
    write(tmp_path, "good.toml", 'program = "x.y"\n')
    write(tmp_path, "bad.toml", 'program = "x.y"\nperiod = -1\n')
    write(tmp_path, "README", "not a service\n")
    write(tmp_path, "bad name.toml", 'program = "x.y"\n')
    specs, errors = load_dir(str(tmp_path))
    assert list(specs) == ["good"]
    assert len(errors) == 2
    assert any("bad.toml:2: key 'period'" in e for e in errors)
    assert any("bad name.toml" in e and "<label>.toml" in e for e in errors)


def test_rsctl_up_requests_are_checked_the_same_way():
    with pytest.raises(ConfigError) as err:
        from_dict({"label": "x", "program": "x.y", "period": "soon"})
    assert str(err.value) == "rsctl up: key 'period': must be a number of seconds (got 'soon')"
    with pytest.raises(ConfigError):
        from_dict({"label": "rs", "program": "x.y"})  # reserved for rsd in DS
    with pytest.raises(ConfigError):
        from_dict({"label": "bad label", "program": "x.y"})
    assert from_dict({"label": "m", "program": "pkg.mod:entry"}).program_kind == "module"
    assert from_dict({"label": "e", "program": "/bin/true"}).program_kind == "exec"


def test_start_order_puts_dependencies_first_and_reports_cycles_and_missing(tmp_path):
    def spec(label, deps):
        return from_dict({"label": label, "program": "x.y", "depends_on": deps})
    specs = {s.label: s for s in (spec("fe", ["drv"]), spec("drv", ["bus"]), spec("bus", []),
                                  spec("a", ["b"]), spec("b", ["a"]), spec("lost", ["nowhere"]),
                                  spec("uses-running", ["ds"]))}
    order, errors = start_order(specs, running={"ds"})
    assert order.index("bus") < order.index("drv") < order.index("fe")
    assert "uses-running" in order
    assert not {"a", "b", "lost"} & set(order)
    assert any("dependency cycle" in e for e in errors)
    assert any("no service 'nowhere'" in e for e in errors)


def test_backoff_policy_sequence():
    assert [policy.restart_delay(n) for n in range(8)] == [0, 2, 4, 8, 16, 30, 30, 30]
    assert [policy.restart_delay(n, backoff=False) for n in range(4)] == [0, 0, 0, 0]
    assert policy.decayed_restarts(5, uptime=10, stable_uptime=30) == 5
    assert policy.decayed_restarts(5, uptime=31, stable_uptime=30) == 0


def test_module_programs_are_imported_by_name_with_an_entry_point():
    from rsd.spawner import _preload
    import json
    assert _preload("m", "module", "json:dumps") is json.dumps
    with pytest.raises(RuntimeError, match="has no callable main"):
        _preload("m", "module", "json")
    with pytest.raises(ModuleNotFoundError):
        _preload("m", "module", "no_such_module_xyz")
