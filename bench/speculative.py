#!/usr/bin/env python3
"""Speculative decoding: offgrid with and without drafting (prompt lookup,
and a draft model when one is given), and llama-server without and with its
n-gram modes (and its draft model mode), on the same prompts in the same run.

    python bench/speculative.py                   # Gemma 3 270M, 3 rounds
    python bench/speculative.py --model SmolLM2.gguf --rounds 5 --tokens 192
    python bench/speculative.py --model SmolLM2-F16.gguf --draft-model SmolLM2-Q4_1.gguf

Prompts of two classes, streamed greedy from /v1/completions, different in
each round (so that no server drafts from an earlier round's reply):
  echo      the reply repeats the prompt: copy a document, edit a code file,
            answer with quotes
  ordinary  counting, free text
offgrid runs once; each request sets `speculative` true or false, in a
shuffled order per round. With --draft-model, the same server also holds the
model a second time under another id whose manifest names the draft model
(`draft_model`), asked with `speculative` true: column "lookup+draft" (prompt
lookup first, the draft model where lookup has nothing worth verifying).
llama-server (built from the llama.cpp vendored in the llama-cpp-python
sdist by bench/llama_server.py, which this script never builds) runs once
per mode: plain, --spec-type ngram-simple, ngram-mod, and with --draft-model
also -md DRAFT (its defaults: --spec-draft-n-max 3, p-min 0). When it is
not built, its rows are left out with a line saying so.

The figure is decode speed: completion tokens after the first over the time
from the first streamed token to the last (prompt evaluation is the same
with or without drafting). The table gives the median over rounds and the
ratio of each mode to the same server without drafting, per prompt and per
class (geometric mean), plus the load average seen during the run.
"""

import argparse
import http.client
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import offgrid  # noqa: E402

THREADS = 2
CTX = 4096

DOCUMENT = (
    "The river rises in the hills above the town and runs for forty miles to the sea. In spring the snow "
    "melts and the water climbs the stone walls of the old mill, which has stood on the east bank since 1790. "
    "Farmers along its banks plant barley and beans, and in summer the children fish from the iron bridge "
    "that the railway company built in 1885. The mill ground flour until 1952; today it holds a small museum "
    "of farm tools, open on Saturdays from ten to four, and a cafe that sells bread baked from the valley's "
    "own wheat.")
CODE = '''def parse_line(line):
    """Split one CSV line into fields, honouring quotes."""
    fields, field, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            fields.append(field)
            field = ""
        else:
            field += ch
    fields.append(field)
    return fields


def read_rows(path):
    with open(path) as f:
        return [parse_line(line.rstrip("\\n")) for line in f]
'''

NEW_NAMES = ("split_fields", "tokenize_line", "read_fields", "fields_of", "cut_line")
TOPICS = ("mill", "bridge", "museum", "river", "farmers")
STORIES = ("a lighthouse keeper who finds a message in a bottle", "a baker who loses her oven",
           "two brothers crossing a frozen lake", "a clockmaker's last clock", "a dog that walks to school")


def prompts(round_no):
    """(class, name, prompt) of one round. Every round's prompts differ
    (another sentence order, name, question, start number, story), so that
    no server drafts a reply from its memory of an earlier round's."""
    sentences = DOCUMENT.split(". ")
    k = round_no % len(sentences)
    document = ". ".join(sentences[k:] + sentences[:k]).rstrip(".") + "."
    i = round_no % len(NEW_NAMES)
    start = 1 + 100 * round_no
    return [
        ("echo", "copy", "Here is a paragraph.\n\n" + document + "\n\nThe same paragraph, copied word for "
                         "word:\n\n"),
        ("echo", "edit", "Original file:\n\n```python\n" + CODE + "```\n\nThe same file with parse_line "
                         "renamed to %s everywhere, otherwise unchanged:\n\n```python\n" % NEW_NAMES[i]),
        ("echo", "quote", document + "\n\nQuestion: What does the text say about the %s? Answer with exact "
                          "quotes from the text.\n\nAnswer: The text says \"" % TOPICS[i]),
        ("ordinary", "count", ", ".join(str(n) for n in range(start, start + 20)) + ","),
        ("ordinary", "story", "Write a short story about %s.\n\nStory:" % STORIES[round_no % len(STORIES)]),
    ]


