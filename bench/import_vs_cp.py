#!/usr/bin/env python3
"""How fast is `offgrid import` next to a plain `cp` of the same file?

    python bench/import_vs_cp.py [--size-mb 200] [--rounds 5] [--dir DIR] [--script] [--cold all]

Writes one GGUF file of about --size-mb (random tensor data, so nothing can
compress or deduplicate it), then runs `offgrid import FILE` into a fresh
store and `cp FILE` to a fresh name, alternating, --rounds times each.
Before every run the source file's pages are dropped from the page cache
(posix_fadvise DONTNEED), so both read it from the disk, as from a stick
just plugged in, while the programs themselves start from memory as on a
machine in use. --cold all drops the whole page cache instead (echo 3 >
/proc/sys/vm/drop_caches, as root): then every run also loads its program
and, for offgrid, Python's standard library from the disk; where that is
not permitted the table says so and the figures are for a warm cache.

`offgrid import` reads the header, hashes the copy and fsyncs before
renaming into place; `cp` does none of that, so "cp + sync" (cp followed by
`sync FILE`, the cost of actually reaching the disk) is timed as well.

offgrid runs as the installed `offgrid` command does (its module imported
from cached bytecode); --script runs `python offgrid.py` instead, which
compiles the whole file at every start. `offgrid version`, the start-up
every command pays, is timed in the same rounds.
Prints a table: median and best seconds and MB/s per method, and offgrid
import's median time against cp + sync's, with and without its start-up.
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

sys.path.insert(0, os.path.join(ROOT, "bench"))
from download_vs_curl import offgrid_command  # noqa: E402  (run offgrid the same way in both)


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


def evict(path):
    """Drop one file's pages from the page cache (written and synced, so clean)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


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
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--script", action="store_true", help="run `python offgrid.py` (compiled at every start)")
    parser.add_argument("--cold", choices=("source", "all"), default="source",
                        help="drop the source file's cached pages before each run (default), or all of the page cache")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="offgrid-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "bench-model.gguf")
        write_gguf(src, args.size_mb)
        size = os.path.getsize(src)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        offgrid = offgrid_command(args.script, env)
        times = {"offgrid import": [], "cp": [], "cp + sync": [], "offgrid version": []}
        dropped = True
        for i in range(args.rounds):
            # Interleaved, so drift in the machine (other load, thermal,
            # writeback) falls on all methods alike.
            for method in times:
                os.sync()
                dropped &= drop_caches() if args.cold == "all" else evict(src)
                target = os.path.join(work, "%s-%d" % (method.replace(" ", "").replace("+", ""), i))
                if method == "offgrid import":
                    seconds = timed(offgrid + ["import", src, "--json", "--models-dir", target], env)
                elif method == "offgrid version":
                    seconds = timed(offgrid + ["version"], env)
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
                if args.cold == "all":
                    drop_caches()
        print("file: %s (%.1f MB), %d rounds each, interleaved; offgrid run %s; load average %.1f" % (
            src, size / 1e6, args.rounds, "as `python offgrid.py`" if args.script else "as the installed command",
            os.getloadavg()[0]))
        print("page cache: %s" % (("the source's pages dropped before every run" if args.cold == "source" else
                                   "dropped before every run") if dropped else
                                  "NOT dropped (no permission for /proc/sys/vm/drop_caches): warm-cache figures"))
        print()
        print("%-16s %10s %10s %10s %10s" % ("METHOD", "MEDIAN s", "BEST s", "MEDIAN MB/s", "BEST MB/s"))
        for method, values in times.items():
            median, best = statistics.median(values), min(values)
            if method == "offgrid version":
                print("%-16s %10.3f %10.3f %11s %10s" % (method, median, best, "-", "-"))
                continue
            print("%-16s %10.3f %10.3f %11.0f %10.0f" % (method, median, best, size / 1e6 / median,
                                                         size / 1e6 / best))
        med = {method: statistics.median(values) for method, values in times.items()}
        print()
        print("offgrid import, median: %.2f x cp + sync; less its start-up: %.2f x cp + sync" % (
            med["cp + sync"] / med["offgrid import"],
            med["cp + sync"] / max(med["offgrid import"] - med["offgrid version"], 1e-6)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
