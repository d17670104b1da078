"""The scripts in build/, run for real: portable llama-cpp-python wheels
(x86_64 and cross-compiled aarch64), the shiv zipapp and the Nuitka binary.
Each artifact is started as `serve` on 127.0.0.1 and must answer the golden
request with the same string as offgrid.py in this venv.

The builds use the shared cache (${OFFGRID_BUILD_CACHE:-~/.cache/offgrid-build}):
a cold run compiles llama.cpp twice (about 5 minutes each on 2 cores) and the
full binary (10 to 15 minutes); a warm run takes about 4 minutes. For quick
local runs OFFGRID_SKIP_FULL_BINARY=1 and OFFGRID_SKIP_AARCH64=1 skip the two
heaviest steps, and OFFGRID_TEST_FULL_BINARY=PATH tests a full binary built
before; in CI each of these is a failure.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import IN_CI, ROOT, need
import golden_model
import offgrid

pytestmark = pytest.mark.slow

BUILD_TIMEOUT = 3600  # a cold Nuitka build on a loaded 2-core machine
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
HOST_ARCH = os.uname().machine
ARTIFACT = "offgrid-%s-%s" % (offgrid.__version__, HOST_ARCH)
LLAMA_CPP_VERSION = os.environ.get("LLAMA_CPP_VERSION", "0.3.36")  # build/common.sh's default


def skip_unless_wanted(variable, what):
    if os.environ.get(variable):
        if IN_CI:
            pytest.fail("%s is set, but CI must build %s" % (variable, what))
        pytest.skip("%s is set: not building %s" % (variable, what))


def build(*args, env=None):
    """Run a build script; returns (last stdout line, stderr)."""
    r = subprocess.run([os.path.join(ROOT, "build", args[0])] + list(args[1:]), capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT, env=dict(os.environ, **(env or {})), cwd=ROOT)
    assert r.returncode == 0, "%s exited %s:\n%s" % (" ".join(args), r.returncode, r.stderr[-6000:])
    lines = r.stdout.strip().splitlines()
    assert lines, "%s printed no path:\n%s" % (" ".join(args), r.stderr[-3000:])
    return lines[-1], r.stderr


def elf_machine(data):
    assert data[:4] == b"\x7fELF"
    return struct.unpack("<H", data[18:20])[0]


def base_python():
    """An interpreter without this venv's site-packages (no llama_cpp), so an
    artifact can only use what it carries."""
    exe = getattr(sys, "_base_executable", None)
    if not exe or os.path.realpath(exe) == os.path.realpath(sys.executable):
        exe = os.path.join(sys.base_prefix, "bin", "python3")
    return exe


def descendants(pid):
    """`pid` and every process below it (a onefile binary runs its program
    as a child)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


def mapped_from(pid, library):
    """Folders a process has `library` mapped from (from /proc/PID/maps)."""
    with open("/proc/%d/maps" % pid) as f:
        return {os.path.dirname(line.split()[-1]) for line in f if line.rstrip().endswith("/" + library)}


@pytest.fixture(scope="session")
def golden_gguf(tmp_path_factory):
    return golden_model.write_model(str(tmp_path_factory.mktemp("golden") / golden_model.MODEL_FILE))


@pytest.fixture(scope="session")
def golden(golden_gguf):
    need("llama_cpp", "the golden answer the built artifacts are compared with")
    return golden_model.golden_text(golden_gguf)


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist"))


# The golden model ############################################################

