"""The service table: one TOML file per service, checked once, here.

Every value a user can write is validated in this module; the rest of rsd
trusts a ServiceSpec.  Errors name the file, the line and the key, and one
bad file never stops the others from loading.
"""

import dataclasses
import os
import pwd
import grp
import re
import tomllib

from libdrv.svcstate import CLASSES
from rsd.scripts import script_trust_problem

LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?")
_BDF_RE = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")
_VENDEV_RE = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")

DEFAULT_INIT_TIMEOUT = 10.0
DEFAULT_STABLE_UPTIME = 30.0
DEFAULT_SCRIPT_TIMEOUT = 30.0

TOP_KEYS = ("label", "program", "args", "class", "user", "group", "period", "script",
            "backoff", "init_timeout", "depends_on", "stable_uptime", "script_timeout",
            "resources", "ipc", "limits", "sandbox", "shared_user", "dumpable")
RESOURCE_KEYS = ("io", "irq", "mem", "pci", "take_from_kernel", "tap", "nbd", "cuse")
CUSE_KEYS = ("name", "group", "mode")
# A network interface name rsd may create (Linux: under IFNAMSIZ, no "/", ":" or space).
IFNAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,14}")
IPC_KEYS = ("talk_to", "grant_to")
LIMIT_KEYS = ("memory_max", "pids_max", "cpu_weight")
SANDBOX_KEYS = ("deny", "action")
# What a service gets when its file sets no [limits] (docs/security.md).
DEFAULT_LIMITS = {"memory_max": 1 << 30, "pids_max": 256, "cpu_weight": 100}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", re.IGNORECASE)
_SYSCALL_RE = re.compile(r"[a-z_][a-z0-9_]{0,40}")


class ConfigError(ValueError):
    def __init__(self, source, line, key, message):
        self.source, self.line, self.key = source, line, key
        where = source if line is None else "%s:%d" % (source, line)
        text = "%s: %s" % (where, message) if key is None else "%s: key '%s': %s" % (where, key, message)
        super().__init__(text)


@dataclasses.dataclass(frozen=True)
class Resources:
    io: tuple = ()      # ((first_port, last_port), ...)
    irq: tuple = ()     # (line, ...)
    mem: tuple = ()     # ((first_addr, last_addr), ...)
    pci: tuple = ()     # ("0000:00:03.0" | "8086:100e", ...) normalised lower case
    take_from_kernel: bool = False  # rsd may unbind the pci device from a kernel driver
    tap: str = ""       # a persistent TAP rsd creates for the service (rsd/tap.py)
    nbd: str = ""       # an NBD device rsd connects for the service (rsd/nbd.py): RUNTIME/blk/<nbd>
    cuse: str = ""      # a CUSE device rsd registers for the service (rsd/cuse.py): /dev/<cuse>
    cuse_group: str = ""
    cuse_gid: int = 0
    cuse_mode: int = 0

    def to_dict(self):
        out = {"io": ["0x%x-0x%x" % r for r in self.io], "irq": list(self.irq),
               "mem": ["0x%x-0x%x" % r for r in self.mem], "pci": list(self.pci)}
        if self.take_from_kernel:
            out["take_from_kernel"] = True
        if self.tap:
            out["tap"] = self.tap
        if self.nbd:
            out["nbd"] = self.nbd
        if self.cuse:
            out["cuse"] = {"name": self.cuse, "group": self.cuse_group, "mode": self.cuse_mode}
        return out


@dataclasses.dataclass(frozen=True)
class Ipc:
    talk_to: tuple = ()
    grant_to: tuple = ()


@dataclasses.dataclass(frozen=True)
class Limits:
    """cgroup limits; None: the default (DEFAULT_LIMITS)."""
    memory_max: object = None    # bytes or "max"
    pids_max: object = None      # a count or "max"
    cpu_weight: object = None    # 1..10000

    def given(self):
        """The limits the file set itself: {key: value}."""
        return {k: getattr(self, k) for k in LIMIT_KEYS if getattr(self, k) is not None}

    def effective(self):
        return {k: DEFAULT_LIMITS[k] if getattr(self, k) is None else getattr(self, k) for k in LIMIT_KEYS}

    def to_dict(self):
        return self.given()


