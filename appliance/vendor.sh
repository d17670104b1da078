#!/usr/bin/env bash
# Install offgrid's aarch64 Python packages (llama-cpp-python from a wheel
# built by build/wheels.sh, its dependencies and psutil from the package
# index) into SITE for the target's Python version, from this x86 machine.
#
#   appliance/vendor.sh SITE PYTHON_VERSION WHEEL
#
# Used by build-image.sh (Debian bookworm, 3.11) and build-deb.sh (JetPack 6,
# 3.10; bookworm, 3.11). The result goes on PYTHONPATH.
set -euo pipefail
if [ $# != 3 ]; then
    echo "usage: appliance/vendor.sh SITE PYTHON_VERSION WHEEL" >&2
    exit 2
fi
site=$1 pyver=$2 wheel=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$wheel" ] || { echo "vendor: no such wheel: $wheel" >&2; exit 1; }
case $wheel in
    *linux_aarch64.whl) ;;
    *) echo "vendor: $wheel is not an aarch64 wheel (want *linux_aarch64.whl)" >&2; exit 1 ;;
esac
python=python3
[ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python

"$python" -m pip install --quiet --no-warn-script-location --target "$site" \
    --platform manylinux2014_aarch64 --platform linux_aarch64 --python-version "$pyver" \
    --implementation cp --only-binary=:all: "$wheel" psutil >&2
# Wheels cannot hold symbolic links: llama_cpp/lib has each library up to
# three times (libx.so, .so.0, .so.0.N) and the wheel's data puts another
# copy in lib/. Keep one file per library and links for the other names.
rm -rf "${site:?}/bin" "${site:?}/include" "${site:?}/lib" "${site:?}/share"
lib=$site/llama_cpp/lib
[ -d "$lib" ] || { echo "vendor: $wheel installed no llama_cpp/lib" >&2; exit 1; }
for f in "$lib"/*.so*; do
    [ -L "$f" ] && continue
    for real in "$lib"/*.so*; do
        if [ "$real" != "$f" ] && [ ! -L "$real" ] && [ "${#real}" -gt "${#f}" ] && cmp -s "$f" "$real"; then
            ln -sf "$(basename "$real")" "$f"
            break
        fi
    done
done
echo "vendor: $(basename "$wheel") and its dependencies for Python $pyver: $(du -sh "$site" | cut -f1) in $site" >&2
