#!/usr/bin/env bash
# offgrid as one native executable (Nuitka --onefile): needs no Python on
# the machine it runs on.
#
#   build/binary.sh [--stdlib] [--output FILE]
#
# Writes dist/offgrid-<version>-<arch> (with --stdlib:
# dist/offgrid-<version>-<arch>-stdlib) for this machine's architecture and
# prints its path.
#   (default)  llama-cpp-python (the portable wheel from build/wheels.sh),
#              numpy and psutil compiled in: real inference. 645 s of CPU
#              cold (28 minutes on a busy 2-core machine), 25 MB.
#   --stdlib   the standard library only: every command, /health and the
#              model store work; inference answers 503 naming what to install.
#              145 s of CPU cold, 7 MB.
#   --output FILE  write the binary there instead
# The target needs glibc as new as the build machine's, libstdc++6, zlib and
# the C.UTF-8 locale (every Debian/Ubuntu has them); libgomp is bundled. Nuitka cannot cross-compile:
# build an aarch64 binary on an aarch64 machine.
# The full binary is also copied to $OFFGRID_BUILD_CACHE/binary/, where
# `offgrid runtime add` picks it up for a stick (docs/usb.md).
# Environment: PYTHON (the build Python, needs its dev headers: Debian
# python3-dev), LLAMA_CPP_VERSION, OFFGRID_BUILD_CACHE, OFFGRID_DIST.
# Nuitka uses ccache when installed (Debian ccache) and needs patchelf.
. "$(dirname "$0")/common.sh"

variant=full output=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        --stdlib) variant=stdlib; shift ;;
        --output) [ $# -ge 2 ] || die "--output needs a file name"; output=$2; shift 2 ;;
        *) die "unknown argument '$1' (see $0 --help)" ;;
    esac
done
[ -n "$OFFGRID_VERSION" ] || die "no __version__ found in $ROOT/offgrid.py"
command -v patchelf >/dev/null || die "patchelf not found (Debian: apt-get install patchelf)"
command -v gcc >/dev/null || die "gcc not found (Debian: apt-get install build-essential)"
name=offgrid-$OFFGRID_VERSION-$HOST_ARCH
[ "$variant" = full ] || name=$name-stdlib
[ -n "$output" ] || output=$DIST/$name
started=$(date +%s)

py=$(tools_python)
flags=()
if [ "$variant" = full ]; then
    # Nuitka compiles what the build Python can import, so the full binary
    # is built in its own venv holding exactly the portable wheel and psutil
    # (never a developer's own llama-cpp-python build).
    wheel=$("$BUILD_DIR/wheels.sh" "$HOST_ARCH")
    venv=$CACHE/venv/nuitka-full-$(python_id)-$HOST_ARCH
    want="$TOOLS $(basename "$wheel") psutil"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ]; then
        rm -rf "$venv"
        timed "venv for the full binary" "$PYTHON" -m venv "$venv"
        # shellcheck disable=SC2086
        timed "install $(basename "$wheel"), psutil, Nuitka" "$venv/bin/python" -m pip install -q \
            --upgrade pip $TOOLS "$wheel" "psutil>=5.9" >&2
        echo "$want" > "$venv/.installed"
    fi
    py=$venv/bin/python
    # llama.cpp's CPU backend needs libgomp.so.1, which minimal systems lack;
    # its RUNPATH is $ORIGIN, so a copy next to it is found.
    gomp=$(readlink -f "$(gcc -print-file-name=libgomp.so.1)")
    [ -f "$gomp" ] || die "libgomp.so.1 not found (Debian: apt-get install libgomp1)"
    flags+=("--include-data-files=$gomp=llama_cpp/lib/libgomp.so.1")
else
    # Stated even though the tools venv lacks them, so the binary never
    # picks up a llama_cpp that happens to be importable at build time.
    flags+=(--nofollow-import-to=llama_cpp --nofollow-import-to=psutil --nofollow-import-to=numpy)
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/offgrid-binary-XXXXXX")
trap 'rm -rf "$work"' EXIT
# --onefile-child-grace-time=infinity: the onefile parent turns SIGTERM
# into KeyboardInterrupt in the child and, by default, kills the child 5 s
# later; offgrid bounds its own shutdown (shutdown_grace), so let it finish.
# --lto=no: link-time optimisation doubles the C compile time for a
# program that spends its time in llama.cpp anyway.
timed "nuitka ($variant)" "$py" -m nuitka --mode=onefile --assume-yes-for-downloads \
    --onefile-child-grace-time=infinity --lto=no --jobs="$(nproc)" \
    --output-dir="$work" --output-filename=offgrid "${flags[@]}" "$ROOT/offgrid.py" >&2
mkdir -p "$(dirname "$output")"
mv "$work/offgrid" "$output.tmp"
mv "$output.tmp" "$output"
if [ "$variant" = full ]; then
    # A copy in the build cache, where `offgrid runtime add` finds it to
    # carry on a stick.
    mkdir -p "$CACHE/binary"
    cp "$output" "$CACHE/binary/.$name.tmp"
    mv "$CACHE/binary/.$name.tmp" "$CACHE/binary/$name"
fi
say "wrote $output ($(du -h "$output" | cut -f1), $variant) in $(( $(date +%s) - started )) s"
echo "$output"