PROMPTS = prompts(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotReady(Exception):
    pass


class Target:
    """A server started as a subprocess, ready when GET /health answers 200
    and `ready` says yes to its JSON body; raises NotReady with its log."""

    def __init__(self, name, cmd, port, ready=lambda body: True, env=None):
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise NotReady("%s exited:\n%s" % (name, self.output()))
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                r = conn.getresponse()
                body = r.read()
                if r.status == 200 and ready(json.loads(body)):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise NotReady("%s did not become ready in 300 s:\n%s" % (name, self.output()))

    def output(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def decode_speed(port, prompt, tokens, extra):
    """Stream one greedy completion; (tokens/s after the first token, tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = dict({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                 "stream_options": {"include_usage": True}}, **extra)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        sys.exit("server answered %d: %s" % (r.status, r.read()[:500]))
    times, chunks, usage = [], 0, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
        if event.get("choices") and event["choices"][0].get("text"):
            times.append(time.monotonic())
            chunks += 1
    conn.close()
    n = usage or chunks
    if len(times) < 2 or times[-1] == times[0]:
        return None, n
    return (n - 1) / (times[-1] - times[0]), n


def llama_server_path():
    """llama-server's path when bench/llama_server.py has built it, else (None, why)."""
    try:
        import llama_server
    except ImportError:
        return None, "bench/llama_server.py is not in this checkout"
    path = llama_server.binary("llama-server", build_missing=False)
    if path is None:
        return None, "llama-server is not built; run python bench/llama_server.py once (minutes), then again"
    return path, None


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160, help="max_tokens of each completion")
    parser.add_argument("--model", help="GGUF file (default: Gemma 3 270M from its package)")
    parser.add_argument("--draft-model", help="GGUF file of a draft model with the model's vocabulary: adds "
                                              "the lookup+draft column (and llama-server's -md)")
    parser.add_argument("--no-llama-server", action="store_true", help="offgrid only")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="offgrid-bench-")
    models = os.path.join(work, "models")
    store = offgrid.ModelStore(models)
    if args.model:
        os.makedirs(models)
        os.symlink(os.path.abspath(args.model), os.path.join(models, os.path.basename(args.model)))
    else:
        store.install_packaged(offgrid.GEMMA)
    manifest = store.models()[0]
    model_path = store.gguf_path(manifest)
    drafted_id = None
    if args.draft_model:
        # The model again under another id, whose manifest names the draft model.
        draft_file = "draft-" + os.path.basename(args.draft_model)
        os.symlink(os.path.abspath(args.draft_model), os.path.join(models, draft_file))
        os.symlink(os.path.realpath(model_path), os.path.join(models, "drafted-" + manifest["file"]))
        found = {m["file"]: m for m in store.models()}
        drafted = found["drafted-" + manifest["file"]]
        drafted_id = drafted["id"]
        drafted["draft_model"] = found[draft_file]["id"]
        offgrid.atomic_write(store.manifest_path(drafted_id), json.dumps(drafted, indent=2).encode())
    loads = [loadavg()]
    results = {}  # (target, mode, prompt name) -> [tokens/s]

    def record(target, mode, name, speed):
        if speed:
            results.setdefault((target, mode, name), []).append(speed)

    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env.update(OFFGRID_HOME=work, OFFGRID_LOG_REQUESTS="0", OFFGRID_PARALLEL="1", OFFGRID_CTX=str(CTX),
               OFFGRID_MODEL=manifest["id"], OFFGRID_KEEP_ALIVE="-1")
    # mode -> (model id, speculative)
    offgrid_modes = {"plain": (manifest["id"], False), "lookup": (manifest["id"], True)}
    if drafted_id:
        offgrid_modes["lookup+draft"] = (drafted_id, True)
    port = free_port()
    server = Target("offgrid", [sys.executable, os.path.join(ROOT, "offgrid.py"), "serve", "--port", str(port),
                                "--models-dir", models, "--threads", str(THREADS)], port,
                    lambda body: body.get("model"), env)
    try:
        for model_id, _ in set(offgrid_modes.values()):
            decode_speed(port, "Warm up.", 8, {"model": model_id})
        for round_no in range(args.rounds):
            runs = [(mode, p) for mode in offgrid_modes for p in prompts(round_no)]
            random.Random(round_no).shuffle(runs)
            for mode, (_, name, prompt) in runs:
                model_id, speculative = offgrid_modes[mode]
                speed, _ = decode_speed(port, prompt, args.tokens, {"model": model_id, "speculative": speculative})
                record("offgrid", mode, name, speed)
            loads.append(loadavg())
            print("offgrid round %d done" % (round_no + 1), file=sys.stderr)
    finally:
        server.stop()

    skipped = None
    binary = None
    if args.no_llama_server:
        skipped = "left out (--no-llama-server)"
    else:
        binary, skipped = llama_server_path()
    if binary:
        modes = [("plain", []), ("ngram-simple", ["--spec-type", "ngram-simple"]),
                 ("ngram-mod", ["--spec-type", "ngram-mod"])]
        if args.draft_model:
            modes.append(("draft", ["-md", os.path.abspath(args.draft_model), "-tbd", str(THREADS),
                                    "-td", str(THREADS)]))
        for mode, flags in modes:
            port = free_port()
            try:
                server = Target("llama-server " + mode, [binary, "-m", model_path, "--host", "127.0.0.1", "--port",
                                                         str(port), "-t", str(THREADS), "-tb", str(THREADS), "-c",
                                                         str(CTX), "-np", "1", "-fa", "on"] + flags, port)
            except NotReady as e:
                print("llama-server %s left out: %s" % (mode, e), file=sys.stderr)
                continue
            try:
                for round_no in range(args.rounds):
                    runs = prompts(round_no)
                    random.Random(round_no).shuffle(runs)
                    for _, name, prompt in runs:
                        speed, _ = decode_speed(port, prompt, args.tokens, {})
                        record("llama-server", mode, name, speed)
                    loads.append(loadavg())
            finally:
                server.stop()
            print("llama-server %s done" % mode, file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)

    columns = [("offgrid", mode) for mode in offgrid_modes]
    if binary:
        columns += [("llama-server", "plain"), ("llama-server", "ngram-simple"), ("llama-server", "ngram-mod")]
        if args.draft_model:
            columns.append(("llama-server", "draft"))

    def median(target, mode, name):
        values = results.get((target, mode, name))
        return statistics.median(values) if values else None

    print("model %s%s, %d threads, %d rounds, max_tokens %d, greedy, one stream" % (
        manifest["id"], ", draft model %s" % os.path.basename(args.draft_model) if args.draft_model else "",
        THREADS, args.rounds, args.tokens))
    print("decode tokens/s (median of rounds); x = ratio to the same server without drafting\n")
    head = "| class | prompt | " + " | ".join("%s %s" % c for c in columns) + " |"
    print(head)
    print("|" + "---|" * (2 + len(columns)))
    ratios = {}  # (target, mode, class) -> [ratio per prompt]
    for cls, name, _ in PROMPTS:
        cells = []
        for target, mode in columns:
            value = median(target, mode, name)
            base = median(target, "plain", name)
            if value is None:
                cells.append("-")
            elif mode == "plain":
                cells.append("%.1f" % value)
            else:
                ratio = value / base if base else None
                ratios.setdefault((target, mode, cls), []).append(ratio)
                cells.append("%.1f (%.2fx)" % (value, ratio) if ratio else "%.1f" % value)
        print("| %s | %s | %s |" % (cls, name, " | ".join(cells)))
    print()
    for cls in ("echo", "ordinary"):
        parts = []
        for target, mode in columns:
            if mode == "plain":
                continue
            g = geomean(ratios.get((target, mode, cls), []))
            parts.append("%s %s %s" % (target, mode, "%.2fx" % g if g else "-"))
        print("%s prompts, geometric mean of ratios: %s" % (cls, ", ".join(parts)))
    if binary:
        for cls in ("echo", "ordinary"):
            names = [n for c, n, _ in PROMPTS if c == cls]
            mine = "lookup+draft" if args.draft_model else "lookup"
            ours = geomean([median("offgrid", mine, n) for n in names])
            best = max((geomean([median("llama-server", m, n) for n in names]) or 0, m)
                       for m in ("plain", "ngram-simple", "ngram-mod", "draft"))
            if ours and best[0]:
                print("%s prompts: offgrid %s / llama-server's best mode (%s) = %.2f" % (
                    cls, mine, best[1], ours / best[0]))
    else:
        print("llama-server: %s" % skipped)
    seen = [l for l in loads if l]
    if seen:
        print("load average (1 min) during the run: %.2f to %.2f on %d CPUs" % (
            min(l[0] for l in seen), max(l[0] for l in seen), os.cpu_count() or 0))


if __name__ == "__main__":
    main()
