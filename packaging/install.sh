#!/usr/bin/env bash
# Install cllmd from this source tree as a system service: a self-contained virtual environment
# under /opt/cllmd, the commands linked into /usr/local/bin, the systemd unit, the sysusers entry
# and the default /etc/cllmd/cllmd.toml. `--uninstall` takes it away again. Run `--help`.
set -euo pipefail
umask 022

PROG=${0##*/}
SRC=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS]            install cllmd from $SRC
       $PROG --uninstall [--purge] [OPTIONS]

  --prefix DIR       the virtual environment (default /opt/cllmd)
  --destdir DIR      stage everything under DIR; touch nothing outside it (for packagers, tests)
  --python PY        interpreter the environment is made from (default /usr/bin/python3, >= 3.11;
                     not under /home, /root or /run/user: the unit hides those)
  --layout NAME      local (default): /usr/local/bin and /usr/local/lib/{systemd/system,sysusers.d}
                     package: /usr/bin, /lib/systemd/system, /usr/lib/sysusers.d (Debian package)
  --wheels DIR       install offline from the wheels in DIR (pip --no-index --find-links DIR)
  --pip-arg ARG      pass ARG to pip install (repeatable), e.g. --pip-arg=--index-url=URL
  --enable           also \`systemctl enable --now cllmd\` (when systemd is running)
  --uninstall        remove what an install with the same --prefix/--destdir/--layout put there
  --purge            with --uninstall: also delete /var/lib/cllmd, /var/cache/cllmd, /etc/cllmd
  -h, --help         this text
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

PREFIX=/opt/cllmd
DESTDIR=""
PYTHON=/usr/bin/python3
LAYOUT=local
WHEELS=""
PIP_ARGS=()
ENABLE=0
UNINSTALL=0
PURGE=0

need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --destdir) need_arg "$@"; DESTDIR=$2; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --layout) need_arg "$@"; LAYOUT=$2; shift 2 ;;
        --layout=*) LAYOUT=${1#*=}; shift ;;
        --wheels) need_arg "$@"; WHEELS=$2; shift 2 ;;
        --wheels=*) WHEELS=${1#*=}; shift ;;
        --pip-arg) need_arg "$@"; PIP_ARGS+=("$2"); shift 2 ;;
        --pip-arg=*) PIP_ARGS+=("${1#*=}"); shift ;;
        --enable) ENABLE=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

case $PREFIX in
    /*) ;;
    *) die "--prefix must be an absolute path, got '$PREFIX'" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die "--prefix must not be /"
case $PREFIX in
    /home|/home/*|/root|/root/*|/run/user|/run/user/*)
        die "--prefix $PREFIX is hidden from the service by ProtectHome=yes; choose e.g. /opt/cllmd" ;;
esac
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR" || die "cannot create --destdir $DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
    [ "$DESTDIR" != / ] || DESTDIR=""
fi
case $LAYOUT in
    local)
        BINDIR=/usr/local/bin
        UNITDIR=/usr/local/lib/systemd/system
        SYSUSERSDIR=/usr/local/lib/sysusers.d
        TMPFILESDIR=/usr/local/lib/tmpfiles.d ;;
    package)
        BINDIR=/usr/bin
        UNITDIR=/lib/systemd/system
        SYSUSERSDIR=/usr/lib/sysusers.d
        TMPFILESDIR=/usr/lib/tmpfiles.d ;;
    *) die "--layout must be 'local' or 'package', got '$LAYOUT'" ;;
esac
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge only goes with --uninstall"

CONFDIR=/etc/cllmd
SHARE=$PREFIX/share/cllmd
MANIFEST=$SHARE/install-manifest
COMMANDS=(cllmd cllm cllm-status cllm-http)
D=$DESTDIR   # short: every path we touch is "$D$path"

if [ -z "$D" ] && [ "$(id -u)" != 0 ]; then
    die "installing into the system needs root (or stage it with --destdir DIR)"
fi
systemd_running() { [ -z "$D" ] && [ -d /run/systemd/system ]; }

# ---- the manifest: every file and directory an install created, so --uninstall removes exactly
# those (directories only when empty). Lines: "f PATH", "l PATH", "d PATH"; paths without D.
CREATED=()
record() { CREATED+=("$1 $2"); }
make_dir() {  # mkdir -p that records each directory it creates
    local missing=() p=$1
    while [ ! -d "$D$p" ]; do missing=("$p" "${missing[@]}"); p=$(dirname "$p"); done
    for p in "${missing[@]}"; do
        mkdir -m 0755 "$D$p"
        record d "$p"
    done
}
same_file() { [ -f "$1" ] && [ -f "$2" ] && cmp -s "$1" "$2"; }

# ============================================================================ uninstall
if [ "$UNINSTALL" = 1 ]; then
    if [ "$LAYOUT" = package ]; then
        die "the package layout is removed by its package manager (apt remove cllmd), not by $PROG"
    fi
    if [ ! -f "$D$MANIFEST" ]; then
        die "no cllmd install found at $D$PREFIX (no $D$MANIFEST); give the --prefix/--destdir used to install"
    fi
    for unit in cllm-http.service cllmd.service; do
        if systemd_running && systemctl cat "$unit" >/dev/null 2>&1; then
            systemctl disable --now "$unit" && say "stopped and disabled $unit"
        fi
    done
    mapfile -t ENTRIES < "$D$MANIFEST"
    DIRS=()
    for entry in "${ENTRIES[@]}"; do
        kind=${entry%% *}; path=${entry#* }
        case $kind in
            f)
                if [ "$path" = "$CONFDIR/cllmd.toml" ] && [ "$PURGE" = 0 ] \
                        && ! same_file "$D$path" "$D$SHARE/cllmd.toml"; then
                    say "kept $path: it was changed (use --purge to delete it)"
                elif [ -e "$D$path" ]; then
                    rm -f "$D$path"; say "removed $path"
                fi ;;
            l)
                # Only our own link: never a command someone else put there since.
                if [ -L "$D$path" ] && [[ $(readlink "$D$path") == "$PREFIX"/* ]]; then
                    rm -f "$D$path"; say "removed $path"
                fi ;;
            d) DIRS=("$path" "${DIRS[@]}") ;;
            *) die "$D$MANIFEST: bad line: $entry" ;;
        esac
    done
    rm -rf -- "$D$PREFIX"
    say "removed $PREFIX"
    if [ "$PURGE" = 1 ]; then
        for dir in /var/lib/cllmd /var/cache/cllmd "$CONFDIR"; do
            if [ -e "$D$dir" ]; then rm -rf "$D$dir"; say "purged $dir"; fi
        done
    else
        for dir in /var/lib/cllmd /var/cache/cllmd; do
            [ ! -e "$D$dir" ] || say "kept $dir (the model, data and queue; --purge deletes it)"
        done
    fi
    for dir in "${DIRS[@]}"; do   # deepest first: recorded parents-first, reversed above
        rmdir "$D$dir" 2>/dev/null || true
    done
    if systemd_running; then
        systemctl daemon-reload
        say "ran systemctl daemon-reload"
    fi
    if [ -z "$D" ] && getent passwd cllmd >/dev/null 2>&1; then
        say "the system user cllmd and group cllm are kept (files may still belong to them);"
        say "remove them with: userdel cllmd && groupdel cllm"
    fi
    exit 0
fi

# ============================================================================ install
[ -f "$SRC/pyproject.toml" ] || die "$SRC is not the cllmd source tree (no pyproject.toml)"
for f in cllmd.service cllm-http.service cllmd.sysusers cllmd.toml cllmd-tcp.conf; do
    [ -f "$SRC/systemd/$f" ] || die "missing $SRC/systemd/$f"
done
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a directory"

PYTHON_REAL=$(command -v "$PYTHON" 2>/dev/null) || die "--python $PYTHON: not found"
PYTHON_REAL=$(readlink -f "$PYTHON_REAL")
case $PYTHON_REAL in
    /home/*|/root/*|/run/user/*)
        die "--python $PYTHON is $PYTHON_REAL, which ProtectHome=yes hides from the service; use a system interpreter such as /usr/bin/python3" ;;
esac
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "--python $PYTHON is older than 3.11"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "--python $PYTHON cannot make virtual environments (on Debian: apt-get install python3-venv)"

# Never replace someone else's command: checked before any work is done.
for cmd in "${COMMANDS[@]}"; do
    link=$D$BINDIR/$cmd
    if [ -e "$link" ] || [ -L "$link" ]; then
        if [ ! -L "$link" ] || [[ $(readlink "$link") != "$PREFIX"/* ]]; then
            die "$BINDIR/$cmd exists and is not a link into $PREFIX; not replacing it"
        fi
    fi
done

VENV=$D$PREFIX
if [ -e "$VENV" ] && [ ! -f "$D$MANIFEST" ] && [ "$LAYOUT" = local ]; then
    die "$VENV exists but was not made by this installer; remove it or choose another --prefix"
fi
if [ -f "$D$MANIFEST" ]; then
    # Upgrade in place: keep what the earlier install recorded so --uninstall still finds it.
    while IFS= read -r line; do CREATED+=("$line"); done < "$D$MANIFEST"
fi
make_dir "$(dirname "$PREFIX")"
if [ ! -x "$VENV/bin/python" ]; then
    [ -e "$VENV" ] || record d "$PREFIX"
    "$PYTHON" -m venv "$VENV"
    say "created the virtual environment $PREFIX (from $PYTHON_REAL)"
fi

pip_args=(--quiet --disable-pip-version-check --no-compile)
[ -z "$WHEELS" ] || pip_args+=(--no-index --find-links "$WHEELS")
# A plain (not editable) install: the service must not depend on this source tree staying put.
# With the http extra: cllm-http.service runs the gateway from the same environment.
"$VENV/bin/python" -m pip install "${pip_args[@]}" "${PIP_ARGS[@]}" "$SRC[http]"
# Byte-compile once here, recording the final paths (-s/-p strip the stage): under
# ProtectSystem=strict the service could not write __pycache__ itself.
"$VENV/bin/python" -m compileall -q -j 0 ${D:+-s "$D" -p /} "$VENV/lib" >/dev/null
VERSION=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("cllmd"))')
say "installed cllmd $VERSION into $PREFIX"

if [ -n "$D" ]; then
    # The environment was built at $D$PREFIX but will run at $PREFIX: the scripts' #! lines,
    # the activate scripts and pyvenv.cfg name it; rewrite every text file that does.
    { grep -rlIF --null "$D$PREFIX" "$VENV" || true; } | xargs -0 -r sed -i "s|$D$PREFIX|$PREFIX|g"
    if grep -rlIF "$D$PREFIX" "$VENV" >&2; then
        die "the environment still names the stage $D in the files above"
    fi
fi

for cmd in "${COMMANDS[@]}"; do
    [ -x "$VENV/bin/$cmd" ] || die "$PREFIX/bin/$cmd was not installed (is $SRC complete?)"
done

# ---- files outside the environment
install_file() {  # install_file SRC DEST MODE: copy unless identical; record it
    local src=$1 dest=$2 mode=$3
    make_dir "$(dirname "$dest")"
    if ! same_file "$src" "$D$dest"; then
        install -m "$mode" "$src" "$D$dest"
        say "installed $dest"
    fi
    record f "$dest"
}

make_dir "$BINDIR"
for cmd in "${COMMANDS[@]}"; do
    link=$BINDIR/$cmd
    ln -sfn "$PREFIX/bin/$cmd" "$D$link"
    record l "$link"
done
say "linked ${COMMANDS[*]} into $BINDIR"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The unit names /opt/cllmd; another --prefix gets its own paths.
sed "s|/opt/cllmd/|$PREFIX/|g" "$SRC/systemd/cllmd.service" > "$TMP/cllmd.service"
install_file "$TMP/cllmd.service" "$UNITDIR/cllmd.service" 0644
sed "s|/opt/cllmd/|$PREFIX/|g" "$SRC/systemd/cllm-http.service" > "$TMP/cllm-http.service"
install_file "$TMP/cllm-http.service" "$UNITDIR/cllm-http.service" 0644
install_file "$SRC/systemd/cllmd.sysusers" "$SYSUSERSDIR/cllmd.conf" 0644
if [ -f "$SRC/systemd/cllmd.tmpfiles" ]; then
    install_file "$SRC/systemd/cllmd.tmpfiles" "$TMPFILESDIR/cllmd.conf" 0644
fi
make_dir "$SHARE/examples"
install -m 0644 "$SRC/systemd/cllmd-tcp.conf" "$D$SHARE/examples/cllmd-tcp.conf"
make_dir "$PREFIX/share/doc/cllmd"
for doc in service.md http.md; do
    [ ! -f "$SRC/docs/$doc" ] || install -m 0644 "$SRC/docs/$doc" "$D$PREFIX/share/doc/cllmd/$doc"
done

# ---- the configuration: never overwrite one the admin changed. The shipped default is kept
# in $SHARE/cllmd.toml; a config equal to the previous default is upgraded to the new one.
CONF=$CONFDIR/cllmd.toml
make_dir "$CONFDIR"
if [ ! -e "$D$CONF" ]; then
    install -m 0644 "$SRC/systemd/cllmd.toml" "$D$CONF"
    say "installed $CONF (every key commented out at its default)"
    record f "$CONF"
elif same_file "$D$CONF" "$SRC/systemd/cllmd.toml"; then
    record f "$CONF"
elif same_file "$D$CONF" "$D$SHARE/cllmd.toml"; then
    install -m 0644 "$SRC/systemd/cllmd.toml" "$D$CONF"
    say "updated $CONF to the new default (it was the old default, unchanged)"
    record f "$CONF"
else
    say "kept $CONF: it was changed; the new default is $SHARE/cllmd.toml"
fi
install -m 0644 "$SRC/systemd/cllmd.toml" "$D$SHARE/cllmd.toml"

# ---- the manifest (unique lines, first occurrence wins: parents before children). The
# package layout has none: dpkg keeps its own list, and --uninstall must not compete with it.
if [ "$LAYOUT" = local ]; then
    printf '%s\n' "${CREATED[@]}" | awk '!seen[$0]++' > "$D$MANIFEST"
fi

# ---- the running system
if [ -n "$D" ]; then
    say "staged under $D; nothing outside it was touched"
elif systemd_running; then
    systemd-sysusers "$SYSUSERSDIR/cllmd.conf"
    say "ran systemd-sysusers: user cllmd, group cllm"
    systemctl daemon-reload
    say "ran systemctl daemon-reload"
    if [ "$ENABLE" = 1 ]; then
        systemctl enable --now cllmd.service
        say "enabled and started cllmd.service"
    fi
else
    say "systemd is not running here: later run 'systemd-sysusers' and 'systemctl daemon-reload'"
fi

if [ "$LAYOUT" = package ]; then
    REMOVE_HINT="apt remove cllmd (apt purge cllmd also deletes the state)"
else
    REMOVE_HINT="$SRC/packaging/$PROG --uninstall${D:+ --destdir $D}"
    [ "$PREFIX" = /opt/cllmd ] || REMOVE_HINT+=" --prefix $PREFIX"
fi
cat <<EOF

cllmd $VERSION is installed.
  start it:           systemctl enable --now cllmd
  let a user talk to it (effective at their next login):
                      usermod -aG cllm USERNAME
  configuration:      $CONF (then: systemctl reload cllmd)
  TCP with CURVE:     see $SHARE/examples/cllmd-tcp.conf
  HTTP (OpenAI API, metrics, dashboard on 127.0.0.1:11435):
                      systemctl enable --now cllm-http
  logs:               journalctl -u cllmd
  remove:             $REMOVE_HINT
EOF
