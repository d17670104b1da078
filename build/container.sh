#!/usr/bin/env bash
# The offgrid container image (deploy/Containerfile), for amd64 or arm64, or
# both under one multi-architecture name.
#
#   build/container.sh [amd64|arm64] [--starter] [--tag NAME] [--base-only] [--pull-base]
#   build/container.sh amd64 arm64 [--manifest NAME] [--starter] [--pull-base]
#
# Three steps, each cached:
# 1. the base image debian:bookworm-slim. With no registry in reach it is
#    made here: mmdebstrap writes a minimal Debian bookworm root (the slim
#    image's package set and path excludes) from this machine's apt sources,
#    `podman import` turns it into localhost/offgrid-base:bookworm-slim-ARCH,
#    also tagged docker.io/library/debian:bookworm-slim when ARCH is this
#    machine's, so the Containerfile's ordinary FROM line finds it locally.
#    --pull-base takes the registry's instead.
# 2. the Python packages, as wheels in deploy/wheels/: llama-cpp-python from
#    build/wheels.sh (built once, portable; aarch64 cross-built) and the
#    pinned binary wheels of deploy/requirements.txt for the target.
# 3. podman build (or docker build, when podman is missing) of
#    deploy/Containerfile with the repository as context; the build itself
#    reaches no network for Python packages (PIP_NO_INDEX=1).
# Prints the image name (default offgrid:<version>, -arm64 appended for
# arm64) on stdout; progress and step timings go to stderr.
#   --starter     bake the starter model (SmolLM2-135M-Instruct) into the image
#   --base-only   stop after step 1 and print the base image's name
#   --manifest NAME  (podman) build each architecture given, each under its
#                 own name as above, then make the manifest list NAME holding
#                 them (default offgrid:<version>-multiarch) and print NAME;
#                 `podman manifest push --all` sends it to a registry. An arm64
#                 image on an x86 machine is built under qemu-user (binfmt_misc).
# Environment: OFFGRID_BUILD_CACHE (rootfs tarballs, wheels), CONTAINER_ENGINE
# (podman or docker), CONTAINERS_CONF for podman, OFFGRID_APT_SOURCES (a
# sources.list to use instead of the host's), PYTHON, OFFGRID_CACHED_ONLY=1
# (use the cached base root and wheel or exit 3; never make them).
# Measured on a busy 2-core machine: amd64 base rootfs 1.6 min (then cached),
# image 1.4 min on cached wheels. The arm64 base (mmdebstrap under qemu-user)
# took 7.5 minutes at load average 9 (18 at load average 20), the arm64 image
# 4 minutes at load average 3 and 8 at load average 9.
. "$(dirname "$0")/common.sh"
. "$(dirname "$0")/apt-sources.sh"

SUITE=bookworm
BASE=docker.io/library/debian:bookworm-slim
archs=() starter=0 tag="" base_only=0 pull_base=0 manifest=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        amd64|arm64) archs+=("$1"); shift ;;
        --starter) starter=1; shift ;;
        --tag) [ $# -ge 2 ] || die "--tag needs a name"; tag=$2; shift 2 ;;
        --base-only) base_only=1; shift ;;
        --pull-base) pull_base=1; shift ;;
        --manifest) [ $# -ge 2 ] || die "--manifest needs a name"; manifest=$2; shift 2 ;;
        *) die "unknown argument '$1' (see $0 --help)" ;;
    esac
