#!/usr/bin/env python3
"""Embeddings: time and peak memory of /v1/embeddings, offgrid against an
earlier offgrid and (optionally) llama.cpp's llama-server, same model, same run.

    python bench/embeddings.py [--model GGUF] [--baseline-rev REV] [--llama-server BIN]

Cases: 1, 64 and 512 short inputs in one request, and one long input of
close to 4,096 tokens (--long-words; --cases picks some). Every case runs
on a freshly started server. offgrid loads its default model for
generation when it starts; that model is unloaded first, so that both
servers hold the embedding model alone. The peak RSS (VmHWM) is reset
then (/proc/PID/clear_refs), so it is that case's own: idle is the RSS
after one one-word request, peak the highest RSS after it through the case.
For the short cases the vectors are compared with those of each distinct
text sent alone to the same server: the lowest cosine is printed.
The baseline is offgrid.py as it was at git revision REV (for instance the
commit before a change), run the same way.
llama-server is started with --embeddings, mean pooling and a batch large
enough for the long input, as its embeddings endpoint requires.
Prints one table and the load average before and after.
"""


import argparse
import json
import math
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


def status_mib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid):
    """Start VmHWM again from the RSS now (Linux 4.0 and later)."""
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("5")


def call(url, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def unload_all(url):
    """offgrid loads its default model for generation as it starts: wait
    for that load, then unload it, so the server holds nothing."""
    deadline = time.time() + 120
    while time.time() < deadline and not call(url, "/api/ps")["models"]:
        time.sleep(0.2)
    for m in call(url, "/api/ps")["models"]:
        call(url, "/api/generate", {"model": m["model"], "keep_alive": 0})
    if call(url, "/api/ps")["models"]:
        raise SystemExit("offgrid kept a model loaded after keep_alive 0")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


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
    body = {"model": model_id, "input": texts, "encoding_format": "float"}
    started = time.monotonic()
    reply = call(url, "/v1/embeddings", body)
    vectors = [d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])]
    return time.monotonic() - started, reply["usage"]["prompt_tokens"], vectors


def run_case(target, model, model_id, home, texts):
    """(tokens, seconds, idle MiB, peak MiB, lowest cosine against one at a
    time or None) of one case on a fresh server."""
    proc, url = start(target, model, home)
    try:
        if target["kind"] == "offgrid":
            unload_all(url)
        reset_peak(proc.pid)
        embed(url, model_id, ["warm"])
        idle = status_mib(proc.pid, "VmRSS")
        seconds, tokens, vectors = embed(url, model_id, texts)
        peak = status_mib(proc.pid, "VmHWM")
        agree = None
        if len(texts) > 1:
            alone = {t: embed(url, model_id, [t])[2][0] for t in set(texts)}
            agree = min(cosine(v, alone[t]) for t, v in zip(texts, vectors))
    finally:
        proc.terminate()
        proc.wait(60)
    return tokens, seconds, idle, peak, agree


def load_average():
    return "%.2f %.2f %.2f" % os.getloadavg()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the starter model, installed from its package)")
    parser.add_argument("--baseline-rev", help="git revision whose offgrid.py is the baseline")
    parser.add_argument("--llama-server", help="a llama-server binary to compare with")
    parser.add_argument("--long-words", type=int, default=1041,
                        help="words in the long input (default 1041: 4,095 tokens for the starter model, within "
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
    print("load average before: %s" % load_average(), file=sys.stderr)
    started = load_average()
    rows = []
    for case, texts in cases:
        for target in targets:
            home = tempfile.mkdtemp(prefix="home-", dir=work)
            rows.append((case, target["name"]) + run_case(target, model, model_id, home, texts))
            agree = " min cosine %.6f" % rows[-1][6] if rows[-1][6] is not None else ""
            print("%-10s %-22s %6d tokens %8.2f s idle %5.0f MiB peak %5.0f MiB%s" % (rows[-1][:6] + (agree,)),
                  file=sys.stderr)
    print("model: %s, one fresh server per case holding that model alone; idle is the RSS after a "
          "one-word request, peak the VmHWM from then through the case" % os.path.basename(model))
    print("load average (1, 5, 15 min) before: %s, after: %s" % (started, load_average()))
    print("%-10s %-22s %8s %10s %10s %10s %10s %12s" % ("CASE", "TARGET", "TOKENS", "SECONDS", "IDLE MiB",
                                                        "PEAK MiB", "TIME RATIO", "MIN COSINE"))
    for case, _texts in cases:
        mine = [r for r in rows if r[0] == case and r[1] == "offgrid"][0]
        for r in rows:
            if r[0] == case:
                agree = "%.6f" % r[6] if r[6] is not None else "-"
                print("%-10s %-22s %8d %10.2f %10.0f %10.0f %10.2f %12s"
                      % (r[0], r[1], r[2], r[3], r[4], r[5], r[3] / mine[3], agree))


if __name__ == "__main__":
    main()