@dataclasses.dataclass(frozen=True)
class Sandbox:
    deny: tuple = ()             # system calls denied on top of rsd.sandbox.DENIED
    action: str = "errno"        # errno (EPERM) | kill

    def to_dict(self):
        return {"deny": list(self.deny), "action": self.action}


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    label: str
    program: str
    program_kind: str            # "module" | "pyfile" | "exec"
    args: tuple = ()
    cls: str = "server"
    user: object = None          # name or uid; None = a dynamically allocated uid
    group: object = None
    period: float = 0.0
    script: str = None
    backoff: bool = True
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    depends_on: tuple = ()
    stable_uptime: float = DEFAULT_STABLE_UPTIME
    script_timeout: float = DEFAULT_SCRIPT_TIMEOUT
    resources: Resources = Resources()
    ipc: Ipc = Ipc()
    limits: Limits = Limits()
    sandbox: Sandbox = Sandbox()
    shared_user: bool = False    # may share its uid with other services (they can then signal it)
    dumpable: bool = False       # core dumps (and ptrace by its own uid) allowed
    source: str = "rsctl up"     # the file it came from, or "rsctl up"

    def to_dict(self):
        return {"label": self.label, "program": self.program, "args": list(self.args),
                "class": self.cls, "user": self.user, "group": self.group,
                "period": self.period, "script": self.script, "backoff": self.backoff,
                "init_timeout": self.init_timeout, "depends_on": list(self.depends_on),
                "stable_uptime": self.stable_uptime, "script_timeout": self.script_timeout,
                "resources": self.resources.to_dict(),
                "ipc": {"talk_to": list(self.ipc.talk_to), "grant_to": list(self.ipc.grant_to)},
                "limits": self.limits.to_dict(), "sandbox": self.sandbox.to_dict(),
                "shared_user": self.shared_user, "dumpable": self.dumpable,
                "source": self.source}


def _line_finder(text):
    """Return f(table, key) -> the line number where key is set in [table] (or None)."""
    if text is None:
        return lambda table, key: None
    lines = text.splitlines()

    def find(table, key):
        current = None
        pat = re.compile(r'\s*["\']?%s["\']?\s*=' % re.escape(key))
        for no, line in enumerate(lines, 1):
            m = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
            if m and not line.lstrip().startswith("[["):
                current = m.group(1)
                if table is None and current == key:
                    return no  # the key is itself a table: point at its header
                continue
            if current == table and pat.match(line):
                return no
        return None
    return find


