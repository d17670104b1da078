#!/usr/bin/env python3
"""How fast is `offgrid import` next to a plain `cp` of the same file?

    python bench/import_vs_cp.py [--size-mb 200] [--rounds 5] [--dir DIR]

Writes one GGUF file of about --size-mb (random tensor data, so nothing can
compress or deduplicate it), then runs `offgrid import FILE` into a fresh
store and `cp FILE` to a fresh name, alternating, --rounds times each.
Before every run the page cache is dropped (echo 3 > /proc/sys/vm/drop_caches)
so both read the source from disk; where that is not permitted the table
says so and the figures are for a warm cache.

`offgrid import` reads the header, hashes while copying and fsyncs before
renaming into place; `cp` does none of that, so "cp + sync" (cp followed by
`sync FILE`, the cost of actually reaching the disk) is timed as well.
Prints a table: median and best seconds and MB/s per method.
"""

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFGRID = os.path.join(ROOT, "offgrid.py")


def write_gguf(path, size_mb):
    """A valid GGUF file with one F32 tensor of random data, about size_mb."""
    cols = 4096
    rows = max(1, size_mb * 1024 * 1024 // (cols * 4))

    def string(s):
        b = s.encode()
        return struct.pack("<Q", len(b)) + b
    meta = [("general.architecture", "llama"), ("general.name", "bench")]
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(meta) + 1)
    for key, value in meta:
        head += string(key) + struct.pack("<I", 8) + string(value)
    head += string("llama.context_length") + struct.pack("<II", 4, 2048)
    head += string("w") + struct.pack("<I", 2) + struct.pack("<QQ", cols, rows) + struct.pack("<IQ", 0, 0)
    head += b"\0" * ((32 - len(head) % 32) % 32)
    remaining = rows * cols * 4
    with open(path, "wb") as f:
        f.write(head)
        while remaining:
            n = min(remaining, 16 << 20)
            f.write(os.urandom(n))
            remaining -= n
        f.flush()
        os.fsync(f.fileno())


def drop_caches():
    """True if the page cache was dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(cmd, env=None):
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="offgrid-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "bench-model.gguf")
        write_gguf(src, args.size_mb)
        size = os.path.getsize(src)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        times = {"offgrid import": [], "cp": [], "cp + sync": []}
        dropped = True
        for i in range(args.rounds):
            # Interleaved, so drift in the machine (other load, thermal,
            # writeback) falls on all methods alike.
            for method in times:
                dropped &= drop_caches()
                target = os.path.join(work, "%s-%d" % (method.replace(" ", "").replace("+", ""), i))
                if method == "offgrid import":
                    cmd = [sys.executable, OFFGRID, "import", src, "--json", "--models-dir", target]
                    seconds = timed(cmd, env)
                else:
                    seconds = timed(["cp", src, target])
                    if method == "cp + sync":
                        started = time.perf_counter()
                        subprocess.run(["sync", target], check=True)
                        seconds += time.perf_counter() - started
                times[method].append(seconds)
                # Free the disk for the next round.
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.unlink(target)
                drop_caches()
        print("file: %s (%.1f MB), %d rounds each, interleaved" % (src, size / 1e6, args.rounds))
        print("page cache: %s" % ("dropped before every run" if dropped else
                                  "NOT dropped (no permission for /proc/sys/vm/drop_caches): warm-cache figures"))
        print()
        print("%-16s %10s %10s %10s %10s" % ("METHOD", "MEDIAN s", "BEST s", "MEDIAN MB/s", "BEST MB/s"))
        for method, values in times.items():
            median, best = statistics.median(values), min(values)
            print("%-16s %10.3f %10.3f %11.0f %10.0f" % (method, median, best, size / 1e6 / median,
                                                         size / 1e6 / best))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
