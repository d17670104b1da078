"""A stick that brings everything: `runtime add` gathers llama-cpp-python
and its packages for a target (and the native offgrid build/binary.sh
cached, or the whole runtime from a LAN peer by sha256), `export --runtime`
puts them on the stick with their sha256, and on the next machine, with no
network and no llama-cpp-python, `import`, `install-runtime` and `serve`
give the golden answer.

- x86_64: the next machine is the system's bare Python (/usr/bin/python3,
  no numpy, no llama-cpp-python) in a network namespace with only loopback;
  with the native program, a Python the stick carries no wheels for.
- aarch64: the arm64 Debian root of the Pi image (appliance/build-image.sh
  --rootfs-only, the cache tests/test_appliance.py uses) under qemu-user,
  chrooted in a network namespace with only loopback: 1.5 minutes here.

The llama-cpp-python wheels are the ones build/wheels.sh cached, the native
program the one build/binary.sh cached (tests/test_appliance.py and
tests/test_build.py, run before this file, build them in CI); the other
packages come from the package index. Without them this skips, saying
which command makes them; in CI it fails instead."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

import golden_model
import offgrid
from conftest import IN_CI, ROOT, cached_build, need_arm64_emulation, need_root_and, run_cli, unpacked_root

BARE_PYTHON = "/usr/bin/python3"


def bare_python_version():
    """X.Y of the system Python that stands for the next machine; skips (or,
    in CI, fails) when there is none fit for it."""
    why = None
    if not os.path.exists(BARE_PYTHON):
        why = "no %s" % BARE_PYTHON
    elif subprocess.run([BARE_PYTHON, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        why = "%s has llama-cpp-python installed" % BARE_PYTHON
    elif os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        why = "needs root, unshare and ip for a network namespace"
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    return subprocess.run([BARE_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def golden_gguf(tmp_path_factory):
    return golden_model.write_model(str(tmp_path_factory.mktemp("golden") / golden_model.MODEL_FILE))


def add_wheels(home, target):
    """`runtime add TARGET` with the build cache's llama-cpp-python wheel
    and no native program (that one has a test of its own)."""
    wheel = offgrid.cached_llama_wheel(target.split("-")[0])
    return run_cli(["runtime", "add", target, "--wheel", wheel], home,
                   env={"OFFGRID_BUILD_CACHE": os.path.join(str(home), "no-cache")})


@pytest.fixture(scope="module")
def exporter(tmp_path_factory, golden_gguf):
    """A home holding the golden model and the x86_64 runtime for the bare
    Python's version, gathered with `offgrid runtime add`."""
    if offgrid.machine_arch() != "x86_64":
        pytest.skip("the x86_64 stick test runs on x86_64")
    if not offgrid.cached_llama_wheel("x86_64"):
        if IN_CI:
            pytest.fail("no x86_64 llama-cpp-python wheel in the build cache (build/wheels.sh x86_64)")
        pytest.skip("no x86_64 llama-cpp-python wheel in the build cache: build/wheels.sh x86_64")
    python = bare_python_version()
    home = tmp_path_factory.mktemp("exporter")
    os.makedirs(str(home / "models"))
    shutil.copyfile(golden_gguf, str(home / "models" / golden_model.MODEL_FILE))
    p = add_wheels(home, "x86_64-py" + python)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("x86_64: 7 files, ") and ("Python %s," % python) in p.stdout, p.stdout
    return home, python


def export(home, dest, *extra):
    os.makedirs(str(dest), exist_ok=True)
    p = run_cli(["export", "--all", str(dest)] + list(extra), home)
    assert p.returncode == 0, p.stderr
    return os.path.join(str(dest), "offgrid")


