#!/usr/bin/env python3
"""Download throughput: `offgrid download` against `curl -o`, same file, same run.

    python bench/download_vs_curl.py [--size-mb 200] [--rounds 3] [--script]

Generates a GGUF file of random data (so nothing compresses or dedupes),
serves it from a local HTTP server on 127.0.0.1, and fetches it in
interleaved rounds with each tool into a fresh folder. offgrid's time
includes what curl does not do: hashing the file, fsync, verifying
size and sha256, reading the GGUF header and installing with a manifest.
curl never fsyncs, so its file may still be in the page cache only; "curl +
sync" adds `sync FILE` after it, the cost of reaching the disk.

offgrid runs as the installed `offgrid` command does (its module imported
from cached bytecode); --script runs `python offgrid.py` instead, which
compiles the whole file at every start. Each round also times
`offgrid version`, the start-up every command pays, so the table shows how
much of offgrid's time is the transfer itself.
Prints one table; RATIO is curl's time over offgrid's, + SYNC curl + sync's.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFGRID = os.path.join(ROOT, "offgrid.py")
FILE = "bench.Q8_0.gguf"


def write_gguf(path, size):
    """A valid GGUF header, one F32 tensor, then random bytes up to size."""
    name = b"w"
    elements = (size - 256) // 4
    head = (b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
            + struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<I", 8)
            + struct.pack("<Q", 5) + b"llama"
            + struct.pack("<Q", len(name)) + name + struct.pack("<I", 1) + struct.pack("<Q", elements)
            + struct.pack("<IQ", 0, 0))
    head += b"\0" * ((32 - len(head) % 32) % 32)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(head)
        digest.update(head)
        left = elements * 4
        while left:
            block = os.urandom(min(left, 8 << 20))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return os.path.getsize(path), digest.hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def timed(cmd, env=None):
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def offgrid_command(script, env):
    """How to run offgrid: as the installed command does (bytecode cached,
    as pip leaves it; `env` is changed to allow that), or as a script."""
    if script:
        return [sys.executable, OFFGRID]
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # From ROOT, so this checkout's offgrid.py is the module imported.
    subprocess.run([sys.executable, "-m", "offgrid", "version"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    return [sys.executable, "-m", "offgrid"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--script", action="store_true", help="run `python offgrid.py` (compiled at every start)")
    args = parser.parse_args()
    if not shutil.which("curl"):
        sys.exit("download_vs_curl: curl is not installed")
    work = tempfile.mkdtemp(prefix="offgrid-bench-")
    try:
        served = os.path.join(work, "served")
        os.makedirs(served)
        size, sha = write_gguf(os.path.join(served, FILE), args.size_mb * 1024 * 1024)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=served))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = "http://127.0.0.1:%d/%s" % (httpd.server_address[1], FILE)
        home = os.path.join(work, "home")
        os.makedirs(home)
        with open(os.path.join(home, "catalog.json"), "w") as f:
            json.dump({"models": [{"id": "bench", "file": FILE, "url": url, "size": size, "sha256": sha}]}, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        env["OFFGRID_HOME"] = home
        offgrid = offgrid_command(args.script, env)
        rows = []
        for i in range(args.rounds):
            # Alternate who goes first so page cache and CPU frequency favour neither.
            order = ("offgrid", "curl") if i % 2 == 0 else ("curl", "offgrid")
            times = {"start": timed(offgrid + ["version"], env)}
            for tool in order:
                dest = os.path.join(work, "%s-%d" % (tool, i))
                os.makedirs(dest)
                if tool == "curl":
                    times[tool] = timed(["curl", "-sS", "-f", "-o", os.path.join(dest, FILE), url])
                    times["curl + sync"] = times[tool] + timed(["sync", os.path.join(dest, FILE)])
                else:
                    times[tool] = timed(offgrid + ["download", "bench", "--models-dir", dest], env)
                    # offgrid verified it; check anyway that the bench measured a real install
                    with open(os.path.join(dest, "bench.manifest.json")) as f:
                        assert json.load(f)["sha256"] == sha
                shutil.rmtree(dest)
            rows.append(times)
        httpd.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    print("file: %.0f MB GGUF of random data over http://127.0.0.1, %d rounds, interleaved; offgrid run %s; "
          "load average %.1f" % (mb, args.rounds, "as `python offgrid.py`" if args.script else
                                 "as the installed command", os.getloadavg()[0]))
    print("%-8s %12s %12s %8s %8s %10s %18s" % ("ROUND", "OFFGRID MB/s", "CURL MB/s", "RATIO", "+ SYNC",
                                                "START s", "RATIO LESS START"))
    med = {k: statistics.median(t[k] for t in rows) for k in ("offgrid", "curl", "curl + sync", "start")}
    for i, t in list(enumerate(rows, 1)) + [("median", med)]:
        print("%-8s %12.0f %12.0f %8.2f %8.2f %10.3f %18.2f" % (
            i, mb / t["offgrid"], mb / t["curl"], t["curl"] / t["offgrid"], t["curl + sync"] / t["offgrid"],
            t["start"], t["curl"] / max(t["offgrid"] - t["start"], 1e-6)))


if __name__ == "__main__":
    main()
