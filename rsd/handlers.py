"""rsctl's requests: one function per verb, and the dispatcher.

Each handler checks the request, then hands the decision to the manager
(rsd/manager.py); replies that wait for an outcome (up waits for ready, down
for the exit) are sent by the manager when it happens.
"""

from libdrv.svcstate import FAULT_KINDS
from rsd import service
from rsd.manager import Event, State


def _lookup(rsd, client, msg):
    label = msg.get("label")
    svc = rsd.manager.services.get(label) if isinstance(label, str) else None
    if svc is None:
        client.error("no service labelled %r (see `rsctl status`)" % (label,))
    return svc


def up(rsd, client, msg):
    mgr = rsd.manager
    try:
        spec = service.from_dict(msg.get("spec"), source="rsctl up", policy_dir=rsd.paths.policy_dir)
    except service.ConfigError as exc:
        client.error(str(exc))
        return
    existing = mgr.services.get(spec.label)
    if existing is not None and existing.state is not State.FAILED:  # a failed one is replaced
        client.error("a service labelled %r is already running; use `rsctl restart %s`, or "
                     "`rsctl up --label OTHER`" % (spec.label, spec.label))
        return
    missing = [d for d in spec.depends_on
               if mgr.services.get(d) is None or mgr.services[d].state is State.FAILED]
    if missing:
        client.error("%s depends on %s, which is not running (see `rsctl status`): start it first"
                     % (spec.label, ", ".join(missing)))
        return
    try:
        svc = mgr.add_service(spec, from_file=False)
    except OSError as exc:
        client.error("cannot start %s: %s" % (spec.label, exc))
        return
    svc.waiters.append((client, "up"))
    rsd.table.save_services()


def down(rsd, client, msg):
    svc = _lookup(rsd, client, msg)
    if svc is not None:
        rsd.manager.on_event(svc, Event.STOP_REQUESTED, client=client)


def restart(rsd, client, msg):
    svc = _lookup(rsd, client, msg)
    if svc is None:
        return
    refused = rsd.manager.on_event(svc, Event.RESTART_REQUESTED, client=client)
    if refused:
        client.error(refused)


def give_up(rsd, client, msg):
    svc = _lookup(rsd, client, msg)
    if svc is None:
        return
    why = msg.get("why")
    if why is not None and not isinstance(why, str):
        client.error("why must be a text (got %r)" % (why,))
        return
    refused = rsd.manager.on_event(svc, Event.GIVE_UP_REQUESTED, why=why or None)
    if refused:
        client.error(refused)
    else:
        client.reply({"ok": True, **svc.status()})


def status(rsd, client, msg):
    if msg.get("label") is not None:
        svc = _lookup(rsd, client, msg)
        if svc is not None:
            client.reply({"ok": True, "services": [svc.status()]})
        return
    client.reply({"ok": True, "services": [s.status() for _, s in sorted(rsd.manager.services.items())]})


def fi(rsd, client, msg):
    svc = _lookup(rsd, client, msg)
    if svc is None:
        return
    kind = msg.get("kind", "crash")
    if kind not in FAULT_KINDS:
        client.error("fault kind must be one of %s (got %r)" % (", ".join(FAULT_KINDS), kind))
        return
    if svc.state.value != "up" or svc.ctl is None:
        client.error("%s is %s, not up; inject faults into a running service" % (svc.label, svc.state.value))
        return
    if kind == "hang" and svc.spec.period <= 0:
        client.error("%s has no heartbeat (period 0), so a hang would never be detected; "
                     "give it a period (rsctl up --period S) or inject --crash" % svc.label)
        return
    svc.ctl.try_send({"op": "fi", "kind": kind})
    client.reply({"ok": True, "label": svc.label, "kind": kind, "pid": svc.pid})


def reload(rsd, client, msg):
    client.reply({"ok": True, **rsd.manager.reload()})


def shutdown(rsd, client, msg):
    rsd.manager.shutdown(client)


HANDLERS = {"up": up, "down": down, "restart": restart, "give-up": give_up, "status": status,
            "fi": fi, "reload": reload, "shutdown": shutdown}


def dispatch(rsd, client, msg):
    """Hand one request to its handler; a malformed one is answered with an error, never raised."""
    op = msg.get("op")
    handler = HANDLERS.get(op) if isinstance(op, str) else None
    if handler is None:
        client.error("unknown request %r; rsctl knows up, down, restart, give-up, status, fi, reload, shutdown" % op)
        return
    if rsd.manager.shutting_down is not None and op != "status":
        client.error("rsd is shutting down")
        return
    handler(rsd, client, msg)