def in_empty_netns(script, home, root=None, timeout=600):
    """Run a shell script as the next machine: a network namespace with only
    loopback, the bare Python, OFFGRID_HOME=home, PATH of the system only.
    With `root`, inside that root file system (chroot, its own /proc), where
    host paths under it name the same files (see the arm64_rootfs fixture)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OFFGRID_HOME": str(home), "LANG": "C.UTF-8",
           "PY": BARE_PYTHON if root is None else "python3", "HOME": str(home)}
    cmd = ["unshare", "--net", "sh", "-ec", "ip link set lo up\n" + script]
    if root is not None:
        cmd = ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-ec",
               'mount -t proc proc "$0/proc"\nexec chroot "$0" sh -ec "ip link set lo up\n$1"', root, script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


STICK_STEPS = """
cd {stick}
! $PY -c 'import llama_cpp' 2>/dev/null
! $PY -c 'import urllib.request; urllib.request.urlopen("https://pypi.org", timeout=5)' 2>/dev/null
$PY offgrid.py import .
$PY offgrid.py serve --port 0 > {home}/before.log 2>&1 &
server=$!
while ! grep -q "offgrid listening" {home}/before.log && kill -0 $server 2>/dev/null; do sleep 0.2; done
kill $server || true
wait $server || true
$PY offgrid.py install-runtime .
{serve} serve --port 0 > {home}/serve.log 2>&1 &
server=$!
url=
while [ -z "$url" ] && kill -0 $server 2>/dev/null; do
    sleep 0.2
    url=$(sed -n 's/.*offgrid listening url=\\(http[^ ]*\\).*/\\1/p' {home}/serve.log)
done
$PY {client} "$url" > {home}/answer.json
kill $server
wait $server
"""


def run_stick_steps(stick, next_home, tmp_path, root=None, serve="$PY offgrid.py"):
    """The stick's steps on the next machine: no llama-cpp-python, no
    network; `import`, a `serve` that names install-runtime, `install-runtime`,
    then `serve` (run as `serve`) asked the golden request. Returns the
    CompletedProcess and the reply's content."""
    client = ("import json, sys, urllib.request\n"
              "req = urllib.request.Request(sys.argv[1] + '/v1/chat/completions', data=json.dumps(%r).encode(),"
              " headers={'Content-Type': 'application/json'})\n"
              "print(json.dumps(json.load(urllib.request.urlopen(req, timeout=900))))\n" % golden_model.REQUEST)
    (tmp_path / "client.py").write_text(client)
    os.makedirs(str(next_home))
    script = STICK_STEPS.format(stick=stick, home=next_home, client=tmp_path / "client.py", serve=serve)
    p = in_empty_netns(script, next_home, root=root, timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr + "\n" + "".join(
        open(str(next_home / n)).read() for n in ("before.log", "serve.log") if (next_home / n).exists())
    assert "1 imported, 0 skipped, 0 failed" in p.stdout
    before = (next_home / "before.log").read_text()
    hint = [line for line in before.splitlines() if "install-runtime" in line]
    seen = stick if root is None else "/" + os.path.relpath(stick, root)  # the stick's path in the root
    assert len(hint) == 1 and "this stick carries it for this machine: run  python3 %s install-runtime %s" % (
        os.path.join(seen, "offgrid.py"), seen) in hint[0], before
    return p, json.loads((next_home / "answer.json").read_text())["choices"][0]["message"]["content"]


def test_stick_with_runtime_serves_the_golden_answer_with_no_network(exporter, golden_gguf, tmp_path):
    home, python = exporter
    golden = golden_model.golden_text(golden_gguf)
    stick = export(home, tmp_path / "usb", "--runtime", "x86_64-py" + python)
    manifest = json.load(open(os.path.join(stick, "manifest.json")))
    [runtime] = manifest["runtimes"]
    assert runtime["target"] == "x86_64" and len(runtime["files"]) == 7
    sums = open(os.path.join(stick, "SHA256SUMS")).read()
    for f in runtime["files"]:
        assert f["name"].startswith("runtime/x86_64/")
        assert "%s  %s\n" % (f["sha256"], f["name"]) in sums
        assert offgrid.sha256_file(os.path.join(stick, f["name"])) == f["sha256"]
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=stick).returncode == 0
    readme = open(os.path.join(stick, "README.txt")).read()
    assert "install-runtime" in readme and "x86_64 (Python %s)" % python in readme and "Windows" in readme

    next_home = tmp_path / "next"
    p, answer = run_stick_steps(stick, next_home, tmp_path)
    assert "Installed llama-cpp-python 0.3.36 for x86_64, Python %s (7 files" % python in p.stdout
    assert answer == golden
    assert os.path.isdir(str(next_home / "venv" / "lib" / ("python" + python) / "site-packages" / "llama_cpp"))


