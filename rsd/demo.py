"""`make demo`: the data store at work, in a temp dir, step by step.

Starts `datastore`, lets a labelled "driver" process back up its state,
shows a front end's subscription being told, kills the data store with
SIGKILL, restarts it and shows that nothing acknowledged was lost.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from datastore.client import DSClient

NOBODY = 65534


def step(n, text):
    print("\n\033[1m[%d] %s\033[0m" % (n, text), flush=True)


def start_datastore(base):
    notify_path = os.path.join(base, "notify.sock")
    if os.path.exists(notify_path):
        os.unlink(notify_path)
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(10)
    proc = subprocess.Popen([sys.executable, "-m", "datastore.server", "--runtime-dir",
                             os.path.join(base, "run"), "--state-dir", os.path.join(base, "state")],
                            env=dict(os.environ, NOTIFY_SOCKET=notify_path),
                            stderr=open(os.path.join(base, "datastore.log"), "ab"))
    msg = ns.recv(1024)
    ns.close()
    print("    datastore pid %d says %s" % (proc.pid, msg.split(b"\n")[0].decode()))
    return proc


DRIVER = r"""
import sys
from datastore.client import DSClient, PRIVATE
ds = DSClient(sys.argv[1])
for line in sys.stdin:
    if line == "init\n":
        me = ds.whoami()
        print("    driver: I am %s (uid %d)" % (me["label"], me["uid"]), flush=True)
        ds.publish("state.serial0.baud", 115200, flags=PRIVATE)
        ds.publish("state.serial0.format", "8N1", flags=PRIVATE)
        print("    driver: backed up baud=115200 format=8N1 (private to my label)", flush=True)
    elif line == "show\n":
        ds.connect()  # the old connection died with the old daemon
        print("    driver (still %s): reads back baud=%s format=%s" % (
            ds.whoami()["label"], ds.get("state.serial0.baud"), ds.get("state.serial0.format")), flush=True)
"""


def ask(driver, command, lines):
    driver.stdin.write(command + "\n")
    driver.stdin.flush()
    for _ in range(lines):
        print(driver.stdout.readline(), end="", flush=True)


def main():
    if os.geteuid() != 0:
        print("The demo runs its driver as user nobody; run it as root (sudo make demo).")
        return 1
    base = tempfile.mkdtemp(prefix="rsd-demo-")
    os.chmod(base, 0o755)
    os.makedirs(os.path.join(base, "run"), mode=0o755)
    sock = os.path.join(base, "run", "ds.sock")
    ds_proc = driver = None
    try:
        step(1, "Start the data store in %s (it signals READY=1 the systemd way)" % base)
        ds_proc = start_datastore(base)
        rs = DSClient(sock)
        print("    this process is the registrar: %s" % rs.whoami()["label"])

        step(2, "A front end subscribes to drv.chr.* with INITIAL")
        fe = DSClient(sock)
        fe.subscribe(r"drv\.chr\..*", initial=True)

        step(3, "rsd's part: start a driver as 'nobody', register its pid as label serial0")
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, sock], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
        rs.register(driver.pid, "serial0")
        print("    registered pid %d -> serial0" % driver.pid)
        ask(driver, "init", 2)
        rs.publish("drv.chr.serial0", "up 1")

        step(4, "The front end is told, in order")
        for n in fe.get_notifications(timeout=5):
            print("    front end: %s %s = %r (owner %s)" % (n.event, n.key, n.value, n.owner))

        step(5, "Others cannot read the driver's private state, nor publish without a label")
        print("    registrar retrieve state.serial0.baud -> %s" % (rs.get("state.serial0.baud", "not visible"),))
        anon = subprocess.run([sys.executable, "-c",
                               "import sys\nfrom datastore.client import DSClient\n"
                               "try:\n    DSClient(sys.argv[1]).publish('x', 1)\n"
                               "except Exception as e:\n    print('    unlabelled process:', e)", sock],
                              user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True, text=True)
        print(anon.stdout.rstrip())

        step(6, "kill -9 the data store, start it again")
        ds_proc.send_signal(signal.SIGKILL)
        ds_proc.wait()
        print("    datastore killed (status %d)" % ds_proc.returncode)
        ds_proc = start_datastore(base)

        step(7, "Everything acknowledged is back, and the driver is still known as serial0")
        rs = DSClient(sock)
        for e in rs.list():
            print("    %-24s %-5s owner=%-8s value=%s" % (e.key, e.type, e.owner,
                                                          "(private)" if e.value is None else repr(e.value)))
        print("    (the driver's own keys are private: listed to it, not to us)")
        ask(driver, "show", 1)

        step(8, "rsd takes the driver down: drv.chr.serial0 = down, purge(serial0)")
        fe = DSClient(sock)
        fe.subscribe(r"(drv\.chr|state\.serial0)\..*")
        driver.stdin.close()
        driver.wait(5)
        rs.unregister(driver.pid)
        rs.publish("drv.chr.serial0", "down", overwrite=True)
        print("    purged %d keys" % rs.purge("serial0"))
        for n in fe.get_notifications(timeout=5):
            print("    front end: %s %s%s" % (n.event, n.key, " = %r" % n.value if n.has_value else ""))
        print("\nDone. The full hardware demo arrives with the serial driver; see README.md.")
        return 0
    finally:
        for p in (driver, ds_proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
