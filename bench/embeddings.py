#!/usr/bin/env python3
"""Embeddings: time and peak memory of /v1/embeddings, offgrid against an
earlier offgrid and (optionally) llama.cpp's llama-server, same model, same run.

    python bench/embeddings.py [--model GGUF] [--baseline-rev REV] [--llama-server BIN]

Cases: 1, 64 and 512 short inputs in one request, and one long input of
about 3,900 tokens (--long-words; --cases picks some). Every case runs on
a freshly started server, so the peak RSS (VmHWM) read after it is that
case's own. The baseline is
offgrid.py as it was at git revision REV (for instance the commit before a
change), run the same way.
llama-server is started with --embeddings, mean pooling and a batch large
enough for the long input, as its embeddings endpoint requires.
Prints one table.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402

SHORT = ["The sea is blue.", "Stock prices fell sharply on Monday.", "A recipe for bread needs flour.",
         "The train leaves at nine.", "Rain is expected tomorrow.", "She plays the violin."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url, proc, path):
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited with %s" % proc.returncode)
        try:
            with urllib.request.urlopen(url + path, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


def start(target, model, home):
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    if target["kind"] == "offgrid":
        models = os.path.join(home, "models")
        os.makedirs(models, exist_ok=True)
        link = os.path.join(models, os.path.basename(model))
        if not os.path.exists(link):
            os.symlink(model, link)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
        env["OFFGRID_HOME"] = home
        proc = subprocess.Popen([sys.executable, target["path"], "serve", "--port", str(port),
                                 "--models-dir", models], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(url, proc, "/health")
    else:
        proc = subprocess.Popen([target["path"], "-m", model, "--port", str(port), "--embeddings",
                                 "--pooling", "mean", "-c", "4096", "-b", "4096", "-ub", "4096", "-t", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(url, proc, "/health")
    return proc, url


def embed(url, model_id, texts):
    body = json.dumps({"model": model_id, "input": texts, "encoding_format": "float"}).encode()
    req = urllib.request.Request(url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=3600) as r:
        reply = json.loads(r.read())
    return time.monotonic() - started, reply["usage"]["prompt_tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the starter model, installed from its package)")
    parser.add_argument("--baseline-rev", help="git revision whose offgrid.py is the baseline")
    parser.add_argument("--llama-server", help="a llama-server binary to compare with")
    parser.add_argument("--long-words", type=int, default=1000,
                        help="words in the long input (default 1000: 3,890 tokens for the starter model, within "
                             "its 4,096-token context)")
    parser.add_argument("--cases", default="1 short,64 short,512 short,1 long",
                        help="which cases, comma-separated (default: all four)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="offgrid-bench-embed-")
    model = args.model
    if not model:
        manifest = offgrid.ModelStore(os.path.join(work, "store")).install_starter()
        if not manifest:
            raise SystemExit("give --model, or install the starter package")
        model = os.path.join(work, "store", manifest["file"])
    model_id = offgrid.model_id_from_filename(model)
    targets = [{"name": "offgrid", "kind": "offgrid", "path": os.path.join(ROOT, "offgrid.py")}]
    if args.baseline_rev:
        path = os.path.join(work, "baseline-offgrid.py")
        with open(path, "wb") as f:
            f.write(subprocess.check_output(["git", "-C", ROOT, "show", args.baseline_rev + ":offgrid.py"]))
        targets.append({"name": "offgrid@" + args.baseline_rev, "kind": "offgrid", "path": path})
    if args.llama_server:
        targets.append({"name": "llama-server", "kind": "llama-server", "path": args.llama_server})
    long_text = " ".join("item%d" % i for i in range(args.long_words))
    cases = [("1 short", SHORT[:1]), ("64 short", (SHORT * 11)[:64]), ("512 short", (SHORT * 86)[:512]),
             ("1 long", [long_text])]
    wanted = [c.strip() for c in args.cases.split(",")]
    cases = [c for c in cases if c[0] in wanted]
    rows = []
    for case, texts in cases:
        for target in targets:
            home = tempfile.mkdtemp(prefix="home-", dir=work)
            proc, url = start(target, model, home)
            try:
                embed(url, model_id, ["warm"])
                seconds, tokens = embed(url, model_id, texts)
                rows.append((case, target["name"], tokens, seconds, peak_mib(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(60)
            print("%-10s %-22s %6d tokens %8.2f s %8.0f MiB" % rows[-1], file=sys.stderr)
    print("model: %s, one fresh server per case; peak RSS is the server's VmHWM" % os.path.basename(model))
    print("%-10s %-22s %8s %10s %14s %10s" % ("CASE", "TARGET", "TOKENS", "SECONDS", "PEAK RSS MiB", "TIME RATIO"))
    for case, _texts in cases:
        mine = [r for r in rows if r[0] == case and r[1] == "offgrid"][0]
        for r in rows:
            if r[0] == case:
                print("%-10s %-22s %8d %10.2f %14.0f %10.2f" % (r[0], r[1], r[2], r[3], r[4], r[3] / mine[3]))


if __name__ == "__main__":
    main()
