"""The shipped policy.d scripts, run by a real rsd on real failures."""

import os
import shutil
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "services"))
from rsdharness import wait_for  # noqa: E402

POLICY_D = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "policy.d")


def _shipped(rsd, name):
    """The shipped script, installed as `make install` does: root's, mode 0755.

    rsd runs only scripts nobody but root can change, and a checkout's
    modes follow the umask of whoever cloned it.
    """
    path = os.path.join(rsd.policy_dir, name)
    shutil.copy(os.path.join(POLICY_D, name), path)
    os.chmod(path, 0o755)
    return path


def test_restart_limit_restarts_then_gives_up(rsd):
    with open(os.path.join(rsd.policy_dir, "limits"), "w") as f:
        f.write("other 9\nprobe 2\n* 7\n")
    st = rsd.up(script=_shipped(rsd, "restart-limit"))
    for n in (1, 2):
        rsd.ask("probe", "crash 11")
        st = rsd.wait_generation("probe", st["generation"], timeout=5)
        assert st["restarts"] == n
    rsd.ask("probe", "crash 11")
    st = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(rsd.status("probe")), 5,
                  what="given up")
    assert st["pid"] is None and "failed 2 times in a row (last: signal); limit 2" in st["gave_up"]["why"]
    log = rsd.log()
    assert "probe: policy script: probe failed (signal); restart 2 of 2" in log
    assert "limit 2 reached: giving up" in log


def test_restart_save_crash_keeps_info_and_log(rsd):
    st = rsd.up(script=_shipped(rsd, "restart-save-crash"))
    rsd.ask("probe", "exit 9")
    rsd.wait_generation("probe", st["generation"], timeout=5)
    crash = os.path.join(rsd.state_dir, "crash")
    records = os.listdir(crash)
    assert len(records) == 1 and records[0].startswith("probe-") and records[0].endswith("-%d" % st["pid"])
    with open(os.path.join(crash, records[0], "info")) as f:
        info = dict(line.strip().split("=", 1) for line in f)
    assert (info["reason"], info["exit_status"], info["signal"], info["pid"]) == ("exit", "9", "", str(st["pid"]))
    assert os.path.exists(os.path.join(crash, records[0], "log"))


def test_restart_mail_uses_sendmail_or_logs(rsd):
    out = os.path.join(rsd.base, "mail.out")
    fake = os.path.join(rsd.base, "fake-sendmail")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\necho \"$@\" > %s.args\ncat > %s\n" % (out, out))
    os.chmod(fake, 0o755)
    conf = os.path.join(rsd.policy_dir, "mail.conf")
    with open(conf, "w") as f:
        f.write("MAILTO=ops@example.org\nSENDMAIL=%s\n" % fake)
    st = rsd.up(script=_shipped(rsd, "restart-mail"))
    rsd.ask("probe", "crash 6")
    st = rsd.wait_generation("probe", st["generation"], timeout=5)
    mail = wait_for(lambda: os.path.exists(out) and open(out).read(), 5, what="mail")
    assert "To: ops@example.org" in mail and "Subject: [rsd] probe failed (signal)" in mail
    assert "signal 6" in mail and "Result: restarted." in mail
    # Without sendmail the message lands in rsd's log.
    with open(conf, "w") as f:
        f.write("SENDMAIL=/nonexistent/sendmail\n")
    rsd.ask("probe", "crash 6")
    rsd.wait_generation("probe", st["generation"], timeout=5)
    wait_for(lambda: "policy script: no sendmail; would have mailed root" in rsd.log(), 5, what="logged")
