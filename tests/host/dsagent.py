"""A separate process that runs DS client calls for a test: one JSON request
per stdin line, one JSON reply per stdout line.  Tests start it as another
uid and register its pid under a label, so identity comes from the kernel."""

import base64
import json
import os
import sys

from datastore.client import DSClient, DSError


def _enc(v):
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if hasattr(v, "__dataclass_fields__"):
        return {k: _enc(getattr(v, k)) for k in v.__dataclass_fields__}
    return v


def _dec(v):
    if isinstance(v, dict) and "b64" in v:
        return base64.b64decode(v["b64"])
    return v


def main():
    client = DSClient(sys.argv[1])
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        method = getattr(client, req["call"])
        args = [_dec(a) for a in req.get("args", [])]
        kwargs = {k: _dec(v) for k, v in req.get("kwargs", {}).items()}
        try:
            result = {"ok": True, "value": _enc(method(*args, **kwargs))}
        except DSError as exc:
            result = {"ok": False, "error": type(exc).__name__, "msg": str(exc)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
