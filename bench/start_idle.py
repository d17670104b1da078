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
  PYTHONDONTWRITEBYTECODE=1, compiles the whole file on every start;
- service unit: the ExecStart and Environment= lines of the unit that
  version's `offgrid install-service` writes, run as written (plus -S), its
  cache folder in a temporary one that its first start fills.

Import time is the median over --runs fresh interpreters of the time
around `import offgrid`, plus `-X importtime`'s self time of offgrid's
module body. Idle RSS is VmRSS of `serve` on an empty models folder, after
it answered one /health and one /v1/models; start ms is from starting the
process to its first /health answer. For the service unit, import ms is
`import offgrid` under the unit's environment (from source where the
unit runs offgrid.py as a script). With --rev, offgrid.py at
that git revision is measured beside the working tree's, interleaved.
"""

import argparse
import os
import shlex
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


def service_unit(folder, cache):
    """The command and environment of the unit FOLDER's offgrid.py writes,
    with its state and cache folders moved under CACHE."""
    unit = subprocess.check_output([sys.executable, "-S", os.path.join(folder, "offgrid.py"), "install-service",
                                    "--output", "-", "--python", sys.executable], text=True)
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    argv = [a.replace("$$", "$").replace("%%", "%") for a in shlex.split(line[len("ExecStart="):])]
    argv = [argv[0], "-S"] + argv[1:argv.index("serve")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFGRID_", "PYTHON"))}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            name, value = line[len("Environment="):].split("=", 1)
            env[name] = value.replace("/var/cache/offgrid", cache)
    return argv, env


def import_time(folder, cached, pycache, service=None):
    env = env_for(cached, pycache)
    if service:
        # A unit that runs offgrid.py as a script compiles it at every start,
        # with the standard library's bytecode read as usual.
        env = dict(service[1], **({} if "-c" in service[0] else {"PYTHONDONTWRITEBYTECODE": "1"}))
    wall = float(subprocess.run([sys.executable, "-S", "-c", IMPORT, folder], env=env, capture_output=True,
                                text=True, check=True).stdout)
    out = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c",
                          "import sys; sys.path.insert(0, sys.argv[1]); import offgrid", folder],
                         env=env, capture_output=True, text=True, check=True).stderr
    own = [line for line in out.splitlines() if line.rstrip().endswith("| offgrid")][-1]
    return wall, int(own.split("|")[0].split(":")[1]) / 1e6


def idle_rss(folder, cached, pycache, home, service=None):
    """Idle VmRSS in MiB and seconds from start to the first /health."""
    port = free_port()
    args = ["serve", "--port", str(port), "--models-dir", os.path.join(home, "models")]
    if service:
        cmd, env = service[0] + args, dict(service[1])
    else:
        env = env_for(cached, pycache)
        cmd = ([sys.executable, "-S", "-c", SERVE_MODULE, folder] + args if cached
               else [sys.executable, "-S", os.path.join(folder, "offgrid.py")] + args)
    env["OFFGRID_HOME"] = home
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                for path in ("/health", "/v1/models"):
                    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
                        r.read()
                    if path == "/health":
                        start = time.perf_counter() - started
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("serve did not answer")
                time.sleep(0.05)
        with open("/proc/%d/status" % proc.pid) as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), start
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
            service = service_unit(folder, os.path.join(work, "cache-" + str(len(results))))
            # The service's first start, which fills its cache folder.
            first = idle_rss(folder, True, pycache, tempfile.mkdtemp(dir=work), service)
            results[name] = {"pycache": pycache, "folder": folder, "service": service, "first": first}
        rows = {}
        for i in range(args.runs):
            for name, v in results.items():
                for start in ("cached bytecode", "from source", "service unit"):
                    cached, service = start != "from source", v["service"] if start == "service unit" else None
                    wall, own = import_time(v["folder"], cached, v["pycache"], service)
                    row = rows.setdefault((name, start), {"wall": [], "own": [], "rss": [], "start": []})
                    row["wall"].append(wall)
                    row["own"].append(own)
                    if i < 3:
                        home = tempfile.mkdtemp(dir=work)
                        rss, started = idle_rss(v["folder"], cached, v["pycache"], home, service)
                        row["rss"].append(rss)
                        row["start"].append(started)
        load = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("python %s, -S (no site-packages), %d runs; load average %.2f %.2f %.2f" % (
        sys.version.split()[0], args.runs, *load))
    print("%-14s %-16s %16s %15s %13s %13s" % (
        "offgrid.py", "start", "import ms (med)", "module body ms", "start ms", "idle RSS MiB"))
    for (name, start), r in rows.items():
        print("%-14s %-16s %16.1f %15.1f %13.0f %13.1f" % (
            name, start, 1000 * statistics.median(r["wall"]), 1000 * statistics.median(r["own"]),
            1000 * statistics.median(r["start"]), statistics.median(r["rss"])))
    for name, v in results.items():
        print("%s: the service unit's first start (compiling into its cache folder): %.0f ms to /health, "
              "%.1f MiB idle" % (name, 1000 * v["first"][1], v["first"][0]))
    for name, v in results.items():
        print("%s: %s" % (name, " ".join(shlex.quote(a) for a in v["service"][0])))


if __name__ == "__main__":
    main()
