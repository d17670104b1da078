#!/usr/bin/env bash
# Rebuild offgrid's llama-cpp-python with CUDA on an NVIDIA Jetson, after the
# offgrid-llm .deb (appliance/build-deb.sh --python 3.10) is installed.
# Run on the Jetson itself (JetPack 6, Orin: CUDA architecture 87):
#
#   sudo ./install-jetson.sh [--sdist llama_cpp_python-X.tar.gz] [--arch 87] [--jobs N]
#
# The CUDA build replaces the CPU build in /opt/offgrid/site (the CPU build is
# kept in /opt/offgrid/llama_cpp.cpu to go back to); then offgrid restarts.
# Without --sdist, pip fetches the sdist of the same llama-cpp-python version
# the .deb carries. Building takes a long while on the device (CUDA kernels).
set -euo pipefail

site=/opt/offgrid/site
sdist=""
arch=""
jobs=$(nproc)

die() { echo "install-jetson: $*" >&2; exit 1; }
log() { echo "install-jetson: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --sdist) sdist=$(realpath "${2:?--sdist needs a file}"); shift 2 ;;
        --arch) arch=${2:?--arch needs a CUDA architecture, e.g. 87}; shift 2 ;;
        --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (it writes $site and restarts offgrid.service)"
[ "$(uname -m)" = aarch64 ] || die "this is $(uname -m), not a Jetson (aarch64)"
[ -f /etc/nv_tegra_release ] || die "no /etc/nv_tegra_release: this is not a Jetson with NVIDIA's L4T/JetPack"
[ -d "$site/llama_cpp" ] || die "no $site/llama_cpp: install the offgrid-llm .deb first (dpkg -i offgrid-llm_*_arm64.deb)"
[ -z "$sdist" ] || [ -f "$sdist" ] || die "no such sdist: $sdist"
nvcc=${CUDACXX:-/usr/local/cuda/bin/nvcc}
[ -x "$nvcc" ] || die "no CUDA compiler at $nvcc: install JetPack's CUDA (apt-get install nvidia-jetpack), or set CUDACXX"

if [ -z "$arch" ]; then
    compatible=$(tr '\0' ' ' < /proc/device-tree/compatible 2>/dev/null || true)
    case $compatible in
        *tegra234*) arch=87 ;;   # Orin (JetPack 6)
        *tegra194*) arch=72 ;;   # Xavier (JetPack 5: its Python 3.8 does not fit the .deb)
        *) die "cannot tell the Jetson model from /proc/device-tree/compatible ($compatible); pass --arch" ;;
    esac
fi
version=$(PYTHONPATH=$site python3 -c 'from importlib.metadata import version; print(version("llama-cpp-python"))') \
    || die "cannot read the llama-cpp-python version in $site"

missing=""
for p in python3-pip cmake build-essential; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing$missing"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
fi

started=$SECONDS
build=$(mktemp -d /var/tmp/offgrid-cuda.XXXXXX)
trap 'rm -rf "$build"' EXIT
log "building llama-cpp-python $version with CUDA for sm_$arch with $jobs jobs (this takes long)"
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CUDACXX=$nvcc CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
    python3 -m pip install --no-deps --no-binary llama-cpp-python --target "$build/site" \
    "${sdist:-llama-cpp-python==$version}"
PYTHONPATH=$build/site:$site python3 -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() and llama_cpp.llama_supports_rpc() else 1)' \
    || die "the new build does not report GPU offload and RPC; $site is unchanged"

rm -rf /opt/offgrid/llama_cpp.cpu
mkdir /opt/offgrid/llama_cpp.cpu
mv "$site/llama_cpp" "$site"/llama_cpp_python-*.dist-info /opt/offgrid/llama_cpp.cpu/
mv "$build/site/llama_cpp" "$build/site"/llama_cpp_python-*.dist-info "$site/"
python3 -m compileall -q "$site/llama_cpp" >/dev/null || true
log "installed the CUDA build in $site in $((SECONDS - started)) s (CPU build kept in /opt/offgrid/llama_cpp.cpu)"
if [ -d /run/systemd/system ]; then
    systemctl restart offgrid.service
    log "restarted offgrid.service"
fi
