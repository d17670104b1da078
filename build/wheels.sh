#!/usr/bin/env bash
# Portable llama-cpp-python wheels, built once and cached.
#
#   build/wheels.sh [x86_64|aarch64|cuda]...     (default: this machine's architecture)
#
# Prints each wheel's path on stdout; progress and step timings go to stderr.
# x86_64 is built natively with GGML_NATIVE=OFF (runs on any x86-64 CPU);
# aarch64 is cross-compiled on x86_64 with Debian's g++-aarch64-linux-gnu and
# build/aarch64-linux-gnu.cmake for plain ARMv8-A (Raspberry Pi 3 and newer,
# Jetson), then retagged linux_aarch64. Each takes about 5 minutes of 2 cores.
#
# cuda builds this machine's architecture with the CUDA backend as well
# (-DGGML_CUDA=ON), with the CUDA toolkit found here (nvcc on PATH, in
# /usr/local/cuda/bin, or CUDACXX). It is not cross-compiled: build it where
# the toolkit for the target is, e.g. on the Jetson (appliance/install-jetson.sh
# does). CUDA_ARCHITECTURES picks the GPU generations (CMake's list);
# default: 87 on aarch64 (Jetson Orin), 75;80;86;89;90 on x86_64 (Turing to
# Hopper; 120 added with CUDA 12.8 or newer). The wheel needs that CUDA major
# version's runtime libraries (libcudart, libcublas) where it runs.
#
# Cache: ${OFFGRID_BUILD_CACHE:-~/.cache/offgrid-build}/wheels/<version>-<flags hash>/
# The hash covers the architecture, the CMake flags and the toolchain file,
# so a change of flags builds a new wheel and never reuses a stale one.
# Environment: LLAMA_CPP_VERSION (default 0.3.36), PYTHON (default python3),
# LLAMA_SDIST (an sdist file to build from instead of fetching one),
# OFFGRID_CACHED_ONLY=1 (print a cached wheel or exit 3, never build).
. "$(dirname "$0")/common.sh"

case "${1:-}" in
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac

# The CUDA compiler, its version, and the GPU architectures of a cuda build.
cuda_setup() {
    NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
    [ -x "$NVCC" ] || die "cuda: no CUDA compiler (nvcc on PATH, /usr/local/cuda/bin/nvcc or CUDACXX); install the CUDA toolkit (on a Jetson: apt-get install nvidia-jetpack)"
    CUDA_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
    [ -n "$CUDA_VERSION" ] || die "cuda: cannot read the version from $NVCC --version"
    if [ -z "${CUDA_ARCHITECTURES:-}" ]; then
        case $HOST_ARCH in
            aarch64) CUDA_ARCHITECTURES=87 ;;
            *) CUDA_ARCHITECTURES="75;80;86;89;90"
               case $(printf '%s\n12.8\n' "$CUDA_VERSION" | sort -V | head -1) in
                   12.8) CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES;120" ;;
               esac ;;
        esac
    fi
}

