"""rsctl: control rsd (MINIX's `service` command) and look into DS (`rsctl ds`)."""

import argparse
import json
import os
import shlex
import sys
import time

from libdrv.svcstate import FAULT_KINDS
from rsd.control import request



def _add_parsers(sub):
    up = sub.add_parser("up", help="start a service without a file (MINIX `service up`)",
                        description="Start PROGRAM under rsd and wait until it says ready.  PROGRAM "
                        "is a Python module (pkg.mod[:func]), a .py file or an executable.  Its "
                        "arguments: --args \"A B\", or after --: rsctl up PROGRAM --period 1 -- -v A")
    up.add_argument("program")
    up.add_argument("--label", help="the service's label (default: derived from PROGRAM)")
    up.add_argument("--args", default="", help='arguments, one shell-quoted string: --args "-v --port 2"')
    up.add_argument("--period", type=float, default=0.0, help="heartbeat period in seconds (0: off)")
    up.add_argument("--script", help="policy script run on failure (absolute, or a name in policy.d)")
    up.add_argument("--no-backoff", action="store_true", help="restart at once every time")
    up.add_argument("--class", dest="cls", default="server", help="net, blk, chr or server")
    up.add_argument("--user", help="run as this user (default: a dynamically allocated uid)")
    up.add_argument("--group", help="run with this group")
    up.add_argument("--init-timeout", type=float, help="seconds to become ready (default 10)")
    up.add_argument("--stable-uptime", type=float, help="uptime after which the restart count resets")
    up.add_argument("--depends-on", action="append", default=[], metavar="LABEL")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_up)

    for verb, text in (("down", "stop a service and purge its DS keys"),
                       ("restart", "kill a service now and start a fresh copy now")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("label")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_simple, verb=verb)

    gu = sub.add_parser("give-up", help="stop restarting a service that is between incarnations; it "
                        "stays in `rsctl status` as failed (what a policy script runs when it gives up)")
    gu.add_argument("label")
    gu.add_argument("--why", help="the reason `rsctl status` shows")
    gu.add_argument("--json", action="store_true")
    gu.set_defaults(func=cmd_give_up)

    st = sub.add_parser("status", help="show services: pid, state, generation, restarts, uptime, last failure")
    st.add_argument("label", nargs="?")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    fi = sub.add_parser("fi", help="inject a fault through the control channel (default --crash)")
    fi.add_argument("label")
    g = fi.add_mutually_exclusive_group()
    for kind in FAULT_KINDS:
        g.add_argument("--" + kind, dest="kind", action="store_const", const=kind)
    fi.set_defaults(func=cmd_fi, kind=None)

    rl = sub.add_parser("reload", help="re-read services.d: start new, stop removed, restart changed")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=cmd_reload)

    sd = sub.add_parser("shutdown", help="stop every service, then rsd")
    sd.set_defaults(func=cmd_shutdown)


