#!/usr/bin/env python3
"""Peak memory each request shape adds to `offgrid serve`, against what the
server predicted for it (max_request_bytes).

    python bench/request_memory.py [--model GGUF] [--tokens 512] [--shapes NAME,NAME]

The shapes run in order on one server on the model (default: the starter
model, SmolLM2-135M-Instruct, installed from its package), or each on a new
one with --fresh, warmed with one short chat and one short embedding so
that both uses of the model are loaded. Memory an earlier shape freed may
stay with the process and serve a later one, so --fresh measures each shape
alone, at the price of a start per shape. Before each shape the process's
peak RSS is reset (writing 5 to /proc/PID/clear_refs),
the request is sent, and the growth is VmHWM after it less VmRSS before it.
The prediction is the `memory=` figure of the request's access-log line:
what the server held for it, from max_tokens (a reply that ends sooner
takes less: the table shows the tokens it took). Long replies are
completions of a count, which runs to max_tokens.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402

WORDS = ("the river carries small stones past the old mill while children count boats and the baker "
         "opens early for travellers who came over the hills before dawn").split()


def text(words):
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def shapes(model_id, tokens):
    """(name, path, body) for each request shape."""
    def chat(content, **kw):
        body = {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 16}
        body.update(kw)
        return body
    count = "Count from 1 to 10000, separated by commas."

    def complete(tokens, **kw):
        body = {"model": model_id, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": tokens}
        body.update(kw)
        return body
    return [
        ("short chat, 16 tokens", "/v1/chat/completions", chat("Say hello.")),
        ("long prompt, 3,000 words", "/v1/chat/completions", chat(text(3000) + "\nSummarise.")),
        ("4 MiB body (refused: longer than the context)", "/v1/chat/completions", chat(text(700000))),
        ("reply of %d tokens" % tokens, "/v1/completions", complete(tokens)),
        ("n=8 x %d tokens" % (tokens // 4), "/v1/completions", complete(tokens // 4, n=8)),
        ("logprobs, top 20 x %d tokens" % tokens, "/v1/chat/completions",
         chat(count, max_tokens=tokens, logprobs=True, top_logprobs=20)),
        ("n=4 x logprobs, top 20 x %d tokens" % (tokens // 4), "/v1/chat/completions",
         chat(count, max_tokens=tokens // 4, n=4, logprobs=True, top_logprobs=20)),
        ("embeddings, 512 short inputs", "/v1/embeddings",
         {"model": model_id, "input": [text(8 + i % 5) for i in range(512)]}),
        ("embeddings, 2,048 short inputs", "/v1/embeddings",
         {"model": model_id, "input": [text(8 + i % 5) for i in range(2048)]}),
        ("embeddings, one 40,000-word input, truncate", "/api/embed",
         {"model": model_id, "input": text(40000), "truncate": True}),
        ("schema grammar, maxItems 1,000 (the most a grammar nests)", "/v1/chat/completions",
         chat("List words.", response_format={"type": "json_schema", "json_schema": {"name": "words", "schema": {
             "type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 1000}}})),
        ("schema grammar, maxLength 1,000", "/v1/chat/completions",
         chat("Write.", response_format={"type": "json_schema", "json_schema": {"name": "long", "schema": {
             "type": "object", "properties": {"text": {"type": "string", "maxLength": 1000}},
             "required": ["text"]}}})),
    ]


def status_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def post(url, path, body):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=1800) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Server:
    def __init__(self, models, home, budget):
        os.makedirs(home, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        env.update(OFFGRID_HOME=home, OFFGRID_MAX_REQUEST_BYTES=str(budget))
        self.log = os.path.join(home, "serve.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "offgrid.py"), "serve", "--port", "0",
                                          "--models-dir", models], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            m = re.search(r"listening url=(http://[0-9.]+:\d+)", self.output())
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start:\n" + self.output())
            time.sleep(0.1)

    def output(self):
        with open(self.log) as f:
            return f.read()

    def predicted(self, path):
        """The memory= of the last access-log line for PATH."""
        lines = [x for x in self.output().splitlines() if " request method=" in x and "path=%s " % path in x]
        m = re.search(r"\bmemory=(\d+)", lines[-1]) if lines else None
        return int(m.group(1)) if m else 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the starter model, from its package)")
    parser.add_argument("--shapes", help="comma-separated leading words of the shapes to run (default: all)")
    parser.add_argument("--fresh", action="store_true",
                        help="a new server for every shape (default: one server, shapes in order)")
    parser.add_argument("--tokens", type=int, default=512, help="the longest reply's max_tokens (default 512)")
    parser.add_argument("--budget", type=int, default=16 << 30,
                        help="max_request_bytes for the servers, high enough that no shape is refused")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="offgrid-bench-reqmem-")
    try:
        models = os.path.join(work, "models")
        store = offgrid.ModelStore(models)
        if args.model:
            manifest = store.install([args.model], os.path.splitext(os.path.basename(args.model))[0], "file")
        else:
            if not offgrid.starter_files():
                raise SystemExit("no --model given and the starter package is not installed: " + offgrid.STARTER["pip"])
            manifest = store.install_starter()
        rows = []
        wanted = [w.strip() for w in args.shapes.split(",")] if args.shapes else None
        srv = None
        try:
            for name, path, body in shapes(manifest["id"], args.tokens):
                if wanted and not any(name.startswith(w) for w in wanted):
                    continue
                if srv is None or args.fresh:
                    if srv is not None:
                        srv.stop()
                    srv = Server(models, os.path.join(work, "home%d" % len(rows)), args.budget)
                    post(srv.url, "/v1/chat/completions", {"model": manifest["id"], "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "Hi."}]})
                    post(srv.url, "/v1/embeddings", {"model": manifest["id"], "input": "warm up"})
                with open("/proc/%d/clear_refs" % srv.proc.pid, "w") as f:
                    f.write("5")  # VmHWM starts again from VmRSS
                before = status_kib(srv.proc.pid, "VmRSS") * 1024
                started = time.monotonic()
                status, reply = post(srv.url, path, body)
                took = time.monotonic() - started
                peak = status_kib(srv.proc.pid, "VmHWM") * 1024
                time.sleep(0.2)  # the access-log line follows the reply
                predicted = srv.predicted(path)
                usage = reply.get("usage") or {}
                out = usage.get("completion_tokens", "")
                if status != 200:
                    out = "%d %s" % (status, (reply.get("error") or {}).get("code", ""))
                rows.append((name, out, took, peak - before, predicted))
                print("%-48s %-28s %7.1f s %9.1f MiB  predicted %9.1f MiB" % (
                    name, out, took, (peak - before) / 2 ** 20, predicted / 2 ** 20), file=sys.stderr)
        finally:
            if srv is not None:
                srv.stop()
        load = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("model %s, ctx %s; load average %.2f %.2f %.2f" % (manifest["id"], manifest.get("context_length"), *load))
    print("%-48s %-22s %8s %14s %16s %8s" % ("shape", "tokens out / status", "time s", "peak +MiB",
                                              "predicted MiB", "ratio"))
    for name, out, took, grew, predicted in rows:
        print("%-48s %-22s %8.1f %14.1f %16.1f %8s" % (
            name, out, took, grew / 2 ** 20, predicted / 2 ** 20,
            "%.2f" % (predicted / grew) if grew > 0 else "-"))


if __name__ == "__main__":
    main()