@pytest.fixture(scope="module")
def arm64_rootfs(tmp_path_factory):
    """The arm64 Debian root of the Raspberry Pi image (its Python 3.11 and
    no numpy or llama-cpp-python), unpacked from the tarball that
    appliance/build-image.sh caches (tests/test_appliance.py and
    tests/test_cluster.py use it too); its programs run under qemu-user.
    The rootfs and the aarch64 wheel come from the build cache: outside CI a
    missing one skips, naming the command that makes it. A folder made at
    the root's own host path, linked to /, lets host paths under it name the
    same files inside the chroot."""
    need_arm64_emulation()
    need_root_and(("mmdebstrap", "zstd", "chroot", "unshare", "ip"),
                  "the arm64 stick test needs root (chroot, network namespaces)")
    cached_build([os.path.join(ROOT, "build", "wheels.sh"), "aarch64"])
    tarball = cached_build([os.path.join(ROOT, "appliance", "build-image.sh"), "--rootfs-only"]).split()[-1]
    root = str(tmp_path_factory.mktemp("arm64-root"))
    with unpacked_root(tarball, root):
        yield root
    os.unlink(root + root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_aarch64_stick_serves_the_golden_answer_under_qemu_with_no_network(arm64_rootfs, golden_gguf,
                                                                          tmp_path_factory):
    root = arm64_rootfs
    python = os.readlink(os.path.join(root, "usr", "bin", "python3"))[len("python"):]
    home = tmp_path_factory.mktemp("arm64-exporter")
    os.makedirs(str(home / "models"))
    shutil.copyfile(golden_gguf, str(home / "models" / golden_model.MODEL_FILE))
    p = add_wheels(home, "aarch64-py" + python)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("aarch64: 7 files, ") and ("Python %s," % python) in p.stdout, p.stdout
    # The stick and the next machine's home inside the arm64 root.
    work = pathlib.Path(root, "var", "tmp", "stick")
    work.mkdir()
    stick = export(home, work / "usb", "--runtime", "aarch64-py" + python)
    manifest = json.load(open(os.path.join(stick, "manifest.json")))
    assert [r["target"] for r in manifest["runtimes"]] == ["aarch64"]
    assert all("aarch64" in f["name"] or "-none-any" in f["name"] for f in manifest["runtimes"][0]["files"])
    p, answer = run_stick_steps(stick, work / "next", work, root=root)
    assert "Installed llama-cpp-python 0.3.36 for aarch64, Python %s (7 files" % python in p.stdout
    assert answer == golden_model.golden_text(golden_gguf)
    assert os.path.isdir(os.path.join(str(work / "next"), "venv", "lib", "python" + python, "site-packages",
                                      "llama_cpp"))


def native_program():
    """A full native offgrid for this machine: the one build/binary.sh left
    in the build cache (tests/test_build.py builds it first in CI), or, on a
    developer machine, OFFGRID_TEST_FULL_BINARY."""
    path = os.environ.get("OFFGRID_TEST_FULL_BINARY")
    if path:
        assert not IN_CI, "CI tests the binary it builds: unset OFFGRID_TEST_FULL_BINARY"
    else:
        path = offgrid.cached_binary(offgrid.machine_arch() or "x86_64")
    if not path and IN_CI:
        # tests/test_build.py, run before this file, has built it as a rule.
        p = subprocess.run([os.path.join(ROOT, "build", "binary.sh")], capture_output=True, text=True, timeout=3600,
                           env=dict(os.environ, OFFGRID_DIST=tempfile.mkdtemp(prefix="offgrid-dist-")))
        assert p.returncode == 0, p.stderr[-4000:]
        path = offgrid.cached_binary(offgrid.machine_arch())
    if not path:
        why = "no native offgrid in the build cache: build/binary.sh (or OFFGRID_TEST_FULL_BINARY=PATH)"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.mark.slow
def test_stick_with_the_native_program_serves_where_its_python_is_not_carried(exporter, golden_gguf, tmp_path):
    """A runtime of the native program alone, picked up from the build cache:
    on the next machine (a Python the stick carries no wheels for)
    install-runtime puts it at <home>/bin/offgrid, offgrid.py's serve says
    to run it, and it gives the golden answer."""
    _, python = exporter
    name = "offgrid-%s-x86_64" % offgrid.__version__
    cache = tmp_path / "cache"
    os.makedirs(str(cache / "binary"))
    shutil.copy2(native_program(), str(cache / "binary" / name))
    home = tmp_path / "exporter"
    os.makedirs(str(home / "models"))
    shutil.copyfile(golden_gguf, str(home / "models" / golden_model.MODEL_FILE))
    p = run_cli(["runtime", "add", "x86_64"], home, env={"OFFGRID_BUILD_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("x86_64: 1 file, ") and ", native program, in " in p.stdout, p.stdout
    [held] = json.loads(run_cli(["runtime", "list", "--json"], home).stdout)
    assert held["binary"] == name and held["pythons"] == [] and held["size"] == os.path.getsize(str(
        cache / "binary" / name))
    stick = export(home, tmp_path / "usb", "--runtime", "x86_64")
    [runtime] = json.load(open(os.path.join(stick, "manifest.json")))["runtimes"]
    assert [f["name"] for f in runtime["files"]] == ["runtime/x86_64/" + name]
    assert "%s  runtime/x86_64/%s\n" % (runtime["files"][0]["sha256"], name) in open(
        os.path.join(stick, "SHA256SUMS")).read()
    assert os.access(os.path.join(stick, "runtime", "x86_64", name), os.X_OK)
    readme = open(os.path.join(stick, "README.txt")).read()
    assert "x86_64 (native program)" in readme and "    runtime/x86_64/%s install-runtime .\n" % name in readme

    next_home = tmp_path / "next"
    installed = str(next_home / "bin" / "offgrid")
    p, answer = run_stick_steps(stick, next_home, tmp_path, serve=installed)
    assert "Installed the native offgrid for x86_64 (needs no Python) as %s." % installed in p.stdout
    assert "llama-cpp-python" not in p.stdout and not (next_home / "venv").exists()
    assert answer == golden_model.golden_text(golden_gguf)
    # offgrid.py itself now points at the native program.
    p = in_empty_netns("cd %s\n$PY offgrid.py info" % stick, next_home)
    assert "the native offgrid install-runtime put in place serves without it: run  %s serve" % installed in p.stdout
    # With no Python, the README's steps: the program from the stick.
    bare_home = tmp_path / "bare"
    os.makedirs(str(bare_home))
    p = in_empty_netns("cd %s\n./runtime/x86_64/%s import .\n./runtime/x86_64/%s install-runtime ." % (
        stick, name, name), bare_home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 imported, 0 skipped, 0 failed" in p.stdout
    assert "Installed the native offgrid for x86_64 (needs no Python) as %s." % (bare_home / "bin" / "offgrid") in (
        p.stdout)
    assert offgrid.sha256_file(str(bare_home / "bin" / "offgrid")) == runtime["files"][0]["sha256"]


def test_flipped_byte_in_a_runtime_file_is_refused_and_nothing_installed(exporter, tmp_path):
    home, python = exporter
    stick = export(home, tmp_path / "usb", "--runtime", "x86_64-py" + python)
    numpy = [f for f in json.load(open(os.path.join(stick, "manifest.json")))["runtimes"][0]["files"]
             if "/numpy-" in f["name"]][0]
    path = os.path.join(stick, numpy["name"])
    with open(path, "r+b") as f:
        f.seek(numpy["size"] // 2)
        byte = f.read(1)
        f.seek(numpy["size"] // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    next_home = tmp_path / "next"
    os.makedirs(str(next_home))
    p = in_empty_netns("cd %s\n$PY offgrid.py install-runtime . --json" % stick, next_home)
    assert p.returncode == 1 and p.stdout == ""
    [line] = p.stderr.splitlines()
    assert line.startswith("offgrid: error: %s: sha256 " % numpy["name"]), line
    assert line.endswith("does not match the stick's manifest (%s); the stick may be damaged; nothing installed"
                         % numpy["sha256"]), line
    assert not (next_home / "venv").exists() and not (next_home / "venv.new").exists()


def test_stick_without_this_machines_runtime_names_the_targets_it_carries(exporter, tmp_path):
    home, python = exporter
    other = "3.12" if python != "3.12" else "3.11"
    p = add_wheels(home, "x86_64-py" + other)
    assert p.returncode == 0, p.stderr
    stick = export(home, tmp_path / "usb", "--runtime", "x86_64-py" + other)
    next_home = tmp_path / "next"
    os.makedirs(str(next_home))
    p = in_empty_netns("cd %s\n$PY offgrid.py install-runtime ." % stick, next_home)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "offgrid: error: this stick carries no runtime for this machine (x86_64, Python %s); it carries: "
        "x86_64 (Python %s)" % (python, other)]
    assert not (next_home / "venv").exists()
    # Without the runtime for this Python, serve keeps the plain advice.
    p = in_empty_netns("cd %s\ntimeout 10 $PY offgrid.py serve --port 0 || true" % stick, next_home)
    assert "install-runtime" not in p.stderr and "pip install" in p.stderr


def test_runtime_list_and_the_errors_of_add_and_export(exporter, tmp_path):
    home, python = exporter
    p = run_cli(["runtime", "list", "--json"], home)
    [runtime] = json.loads(p.stdout)
    assert runtime["target"] == "x86_64" and python in runtime["pythons"] and runtime["size"] > 20 << 20
    assert runtime["size"] == sum(f["size"] for f in runtime["files"])
    p = run_cli(["runtime", "list"], home)
    assert p.stdout.splitlines()[0].split() == ["TARGET", "PYTHONS", "NATIVE", "FILES", "SIZE"]
    empty_cache = {"OFFGRID_BUILD_CACHE": str(tmp_path / "no-cache")}
    os.makedirs(str(tmp_path / "elsewhere"))
    p = run_cli(["runtime", "add", "aarch64"], tmp_path / "elsewhere", env=empty_cache)
    assert p.returncode == 1 and p.stderr.splitlines() == [
        "offgrid: error: no llama-cpp-python wheel for aarch64: build one with `build/wheels.sh aarch64` or pass "
        "--wheel FILE (or --binary FILE, a native offgrid from build/binary.sh)"]
    p = run_cli(["runtime", "add", "aarch64", "--binary", offgrid.cached_llama_wheel("x86_64")],
                tmp_path / "elsewhere", env=empty_cache)
    assert p.returncode == 1 and p.stderr.splitlines() == [
        "offgrid: error: %s is not a native program for aarch64 Linux" % offgrid.cached_llama_wheel("x86_64")]
    p = run_cli(["runtime", "add", "riscv64"], home)
    assert p.returncode == 1 and "unknown runtime target 'riscv64'" in p.stderr
    os.makedirs(str(tmp_path / "usb"))
    p = run_cli(["export", "--all", str(tmp_path / "usb"), "--runtime", "aarch64"], home)
    assert p.returncode == 1 and p.stderr.splitlines() == [
        "offgrid: error: no runtime for aarch64 is held here: gather it with `offgrid runtime add aarch64` "
        "(held: x86_64 (Python %s))" % ", ".join(runtime["pythons"])]
    assert not os.path.exists(str(tmp_path / "usb" / "offgrid"))


def test_wheel_tags_decide_which_python_a_file_serves():
    fits = offgrid.wheel_fits
    assert fits("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "x86_64", "3.11")
    assert not fits("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "x86_64", "3.12")
    assert not fits("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl", "aarch64", "3.11")
    assert fits("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl", "x86_64", "3.9")
    assert fits("llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl", "aarch64", "3.13")
    assert fits("jinja2-3.1.6-py3-none-any.whl", "aarch64", "3.10")
    assert offgrid.parse_runtime_targets("x86_64-py3.11, aarch64") == [
        ("x86_64", ["3.11"]), ("aarch64", list(offgrid.RUNTIME_PYTHONS))]


def test_a_peers_runtime_entry_is_checked_before_anything_is_fetched():
    wheel = "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    native = "offgrid-0.1.0-x86_64"

    def entry(target="x86_64", **f):
        item = {"name": wheel, "size": 10, "sha256": "ab" * 32}
        item.update(f)
        return {"target": target, "files": [item]}
    assert offgrid.check_peer_runtime(entry())["files"] == [{"name": wheel, "size": 10, "sha256": "ab" * 32}]
    assert offgrid.check_peer_runtime(entry(name=native))["binary"] == native
    for bad in (entry(target="riscv64"), entry(name="../" + wheel), entry(name="/tmp/" + wheel),
                entry(name="." + wheel), entry(name="evil.sh"), entry(name="offgrid-0.1.0-aarch64/../x"),
                entry(size=0), entry(size=True), entry(size="10"), entry(sha256="zz"), entry(sha256=None),
                {"target": "x86_64", "files": []}, {"target": "x86_64"}, [], "x86_64"):
        assert offgrid.check_peer_runtime(bad) is None, bad


def test_http_export_carries_the_runtime_and_names_a_bad_target(exporter, start_server, tmp_path):
    import time
    home, python = exporter
    srv = start_server(home=home, models_dir=str(home / "models"), wait_model=False)
    os.makedirs(str(tmp_path / "usb"))
    status, body, _ = srv.post("/v1/models/export", {"path": str(tmp_path / "usb"), "runtime": "riscv64"})
    assert status == 400 and body["error"]["param"] == "runtime" and "riscv64" in body["error"]["message"]
    status, job, _ = srv.post("/v1/models/export", {"path": str(tmp_path / "usb"), "runtime": "x86_64-py" + python})
    assert status == 202, job
    deadline = time.time() + 300
    while job["status"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.2)
        job = srv.get("/v1/models/jobs/" + job["job"])[1]
    assert job["status"] == "done", job
    manifest = json.load(open(str(tmp_path / "usb" / "offgrid" / "manifest.json")))
    assert [r["target"] for r in manifest["runtimes"]] == ["x86_64"] and len(manifest["runtimes"][0]["files"]) == 7
    assert [m["id"] for m in manifest["models"]] == [golden_model.MODEL_ID]


@pytest.mark.slow
def test_runtime_is_fetched_from_a_lan_peer_by_sha256_checked_and_resumed(exporter, tmp_path):
    """Node a (`serve --p2p` in a network namespace) holds the x86_64
    runtime; `runtime add --from-peer` in another namespace finds it, is
    refused a target a does not hold, keeps nothing of a file a serves
    wrong, and gets the whole runtime once a serves it right."""
    from test_p2p import SECRET, Lan, lan_unavailable, raw_get, signed
    home, python = exporter
    why = lan_unavailable()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    lan = Lan(tmp_path)
    try:
        shutil.copytree(str(home / "runtimes"), str(tmp_path / "a" / "runtimes"))
        a = lan.node("a")
        status, _, body = raw_get(a.url, "/v1/p2p/manifest", signed("ab" * 8, "GET", "/v1/p2p/manifest", SECRET))
        manifest = json.loads(body)
        assert status == 200 and [r["target"] for r in manifest["runtimes"]] == ["x86_64"], manifest
        held = [f for f in manifest["runtimes"][0]["files"] if offgrid.wheel_fits(f["name"], "x86_64", python)]
        _, _, python_b = lan.namespace("b")
        home_b = tmp_path / "b"
        os.makedirs(str(home_b))
        env = {"OFFGRID_P2P_PORT": lan.udp_port, "OFFGRID_P2P_SECRET": SECRET}

        def add(target):
            return run_cli(["runtime", "add", target, "--from-peer", "--wait", "3"], home_b, python=python_b,
                           env=env, timeout=600)

        p = add("aarch64")
        assert p.returncode == 1 and p.stderr.splitlines()[-1] == (
            "offgrid: error: no peer offers a runtime for aarch64 (a has %s)" % offgrid.describe_runtimes(
                [offgrid.check_peer_runtime(manifest["runtimes"][0])])), p.stderr

        numpy = [f for f in held if f["name"].startswith("numpy-")][0]
        path = str(tmp_path / "a" / "runtimes" / "x86_64" / numpy["name"])
        with open(path, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xff]))
        p = add("x86_64-py" + python)
        assert p.returncode == 1
        assert p.stderr.splitlines()[-1].startswith("offgrid: error: peer a served wrong bytes for %s (%d bytes, "
                                                    "sha256 " % (numpy["name"], numpy["size"])), p.stderr
        assert p.stderr.splitlines()[-1].endswith("%s); nothing kept" % numpy["sha256"])
        folder = home_b / "runtimes" / "x86_64"
        assert not (folder / offgrid.RUNTIME_INDEX).exists()
        kept = sorted(os.listdir(str(folder)))
        assert not any("numpy" in n for n in kept), kept
        assert any(n.startswith(".diskcache-") and n.endswith(".part") for n in kept), kept  # checked, kept

        with open(path, "r+b") as f:
            f.seek(1000)
            f.write(byte)
        p = add("x86_64-py" + python)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("x86_64: 7 files, ") and p.stdout.rstrip().endswith("(from peer a)"), p.stdout
        got = json.load(open(str(folder / offgrid.RUNTIME_INDEX)))["files"]
        assert [(f["name"], f["size"], f["sha256"]) for f in got] == [(f["name"], f["size"], f["sha256"])
                                                                     for f in held]
        for f in got:
            assert offgrid.sha256_file(str(folder / f["name"])) == f["sha256"]
        assert sorted(os.listdir(str(folder))) == sorted([f["name"] for f in got] + [offgrid.RUNTIME_INDEX])
        # What came from the peer goes on a stick like any runtime.
        os.makedirs(str(tmp_path / "usb"))
        p = run_cli(["export", str(tmp_path / "usb"), "--runtime", "x86_64-py" + python], home_b)
        assert p.returncode == 0, p.stderr
        stick = tmp_path / "usb" / "offgrid"
        assert len(json.load(open(str(stick / "manifest.json")))["runtimes"][0]["files"]) == 7
        assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=str(stick)).returncode == 0
    finally:
        lan.close()
