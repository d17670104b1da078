#!/usr/bin/env python3
"""Peer-to-peer throughput: `POST /v1/p2p/pull` against `curl -o`, between the same two network namespaces.

    sudo .venv/bin/python bench/p2p_vs_curl.py [--size-mb 200] [--rounds 3]

Needs root (it makes a bridge and two network namespaces joined to it by
veth pairs, and removes them after). Node A runs `offgrid.py serve --p2p`
with one GGUF file of random data (nothing compresses); node C runs
`offgrid.py serve --p2p` with an empty store. In interleaved rounds:

- offgrid: C is asked to `POST /v1/p2p/pull` the model; timed from the
  request to the job's `done`, which includes what curl does not do:
  hashing as it writes, fsync, verifying size and sha256, reading the GGUF
  header and installing with a manifest. The model is then removed.
- curl blob: `curl -o` in C's namespace of A's `GET /v1/p2p/blobs/<sha256>`
  (the route peers use), into C's models folder.
- curl http.server: `curl -o` of the same file from `python3 -m http.server`
  in A's namespace, a plain static file server for reference.

Prints one table; RATIO is curl blob time / offgrid time.

With --uplink-mbit N, a second table: each peer's uplink is capped at N
Mbit/s (tc tbf on its eth0, as on a Wi-Fi or 100 Mbit LAN), and C pulls
the model from A alone, then from A and B at once (B gets a copy first),
which offgrid splits into ranges fetched in parallel.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFGRID = os.path.join(ROOT, "offgrid.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from download_vs_curl import write_gguf  # noqa: E402


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True, capture_output=True)


class Net:
    def __init__(self):
        self.tag = "%04x" % random.randrange(1 << 16)
        self.bridge = "ogb" + self.tag
        self.prefix = "10.%d.%d" % (random.randrange(100, 250), random.randrange(256))
        self.namespaces, self.links = [], []
        ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        ip("addr", "add", self.prefix + ".1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self, name):
        index = len(self.namespaces) + 2
        ns, host_end = "og%s%s" % (self.tag, name), "ogv%s%d" % (self.tag, index)
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(host_end)
        ip("link", "set", host_end, "master", self.bridge)
        ip("link", "set", host_end, "up")
        address = "%s.%d" % (self.prefix, index)
        ip("-n", ns, "addr", "add", address + "/24", "brd", "+", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return ns, address

    def close(self):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def serve(ns, address, home, udp_port, name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env.update(OFFGRID_HOME=home, OFFGRID_P2P_PORT=str(udp_port), OFFGRID_P2P_INTERVAL="1", OFFGRID_P2P_NAME=name,
               OFFGRID_LOG_REQUESTS="0")
    log = open(os.path.join(home, "serve.log"), "w+")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, OFFGRID, "serve", "--p2p", "--insecure",
                             "--host", address, "--port", "0", "--models-dir", os.path.join(home, "models")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(log.name) as f:
            m = re.search(r"offgrid listening url=(http://[0-9.]+:\d+)", f.read())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(log.name) as f:
        sys.exit("p2p_vs_curl: serve did not start:\n" + f.read())


def call(url, method="GET", body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uplink-mbit", type=int, default=0,
                        help="also compare one peer with two, each uplink capped at this many Mbit/s")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("curl"):
        sys.exit("p2p_vs_curl: needs root, ip (iproute2) and curl")
    work = tempfile.mkdtemp(prefix="offgrid-p2p-bench-")
    net, procs = Net(), []
    try:
        ns_a, addr_a = net.add("a")
        ns_c, addr_c = net.add("c")
        ns_b, addr_b = net.add("b")
        home_a, home_c, home_b = (os.path.join(work, n) for n in "acb")
        for home in (home_a, home_c, home_b):
            os.makedirs(os.path.join(home, "models"))
        src = os.path.join(work, "bench.gguf")
        size, sha = write_gguf(src, args.size_mb * 1024 * 1024)
        sys.path.insert(0, ROOT)
        import offgrid
        offgrid.ModelStore(os.path.join(home_a, "models")).install([src], "bench", "bench", expected_sha256=sha)
        # Node C holds a small model of its own, so that it does not install the starter model.
        small = os.path.join(work, "small.gguf")
        write_gguf(small, 1 << 20)
        offgrid.ModelStore(os.path.join(home_c, "models")).install([small], "small", "bench")
        offgrid.ModelStore(os.path.join(home_b, "models")).install([small], "small-b", "bench")
        udp_port = random.randrange(20000, 30000)
        proc_a, url_a = serve(ns_a, addr_a, home_a, udp_port, "a")
        proc_c, url_c = serve(ns_c, addr_c, home_c, udp_port, "c")
        proc_b, url_b = serve(ns_b, addr_b, home_b, udp_port, "b")
        procs += [proc_a, proc_c, proc_b]
        static = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-m", "http.server", "8000",
                                   "--bind", addr_a, "--directory", os.path.join(home_a, "models")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(static)
        deadline = time.time() + 30
        while not any(m["sha256"] == sha for p in call(url_c + "/v1/p2p/peers")["data"] for m in p["models"]):
            if time.time() > deadline:
                sys.exit("p2p_vs_curl: C did not see A's model")
            time.sleep(0.2)
        dest = os.path.join(home_c, "curl.gguf")
        blob_url = "%s/v1/p2p/blobs/%s" % (url_a, sha)
        static_url = "http://%s:8000/bench.gguf" % addr_a
        rows = []
        for i in range(args.rounds):
            order = ["offgrid", "curl blob", "curl http.server"]
            order = order[i % 3:] + order[:i % 3]  # who goes first rotates
            times = {}
            for tool in order:
                started = time.perf_counter()
                if tool == "offgrid":
                    job = call(url_c + "/v1/p2p/pull", "POST", {"id": "bench"})
                    while job["status"] in ("queued", "running"):
                        time.sleep(0.02)
                        job = call(url_c + "/v1/models/download/" + job["job"])
                    times[tool] = time.perf_counter() - started
                    if job["status"] != "done" or not job["source"].startswith("peer:a"):
                        sys.exit("p2p_vs_curl: pull failed: %s" % job)
                    call(url_c + "/v1/models/bench", "DELETE")
                else:
                    subprocess.run(["ip", "netns", "exec", ns_c, "curl", "-sS", "-f", "-o", dest,
                                    blob_url if tool == "curl blob" else static_url], check=True)
                    times[tool] = time.perf_counter() - started
                    if os.path.getsize(dest) != size:
                        sys.exit("p2p_vs_curl: curl got %d bytes" % os.path.getsize(dest))
                    os.unlink(dest)
            rows.append(times)
        swarm = []
        if args.uplink_mbit:
            for ns in (ns_a, ns_b):
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                                "%dmbit" % args.uplink_mbit, "burst", "256kb", "latency", "100ms"], check=True)

            def pull_time(expect):
                started = time.perf_counter()
                job = call(url_c + "/v1/p2p/pull", "POST", {"id": "bench"})
                while job["status"] in ("queued", "running"):
                    time.sleep(0.02)
                    job = call(url_c + "/v1/models/download/" + job["job"])
                took = time.perf_counter() - started
                if job["status"] != "done" or job["source"].split(" ")[0] != expect:
                    sys.exit("p2p_vs_curl: pull failed or came from elsewhere: %s" % job)
                call(url_c + "/v1/models/bench", "DELETE")
                return took
            one = [pull_time("peer:a") for _ in range(args.rounds)]
            offgrid.ModelStore(os.path.join(home_b, "models")).install([src], "bench", "bench",
                                                                     expected_sha256=sha)
            deadline = time.time() + 30
            while sum(any(m["sha256"] == sha for m in p["models"])
                      for p in call(url_c + "/v1/p2p/peers")["data"]) < 2:
                if time.time() > deadline:
                    sys.exit("p2p_vs_curl: C did not see B's copy")
                time.sleep(0.2)
            two = [pull_time("peers:a,b") for _ in range(args.rounds)]
            swarm = [("A alone", one), ("A and B at once", two)]
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        net.close()
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    print("file: %.0f MB GGUF of random data, node A to node C over a veth bridge, %d rounds, interleaved"
          % (mb, args.rounds))
    print("%-8s %14s %15s %22s %8s" % ("ROUND", "OFFGRID MB/s", "CURL BLOB MB/s", "CURL HTTP.SERVER MB/s", "RATIO"))
    for i, t in enumerate(rows, 1):
        print("%-8s %14.0f %15.0f %22.0f %8.2f" % (i, mb / t["offgrid"], mb / t["curl blob"],
                                                   mb / t["curl http.server"], t["curl blob"] / t["offgrid"]))
    med = {k: statistics.median(t[k] for t in rows) for k in rows[0]}
    print("%-8s %14.0f %15.0f %22.0f %8.2f" % ("median", mb / med["offgrid"], mb / med["curl blob"],
                                               mb / med["curl http.server"], med["curl blob"] / med["offgrid"]))
    if swarm:
        print()
        print("each peer's uplink capped at %d Mbit/s (%.1f MB/s), %d rounds each" % (
            args.uplink_mbit, args.uplink_mbit / 8.0, args.rounds))
        print("%-18s %18s %12s" % ("PEERS", "OFFGRID MB/s", "VS ONE"))
        base = statistics.median(swarm[0][1])
        for label, times in swarm:
            med_t = statistics.median(times)
            print("%-18s %18s %12.2f" % (label, "%.1f (%.1f-%.1f)" % (mb / med_t, mb / max(times), mb / min(times)),
                                         base / med_t))


if __name__ == "__main__":
    main()