cmake_args() {  # the flags for one architecture, toolchain given by path
    local arch=$1
    case "$arch/$HOST_ARCH" in
        cuda/*) echo "-DGGML_NATIVE=OFF -DGGML_RPC=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES" \
                     "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
                     "-DLLAMA_BUILD_SERVER=OFF" ;;
        x86_64/x86_64) echo "-DGGML_NATIVE=OFF -DGGML_RPC=ON" ;;
        aarch64/aarch64) echo "-DGGML_NATIVE=OFF -DGGML_RPC=ON -DGGML_CPU_ARM_ARCH=armv8-a" ;;
        aarch64/x86_64)
            echo "-DCMAKE_TOOLCHAIN_FILE=$BUILD_DIR/aarch64-linux-gnu.cmake -DGGML_NATIVE=OFF" \
                 "-DGGML_RPC=ON -DGGML_CPU_ARM_ARCH=armv8-a -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF" \
                 "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" ;;
        *) die "cannot build $arch wheels on $HOST_ARCH" ;;
    esac
}

# ELF machine of a wheel's libllama.so: 62 is x86-64, 183 is AArch64.
elf_machine() {
    "$PYTHON" - "$1" <<'PY'
import struct, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("/libllama.so"))
    head = z.read(name)[:20]
print(struct.unpack("<H", head[18:20])[0])
PY
}

build_one() {
    local arch=$1 args key dir wheel tmp fd want cuda=""
    if [ "$arch" = cuda ]; then
        cuda_setup
        cuda="cuda$CUDA_VERSION-"
        arch=$HOST_ARCH
    fi
    args=$(cmake_args "${cuda:+cuda}${cuda:-$arch}")
    # Hash the flags with the toolchain's content in place of its path, so
    # every checkout (and the appliance build) shares one cache entry.
    key=$( { echo "llama-cpp-python $LLAMA_CPP_VERSION $arch"; echo "${args//$BUILD_DIR\//}";
             case "$args" in *TOOLCHAIN*) cat "$BUILD_DIR/aarch64-linux-gnu.cmake" ;; esac;
             [ -z "$cuda" ] || echo "$NVCC $CUDA_VERSION"; } \
           | sha256sum | cut -c1-12)
    dir=$CACHE/wheels/$LLAMA_CPP_VERSION-$cuda$key
    mkdir -p "$dir"
    exec {fd}>"$dir/.lock"
    if ! flock -n "$fd"; then
        say "another build of this wheel is running; waiting for it"
        flock "$fd"
    fi
    rm -rf "$dir"/.build-*  # left by an interrupted build; the lock says none is running
    wheel=$(ls "$dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*-linux_"$arch".whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
        say "$arch: cached $wheel"
        echo "$wheel"
        exec {fd}>&-
        return
    fi
    not_cached "the $arch llama-cpp-python wheel; build/wheels.sh $arch builds it (about 5 min)"
    if [ "$arch" != "$HOST_ARCH" ]; then
        command -v aarch64-linux-gnu-g++ >/dev/null || die "aarch64-linux-gnu-g++ not found (Debian: apt-get install g++-aarch64-linux-gnu)"
    fi
    command -v cmake >/dev/null || die "cmake not found (Debian: apt-get install cmake)"
    local sdist py
    py=$(tools_python)
    sdist=$(llama_sdist "$py")
    tmp=$(mktemp -d "$dir/.build-XXXXXX")
    if [ -n "$cuda" ]; then
        say "$arch: building llama-cpp-python $LLAMA_CPP_VERSION with CUDA $CUDA_VERSION, CMAKE_ARGS=\"$args\"" \
            "(the CUDA kernels take far longer than the CPU build: an hour or more on a few cores)"
    else
        say "$arch: building llama-cpp-python $LLAMA_CPP_VERSION with CMAKE_ARGS=\"$args\" (about 5 min on 2 cores)"
    fi
    # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by
    # CMAKE_ARGS, so it may hold a build tuned to the developer's CPU
    # (GGML_NATIVE=ON) that would crash elsewhere. Always compile here; this
    # cache is the one keyed by flags. ccache, when installed, makes a rebuild
    # with the same flags fast.
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} ${cuda:+CUDACXX=$NVCC} \
        timed "$arch: pip wheel" "$py" -m pip wheel --no-deps --no-cache-dir -w "$tmp" "$sdist" >&2
    wheel=$(ls "$tmp"/llama_cpp_python-*.whl)
    if [ "$arch" != "$HOST_ARCH" ]; then
        # The cross build runs setuptools-style tagging on the host, so the
        # wheel says linux_x86_64 although its libraries are aarch64.
        timed "$arch: retag" "$py" -m wheel tags --platform-tag "linux_$arch" --remove "$wheel" >/dev/null
        wheel=$(ls "$tmp"/llama_cpp_python-*-linux_"$arch".whl)
    fi
    case "$arch" in x86_64) want=62 ;; aarch64) want=183 ;; esac
    [ "$(elf_machine "$wheel")" = "$want" ] || die "$wheel holds libraries for another architecture"
    if [ -n "$cuda" ]; then
        "$py" -c 'import sys, zipfile; sys.exit(not any(n.endswith("/libggml-cuda.so") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' \
            "$wheel" || die "$wheel has no libggml-cuda.so: the CUDA backend was not built"
    fi
    printf 'llama-cpp-python %s for %s%s\nCMAKE_ARGS=%s\nbuilt %s on %s\n' "$LLAMA_CPP_VERSION" "$arch" \
        "${cuda:+ with CUDA $CUDA_VERSION}" "$args" "$(date -u +%FT%TZ)" "$HOST_ARCH" > "$dir/BUILD-INFO"
    mv "$wheel" "$dir/"
    rm -rf "$tmp"
    wheel=$dir/$(basename "$wheel")
    say "$arch: wrote $wheel ($(du -h "$wheel" | cut -f1))"
    echo "$wheel"
    exec {fd}>&-
}

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=("$HOST_ARCH")
for arch in "${archs[@]}"; do [ "$arch" = cuda ] || check_arch "$arch"; done
for arch in "${archs[@]}"; do build_one "$arch"; done
