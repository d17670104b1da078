"""Benchmark: what the generation core costs, and what logprobs and n cost.

Three questions, on the starter model (Gemma 3 270M Q4_K_M), in this
process (no HTTP), greedy, the same prompt shape every time:

1. Is decoding as fast as before the core? The engine of an earlier
   offgrid.py (`--before`, a git revision, default main) and this one, each
   with the model loaded, take turns on the same requests; the ratio
   now / before is taken within each round.
2. What do logprobs cost? The same request with logprobs off, on, and on
   with top_logprobs 5 (each token then reads the vocabulary's logits).
3. What does n=4 cost against 4 separate requests? One request with n=4,
   4 requests at once (threads), and 4 one after another; wall time and
   tokens per second over all four replies.

Decode tok/s is (completion tokens - 1) / decode seconds, as the engine
measures them; every request generates exactly --tokens tokens (ignore_eos)
and gets a prompt of its own ("Run N.") so no prompt cache is reused.

Run from the repository root (a minute or two on a quiet machine):

    .venv/bin/python bench/core_cost.py
    .venv/bin/python bench/core_cost.py --rounds 5 --tokens 128 --before main --json
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402

PROMPT = offgrid.BENCH_PROMPT * 3


def load_before(revision, folder):
    """offgrid.py as it was at `revision`, imported under another name."""
    path = os.path.join(folder, "offgrid_before.py")
    with open(path, "wb") as f:
        f.write(subprocess.check_output(["git", "-C", ROOT, "show", "%s:offgrid.py" % revision]))
    spec = importlib.util.spec_from_file_location("offgrid_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tok_s(info):
    return (info["completion_tokens"] - 1) / info["decode_s"] if info.get("decode_s") else None


class Bench:
    def __init__(self, args, home):
        os.environ["OFFGRID_HOME"] = home
        overrides = {"threads": args.threads} if args.threads else {}
        self.config = offgrid.Config.load(overrides=overrides)
        self.store = offgrid.ModelStore(self.config.models_dir)
        if not self.store.models():
            self.store.install_starter()
        self.manifest = self.store.models()[0]
        self.engine = offgrid.Engine(self.config, self.store)
        self.engine.wait(offgrid.Job("load", self.manifest))
        self.tokens, self.count = args.tokens, 0

    def request(self, **kw):
        self.count += 1
        values = offgrid.read_params({"prompt": "Run %d. %s" % (self.count, PROMPT), "temperature": 0,
                                      "max_tokens": self.tokens}, "completion", self.config)
        request = offgrid._request("completion", values, ignore_eos=True, fresh=True, **kw)
        return offgrid.resolve_request(request, self.manifest, self.config)

    def run(self, **kw):
        return offgrid.run_generation(self.engine, self.manifest, self.request(**kw))

    def stop(self):
        self.engine.stop()
        self.engine.wait_stopped(10)


class Before:
    """The earlier engine, driven through its own API."""

    def __init__(self, module, bench):
        self.m, self.bench = module, bench
        self.engine = module.Engine(bench.config, bench.store)
        module.run_local(self.engine, module.Job("load", bench.manifest, {}))

    def run(self):
        self.bench.count += 1
        params = self.m.parse_generation({"prompt": "Run %d. %s" % (self.bench.count, PROMPT), "temperature": 0,
                                          "max_tokens": self.bench.tokens}, "completion", self.bench.config)
        params.update(ignore_eos=True, fresh=True)
        return self.m.run_local(self.engine, self.m.Job("completion", self.bench.manifest, params))

    def stop(self):
        self.engine.stop()
        self.engine.wait_stopped(10)


def four_at_once(bench):
    replies = [None] * 4

    def one(i):
        replies[i] = bench.run()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def timed(fn):
    started = time.monotonic()
    result = fn()
    return time.monotonic() - started, result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="inference threads (default: the config's)")
    parser.add_argument("--before", default="main", help="git revision of the offgrid.py to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="offgrid-bench-") as home:
        bench = Bench(args, home)
        before = Before(load_before(args.before, home), bench)
        rows = {k: [] for k in ("before", "now", "ratio", "logprobs", "top5", "n4_s", "four_at_once_s",
                                "four_in_turn_s", "n4_tok_s", "four_at_once_tok_s", "four_in_turn_tok_s")}
        try:
            before.run(), bench.run()  # warm-up
            for _ in range(args.rounds):
                old, new = tok_s(before.run()), tok_s(bench.run().info())
                rows["before"].append(old)
                rows["now"].append(new)
                rows["ratio"].append(new / old if old and new else None)
                rows["logprobs"].append(tok_s(bench.run(logprobs=True).info()))
                rows["top5"].append(tok_s(bench.run(logprobs=True, top_logprobs=5).info()))
                for key, fn in (("n4", lambda: [bench.run(n=4)]), ("four_at_once", lambda: four_at_once(bench)),
                                ("four_in_turn", lambda: [bench.run() for _ in range(4)])):
                    seconds, replies = timed(fn)
                    tokens = sum(r.usage()["completion_tokens"] for r in replies)
                    rows[key + "_s"].append(seconds)
                    rows[key + "_tok_s"].append(tokens / seconds)
        finally:
            before.stop()
            bench.stop()
    result = {"model": bench.manifest["id"], "tokens": args.tokens, "rounds": args.rounds, "before": args.before,
              "threads": bench.config["threads"] or offgrid.physical_cores(),
              "parallel": bench.engine.parallel, "median": {k: median(v) for k, v in rows.items()}, "runs": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["median"]
    print("model %s, %d tokens per reply, %d threads, parallel %d, %d rounds (medians)"
          % (result["model"], args.tokens, result["threads"], result["parallel"], args.rounds))
    print()
    print("%-40s %s" % ("decode", "tok/s"))
    print("%-40s %.1f" % ("before the core (%s)" % args.before, m["before"]))
    print("%-40s %.1f" % ("now, logprobs off", m["now"]))
    print("%-40s %.3f" % ("now / before, per round", m["ratio"]))
    print("%-40s %.1f" % ("now, logprobs on", m["logprobs"]))
    print("%-40s %.1f" % ("now, logprobs on, top_logprobs 5", m["top5"]))
    print()
    print("%-40s %-10s %s" % ("4 replies", "wall s", "tok/s over all"))
    for key, label in (("n4", "one request, n=4"), ("four_at_once", "4 requests at once"),
                       ("four_in_turn", "4 requests one after another")):
        print("%-40s %-10.2f %.1f" % (label, m[key + "_s"], m[key + "_tok_s"]))


if __name__ == "__main__":
    main()
