#!/usr/bin/env bash
# offgrid as one zipapp (shiv) with llama-cpp-python and psutil inside.
#
#   build/zipapp.sh [x86_64|aarch64] [--python-version X.Y] [--output FILE]
#
# Writes dist/offgrid-<version>-<arch>.pyz (for another Python than the
# default: dist/offgrid-<version>-<arch>-py<X.Y>.pyz) and prints its path.
# Run it with `python3 offgrid-<version>-<arch>.pyz serve`; the target needs
# that Python minor version (numpy inside is built for it), glibc 2.35 or
# newer, libgomp1 and libstdc++6.
#
# The llama-cpp-python wheel comes from build/wheels.sh (built once, cached);
# everything else is taken as binary wheels for the target, so an aarch64
# zipapp is built on x86_64 with pip's --platform options.
#   --python-version X.Y   target Python (default: 3.11, Debian bookworm's,
#                          for aarch64; the build Python's for x86_64)
#   --output FILE          write the zipapp there instead
# Environment: PYTHON (the build Python, default python3), LLAMA_CPP_VERSION,
# OFFGRID_BUILD_CACHE, OFFGRID_DIST (default dist/).
#
# At its first start the zipapp unpacks itself into ~/.shiv/; set SHIV_ROOT
# to a writable folder where home is read-only (systemd: CacheDirectory=).
. "$(dirname "$0")/common.sh"

# The oldest glibc the binary wheels may need: JetPack 6 (Ubuntu 22.04) has
# 2.35, Debian bookworm 2.36; the llama.cpp libraries need 2.34.
GLIBC_MINOR=35

arch=$HOST_ARCH pyver="" output=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        --python-version) [ $# -ge 2 ] || die "--python-version needs a value like 3.11"; pyver=$2; shift 2 ;;
        --output) [ $# -ge 2 ] || die "--output needs a file name"; output=$2; shift 2 ;;
        x86_64|aarch64) arch=$1; shift ;;
        *) die "unknown argument '$1' (see $0 --help)" ;;
    esac
done
[ -n "$OFFGRID_VERSION" ] || die "no __version__ found in $ROOT/offgrid.py"
[ -z "$pyver" ] || [[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.11, not '$pyver'"
py=$(tools_python)
if [ "$arch" = aarch64 ] && [ "$HOST_ARCH" != aarch64 ]; then
    default_pyver=3.11
else
    default_pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
fi
name=offgrid-$OFFGRID_VERSION-$arch.pyz
if [ -z "$pyver" ]; then
    pyver=$default_pyver
elif [ "$pyver" != "$default_pyver" ]; then
    name=offgrid-$OFFGRID_VERSION-$arch-py$pyver.pyz
fi
[ -n "$output" ] || output=$DIST/$name
started=$(date +%s)

wheel=$("$BUILD_DIR/wheels.sh" "$arch")
work=$(mktemp -d "${TMPDIR:-/tmp}/offgrid-zipapp-XXXXXX")
trap 'rm -rf "$work"' EXIT
site=$work/site-packages
abi=cp${pyver/./}
# pip does not widen an explicit --platform to older glibc versions, so
# every manylinux level up to GLIBC_MINOR is named.
platforms=(--platform "manylinux2014_$arch" --platform "linux_$arch")
for minor in $(seq 17 "$GLIBC_MINOR"); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
# Binary wheels for the target only (never a source build for the wrong
# machine); the llama-cpp-python wheel is offered by path, psutil is abi3.
timed "pip install for $arch, Python $pyver" "$py" -m pip install -q --no-compile --target "$site" \
    --only-binary=:all: --implementation cp --python-version "$pyver" --abi "$abi" --abi abi3 --abi none \
    "${platforms[@]}" \
    "$wheel" "psutil>=5.9" >&2
# Console scripts were written for the build machine, and llama-cpp-python's
# CMake install leaves a second copy of its libraries plus headers in lib/
# and include/ (34 MB); llama_cpp loads the copy in llama_cpp/lib.
rm -rf "${site:?}/bin" "${site:?}/lib" "${site:?}/include"
cp "$ROOT/offgrid.py" "$site/offgrid.py"
mkdir -p "$(dirname "$output")"
timed "shiv" "$py" -m shiv --reproducible --compressed -e offgrid:main -p "/usr/bin/env python3" \
    --site-packages "$site" -o "$output.tmp" >&2
mv "$output.tmp" "$output"
say "wrote $output ($(du -h "$output" | cut -f1), llama-cpp-python $LLAMA_CPP_VERSION, $arch, Python $pyver) in $(( $(date +%s) - started )) s"
echo "$output"
