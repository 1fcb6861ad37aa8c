#!/usr/bin/env bash
# Build cllmd_<version>_<arch>.deb with Debian's dpkg-deb: the tree install.sh stages with
# --layout package (the venv in /opt/cllmd, the unit in /lib/systemd/system), plus the control
# file and the maintainer scripts in packaging/debian/. Run `--help`.
set -euo pipefail
umask 022

PROG=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")

usage() {
    cat <<EOF
Usage: $PROG [--out DIR] [--python PY] [--from-stage DIR] [--compress TYPE] [--level N]
       [--revision N]

  --out DIR          where the .deb goes (default: $SRC/dist)
  --python PY        interpreter for the environment (default /usr/bin/python3.11: the
                     package depends on exactly that Debian python, so it names it)
  --from-stage DIR   package DIR, an existing \`install.sh --destdir DIR --layout package\`
                     tree (left untouched), instead of staging a fresh install
  --compress TYPE    xz (default), gzip, zstd or none: dpkg-deb -Z (Debian's archive and
                     lintian accept only xz and gzip)
  --level N          compression level: dpkg-deb -z (default: dpkg-deb's own)
  --revision N       Debian revision (default 1): the version is <pyproject version>-N
  -h, --help         this text
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 1; }

OUT=$SRC/dist
PYTHON=/usr/bin/python3.11
FROM_STAGE=""
COMPRESS=xz
REVISION=1
LEVEL=""
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
        --from-stage) FROM_STAGE=${2:?--from-stage needs a value}; shift 2 ;;
        --compress) COMPRESS=${2:?--compress needs a value}; shift 2 ;;
        --revision) REVISION=${2:?--revision needs a value}; shift 2 ;;
        --level) LEVEL=${2:?--level needs a value}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $COMPRESS in xz|zstd|gzip|none) ;; *) die "--compress must be xz, zstd, gzip or none, got '$COMPRESS'" ;; esac
[ -z "$LEVEL" ] || [[ $LEVEL =~ ^[0-9]$ ]] || die "--level must be a digit 0-9, got '$LEVEL'"
[[ $REVISION =~ ^[0-9A-Za-z.+~]+$ ]] || die "--revision '$REVISION' is not a Debian revision"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (it comes with Debian's dpkg)"
command -v dpkg >/dev/null || die "dpkg not found"

ARCH=$(dpkg --print-architecture)
UPSTREAM=$("$PYTHON" - "$SRC/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
EOF
) || die "cannot read the version from $SRC/pyproject.toml with $PYTHON"
VERSION=$UPSTREAM-$REVISION
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/cllmd_${VERSION}_$ARCH
if [ -n "$FROM_STAGE" ]; then
    [ -x "$FROM_STAGE/opt/cllmd/bin/python" ] && [ -f "$FROM_STAGE/lib/systemd/system/cllmd.service" ] \
        || die "--from-stage $FROM_STAGE is not an install.sh --layout package stage"
    # A copy, not hard links: modes are changed below and the stage must stay as it was.
    cp -a "$FROM_STAGE" "$ROOT"
else
    "$HERE/install.sh" --destdir "$ROOT" --layout package --python "$PYTHON" >&2
fi

# Debian ships no byte code (postinst compiles it) and wants its documentation in its place.
find "$ROOT/opt/cllmd" -depth -name __pycache__ -type d -exec rm -rf {} +
# Wheels unpack their shared libraries executable; Debian wants them 0644 (dlopen needs no x).
find "$ROOT/opt/cllmd" -type f \( -name '*.so' -o -name '*.so.*' \) -exec chmod 0644 {} +
install -d "$ROOT/usr/share/doc/cllmd"
install -m 0644 "$HERE/debian/copyright" "$ROOT/usr/share/doc/cllmd/copyright"
printf 'cllmd (%s) unstable; urgency=medium\n\n  * Package built from the cllmd source tree.\n\n -- cllmd developers <cllmd@example.org>  %s\n' \
    "$VERSION" "$(date -R -u ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH})" \
    | gzip -9n > "$ROOT/usr/share/doc/cllmd/changelog.Debian.gz"

install -d -m 0755 "$ROOT/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/debian/$script" "$ROOT/DEBIAN/$script"
done
echo /etc/cllmd/cllmd.toml > "$ROOT/DEBIAN/conffiles"

# The wheels in the environment are manylinux builds: they need the C and C++ runtimes and zlib
# from the system, and the exact python the venv was made from (python3 too: some of the
# wheels' scripts start with #!/usr/bin/env python3).
DEPENDS="python$PYVER, python3 (>= $PYVER), libc6 (>= 2.28), libstdc++6, libgcc-s1, zlib1g, systemd | systemd-standalone-sysusers | adduser, init-system-helpers (>= 1.54)"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s#@VERSION@#$VERSION#" -e "s#@ARCH@#$ARCH#" -e "s#@INSTALLED_SIZE@#$SIZE#" \
    -e "s#@DEPENDS@#$DEPENDS#" "$HERE/debian/control.in" > "$ROOT/DEBIAN/control"

mkdir -p "$OUT"
DEB=$OUT/cllmd_${VERSION}_$ARCH.deb
level=()
[ -z "$LEVEL" ] || level=(-z"$LEVEL")
dpkg-deb --root-owner-group -Z"$COMPRESS" "${level[@]}" --build "$ROOT" "$DEB" >&2
echo "$DEB"
