#!/usr/bin/env python3
"""llama.cpp's own `llama-server` and `llama-bench`, built for benchmarks only.

    python bench/llama_server.py              # build once (cached), print the llama-server path
    python bench/llama_server.py --bench      # print the llama-bench path instead
    python bench/llama_server.py --rpc --bench   # llama-bench of a second build with GGML_RPC=ON
    python bench/llama_server.py --no-build   # print the path if built, else exit 1

From another benchmark (run from anywhere):

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_server
    path = llama_server.binary("llama-server")     # builds on first use

The source is the llama.cpp vendored in the llama-cpp-python sdist of the
installed version (the sdist pip fetches once into the build cache, as
tests/golden_model.py does), so llama-server runs the same ggml code as
offgrid. The build is portable (GGML_NATIVE=OFF, as offgrid's own), static,
without curl or OpenSSL, run under `nice -n 19` with 2 compile jobs
(--jobs); its build folder is kept beside bin/, so a target added later
compiles only what it adds. Cached in
${OFFGRID_BUILD_CACHE:-~/.cache/offgrid-build}/llama.cpp-VERSION-rpc-off/bin/
(GGML_RPC=OFF, the default build) or ...-rpc-on/bin/ (--rpc). About 15
minutes of two cores the first time; instant afterwards. Never part of CI:
no test may depend on it.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import golden_model  # noqa: E402

TARGETS = ("llama-server", "llama-bench")


def folder(rpc=False, version=None):
    """The cache folder of one build variant."""
    version = version or golden_model.llama_cpp_version()
    return os.path.join(golden_model.build_cache(), "llama.cpp-%s-rpc-%s" % (version, "on" if rpc else "off"))


def source(version):
    """The sdist's vendor/llama.cpp, unpacked once into the cache."""
    dest = os.path.join(golden_model.build_cache(), "llama.cpp-%s-src" % version)
    if os.path.isfile(os.path.join(dest, "CMakeLists.txt")):
        return dest
    sdist = golden_model.fetch_sdist(version)
    top = "llama_cpp_python-%s/vendor/llama.cpp" % version
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=golden_model.build_cache())
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(top + "/") and (m.isfile() or m.isdir())]
            tar.extractall(tmp, members=members)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(os.path.join(tmp, top), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build(rpc=False, jobs=2, version=None, targets=TARGETS):
    """Build `targets` (default: both) of one variant into its cache folder,
    those not built yet; return that folder's bin/."""
    version = version or golden_model.llama_cpp_version()
    cache = folder(rpc, version)
    bindir = os.path.join(cache, "bin")
    targets = [t for t in targets if not os.path.isfile(os.path.join(bindir, t))]
    if not targets:
        return bindir
    src = source(version)
    work = os.path.join(cache, "build")
    started = time.monotonic()
    print("llama_server: building %s from llama.cpp in the llama-cpp-python %s sdist, GGML_RPC=%s (once, "
          "minutes)" % (" and ".join(targets), version, "ON" if rpc else "OFF"), file=sys.stderr)
    subprocess.run(["cmake", "-S", src, "-B", work, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                    "-DGGML_RPC=%s" % ("ON" if rpc else "OFF"), "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON"], check=True, stdout=sys.stderr)
    subprocess.run(["nice", "-n", "19", "cmake", "--build", work, "--target", *targets, "-j", str(jobs)],
                   check=True, stdout=sys.stderr)
    os.makedirs(bindir, exist_ok=True)
    for target in targets:
        shutil.copy2(os.path.join(work, "bin", target), os.path.join(bindir, target + ".tmp"))
        os.replace(os.path.join(bindir, target + ".tmp"), os.path.join(bindir, target))
    print("llama_server: built %s in %.0f s" % (bindir, time.monotonic() - started), file=sys.stderr)
    return bindir


def binary(name="llama-server", rpc=False, jobs=2, build_missing=True):
    """Path of one of TARGETS; built first when missing (unless build_missing is False: then None)."""
    if name not in TARGETS:
        raise ValueError("name must be one of %s" % ", ".join(TARGETS))
    path = os.path.join(folder(rpc), "bin", name)
    if os.path.isfile(path):
        return path
    if not build_missing:
        return None
    return os.path.join(build(rpc, jobs, targets=[name]), name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="print llama-bench's path instead of llama-server's")
    parser.add_argument("--rpc", action="store_true", help="the GGML_RPC=ON variant")
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs (default 2)")
    parser.add_argument("--no-build", action="store_true", help="do not build; exit 1 when not built yet")
    args = parser.parse_args(argv)
    path = binary("llama-bench" if args.bench else "llama-server", args.rpc, args.jobs, not args.no_build)
    if path is None:
        print("llama_server: not built yet; run without --no-build", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
