#!/bin/sh
# stage-venv.sh WHEELS DEST FINAL [compile]
# The project and its dependencies (WHEELS, `make wheels`; nothing from the network) in a venv
# built at DEST on Debian's python3 (services' uids must be able to run it), made to work once
# copied to FINAL: paths naming DEST rewritten, no pip (installs come from here, not from a pip
# on the server). With "compile" its Python is byte-compiled for FINAL here, so the server
# compiles nothing (make install); a Debian package compiles in its postinst instead.
set -eu
WHEELS=$(realpath "$1")
DEST=$(realpath -m "$2")
FINAL=$3
COMPILE=${4:-}
rm -rf "$DEST"
/usr/bin/python3 -m venv "$DEST"
"$DEST/bin/pip" install -q --no-index --no-compile --find-links "$WHEELS" rsd
"$DEST/bin/pip" uninstall -q -y pip setuptools 2>/dev/null || true
rm -f "$DEST"/bin/pip* "$DEST"/bin/Activate.ps1
# The console scripts' #! lines, activate, pyvenv.cfg name the staging path.
grep -rlI -F "$DEST" "$DEST/bin" "$DEST/pyvenv.cfg" | while read -r f; do
    sed -i "s|$DEST|$FINAL|g" "$f"
done
if grep -rlI -F "$DEST" "$DEST" >/dev/null; then
    echo "stage-venv.sh: the staging path is still named in:" >&2
    grep -rlI -F "$DEST" "$DEST" >&2
    exit 1
fi
find "$DEST" -name __pycache__ -type d -prune -exec rm -rf {} +
if [ "$COMPILE" = compile ]; then
    # -s/-p: the compiled files name FINAL's paths (tracebacks), not DEST's.
    "$DEST/bin/python3" -m compileall -q -j 0 -s "$DEST" -p "$FINAL" "$DEST/lib" >/dev/null
fi
