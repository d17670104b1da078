# shellcheck shell=bash
# Shared by the scripts in build/ (sourced, not run): where things live,
# the pinned tool versions, progress lines and step timings on stderr.
set -euo pipefail

BUILD_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BUILD_DIR")
CACHE=${OFFGRID_BUILD_CACHE:-$HOME/.cache/offgrid-build}
DIST=${OFFGRID_DIST:-$ROOT/dist}
PYTHON=${PYTHON:-python3}
# The llama-cpp-python release every artifact bundles (pyproject allows
# >=0.3.36,<0.4; one pinned version keeps the caches and the golden test stable).
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
OFFGRID_VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/offgrid.py")
HOST_ARCH=$(uname -m)
# Build tools, installed into a venv in the cache by tools_python.
TOOLS="wheel==0.48.0 shiv==1.0.8 nuitka==4.3.3 zstandard==0.25.0 ordered-set==4.1.0"

PROG=$(basename "$0")
say() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }
# OFFGRID_CACHED_ONLY=1: take what the build cache holds and build nothing
# that takes minutes; a missing piece exits 3, naming the command that makes
# it (the tests skip on that outside CI).
not_cached() {
    if [ "${OFFGRID_CACHED_ONLY:-}" = 1 ]; then
        echo "$PROG: not cached: $* (OFFGRID_CACHED_ONLY=1)" >&2
        exit 3
    fi
}

# timed LABEL CMD...: run CMD, then say how long it took.
timed() {
    local label=$1 t0 rc=0
    shift
    t0=$(date +%s.%N)
    "$@" || rc=$?
    if [ "$rc" != 0 ]; then
        die "$label failed (exit $rc)"
    fi
    say "$label: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')"
}

check_arch() {
    case "$1" in
        x86_64|aarch64) ;;
        *) die "unknown architecture '$1' (use x86_64 or aarch64)" ;;
    esac
}

# Names the build Python: its version and a hash of where it is installed,
# so venvs made from different interpreters never get mixed up.
python_id() {
    "$PYTHON" -c 'import hashlib, sys; print("py%d.%d-%s" % (sys.version_info[:2] + (
        hashlib.sha256(sys.base_prefix.encode()).hexdigest()[:6],)))' \
        || die "cannot run $PYTHON (set PYTHON to a CPython 3.9+)"
}

# A venv in the cache holding the pinned build tools, made by $PYTHON once.
# Prints its python.
tools_python() {
    local venv
    venv=$CACHE/venv/tools-$(python_id)-$HOST_ARCH
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.tools" 2>/dev/null)" != "$TOOLS" ]; then
        say "making the build tools venv $venv ($TOOLS)"
        rm -rf "$venv"
        mkdir -p "$CACHE/venv"
        "$PYTHON" -m venv "$venv" >&2 || die "$PYTHON -m venv failed (Debian: apt-get install python3-venv)"
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install -q --upgrade pip $TOOLS >&2 || die "installing $TOOLS failed"
        echo "$TOOLS" > "$venv/.tools"
    fi
    echo "$venv/bin/python"
}

# The llama-cpp-python sdist, fetched by pip once into the cache (the same
# file tests/golden_model.py takes the vocabulary from), using the python
# given as $1 (one with pip), or $LLAMA_SDIST when set. Prints its path.
llama_sdist() {
    local py=$1 path=$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz tmp
    if [ -n "${LLAMA_SDIST:-}" ]; then  # an sdist brought along, for a machine with no index
        [ -f "$LLAMA_SDIST" ] || die "LLAMA_SDIST=$LLAMA_SDIST: no such file"
        echo "$LLAMA_SDIST"
        return
    fi
    if [ ! -f "$path" ]; then
        mkdir -p "$CACHE/sdist"
        tmp=$(mktemp -d "$CACHE/sdist/.fetch-XXXXXX")
        say "fetching the llama-cpp-python $LLAMA_CPP_VERSION sdist"
        "$py" -m pip download -q --no-deps --no-binary :all: --dest "$tmp" \
            "llama-cpp-python==$LLAMA_CPP_VERSION" >&2 || { rm -rf "$tmp"; die "pip download failed"; }
        mv "$tmp"/llama_cpp_python-*.tar.gz "$path"
        rm -rf "$tmp"
    fi
    echo "$path"
}
