"""`rsctl ds ls|get|watch`: read-only operator views of the data store."""

import base64
import json
import sys

from libdrv.dsclient import DSClient, DSError


def add_ds_parser(subparsers):
    p = subparsers.add_parser("ds", help="look into the data store (read-only)",
                              description="Read-only views of the data store (DS).")
    p.add_argument("--socket", help="DS socket (default: $RSD_DS_SOCKET or $RSD_RUNTIME_DIR/ds.sock)")
    verbs = p.add_subparsers(dest="ds_verb", metavar="VERB")
    verbs.required = True
    ls = verbs.add_parser("ls", help="list keys matching REGEX (anchored; default all)")
    ls.add_argument("regex", nargs="?", default=".*")
    ls.add_argument("--json", action="store_true")
    get = verbs.add_parser("get", help="show one key")
    get.add_argument("key")
    get.add_argument("--json", action="store_true")
    watch = verbs.add_parser("watch", help="print changes of keys matching REGEX until interrupted")
    watch.add_argument("regex")
    watch.add_argument("--json", action="store_true")
    watch.add_argument("--no-initial", action="store_true", help="do not show keys that already match")
    watch.add_argument("--count", type=int, default=0, help="stop after N notifications (0: never)")
    p.set_defaults(func=run_ds)
    return p


def _jsonable(value):
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    return value


def _show(value, vtype):
    if value is None:
        return "(private)"
    if vtype == "bytes":
        return "<%d bytes> %s" % (len(value), value[:32].hex() + ("..." if len(value) > 32 else ""))
    return str(value)


def _entry_dict(e):
    return {"key": e.key, "type": e.type, "owner": e.owner, "flags": e.flags, "value": _jsonable(e.value)}


def run_ds(args, out=sys.stdout):
    try:
        with DSClient(args.socket) as c:
            return VERBS[args.ds_verb](c, args, out)
    except DSError as exc:
        print("rsctl ds: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _ls(c, args, out):
    entries = c.list(args.regex)
    if args.json:
        json.dump([_entry_dict(e) for e in entries], out, indent=1)
        out.write("\n")
        return 0
    width = max([len(e.key) for e in entries] + [3])
    for e in entries:
        out.write("%-*s  %-5s  %-12s  %s\n" % (width, e.key, e.type, e.owner, _show(e.value, e.type)))
    return 0


def _get(c, args, out):
    e = c.retrieve(args.key)
    if args.json:
        json.dump(_entry_dict(e), out)
        out.write("\n")
    else:
        out.write("%s = %s  (type %s, owner %s, flags %d)\n" % (e.key, _show(e.value, e.type), e.type, e.owner, e.flags))
    return 0


def _watch(c, args, out):
    c.subscribe(args.regex, initial=not args.no_initial)
    seen = 0
    while True:
        for n in c.get_notifications(timeout=None):
            if args.json:
                json.dump({"event": n.event, "key": n.key, "type": n.type, "owner": n.owner,
                           "value": _jsonable(n.value), "initial": n.initial, "dropped": n.dropped}, out)
                out.write("\n")
            elif n.event == "overflow":
                out.write("! %d notifications dropped (this watcher was too slow)\n" % n.dropped)
            else:
                out.write("%s %s = %s  (owner %s)\n" % (n.event, n.key,
                          _show(n.value, n.type) if n.event == "set" else "-", n.owner))
            out.flush()
            seen += 1
            if args.count and seen >= args.count:
                return 0


VERBS = {"ls": _ls, "get": _get, "watch": _watch}
