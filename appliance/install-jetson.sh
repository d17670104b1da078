#!/usr/bin/env bash
# Put a CUDA build of llama-cpp-python in place of the offgrid .deb's CPU
# build on an NVIDIA Jetson (JetPack 6, Orin: CUDA architecture 87), so that
# offgrid's default gpu_layers=auto runs models on the GPU. Run it from an
# offgrid checkout on the Jetson itself, after the offgrid-llm .deb
# (appliance/build-deb.sh --python 3.10) is installed:
#
#   sudo appliance/install-jetson.sh [--wheel FILE.whl] [--sdist llama_cpp_python-X.tar.gz] [--arch 87] [--jobs N]
#
# Without --wheel it runs `build/wheels.sh cuda` (CUDA_ARCHITECTURES=--arch,
# cached in ~/.cache/offgrid-build), from --sdist when given (offline), else
# from the sdist pip fetches for the .deb's llama-cpp-python version. Building
# the CUDA kernels takes long on the device. --wheel installs a CUDA wheel
# that `build/wheels.sh cuda` made before, here or on another Jetson. The CPU
# build is kept in /opt/offgrid/llama_cpp.cpu to go back to; offgrid restarts.
set -euo pipefail

site=/opt/offgrid/site
repo=$(cd "$(dirname "$0")/.." && pwd)
wheel=""
sdist=""
arch=""
jobs=$(nproc)

die() { echo "install-jetson: $*" >&2; exit 1; }
log() { echo "install-jetson: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --wheel) wheel=$(realpath "${2:?--wheel needs a file}"); shift 2 ;;
        --sdist) sdist=$(realpath "${2:?--sdist needs a file}"); shift 2 ;;
        --arch) arch=${2:?--arch needs a CUDA architecture, e.g. 87}; shift 2 ;;
        --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (it writes $site and restarts offgrid.service)"
[ "$(uname -m)" = aarch64 ] || die "this is $(uname -m), not a Jetson (aarch64)"
[ -f /etc/nv_tegra_release ] || die "no /etc/nv_tegra_release: this is not a Jetson with NVIDIA's L4T/JetPack"
[ -d "$site/llama_cpp" ] || die "no $site/llama_cpp: install the offgrid-llm .deb first (dpkg -i offgrid-llm_*_arm64.deb)"
[ -z "$wheel" ] || [ -f "$wheel" ] || die "no such wheel: $wheel"
[ -z "$sdist" ] || [ -f "$sdist" ] || die "no such sdist: $sdist"
version=$(PYTHONPATH=$site python3 -c 'from importlib.metadata import version; print(version("llama-cpp-python"))') \
    || die "cannot read the llama-cpp-python version in $site"

need_packages() {
    local missing="" p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        log "installing$missing"
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
    fi
}

started=$SECONDS
need_packages python3-pip
if [ -z "$wheel" ]; then
    [ -x "$repo/build/wheels.sh" ] || die "no --wheel given and no $repo/build/wheels.sh to build one"
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
    need_packages python3-pip python3-venv cmake build-essential
    log "building llama-cpp-python $version with CUDA for sm_$arch with $jobs jobs (build/wheels.sh cuda; this takes long)"
    wheel=$(CUDACXX=$nvcc CUDA_ARCHITECTURES=$arch CMAKE_BUILD_PARALLEL_LEVEL=$jobs LLAMA_CPP_VERSION=$version \
            LLAMA_SDIST=$sdist PYTHON=python3 "$repo/build/wheels.sh" cuda | tail -n 1)
    [ -f "$wheel" ] || die "build/wheels.sh cuda printed no wheel"
fi
case $(basename "$wheel") in
    llama_cpp_python-"$version"-*-linux_aarch64.whl) ;;
    *) die "$wheel is not a llama-cpp-python $version wheel for linux_aarch64 (the .deb carries $version)" ;;
esac

build=$(mktemp -d /var/tmp/offgrid-cuda.XXXXXX)
trap 'rm -rf "$build"' EXIT
python3 -m pip install --no-deps --no-index --target "$build/site" "$wheel" >&2 \
    || die "cannot unpack $wheel"
# offgrid's own device listing must show the GPU: a build without the CUDA
# backend would leave gpu_layers=auto at 0.
devices=$(PYTHONPATH=$build/site:$site python3 /opt/offgrid/offgrid.py info --json \
          | python3 -c 'import json, sys; print(" ".join("%s:%s" % (d["name"], d["type"]) for d in json.load(sys.stdin)["devices"] or []))') \
    || die "offgrid cannot list the devices with the new build; $site is unchanged"
case " $devices " in
    *:gpu\ *|*:igpu\ *) log "devices with the new build: $devices" ;;
    *) die "the new build shows no GPU (devices: ${devices:-none}); $site is unchanged" ;;
esac
# offgrid worker and serve --workers need llama.cpp's RPC backend in it too.
PYTHONPATH=$build/site:$site python3 -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)' \
    || die "the new build has no RPC backend (build it with -DGGML_RPC=ON, as build/wheels.sh does); $site is unchanged"

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
