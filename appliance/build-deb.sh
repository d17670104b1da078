#!/usr/bin/env bash
# Build an arm64 .deb of offgrid for NVIDIA Jetson (JetPack 6: Ubuntu 22.04,
# Python 3.10) or Debian bookworm arm64 (Python 3.11), on this x86 machine.
#
#   appliance/build-deb.sh [--python 3.10|3.11] [--wheel FILE] [--out DIR]
#
# The package installs offgrid.py and its aarch64 packages (CPU build of
# llama-cpp-python) under /opt/offgrid, the systemd unit `offgrid
# install-service` writes, and /usr/bin/offgrid; its postinst adds the
# system user offgrid and enables the service, which listens on 127.0.0.1.
# appliance/install-jetson.sh then rebuilds llama-cpp-python with CUDA on the
# device. Prints the .deb's path on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
pyver=3.10
wheel=""
out=$repo/dist

die() { echo "build-deb: $*" >&2; exit 1; }
log() { echo "build-deb: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --python) pyver=${2:?--python needs 3.10 or 3.11}; shift 2 ;;
        --wheel) wheel=$(realpath "${2:?--wheel needs a file}"); shift 2 ;;
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
case $pyver in
    3.10) target="JetPack 6 (Ubuntu 22.04)" ;;
    3.11) target="Debian 12 bookworm" ;;
    *) die "--python must be 3.10 (JetPack 6) or 3.11 (Debian bookworm), got $pyver" ;;
esac
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing"
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/offgrid.py")
[ -n "$version" ] || die "cannot read __version__ from offgrid.py"
python=python3
[ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
if [ -z "$wheel" ]; then
    [ -x "$repo/build/wheels.sh" ] || die "no --wheel given and no build/wheels.sh to build one"
    wheel=$("$repo/build/wheels.sh" aarch64 | tail -n 1)
    [ -f "$wheel" ] || die "build/wheels.sh aarch64 printed no wheel"
fi

started=$SECONDS
pkgver=$version+py${pyver/./}
deb=$out/offgrid-llm_${pkgver}_arm64.deb
stage=$(mktemp -d "${TMPDIR:-/tmp}/offgrid-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT

install -d "$stage/opt/offgrid" "$stage/lib/systemd/system/offgrid.service.d" "$stage/usr/bin" "$stage/DEBIAN"
install -m 644 "$repo/offgrid.py" "$stage/opt/offgrid/offgrid.py"
"$here/vendor.sh" "$stage/opt/offgrid/site" "$pyver" "$wheel"
"$python" "$stage/opt/offgrid/offgrid.py" install-service --python /usr/bin/python3 --output - \
    | sed "s|$stage||g" > "$stage/lib/systemd/system/offgrid.service"
cat > "$stage/lib/systemd/system/offgrid.service.d/site.conf" <<'CONF'
# offgrid's own copy of llama-cpp-python and psutil (appliance/install-jetson.sh
# replaces the CPU build of llama-cpp-python there with a CUDA build).
# The package compiles the bytecode of /opt/offgrid when it is installed:
# read it there instead of compiling a copy into /var/cache/offgrid.
[Service]
Environment=PYTHONPATH=/opt/offgrid/site
Environment=PYTHONPYCACHEPREFIX=
CONF
install -m 755 "$here/offgrid-cli.sh" "$stage/usr/bin/offgrid"
next=$(echo "$pyver" | awk -F. '{ printf "%d.%d", $1, $2 + 1 }')
cat > "$stage/DEBIAN/control" <<CONTROL
Package: offgrid-llm
Version: $pkgver
Architecture: arm64
Maintainer: OffGrid LLM <offgrid@localhost>
Depends: python3 (>= $pyver), python3 (<< $next), libgomp1, libstdc++6, passwd
Section: net
Priority: optional
Installed-Size: $(du -sk "$stage" | cut -f1)
Homepage: file:///opt/offgrid/offgrid.py
Description: OffGrid LLM, an OpenAI-compatible language model server
 offgrid serves GGUF models over an OpenAI- and Ollama-compatible HTTP API
 with llama-cpp-python, without network access. This package is built for
 $target: Python $pyver and a portable CPU build of llama-cpp-python
 (install-jetson.sh rebuilds it with CUDA on a Jetson).
CONTROL
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd offgrid >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/offgrid --shell /usr/sbin/nologin offgrid
    fi
    install -d -o offgrid -g offgrid -m 750 /var/lib/offgrid
    # /opt is read-only to the service: compile the bytecode once here.
    python3 -m compileall -q /opt/offgrid >/dev/null || true
    systemctl enable offgrid.service >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl restart offgrid.service || echo "offgrid: the service did not start; see journalctl -u offgrid" >&2
    fi
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop offgrid.service || true
fi
if [ "$1" = remove ]; then
    systemctl disable offgrid.service >/dev/null 2>&1 || true
fi
find /opt/offgrid -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
PRERM
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
# Models, keys and settings in /var/lib/offgrid stay, even on purge: they are
# the user's data. A CUDA rebuild of llama-cpp-python stays in /opt/offgrid
# until purge.
if [ "$1" = purge ]; then
    rm -rf /opt/offgrid
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
chmod 755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
mkdir -p "$out"
dpkg-deb --build --root-owner-group -Zxz "$stage" "$deb" >/dev/null
log "$deb for $target: $(du -h "$deb" | cut -f1), built in $((SECONDS - started)) s"
echo "$deb"
