#!/usr/bin/env python3
"""How long does `offgrid quantize` take next to llama.cpp's own
`llama-quantize` on the same file?

    python bench/quantize.py [--type Q4_K_M] [--n-embd 1024] [--rounds 3] [--threads 2] [--json]

The source is the golden-model builder's F16 model (tests/golden_model.py)
at --n-embd wide, so every matrix takes the K-quant kernels. llama-quantize
is built once from the llama.cpp sources vendored in the llama-cpp-python
sdist of the installed version (`cmake --build --target llama-quantize`,
portable: GGML_NATIVE=OFF) and cached under
${OFFGRID_BUILD_CACHE:-~/.cache/offgrid-build}/llama-quantize-VERSION/:
minutes of compiling on a small machine the first time, never in CI.

Rounds alternate between the two, same threads, each into a fresh folder.
Reported per side: the median wall time of the whole command, and for
offgrid also the time of the llama_model_quantize call alone (its manifest's
`quantize_seconds`; the rest is starting the child, loading the result and
generating 8 tokens, and hashing it). The ratios are offgrid / llama-quantize.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFGRID = os.path.join(ROOT, "offgrid.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))

import golden_model  # noqa: E402


def build_llama_quantize(version, jobs):
    """Path of llama-quantize built from the sdist's vendored llama.cpp (cached)."""
    cache = os.path.join(golden_model.build_cache(), "llama-quantize-%s" % version)
    binary = os.path.join(cache, "bin", "llama-quantize")
    if os.path.isfile(binary):
        return binary
    sdist = golden_model.fetch_sdist(version)
    src = os.path.join(cache, "src")
    if not os.path.isdir(os.path.join(src, "vendor", "llama.cpp")):
        tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.dirname(cache) if os.path.isdir(
            os.path.dirname(cache)) else None)
        top = "llama_cpp_python-%s/" % version
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(top + "vendor/llama.cpp/")
                       and (m.isfile() or m.isdir())]
            tar.extractall(tmp, members=members)
        os.makedirs(cache, exist_ok=True)
        shutil.rmtree(src, ignore_errors=True)
        os.replace(os.path.join(tmp, top.rstrip("/")), src)
        shutil.rmtree(tmp, ignore_errors=True)
    build = os.path.join(cache, "build")
    started = time.monotonic()
    print("bench: building llama-quantize from llama.cpp in the %s sdist (once)" % version, file=sys.stderr)
    subprocess.run(["cmake", "-S", os.path.join(src, "vendor", "llama.cpp"), "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=sys.stderr)
    subprocess.run(["nice", "cmake", "--build", build, "--target", "llama-quantize", "-j", str(jobs)], check=True,
                   stdout=sys.stderr)
    os.makedirs(os.path.dirname(binary), exist_ok=True)
    shutil.copy2(os.path.join(build, "bin", "llama-quantize"), binary + ".tmp")
    os.replace(binary + ".tmp", binary)
    shutil.rmtree(build, ignore_errors=True)
    print("bench: built %s in %.0f s" % (binary, time.monotonic() - started), file=sys.stderr)
    return binary


def run_offgrid(source, qtype, threads, work):
    models = os.path.join(work, "models")
    os.makedirs(models)
    os.link(source, os.path.join(models, "source-f16.gguf"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env["OFFGRID_HOME"] = work
    started = time.monotonic()
    out = subprocess.run([sys.executable, OFFGRID, "quantize", "source-f16", qtype, "--threads", str(threads),
                          "--name", "out", "--models-dir", models, "--json"], env=env, check=True,
                         capture_output=True, text=True)
    wall = time.monotonic() - started
    manifest = json.loads(out.stdout)
    return wall, manifest["quantize_seconds"], manifest["size"]


def run_llama_quantize(binary, source, qtype, threads, work):
    out = os.path.join(work, "out.gguf")
    started = time.monotonic()
    subprocess.run([binary, source, out, qtype, str(threads)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - started, os.path.getsize(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--n-embd", type=int, default=1024, help="width of the golden F16 model (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile jobs for llama-quantize")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    version = golden_model.llama_cpp_version()
    binary = build_llama_quantize(version, args.jobs)
    top = tempfile.mkdtemp(prefix="offgrid-bench-quantize-")
    try:
        source = golden_model.write_model(os.path.join(top, "source-f16.gguf"), dtype="f16", n_embd=args.n_embd)
        offgrid_wall, offgrid_call, native_wall, sizes = [], [], [], set()
        for i in range(args.rounds):
            for side in (("offgrid", "native") if i % 2 == 0 else ("native", "offgrid")):
                work = tempfile.mkdtemp(prefix=side + "-", dir=top)
                if side == "offgrid":
                    wall, call, size = run_offgrid(source, args.type, args.threads, work)
                    offgrid_wall.append(wall)
                    offgrid_call.append(call)
                else:
                    wall, size = run_llama_quantize(binary, source, args.type, args.threads, work)
                    native_wall.append(wall)
                sizes.add(size)
                shutil.rmtree(work)
        result = {
            "type": args.type, "source_bytes": os.path.getsize(source), "threads": args.threads,
            "rounds": args.rounds, "llama_cpp_python": version, "output_bytes": sorted(sizes),
            "offgrid_wall_s": round(statistics.median(offgrid_wall), 3),
            "offgrid_quantize_call_s": round(statistics.median(offgrid_call), 3),
            "llama_quantize_wall_s": round(statistics.median(native_wall), 3),
        }
        result["ratio_quantize_call"] = round(result["offgrid_quantize_call_s"] / result["llama_quantize_wall_s"], 3)
        result["ratio_wall"] = round(result["offgrid_wall_s"] / result["llama_quantize_wall_s"], 3)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("%s of a %.0f MB F16 model, %d threads, median of %d:" % (
            args.type, result["source_bytes"] / 1e6, args.threads, args.rounds))
        print("  llama-quantize                 %8.2f s" % result["llama_quantize_wall_s"])
        print("  offgrid quantize (call only)   %8.2f s   ratio %.2f" % (
            result["offgrid_quantize_call_s"], result["ratio_quantize_call"]))
        print("  offgrid quantize (whole run)   %8.2f s   ratio %.2f" % (result["offgrid_wall_s"], result["ratio_wall"]))
        print("  output sizes: %s bytes" % ", ".join(str(s) for s in result["output_bytes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