class _Checker:
    def __init__(self, source, text):
        self.source = source
        self.where = _line_finder(text)

    def fail(self, table, key, message):
        name = key if table is None else "%s.%s" % (table, key)
        raise ConfigError(self.source, self.where(table, key), name, message)

    def table(self, name, value, keys):
        """A [name] table holding only the given keys."""
        if not isinstance(value, dict):
            self.fail(None, name, "must be a table ([%s])" % name)
        for key in value:
            if key not in keys:
                self.fail(name, key, "unknown key; the keys are: %s" % ", ".join(keys))

    def number(self, table, key, value, minimum, strict=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(table, key, "must be a number of seconds (got %s)" % _show(value))
        if value < minimum or (strict and value == minimum):
            self.fail(table, key, "must be %s %s (got %s)" % (">" if strict else ">=", minimum, value))
        return float(value)

    def string(self, table, key, value):
        if not isinstance(value, str) or not value:
            self.fail(table, key, "must be a non-empty string (got %s)" % _show(value))
        return value

    def string_list(self, table, key, value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(table, key, "must be a list of strings (got %s)" % _show(value))
        return tuple(value)

    def label_list(self, table, key, value):
        out = self.string_list(table, key, value)
        for v in out:
            if not LABEL_RE.fullmatch(v):
                self.fail(table, key, "%r is not a valid label" % v)
        return out

    def ranges(self, table, key, value, limit):
        if not isinstance(value, list):
            self.fail(table, key, 'must be a list of ranges like "0x2f8-0x2ff" or "0x2f8+8"')
        out = []
        for item in value:
            r = _parse_range(item)
            if r is None or not 0 <= r[0] <= r[1] <= limit:
                self.fail(table, key, '%s is not a range within 0..0x%x (write "0xSTART-0xEND", '
                          '"0xSTART+LENGTH" or one number)' % (_show(item), limit))
            out.append(r)
        return tuple(out)

    def ident(self, table, key, value):
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            self.fail(table, key, "must be a name or a numeric id (got %s)" % _show(value))
        return value


def _show(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_range(item):
    try:
        if isinstance(item, bool):
            return None
        if isinstance(item, int):
            return (item, item)
        if not isinstance(item, str):
            return None
        if "+" in item:
            start, length = (int(x.strip(), 0) for x in item.split("+", 1))
            return (start, start + length - 1) if length > 0 else None
        if "-" in item:
            start, end = (int(x.strip(), 0) for x in item.split("-", 1))
            return (start, end)
        n = int(item.strip(), 0)
        return (n, n)
    except ValueError:
        return None


def program_kind(program):
    if program.endswith(".py"):
        return "pyfile"
    if "/" in program:
        return "exec"
    return "module"


def from_dict(data, source="rsctl up", text=None, label=None, policy_dir=None):
    """Check a service description (parsed TOML or an `rsctl up` request).

    label: the label the file name implies (a file's label key must match it).
    policy_dir: where a relative script name is looked up.
    """
    c = _Checker(source, text)
    if not isinstance(data, dict):
        raise ConfigError(source, None, None, "a service description must be a table")
    for key in data:
        if key not in TOP_KEYS:
            c.fail(None, key, "unknown key; the keys are: %s" % ", ".join(TOP_KEYS))

    given = data.get("label", label)
    if given is None:
        c.fail(None, "label", "is missing")
    if not isinstance(given, str) or not LABEL_RE.fullmatch(given):
        c.fail(None, "label", "%s is not a valid label: a letter, then up to 62 letters, digits, "
               "'_' or '-'" % _show(given))
    if given == "rs":
        c.fail(None, "label", "'rs' is reserved for rsd itself; pick another label")
    if label is not None and given != label:
        c.fail(None, "label", "is %r but the file is named %s.toml; rename one of them" % (given, label))

    if "program" not in data:
        c.fail(None, "program", "is missing: give a Python module (pkg.mod), a .py file or an executable")
    program = c.string(None, "program", data["program"])
    kind = program_kind(program)
    if kind == "module" and not _MODULE_RE.fullmatch(program):
        c.fail(None, "program", "%r is neither a Python module name, a .py file nor a path" % program)
    if kind in ("pyfile", "exec"):
        if not os.path.isabs(program):
            c.fail(None, "program", "%r must be an absolute path" % program)
        if not os.path.isfile(program):
            c.fail(None, "program", "%s does not exist (or is not a file)" % program)
        if kind == "exec" and not os.access(program, os.X_OK):
            c.fail(None, "program", "%s is not executable (chmod +x it)" % program)

    args = c.string_list(None, "args", data.get("args", []))
    cls = data.get("class", "server")
    if cls not in CLASSES:
        c.fail(None, "class", "must be one of %s (got %s)" % (", ".join(CLASSES), _show(cls)))

    user = data.get("user")
    group = data.get("group")
    if user is not None:
        user = c.ident(None, "user", user)
        try:
            uid = user if isinstance(user, int) else pwd.getpwnam(user).pw_uid
        except KeyError:
            c.fail(None, "user", "no such user %r (create it, or leave user out for a dynamic uid)" % user)
        if uid <= 0:
            c.fail(None, "user", "a service may not run as root; pick an unprivileged user")
    if group is not None:
        group = c.ident(None, "group", group)
        try:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        except KeyError:
            c.fail(None, "group", "no such group %r" % group)
        if gid <= 0:
            c.fail(None, "group", "a service may not run with group root")

    period = c.number(None, "period", data.get("period", 0), 0)
    if 0 < period < 0.01:
        c.fail(None, "period", "must be 0 (off) or at least 0.01 s")
    script = data.get("script")
    if script is not None:
        script = c.string(None, "script", script)
        if not os.path.isabs(script) and policy_dir is not None:
            script = os.path.join(policy_dir, script)
        if not os.path.isabs(script):
            c.fail(None, "script", "%r must be an absolute path" % script)
        if not (os.path.isfile(script) and os.access(script, os.X_OK)):
            c.fail(None, "script", "%s is not an executable file" % script)
        _check_script_owner(c, script)
    backoff = data.get("backoff", True)
    if not isinstance(backoff, bool):
        c.fail(None, "backoff", "must be true or false (got %s)" % _show(backoff))
    init_timeout = c.number(None, "init_timeout", data.get("init_timeout", DEFAULT_INIT_TIMEOUT), 0, strict=True)
    stable_uptime = c.number(None, "stable_uptime", data.get("stable_uptime", DEFAULT_STABLE_UPTIME), 0, strict=True)
    script_timeout = c.number(None, "script_timeout", data.get("script_timeout", DEFAULT_SCRIPT_TIMEOUT), 0, strict=True)
    depends_on = c.label_list(None, "depends_on", data.get("depends_on", []))
    if given in depends_on:
        c.fail(None, "depends_on", "a service cannot depend on itself")

    resources = _check_resources(c, data.get("resources", {}))
    ipc = _check_ipc(c, data.get("ipc", {}))
    limits = _check_limits(c, data.get("limits", {}))
    sandbox = _check_sandbox(c, data.get("sandbox", {}))
    flags = {}
    for key in ("shared_user", "dumpable"):
        flags[key] = data.get(key, False)
        if not isinstance(flags[key], bool):
            c.fail(None, key, "must be true or false (got %s)" % _show(flags[key]))
    if flags["shared_user"] and user is None:
        c.fail(None, "shared_user", "needs a `user`: a dynamic uid is never shared")
    if flags["dumpable"] and flags["shared_user"]:
        c.fail(None, "dumpable", "a dumpable service must not share its uid: the other services "
               "of that uid could ptrace it; drop shared_user or dumpable")
    return ServiceSpec(label=given, program=program, program_kind=kind, args=args, cls=cls,
                       user=user, group=group, period=period, script=script, backoff=backoff,
                       init_timeout=init_timeout, depends_on=depends_on,
                       stable_uptime=stable_uptime, script_timeout=script_timeout,
                       resources=resources, ipc=ipc, limits=limits, sandbox=sandbox,
                       shared_user=flags["shared_user"], dumpable=flags["dumpable"], source=source)


def _parse_size(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    if value == "max":
        return "max"
    m = _SIZE_RE.fullmatch(value)
    if not m:
        return None
    n = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    return n if n > 0 else None


def _check_limits(c, table):
    c.table("limits", table, LIMIT_KEYS)
    out = {}
    if "memory_max" in table:
        out["memory_max"] = _parse_size(table["memory_max"])
        if out["memory_max"] is None or (out["memory_max"] != "max" and out["memory_max"] < (4 << 20)):
            c.fail("limits", "memory_max", 'must be a size of at least 4M ("64M", "1G", bytes) or "max" '
                   "(got %s)" % _show(table["memory_max"]))
    if "pids_max" in table:
        v = table["pids_max"]
        if not (v == "max" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
            c.fail("limits", "pids_max", 'must be a number of tasks >= 1 or "max" (got %s)' % _show(v))
        out["pids_max"] = v
    if "cpu_weight" in table:
        v = table["cpu_weight"]
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10000):
            c.fail("limits", "cpu_weight", "must be a weight 1..10000 (100 is the default share) "
                   "(got %s)" % _show(v))
        out["cpu_weight"] = v
    return Limits(**out)


def _check_sandbox(c, table):
    c.table("sandbox", table, SANDBOX_KEYS)
    deny = c.string_list("sandbox", "deny", table.get("deny", []))
    from rsd.sandbox import ACTIONS, known_syscall
    for name in deny:
        if not _SYSCALL_RE.fullmatch(name) or not known_syscall(name):
            c.fail("sandbox", "deny", "%r is not a system call on this machine (names as in "
                   "syscalls(2), e.g. \"socket\")" % name)
    action = table.get("action", "errno")
    if action not in ACTIONS:
        c.fail("sandbox", "action", 'must be "errno" (denied calls fail with EPERM) or "kill" '
               "(got %s)" % _show(action))
    return Sandbox(deny=deny, action=action)


def _check_script_owner(c, script):
    """rsd runs policy scripts as root: only root may be able to change one."""
    problem = script_trust_problem(script)
    if problem is not None:
        c.fail(None, "script", problem)


def _check_resources(c, table):
    c.table("resources", table, RESOURCE_KEYS)
    io = c.ranges("resources", "io", table.get("io", []), 0xFFFF)
    mem = c.ranges("resources", "mem", table.get("mem", []), (1 << 52) - 1)
    irq = table.get("irq", [])
    if not isinstance(irq, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                           and 0 <= i <= 255 for i in irq):
        c.fail("resources", "irq", "must be a list of IRQ line numbers 0..255 (got %s)" % _show(irq))
    pci = []
    for item in c.string_list("resources", "pci", table.get("pci", [])):
        m = _BDF_RE.fullmatch(item)
        if m:
            pci.append("%s:%s:%s.%s" % ((m.group(1) or "0000").lower(), m.group(2).lower(),
                                        m.group(3).lower(), m.group(4)))
        elif _VENDEV_RE.fullmatch(item):
            pci.append(item.lower())
        else:
            c.fail("resources", "pci", '%r is neither a PCI address ("0000:00:03.0") nor a '
                   'vendor:device id ("8086:100e")' % item)
    take = table.get("take_from_kernel", False)
    if not isinstance(take, bool):
        c.fail("resources", "take_from_kernel", "must be true or false (got %s)" % _show(take))
    if take and not pci:
        c.fail("resources", "take_from_kernel", "only means something with a pci device: name it in "
               "[resources] pci, or drop take_from_kernel")
    tap = table.get("tap", "")
    if "tap" in table and not (isinstance(tap, str) and IFNAME_RE.fullmatch(tap)):
        c.fail("resources", "tap", "must be a network interface name for rsd to create as a TAP: "
               "a letter, then up to 14 letters, digits, '_', '.' or '-' (got %s)" % _show(tap))
    nbd = table.get("nbd", "")
    if "nbd" in table and not (isinstance(nbd, str) and LABEL_RE.fullmatch(nbd)):
        c.fail("resources", "nbd", "must be a name for the block device rsd connects (its path is "
               "$RSD_RUNTIME_DIR/blk/NAME): a letter, then up to 62 letters, digits, '_' or '-' (got %s)"
               % _show(nbd))
    cuse = _check_cuse(c, table["cuse"]) if "cuse" in table else {}
    return Resources(io=io, irq=tuple(irq), mem=mem, pci=tuple(pci), take_from_kernel=take, tap=tap, nbd=nbd,
                     **cuse)


def _check_cuse(c, value):
    """cuse = "NAME" or {name, group?, mode?}: the CUSE device rsd registers (rsd/cuse.py)."""
    from rsd.cuse import DEFAULT_GROUP, DEFAULT_MODE, check_name
    table = value if isinstance(value, dict) else {"name": value}
    c.table("resources.cuse", table, CUSE_KEYS)
    name, group, mode = table.get("name"), table.get("group", DEFAULT_GROUP), table.get("mode", DEFAULT_MODE)
    if not check_name(name):
        c.fail("resources", "cuse", "must be a name for the character device rsd registers (/dev/NAME): a "
               "letter, then up to 31 letters, digits, '_' or '-' (got %s)" % _show(name))
    if not isinstance(group, str) or not group:
        c.fail("resources", "cuse", "group must be a group name (got %s)" % _show(group))
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        c.fail("resources", "cuse", "group %r (the node's group) does not exist on this machine" % group)
    if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode):
        mode = int(mode, 8)
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o666:
        c.fail("resources", "cuse", 'mode must be permission bits up to 0o666 (0o660, or "0660") (got %s)'
               % _show(mode))
    return {"cuse": name, "cuse_group": group, "cuse_gid": gid, "cuse_mode": mode}


def _check_ipc(c, table):
    c.table("ipc", table, IPC_KEYS)
    return Ipc(talk_to=c.label_list("ipc", "talk_to", table.get("talk_to", [])),
               grant_to=c.label_list("ipc", "grant_to", table.get("grant_to", [])))


def load_file(path, policy_dir=None):
    """Read and check one <label>.toml; raises ConfigError."""
    label = os.path.basename(path)[:-len(".toml")]
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(path, None, None, "cannot read: %s" % exc.strerror) from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        raise ConfigError(path, int(m.group(1)) if m else None, None,
                          "not valid TOML: %s" % exc) from None
    if not LABEL_RE.fullmatch(label):
        raise ConfigError(path, None, None, "the file name must be <label>.toml with a valid label "
                          "(a letter, then letters, digits, '_' or '-')")
    return from_dict(data, source=path, text=text, label=label, policy_dir=policy_dir)


def load_dir(directory, policy_dir=None):
    """Load every *.toml in directory: ({label: spec}, [error text, ...])."""
    specs, errors = {}, []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return specs, errors
    except OSError as exc:
        return specs, ["%s: cannot list: %s" % (directory, exc.strerror)]
    for name in names:
        if not name.endswith(".toml"):
            continue
        try:
            spec = load_file(os.path.join(directory, name), policy_dir)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        specs[spec.label] = spec
    return specs, errors


def start_order(specs, running=()):
    """Labels in an order where dependencies come first; plus errors for the rest.

    running: labels already up (they satisfy dependencies).
    """
    order, errors, state = [], [], {}

    def visit(label, chain):
        if state.get(label) == "done":
            return True
        if state.get(label) == "bad":
            return False
        if label in chain:
            errors.append("%s: dependency cycle: %s" % (specs[label].source, " -> ".join(chain + [label])))
            return False
        ok = True
        for dep in specs[label].depends_on:
            if dep in running and dep not in specs:
                continue
            if dep not in specs:
                errors.append("%s: key 'depends_on': no service %r (add %s.toml or start it first)"
                              % (specs[label].source, dep, dep))
                ok = False
            elif not visit(dep, chain + [label]):
                if ok:
                    errors.append("%s: not started because its dependency %r was not"
                                  % (specs[label].source, dep))
                ok = False
        state[label] = "done" if ok else "bad"
        if ok:
            order.append(label)
        return ok

    for label in sorted(specs):
        visit(label, [])
    return order, errors