done
[ ${#archs[@]} -gt 0 ] || archs=(amd64)
engine=${CONTAINER_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}

# Several architectures: each image is built by this script on its own, then
# a manifest list names them all.
if [ ${#archs[@]} -gt 1 ] || [ -n "$manifest" ]; then
    [ -z "$tag" ] || die "--tag names one image; name the multi-architecture list with --manifest"
    [ $base_only = 0 ] || die "--base-only takes one architecture"
    [ "$(basename "$engine")" = podman ] || die "several architectures under one name need podman (its manifest lists)"
    manifest=${manifest:-offgrid:$OFFGRID_VERSION-multiarch}
    images=()
    for a in "${archs[@]}"; do
        opts=()
        [ $starter = 0 ] || opts+=(--starter)
        [ $pull_base = 0 ] || opts+=(--pull-base)
        out=$("$0" "$a" "${opts[@]}") || exit $?
        images+=("${out##*$'\n'}")
    done
    "$engine" manifest rm "$manifest" >/dev/null 2>&1 || true
    "$engine" manifest create "$manifest" >/dev/null
    for image in "${images[@]}"; do
        # podman keeps a name without a registry as localhost/NAME.
        case ${image%%/*} in
            *.*|*:*|localhost) [ "$image" != "${image%%/*}" ] || image=localhost/$image ;;
            *) image=localhost/$image ;;
        esac
        "$engine" manifest add "$manifest" "containers-storage:$image" >/dev/null
    done
    say "manifest list $manifest: ${images[*]}"
    echo "$manifest"
    exit 0
fi
arch=${archs[0]}
case $arch in amd64) march=x86_64 ;; arm64) march=aarch64 ;; esac
case $HOST_ARCH in x86_64) host_arch=amd64 ;; aarch64) host_arch=arm64 ;; *) host_arch=$HOST_ARCH ;; esac
# The base made here, one name per architecture (the build names it in BASE).
local_base=localhost/offgrid-base:$SUITE-slim-$arch
if [ -z "$tag" ]; then
    tag=offgrid:$OFFGRID_VERSION
    [ "$arch" = amd64 ] || tag=$tag-$arch
fi
command -v "$engine" >/dev/null || die "neither podman nor docker found (Debian: apt-get install podman)"
# arm64 on another machine: its programs (apt in the base, pip in the build)
# run under qemu-user through binfmt_misc, which a machine whose init is not
# systemd may have neither mounted nor enabled.
if [ "$arch" = arm64 ] && [ "$HOST_ARCH" != aarch64 ]; then
    bm=/proc/sys/fs/binfmt_misc
    if ! command -v update-binfmts >/dev/null || [ ! -e /usr/bin/qemu-aarch64-static ]; then
        die "arm64 images on $HOST_ARCH need qemu-user-static and binfmt-support"
    fi
    [ -e $bm/status ] || mount -t binfmt_misc binfmt_misc $bm || die "cannot mount binfmt_misc on $bm"
    if [ ! -e $bm/qemu-aarch64 ] || ! grep -q '^enabled' $bm/qemu-aarch64; then
        update-binfmts --enable qemu-aarch64 || die "cannot enable qemu-aarch64 in binfmt_misc"
    fi
    grep -q '^flags: .*F' $bm/qemu-aarch64 || die "qemu-aarch64 is registered without the F flag"
fi

# Base image ###################################################################


# What the slim image leaves out: its files are removed once the root is made
# (the folders stay: dpkg's database lists them) and kept out of later
# installs by dpkg path excludes.
SLIM_EXCLUDES="/usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/groff/* \
/usr/share/lintian/* /usr/share/linda/*"

base_image() {
    local key tarball sources hook have
    if [ $pull_base = 1 ]; then
        timed "pull $BASE" "$engine" pull --platform "linux/$arch" "$BASE" >&2
        local_base=$BASE
        return
    fi
    key=$(printf '%s\n' "$SUITE" "$arch" minbase "$SLIM_EXCLUDES" "container-base-v2" | sha256sum | cut -c1-12)
    have=$("$engine" image inspect --format '{{ index .Config.Labels "org.offgrid.rootfs" }}' "$local_base" \
        2>/dev/null || true)
    if [ "$have" = "$key" ]; then
        say "base: $local_base is up to date"
        tag_base
        return
    fi
    tarball=$CACHE/rootfs/$SUITE-$arch-slim-$key.tar.zst
    if [ ! -f "$tarball" ]; then
        not_cached "the $arch base root file system; build/container.sh $arch --base-only makes it"
        command -v mmdebstrap >/dev/null || die "mmdebstrap not found (Debian: apt-get install mmdebstrap)"
        sources=$(host_apt_sources "$SUITE" main container.sh) || exit 1
        mkdir -p "$CACHE/rootfs"
        hook=$(mktemp -d)
        printf '%s\n' "$sources" > "$hook/sources.list"
        {
            for p in $SLIM_EXCLUDES; do echo "path-exclude $p"; done
            echo "path-include /usr/share/doc/*/copyright"; echo "path-include /usr/share/locale/locale.alias"
        } > "$hook/slim"
        # shellcheck disable=SC2016  # the hooks' $1 is the root, set by mmdebstrap
        timed "base: mmdebstrap $SUITE $arch" mmdebstrap --variant=minbase --architectures="$arch" \
            --aptopt='APT::Install-Recommends "false"' \
            --customize-hook="cp $hook/slim \"\$1/etc/dpkg/dpkg.cfg.d/slim\"" \
            --customize-hook='find "$1"/usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete' \
            --customize-hook='cd "$1"/usr/share && find man info groff lintian linda locale ! -type d \
                ! -name locale.alias -delete 2>/dev/null || true' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
            "$SUITE" "$CACHE/rootfs/partial-$key.tar.zst" "$hook/sources.list" >&2 \
            || { rm -rf "$hook" "$CACHE/rootfs/partial-$key.tar.zst"; exit 1; }
        rm -rf "$hook"
        mv "$CACHE/rootfs/partial-$key.tar.zst" "$tarball"
    else
        say "base: reusing $tarball"
    fi
    # mmdebstrap leaves the sources it used in the root, so apt in the image
    # build uses the same mirror this machine does.
    local platform
    if [ "$engine" = podman ]; then platform="--arch=$arch"; else platform="--platform=linux/$arch"; fi
    zstd -dc "$tarball" | timed "base: $engine import" "$engine" import "$platform" \
        --change "LABEL org.offgrid.rootfs=$key" --change 'CMD ["bash"]' \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" - "$local_base" >&2
    tag_base
}

# One name serves one architecture: the made base of this machine's own
# architecture is also tagged with the registry's name, so a plain
# `podman build -f deploy/Containerfile .` finds it.
tag_base() {
    if [ "$arch" = "$host_arch" ]; then "$engine" tag "$local_base" "$BASE"; fi
}

# Wheels #######################################################################

# The binary wheels of a requirements file for bookworm's Python 3.11 on the
# target, fetched once per file content and architecture; prints the folder.
download_wheels() {
    local req=$1 py=$2 key dir platforms=() minor
    key=$(sha256sum < "$req" | cut -c1-12)
    dir=$CACHE/container-wheels/$march-$(basename "$req" .txt)-$key
    if [ ! -f "$dir/.complete" ]; then
        platforms=(--platform "manylinux2014_$march" --platform "linux_$march")
        for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$march"); done
        rm -rf "$dir"
        mkdir -p "$dir"
        timed "pip download $(basename "$req") for $march" "$py" -m pip download -q -d "$dir" \
            --no-deps --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
            "${platforms[@]}" -r "$req" >&2
        touch "$dir/.complete"
    fi
    echo "$dir"
}

wheels() {
    local dir=$ROOT/deploy/wheels py llama deps starter_dir
    llama=$("$BUILD_DIR/wheels.sh" "$march") || exit $?
    py=$(tools_python)
    deps=$(download_wheels "$ROOT/deploy/requirements.txt" "$py")
    mkdir -p "$dir"
    find "$dir" -name '*.whl' -delete
    cp "$llama" "$deps"/*.whl "$dir/"
    if [ $starter = 1 ]; then
        starter_dir=$(download_wheels "$ROOT/deploy/requirements-starter.txt" "$py")
        cp "$starter_dir"/*.whl "$dir/"
    fi
}

# Image ########################################################################

timed "base image" base_image
if [ $base_only = 1 ]; then echo "$local_base"; exit 0; fi
timed "wheels" wheels
started=$(date +%s)
# podman writes OCI images by default, which have no HEALTHCHECK.
format=()
[ "$engine" != podman ] || format=(--format docker)
timed "$engine build $tag" "$engine" build "${format[@]}" --platform "linux/$arch" --pull=never -f "$ROOT/deploy/Containerfile" \
    --build-arg BASE="$local_base" --build-arg PIP_NO_INDEX=1 --build-arg STARTER=$starter -t "$tag" "$ROOT" >&2
say "built $tag ($arch) in $(( $(date +%s) - started )) s"
echo "$tag"