def test_golden_model_is_the_same_file_every_time(golden_gguf, tmp_path):
    again = golden_model.write_model(str(tmp_path / "again.gguf"))
    with open(golden_gguf, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    info = offgrid.read_gguf(again)
    assert info["architecture"] == "llama" and not info.get("chat_template")
    assert 15e6 < os.path.getsize(again) < 20e6


def test_golden_answer_is_eight_tokens_and_repeats(golden, golden_gguf):
    assert golden.strip() and len(golden) > 8
    assert golden_model.golden_text(golden_gguf) == golden


# build/wheels.sh #############################################################

def test_wheels_rejects_an_unknown_architecture():
    r = subprocess.run([os.path.join(ROOT, "build", "wheels.sh"), "armv7l"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["wheels.sh: error: unknown architecture 'armv7l' (use x86_64 or aarch64)"]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_wheel_is_portable_tagged_and_cached(arch):
    if HOST_ARCH != "x86_64":
        pytest.skip("the wheels are cross-built from x86_64")
    if arch == "aarch64":
        skip_unless_wanted("OFFGRID_SKIP_AARCH64", "the aarch64 wheel")
    wheel, _ = build("wheels.sh", arch)
    assert os.path.basename(wheel) == "llama_cpp_python-%s-py3-none-linux_%s.whl" % (LLAMA_CPP_VERSION, arch)
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if n.startswith("llama_cpp/lib/") and ".so" in n]
        assert any(n.endswith("/libllama.so") for n in libs)
        for name in libs:
            assert elf_machine(z.read(name)[:20]) == ELF_MACHINE[arch], name
    with open(os.path.join(os.path.dirname(wheel), "BUILD-INFO")) as f:
        assert "GGML_NATIVE=OFF" in f.read()
    started = time.monotonic()
    again, err = build("wheels.sh", arch)
    assert again == wheel and "cached" in err and time.monotonic() - started < 30


# build/zipapp.sh #############################################################

@pytest.fixture(scope="session")
def pyz(dist):
    path, _ = build("zipapp.sh", HOST_ARCH, env={"OFFGRID_DIST": dist})
    assert os.path.basename(path) == ARTIFACT + ".pyz"
    return path


def test_zipapp_answers_the_golden_request(pyz, golden, golden_gguf, tmp_path):
    python = base_python()
    has_own = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    shiv_root = tmp_path / "shiv"
    # HOME has no ~/.shiv to write: the zipapp must unpack into SHIV_ROOT.
    env = {"SHIV_ROOT": str(shiv_root), "HOME": str(tmp_path / "no-such-home")}
    with golden_model.Serve([python, pyz], tmp_path / "home", golden_gguf, env=env) as srv:
        status, health = srv.request("GET", "/health")
        assert status == 200 and health["llama_cpp_python"] == LLAMA_CPP_VERSION, health
        assert srv.chat() == golden
        folders = mapped_from(srv.proc.pid, "libllama.so")
        assert folders and all(f.startswith(str(shiv_root) + "/") for f in folders), (folders, has_own)
        assert srv.stop() == 0, srv.output()[-3000:]
    assert not (tmp_path / "no-such-home").exists()


def test_zipapp_runs_any_command(pyz, tmp_path):
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"), OFFGRID_HOME=str(tmp_path / "home"))
    r = subprocess.run([base_python(), pyz, "version"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and offgrid.__version__ in r.stdout, r.stderr
    r = subprocess.run([base_python(), pyz, "no-such-command"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_aarch64_zipapp_carries_aarch64_libraries(dist):
    if HOST_ARCH != "x86_64":
        pytest.skip("the aarch64 zipapp is cross-built from x86_64")
    skip_unless_wanted("OFFGRID_SKIP_AARCH64", "the aarch64 zipapp")
    path, _ = build("zipapp.sh", "aarch64", env={"OFFGRID_DIST": dist})
    assert os.path.basename(path) == "offgrid-%s-aarch64.pyz" % offgrid.__version__
    with open(path, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert "site-packages/offgrid.py" in names
        libllama = [n for n in names if n.endswith("/llama_cpp/lib/libllama.so")]
        assert libllama and elf_machine(z.read(libllama[0])[:20]) == 183
        numpy_core = [n for n in names if "_multiarray_umath.cpython-311-aarch64-linux-gnu.so" in n]
        assert numpy_core, "numpy for CPython 3.11 on aarch64 is missing"
        psutil_ext = [n for n in names if n.startswith("site-packages/psutil/_psutil_linux") and n.endswith(".so")]
        assert psutil_ext and elf_machine(z.read(psutil_ext[0])[:20]) == 183


def test_zipapp_refuses_a_bad_python_version():
    r = subprocess.run([os.path.join(ROOT, "build", "zipapp.sh"), "--python-version", "three"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == "zipapp.sh: error: --python-version must look like 3.11, not 'three'"


# build/binary.sh #############################################################

def assert_quiet_stop(srv):
    """SIGTERM (what systemd sends) ends the binary with 0, and nothing but
    offgrid's own log lines reaches stderr on the way out."""
    code = srv.stop()
    err = srv.stderr()
    assert code == 0, "exit %s:\n%s" % (code, err[-3000:])
    tail = err[err.index("shutting down"):]
    noise = [line for line in tail.splitlines()[1:] if not re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ", line)]
    assert not noise, tail
    assert tail.rstrip().endswith("stopped"), tail


def test_stdlib_binary_serves_and_names_what_is_missing(dist, golden_gguf, tmp_path):
    path, _ = build("binary.sh", "--stdlib", env={"OFFGRID_DIST": dist})
    assert os.path.basename(path) == ARTIFACT + "-stdlib"
    with golden_model.Serve([path], tmp_path / "home", golden_gguf) as srv:
        status, health = srv.request("GET", "/health")
        assert status == 200, health
        status, models = srv.request("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == [golden_model.MODEL_ID]
        status, body = srv.request("POST", "/v1/chat/completions", golden_model.REQUEST)
        assert status == 503 and "llama-cpp-python" in body["error"]["message"], body
        assert_quiet_stop(srv)


@pytest.fixture(scope="session")
def full_binary(dist):
    skip_unless_wanted("OFFGRID_SKIP_FULL_BINARY", "the full binary")
    path = os.environ.get("OFFGRID_TEST_FULL_BINARY")  # one built before, for local iteration
    if path:
        assert not IN_CI, "CI builds the binary it tests: unset OFFGRID_TEST_FULL_BINARY"
    else:
        path, _ = build("binary.sh", env={"OFFGRID_DIST": dist})
    assert os.path.basename(path) == ARTIFACT
    # Not a zipapp and not a script: a native executable.
    with open(path, "rb") as f:
        assert elf_machine(f.read(20)) == ELF_MACHINE[HOST_ARCH]
    return path


def test_full_binary_answers_the_golden_request(full_binary, golden, golden_gguf, tmp_path):
    with golden_model.Serve([full_binary], tmp_path / "home", golden_gguf, env={"PATH": "/nonexistent"}) as srv:
        assert srv.chat() == golden
        folders = set()
        for pid in descendants(srv.proc.pid):
            folders |= mapped_from(pid, "libgomp.so.1")
        # libgomp comes from the binary, not from the system's libgomp1.
        assert folders and all(not f.startswith("/usr/") for f in folders), folders
        assert_quiet_stop(srv)


def shared_libraries(path):
    """The shared libraries `path` loads, as ldd resolves them here."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"(/\S+\.so[.\d]*)", out)))


def test_full_binary_runs_where_there_is_no_python(full_binary, golden, golden_gguf, tmp_path):
    """A root holding the binary, the C and C++ runtimes, zlib and the
    C.UTF-8 locale (which every Debian has), /proc and /tmp: no Python, no
    libgomp, no shell."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("dpkg-query"):
        if IN_CI:
            pytest.fail("CI runs as root on Debian, with util-linux's unshare")
        pytest.skip("needs root (chroot, mount), unshare and dpkg-query")
    root = tmp_path / "root"
    # What the binary may expect of any Debian or Ubuntu: glibc (package
    # libc6, all of it), libgcc, libstdc++ and zlib, all priority "required".
    glibc = subprocess.run(["dpkg-query", "-L", "libc6"], capture_output=True, text=True, check=True).stdout
    wanted = set(shared_libraries(full_binary))
    wanted |= {p for p in glibc.split() if re.search(r"^/(usr/)?lib.*/[^/]+\.so[.\d]*$", p) and os.path.isfile(p)}
    for name in ("libstdc++.so.6", "libgcc_s.so.1", "libz.so.1"):
        lib = os.path.normpath(subprocess.run(["gcc", "-print-file-name=" + name], capture_output=True,
                                              text=True, check=True).stdout.strip())
        wanted |= {lib} | set(shared_libraries(lib))
    for lib in wanted:
        assert "libgomp" not in lib and "python" not in lib, lib
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), str(dest))
    # glibc's C.UTF-8 locale (libc-bin, on every Debian and Ubuntu): without
    # it the embedded Python aborts at start.
    shutil.copytree("/usr/lib/locale/C.utf8", str(root / "usr/lib/locale/C.utf8"))
    for folder in ("proc", "tmp", "dev", "home"):
        (root / folder).mkdir(exist_ok=True)
    os.chmod(str(root / "tmp"), 0o1777)
    os.mknod(str(root / "dev" / "null"), 0o666 | 0o020000, os.makedev(1, 3))
    shutil.copy2(full_binary, str(root / "offgrid"))
    # A private mount namespace for /proc; the network is the host's, so the
    # server inside is reached on 127.0.0.1 as usual.
    script = 'mount -t proc proc "$0/proc" && exec chroot "$0" /offgrid serve --port 0 --models-dir /home/models'
    cmd = [shutil.which("unshare"), "--mount", "--propagation", "private", "sh", "-c", script, str(root)]
    env = {"OFFGRID_HOME": "/home", "TMPDIR": "/tmp"}
    with golden_model.Serve(cmd, root / "home", golden_gguf, env=env) as srv:
        assert srv.chat() == golden
        assert_quiet_stop(srv)
    assert not any(os.scandir(str(root / "tmp"))), "the binary left its unpacked files in /tmp"