def build_parser():
    p = argparse.ArgumentParser(prog="rsctl", description="Control the reincarnation server rsd.")
    p.add_argument("--socket", help="rsd's control socket (default $RSD_SOCKET or "
                   "$RSD_RUNTIME_DIR/rsd.sock or /run/rsd/rsd.sock)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    _add_parsers(sub)
    try:
        from datastore.opview import add_ds_parser
    except ImportError:  # DS views not installed: everything else still works
        pass
    else:
        add_ds_parser(sub)
    return p


def _call(args, msg, timeout=60.0):
    """Send msg; return the reply dict, or print the error and return None."""
    try:
        reply = request(msg, args.socket, timeout)
    except (ConnectionError, TimeoutError) as exc:
        print("rsctl: %s" % exc, file=sys.stderr)
        return None
    if not reply.get("ok"):
        print("rsctl: %s" % reply.get("error", "request failed"), file=sys.stderr)
        return None
    return reply


def _default_label(program):
    name = program.split(":")[0]
    if "/" in name or name.endswith(".py"):
        base = os.path.basename(name)
        return base[:-3] if base.endswith(".py") else base
    return name.rsplit(".", 1)[-1]


def cmd_up(args):
    program = args.program
    if ("/" in program or program.endswith(".py")) and not os.path.isabs(program):
        program = os.path.abspath(program)
    try:
        argv = shlex.split(args.args) + list(getattr(args, "extra_args", []))
    except ValueError as exc:
        print("rsctl: --args is not valid shell quoting: %s" % exc, file=sys.stderr)
        return 2
    spec = {"label": args.label or _default_label(program), "program": program, "args": argv,
            "class": args.cls, "period": args.period, "backoff": not args.no_backoff}
    for key, value in (("script", args.script), ("user", args.user), ("group", args.group),
                       ("init_timeout", args.init_timeout), ("stable_uptime", args.stable_uptime)):
        if value is not None:
            spec[key] = value
    for key in ("user", "group"):  # a numeric id is an id, not a name
        if isinstance(spec.get(key), str) and spec[key].isdigit():
            spec[key] = int(spec[key])
    if args.depends_on:
        spec["depends_on"] = args.depends_on
    reply = _call(args, {"op": "up", "spec": spec}, timeout=(args.init_timeout or 10.0) + 30)
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply))
    else:
        print("%s up (pid %s, generation %s)" % (reply["label"], reply["pid"], reply["generation"]))
    return 0


def cmd_simple(args):
    reply = _call(args, {"op": args.verb, "label": args.label})
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply))
    elif args.verb == "restart":
        print("%s restarted (pid %s, generation %s)" % (reply["label"], reply["pid"], reply["generation"]))
    else:
        print("%s down" % args.label)
    return 0


def cmd_give_up(args):
    reply = _call(args, {"op": "give-up", "label": args.label, "why": args.why})
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply))
    else:
        print("%s failed: %s" % (reply["label"], reply["gave_up"]["why"]))
    return 0


def _age(t):
    if t is None:
        return "-"
    return "%.0fs ago" % max(0.0, time.time() - t)


def cmd_status(args):
    msg = {"op": "status"}
    if args.label:
        msg["label"] = args.label
    reply = _call(args, msg)
    if reply is None:
        return 1
    services = reply["services"]
    if args.json:
        print(json.dumps(services if not args.label else services[0]))
        return 0
    print("%-16s %-8s %-12s %5s %8s %10s  %s" % ("LABEL", "PID", "STATE", "GEN", "RESTARTS", "UPTIME",
                                                "LAST FAILURE"))
    for s in services:
        f = s.get("last_failure")
        last = "-" if not f else "%s, %s" % (f["reason"], _age(f.get("time")))
        if s.get("gave_up"):
            last = "gave up %s: %s" % (_age(s["gave_up"]["time"]), s["gave_up"]["why"])
        up = "-" if s.get("uptime") is None else "%.1fs" % s["uptime"]
        if s.get("dma_isolated") is False:
            last += "  [DMA NOT ISOLATED: no IOMMU]"
        print("%-16s %-8s %-12s %5d %8d %10s  %s" % (s["label"], s["pid"] or "-", s["state"],
                                                    s["generation"], s["restarts_total"], up, last))
    return 0


def cmd_fi(args):
    reply = _call(args, {"op": "fi", "label": args.label, "kind": args.kind or "crash"})
    if reply is None:
        return 1
    print("injected %s into %s (pid %s)" % (reply["kind"], reply["label"], reply["pid"]))
    return 0


def cmd_reload(args):
    reply = _call(args, {"op": "reload"})
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply))
    else:
        for what in ("started", "stopped", "changed"):
            if reply[what]:
                print("%s: %s" % (what, ", ".join(reply[what])))
        for err in reply["errors"]:
            print("error: %s" % err, file=sys.stderr)
    return 1 if reply["errors"] else 0


def cmd_shutdown(args):
    reply = _call(args, {"op": "shutdown"})
    if reply is None:
        return 1
    print("rsd shut down")
    return 0


def main(argv=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "up" in argv and "--" in argv and argv.index("--") > argv.index("up"):
        # rsctl up PROGRAM [options] -- ARG...: the service's own arguments
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.extra_args = extra
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
