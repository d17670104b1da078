#!/usr/bin/env python3
"""How long `import offgrid` takes and how much memory an idle `offgrid
serve` holds, without the inference runtime.

    python bench/start_idle.py [--runs 10] [--rev REV]

Everything runs under `python -S` (no site-packages: no llama-cpp-python,
no psutil), so the figures are offgrid's and the standard library's own.
Two ways of starting are measured, because they differ by a lot:

- from cached bytecode: `import offgrid` / the `offgrid` command installed
  by pip, with its .pyc written once (into a private PYTHONPYCACHEPREFIX);
- from source: `python offgrid.py ...`, or any run with
  PYTHONDONTWRITEBYTECODE=1, compiles the whole file on every start.

Import time is the median over --runs fresh interpreters of the time
around `import offgrid`, plus `-X importtime`'s self time of offgrid's
module body. Idle RSS is VmRSS of `serve` on an empty models folder, after
it answered one /health and one /v1/models. With --rev, offgrid.py at that
git revision is measured beside the working tree's, interleaved.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT = ("import sys, time; sys.path.insert(0, sys.argv[1]); t = time.perf_counter(); import offgrid; "
          "print(time.perf_counter() - t)")
SERVE_MODULE = ("import sys; sys.path.insert(0, sys.argv[1]); import offgrid; "
                "sys.exit(offgrid.main(sys.argv[2:]))")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(cached, pycache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFGRID_", "PYTHON"))}
    # From source: a cache folder that stays empty, so no .pyc is read either.
    env["PYTHONPYCACHEPREFIX"] = pycache if cached else pycache + "-empty"
    if not cached:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def import_time(folder, cached, pycache):
    env = env_for(cached, pycache)
    wall = float(subprocess.run([sys.executable, "-S", "-c", IMPORT, folder], env=env, capture_output=True,
                                text=True, check=True).stdout)
    out = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c",
                          "import sys; sys.path.insert(0, sys.argv[1]); import offgrid", folder],
                         env=env, capture_output=True, text=True, check=True).stderr
    own = [line for line in out.splitlines() if line.rstrip().endswith("| offgrid")][-1]
    return wall, int(own.split("|")[0].split(":")[1]) / 1e6


def idle_rss(folder, cached, pycache, home):
    port = free_port()
    args = ["serve", "--port", str(port), "--models-dir", os.path.join(home, "models")]
    env = env_for(cached, pycache)
    env["OFFGRID_HOME"] = home
    cmd = ([sys.executable, "-S", "-c", SERVE_MODULE, folder] + args if cached
           else [sys.executable, "-S", os.path.join(folder, "offgrid.py")] + args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                for path in ("/health", "/v1/models"):
                    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
                        r.read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("serve did not answer")
                time.sleep(0.05)
        with open("/proc/%d/status" % proc.pid) as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    finally:
        proc.terminate()
        proc.wait(20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rev", help="also measure offgrid.py at this git revision")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="offgrid-bench-start-")
    try:
        versions = [("working tree", ROOT)]
        if args.rev:
            folder = os.path.join(work, "rev")
            os.makedirs(folder)
            with open(os.path.join(folder, "offgrid.py"), "wb") as f:
                f.write(subprocess.check_output(["git", "-C", ROOT, "show", args.rev + ":offgrid.py"]))
            versions.append((args.rev, folder))
        results = {}
        for name, folder in versions:
            pycache = os.path.join(work, "pycache-" + str(len(results)))
            subprocess.run([sys.executable, "-S", "-c", IMPORT, folder], env=env_for(True, pycache), check=True,
                           stdout=subprocess.DEVNULL)  # writes the .pyc
            results[name] = {"pycache": pycache, "folder": folder}
        rows = {}
        for i in range(args.runs):
            for name, v in results.items():
                for cached in (True, False):
                    wall, own = import_time(v["folder"], cached, v["pycache"])
                    rows.setdefault((name, cached), {"wall": [], "own": [], "rss": []})
                    rows[(name, cached)]["wall"].append(wall)
                    rows[(name, cached)]["own"].append(own)
                    if i < 3:
                        home = tempfile.mkdtemp(dir=work)
                        rows[(name, cached)]["rss"].append(idle_rss(v["folder"], cached, v["pycache"], home))
        load = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("python %s, -S (no site-packages), %d runs; load average %.2f %.2f %.2f" % (
        sys.version.split()[0], args.runs, *load))
    print("%-14s %-22s %16s %18s %15s" % ("offgrid.py", "start", "import ms (med)", "module body ms", "idle RSS MiB"))
    for (name, cached), r in rows.items():
        print("%-14s %-22s %16.1f %18.1f %15.1f" % (
            name, "cached bytecode" if cached else "from source", 1000 * statistics.median(r["wall"]),
            1000 * statistics.median(r["own"]), statistics.median(r["rss"])))


if __name__ == "__main__":
    main()
