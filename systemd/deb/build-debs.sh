#!/bin/sh
# make deb: rsd_<v>_amd64.deb and rsdrv-dkms_<v>_all.deb, built with dpkg-deb from staging
# trees under OUT (docs/deploy.md, "Debian packages").
#   build-debs.sh WHEELS OUT [DKMS_TARBALL]
# rsd: the project and its dependencies in a private venv, /usr/lib/rsd (made from WHEELS,
# `make wheels`), the commands in /usr/bin, the units (paths rewritten for /usr), tmpfiles,
# modules-load.d, policy scripts (conffiles), docs and examples. rsdrv-dkms: the module's source for DKMS,
# and DKMS_TARBALL (`make dkms-tarball`), if given, so that its kernel needs no compiler.
set -eu
WHEELS=$(realpath "$1")
OUT=$(realpath -m "$2")
DKMS_TARBALL=${3:+$(realpath "$3")}
HERE=$(dirname "$(realpath "$0")")
REPO=$(dirname "$(dirname "$HERE")")
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml")
KMOD_VERSION=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' "$REPO/kmod/dkms.conf")
STAGE=$OUT/stage
# Who the packages say built them: DEB_MAINTAINER, else git's user.
MAINTAINER=${DEB_MAINTAINER:-"$(git -C "$REPO" config user.name) <$(git -C "$REPO" config user.email)>"}
rm -rf "$STAGE" "$OUT"/*.deb
mkdir -p "$STAGE"

docs() {  # docs PACKAGE ROOT: copyright and changelog, as Debian wants them
    d=$2/usr/share/doc/$1
    install -d -m 755 "$d"
    sed "s/@PACKAGE@/$1/" "$HERE/copyright" > "$d/copyright"
    sed "s/@PACKAGE@/$1/; s/@VERSION@/$4/; s/@DATE@/$3/; s/@MAINTAINER@/$MAINTAINER/" \
        "$HERE/changelog" | gzip -9n > "$d/changelog.gz"
}

control() {  # control NAME ROOT VERSION: DEBIAN/ with control, scripts
    install -d -m 755 "$2/DEBIAN"
    size=$(du -sk --exclude=DEBIAN "$2" | cut -f1)
    sed "s/@VERSION@/$3/; s/@MAINTAINER@/$MAINTAINER/" "$HERE/$1.control" > "$2/DEBIAN/control"
    echo "Installed-Size: $size" >> "$2/DEBIAN/control"
    for script in postinst prerm postrm; do
        if [ -f "$HERE/$1.$script" ]; then
            sed "s/@VERSION@/$3/" "$HERE/$1.$script" > "$2/DEBIAN/$script"
            chmod 755 "$2/DEBIAN/$script"
        fi
    done
}

DATE=$(date -R -d "@$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)")

# -- rsd ------------------------------------------------------------------------------
R=$STAGE/rsd
V=$R/usr/lib/rsd
"$HERE/../stage-venv.sh" "$WHEELS" "$V" /usr/lib/rsd   # not compiled: the postinst does
# /usr/bin gets a shell wrapper per command instead of the venv's scripts, which runs the
# venv's python (so that rsd's services' spawners run it too).
find "$V/bin" -maxdepth 1 -type f -delete
ln -sf ../../../bin/python3 "$V/bin/python3"   # relative: /usr/lib/rsd/bin -> /usr/bin
find "$V" -name '*.so*' -type f -exec strip --strip-unneeded --remove-section=.comment \
    --remove-section=.note {} +
install -d -m 755 "$R/usr/bin"
for entry in rsd:rsd.main datastore:datastore.server rsctl:rsd.cli; do
    c=${entry%%:*} module=${entry#*:}
    printf '#!/bin/sh\n# %s from rsd'"'"'s venv (/usr/lib/rsd)\nexec /usr/lib/rsd/bin/python3 -c '"'"'import sys; sys.argv[0] = "%s"; from %s import main; sys.exit(main())'"'"' "$@"\n' \
        "$c" "$c" "$module" > "$R/usr/bin/$c"
    chmod 755 "$R/usr/bin/$c"
done
install -d -m 755 "$R/lib/systemd/system" "$R/usr/lib/tmpfiles.d" "$R/etc/rsd/policy.d" \
    "$R/etc/rsd/services.d" "$R/usr/share/doc/rsd/examples"
for u in rsd.service datastore.service rsd-cgroup.service; do
    sed 's|/usr/local/bin/|/usr/bin/|g; s|/usr/local/share/doc/rsd|/usr/share/doc/rsd|g' \
        "$REPO/systemd/$u" > "$R/lib/systemd/system/$u"
    chmod 644 "$R/lib/systemd/system/$u"
done
install -m 644 "$REPO/systemd/rsd-tmpfiles.conf" "$R/usr/lib/tmpfiles.d/rsd.conf"
install -D -m 644 "$REPO/systemd/rsd-modules.conf" "$R/usr/lib/modules-load.d/rsd.conf"
install -m 755 "$REPO"/policy.d/* "$R/etc/rsd/policy.d/"
install -m 644 "$REPO"/docs/*.md "$R/usr/share/doc/rsd/"
install -m 644 "$REPO"/docs/examples/*.toml "$R/usr/share/doc/rsd/examples/"
docs rsd "$R" "$DATE" "$VERSION"
control rsd "$R" "$VERSION"
(cd "$R" && find etc -type f | sed 's|^|/|') > "$R/DEBIAN/conffiles"
dpkg-deb --root-owner-group -Zxz --build "$R" "$OUT/rsd_${VERSION}_amd64.deb" >/dev/null

# -- rsdrv-dkms -------------------------------------------------------------------------
K=$STAGE/rsdrv-dkms
S=$K/usr/src/rsdrv-$KMOD_VERSION
install -d -m 755 "$S"
(cd "$REPO/kmod" && git ls-files 2>/dev/null || find . -type f -name '*.[ch]' -o -name Kbuild \
    -o -name Makefile -o -name dkms.conf) | while read -r f; do
    install -D -m 644 "$REPO/kmod/$f" "$S/$f"
done
if [ -n "$DKMS_TARBALL" ]; then
    install -D -m 644 "$DKMS_TARBALL" "$K/usr/share/rsdrv-dkms/rsdrv-$KMOD_VERSION.dkms.tar.gz"
fi
docs rsdrv-dkms "$K" "$DATE" "$KMOD_VERSION"
control rsdrv-dkms "$K" "$KMOD_VERSION"
dpkg-deb --root-owner-group -Zxz --build "$K" "$OUT/rsdrv-dkms_${KMOD_VERSION}_all.deb" >/dev/null
ls -l "$OUT"/*.deb
