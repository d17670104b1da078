"""One model across several machines: `offgrid worker` (llama.cpp's RPC
server behind offgrid's HMAC relay) and `serve --workers`. The handshake and
the split arithmetic on their own; a real worker on 127.0.0.1; and a head
with two workers in real network namespaces on a bridge, each limited to
less memory than the golden model needs, found by their announcements; and
the Raspberry Pi image's arm64 offgrid under qemu-user, in a namespace of
its own, as the worker an x86-64 head finds and splits the model onto (its
root file system and aarch64 wheel from the build cache, as
tests/test_appliance.py makes them; outside CI a missing one skips)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import offgrid
from conftest import (IN_CI, OFFGRID, ROOT, Server, cached_build, free_env, need, need_arm64_emulation,
                      need_root_and, run_cli, unpacked_root, wait_for)
from test_p2p import lan  # noqa: F401 (the fixture)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_model  # noqa: E402

SECRET = "clinic-lan-secret"
# Each machine gets less than the golden model needs (17.4 MB file plus its
# KV cache): the head's budget holds its embeddings only, each worker about
# the output head (8 MB, plus a batch of logits) and a layer.
HEAD_BUDGET = 9000000
WORKER_MEMORY = "14M"
# A batch of 16 keeps the logits a batch makes (16 x 32000 floats) inside a
# worker's share; one slot keeps the KV cache small.
SMALL = {"OFFGRID_BATCH": "16", "OFFGRID_PARALLEL": "1", "OFFGRID_LOG_REQUESTS": "0"}


# -- pieces on their own -----------------------------------------------------

def test_split_layers_follows_free_memory_within_each_cap():
    assert offgrid.split_layers(30, [100, 100, 100], [30, 30, 30]) == [10, 10, 10]
    assert offgrid.split_layers(30, [100, 200, 0], [30, 30, 30]) == [10, 20, 0]
    # A full machine's share goes to the others.
    assert offgrid.split_layers(30, [100, 100, 100], [2, 30, 30]) == [2, 14, 14]
    assert sum(offgrid.split_layers(7, [3, 5, 11], [7, 7, 7])) == 7


def test_announcements_carry_a_checked_worker_field():
    now = time.time()
    msg = {"p": offgrid.P2P_PROTOCOL, "t": "announce", "id": "a" * 16, "seq": 1, "ts": now, "name": "w1",
           "version": "0.1.0", "port": 11613, "digest": "", "tls": False,
           "worker": {"free": 1 << 30, "total": 2 << 30, "device": "CPU", "threads": 4}}
    assert offgrid.parse_datagram(json.dumps(msg).encode(), None, now)["worker"]["free"] == 1 << 30
    for bad in ({"free": -1, "total": 1, "device": "CPU", "threads": 1}, {"free": 1}, "CPU",
                {"free": 1, "total": 1, "device": "", "threads": 1},
                {"free": 1, "total": 1, "device": "CPU", "threads": 1, "extra": 1}):
        with pytest.raises(offgrid.DatagramDropped):
            offgrid.parse_datagram(json.dumps(dict(msg, worker=bad)).encode(), None, now)


def test_config_checks_the_worker_settings(tmp_path):
    for key, value in (("workers", "host-without-port:x"), ("worker_allow", "10.0.0.0/99"),
                       ("worker_port", "70000")):
        r = run_cli(["config", "show"], tmp_path, env={"OFFGRID_" + key.upper(): value})
        assert r.returncode == 2 and key in r.stderr, r.stderr
    assert offgrid.parse_worker_list("10.0.0.2:9000, 10.0.0.3") == [("10.0.0.2", 9000), ("10.0.0.3", 11613)]


def test_worker_refuses_a_lan_address_without_a_secret_unless_insecure(tmp_path):
    r = run_cli(["worker", "--host", "0.0.0.0", "--port", "0"], tmp_path)
    assert r.returncode == 1
    assert "without p2p_secret" in r.stderr and "--insecure" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


class Worker:
    """`offgrid worker` in a subprocess (optionally through a namespace's
    python, or another command that runs offgrid, given as `cmd`)."""

    def __init__(self, home, args, python=sys.executable, env=None, cmd=None, timeout=120):
        os.makedirs(str(home), exist_ok=True)
        self.log_path = os.path.join(str(home), "worker.log")
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen((cmd or [python, OFFGRID]) + ["worker"] + list(args), stdout=self.log,
                                     stderr=subprocess.STDOUT, env=free_env(home, **(env or {})), cwd=str(home))
        line = wait_for("the worker to listen", lambda: self.proc.poll() is not None or self._listening(), timeout)
        if line is True:
            raise RuntimeError("offgrid worker exited %s:\n%s" % (self.proc.returncode, self.output()))
        self.port = int(line.rsplit(":", 1)[1])

    def _listening(self):
        for line in self.output().splitlines():
            if "offgrid worker listening" in line:
                return line.split("address=", 1)[1].split()[0]
        return None

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def test_relay_admits_only_a_head_that_knows_the_secret(tmp_path):
    need("llama_cpp", "the worker's RPC server")
    worker = Worker(tmp_path / "w", ["--port", "0", "--memory", "64M"], env={"OFFGRID_P2P_SECRET": SECRET})
    try:
        address = ("127.0.0.1", worker.port)
        info = offgrid.handshake_dial(address, SECRET.encode(), offgrid.RPC_MODE_PROBE)
        assert info["device"] == "CPU" and 0 < info["free"] <= 64 << 20 and info["total"] == 64 << 20
        with pytest.raises(offgrid.ClusterError, match="refused the connection"):
            offgrid.handshake_dial(address, b"another secret", offgrid.RPC_MODE_PROBE)
        with pytest.raises(offgrid.ClusterError, match="refused the connection"):
            offgrid.handshake_dial(address, None, offgrid.RPC_MODE_RELAY)
        # llama.cpp's own client speaks first with its HELLO; the relay
        # greets, reads that as a failed handshake and hangs up.
        raw = socket.create_connection(address, timeout=10)
        raw.recv(len(offgrid.RPC_MAGIC) + offgrid.RPC_NONCE_BYTES)
        raw.sendall(b"\x0e" + b"\0" * 200)
        try:
            assert raw.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with our bytes unread
        raw.close()
        wait_for("the refusals in the log", lambda: worker.output().count("worker connection refused") >= 3, 10)
        assert "wrong secret" in worker.output()
    finally:
        worker.stop()
    assert worker.proc.returncode == 0


# -- a head and two workers on a LAN -----------------------------------------

@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(golden model path, its answer from one machine alone)."""
    need("llama_cpp", "the cluster tests")
    path = golden_model.write_model(str(tmp_path_factory.mktemp("golden") / golden_model.MODEL_FILE))
    return path, golden_model.golden_text(path)


def start_worker(lan, name, secret=SECRET, extra=()):
    ns, address, python = lan.namespace(name)
    env = dict(SMALL, OFFGRID_P2P_PORT=lan.udp_port, OFFGRID_P2P_INTERVAL=1, OFFGRID_P2P_NAME=name)
    if secret:
        env["OFFGRID_P2P_SECRET"] = secret
    worker = Worker(lan.tmp / name, ["--host", address, "--memory", WORKER_MEMORY] + list(extra),
                    python=python, env=env)
    worker.name, worker.address, worker.python = name, address, python
    lan.workers.append(worker)
    return worker


def start_head(lan, model_path, workers="auto", budget=HEAD_BUDGET):
    ns, address, python = lan.namespace("head")
    home = lan.tmp / "head"
    models = home / "models"
    os.makedirs(str(models), exist_ok=True)
    offgrid.ModelStore(str(models)).install([model_path], golden_model.MODEL_ID, "test")
    env = dict(SMALL, OFFGRID_P2P_PORT=lan.udp_port, OFFGRID_P2P_INTERVAL=1, OFFGRID_P2P_SECRET=SECRET,
               OFFGRID_MAX_LOADED_BYTES=budget, OFFGRID_WORKERS=workers)
    srv = Server(home, str(models), python=python, args=["--host", address, "--insecure"], env=env,
                 wait_model=False)
    srv.python, srv.home, srv.udp_port = python, home, lan.udp_port
    lan.nodes.append(srv)
    return srv


@pytest.fixture
def cluster(lan, golden):
    lan.workers = []
    try:
        w1, w2 = start_worker(lan, "w1"), start_worker(lan, "w2")
        head = start_head(lan, golden[0])
        yield head, w1, w2
    finally:
        for worker in lan.workers:
            worker.stop(signal.SIGKILL)


def heard(head, names):
    def check():
        rows = head.get("/health")[1]["cluster"]["data"]
        return rows if sorted(r["name"] for r in rows) == sorted(names) and all(r["free"] for r in rows) else None
    return wait_for("the head to hear workers %s" % names, check, 30)


def metrics(head):
    with urllib.request.urlopen(head.url + "/metrics", timeout=30) as r:
        return r.read().decode()


def chat(head, **extra):
    return head.post("/v1/chat/completions", dict(golden_model.REQUEST, **extra), timeout=300)


@pytest.mark.slow
def test_a_model_too_big_for_each_machine_runs_split_across_three_and_answers_golden(cluster, golden):
    head, w1, w2 = cluster
    rows = heard(head, ["w1", "w2"])
    assert all(r["free"] <= 14 << 20 and r["device"] == "CPU" for r in rows)
    status, body, _ = chat(head)
    assert status == 200, (body, head.output()[-3000:])
    assert body["choices"][0]["message"]["content"] == golden[1]
    [loaded] = head.get("/health")[1]["loaded"]
    split = loaded["split"]
    assert split["layers"] == 2 and split["head"]["layers"] + sum(w["layers"] for w in split["workers"]) == 2
    assert sorted(w["name"] for w in split["workers"]) == ["w1", "w2"]
    assert all(w["layers"] == 1 and w["lost"] is None for w in split["workers"])
    assert loaded["bytes"] <= HEAD_BUDGET  # what stays here is the embeddings
    assert head.get("/v1/slots")[1]["split"] == split
    text = metrics(head)
    assert 'offgrid_model_split_layers{model="golden-tiny",machine="w1"} 1' in text
    assert 'offgrid_workers{state="connected"} 2' in text
    # Each worker got its own connection through the relay, after the handshake.
    assert "head connected" in w1.output() and "head connected" in w2.output()
    # The CLI lists the workers with what they lend.
    r = subprocess.run([head.python, OFFGRID, "peers", "--json", "--wait", "3"], capture_output=True, text=True,
                       env=free_env(head.home, OFFGRID_P2P_PORT=head.udp_port, OFFGRID_P2P_SECRET=SECRET),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    workers = {p["name"]: p["worker"] for p in json.loads(r.stdout)["data"]}
    assert set(workers) == {"w1", "w2"} and all(w["device"] == "CPU" for w in workers.values())


@pytest.mark.slow
def test_a_worker_killed_mid_stream_ends_that_reply_with_503_and_the_rest_carry_on(cluster, golden):
    head, w1, w2 = cluster
    heard(head, ["w1", "w2"])
    assert chat(head)[0] == 200
    req = urllib.request.Request(head.url + "/v1/chat/completions", method="POST",
                                 data=json.dumps(dict(golden_model.REQUEST, max_tokens=400, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        for line in r:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    w2.stop(signal.SIGKILL)
    assert "error" in events[-1], events[-3:]
    assert events[-1]["error"]["code"] == "worker_lost" and "w2" in events[-1]["error"]["message"]
    health = head.get("/health")[1]
    assert health["status"] == "ok" and health["loaded"] == []
    # The next request loads the model again on what is left: here and w1.
    status, body, _ = chat(head)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == golden[1]
    [loaded] = head.get("/health")[1]["loaded"]
    assert [w["name"] for w in loaded["split"]["workers"]] == ["w1"]
    # With w1 gone too, this machine alone lacks memory: refused, naming how much.
    w1.stop(signal.SIGKILL)
    wait_for("the head to drop the model", lambda: head.get("/health")[1]["loaded"] == [] or None, 30)
    status, body, _ = chat(head)
    assert status == 503 and body["error"]["code"] in ("insufficient_memory", "worker_lost"), body
    if body["error"]["code"] == "worker_lost":  # the head had not yet heard that w1 was gone
        status, body, _ = chat(head)
    assert status == 503 and body["error"]["code"] == "insufficient_memory", body
    assert "missing" in body["error"]["message"]
    assert head.get("/health")[1]["status"] == "ok"


@pytest.mark.slow
def test_workers_ignore_a_head_without_the_secret_and_a_secretless_lan_worker_needs_insecure(lan, golden):
    lan.workers = []
    try:
        w1 = start_worker(lan, "w1")
        # From the bridge (another machine): the relay answers, the RPC server does not.
        with pytest.raises(offgrid.ClusterError, match="refused the connection"):
            offgrid.handshake_dial((w1.address, w1.port), b"guess", offgrid.RPC_MODE_RELAY)
        info = offgrid.handshake_dial((w1.address, w1.port), SECRET.encode(), offgrid.RPC_MODE_PROBE)
        assert info["total"] == 14 << 20
        rpc_port = int(w1.output().split("endpoint       : 127.0.0.1:")[1].split()[0])
        with pytest.raises(OSError):
            socket.create_connection((w1.address, rpc_port), timeout=3)
        # A worker without the secret is not listed by a head that has one.
        ns, address, python = lan.namespace("w0")
        r = subprocess.run([python, OFFGRID, "worker", "--host", address, "--port", "0"], capture_output=True,
                           text=True, env=free_env(lan.tmp, OFFGRID_P2P_PORT=lan.udp_port), timeout=60)
        assert r.returncode == 1 and "--insecure" in r.stderr
        open_worker = Worker(lan.tmp / "w0", ["--host", address, "--insecure", "--memory", "14M"], python=python,
                             env=dict(SMALL, OFFGRID_P2P_PORT=lan.udp_port, OFFGRID_P2P_INTERVAL=1,
                                      OFFGRID_P2P_NAME="w0"))
        lan.workers.append(open_worker)
        assert "WARNING: NO SECRET" in open_worker.output()
        head = start_head(lan, golden[0])
        heard(head, ["w1"])
        # w0's announcements arrive unsigned and are dropped as such.
        wait_for("w0's announcements to be dropped",
                 lambda: 'offgrid_p2p_datagrams_dropped_total{reason="unsigned"} 0' not in metrics(head), 30)
        assert [r["name"] for r in head.get("/health")[1]["cluster"]["data"]] == ["w1"]
        assert "head connected" not in open_worker.output()
    finally:
        for worker in lan.workers:
            worker.stop(signal.SIGKILL)


# -- an arm64 worker: the appliance's offgrid under qemu-user ----------------

# The head keeps the embeddings and one layer; the worker's share is the
# other layer and the output head (the split arithmetic above gives 1 and 1).
# The worker lends a little more than the LAN workers do: under qemu-user its
# process grows by the emulator's own memory as well.
ARM64_HEAD_BUDGET = 17000000
ARM64_WORKER_MEMORY = "16M"


@pytest.fixture(scope="module")
def appliance_root(tmp_path_factory):
    """The Raspberry Pi image's arm64 root file system with offgrid where the
    image has it: /opt/offgrid/offgrid.py, and its own aarch64
    llama-cpp-python (the cross-built wheel) in /opt/offgrid/site, vendored by
    appliance/vendor.sh as build-image.sh does. The rootfs and the wheel come
    from the build cache (outside CI a missing one skips). A folder at the
    rootfs's own host path, linked to /, lets host paths under it name the
    same files inside the chroot."""
    need_arm64_emulation()
    need_root_and(("mmdebstrap", "zstd", "chroot"), "the arm64 root file system needs root (chroot)")
    wheel = cached_build([os.path.join(ROOT, "build", "wheels.sh"), "aarch64"]).split()[-1]
    tarball = cached_build([os.path.join(ROOT, "appliance", "build-image.sh"), "--rootfs-only"]).split()[-1]
    root = str(tmp_path_factory.mktemp("arm64-root"))
    with unpacked_root(tarball, root, proc=True):
        site = os.path.join(root, "opt", "offgrid", "site")
        p = subprocess.run([os.path.join(ROOT, "appliance", "vendor.sh"), site, "3.11", wheel], capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        shutil.copy(OFFGRID, os.path.join(root, "opt", "offgrid", "offgrid.py"))
        yield root


@pytest.mark.slow
def test_the_appliances_arm64_offgrid_is_a_worker_for_an_x86_head(appliance_root, lan, golden):
    import llama_cpp
    root = appliance_root
    cmd = ["chroot", root, "env", "PYTHONPATH=/opt/offgrid/site", "python3", "/opt/offgrid/offgrid.py"]
    # The same llama-cpp-python release on both sides, so the same llama.cpp
    # and RPC protocol; only the machine differs.
    r = subprocess.run(cmd[:-2] + ["python3", "-c", "import platform; print(platform.machine())"],
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "aarch64", (r.stdout, r.stderr)
    r = subprocess.run(cmd + ["version"], capture_output=True, text=True, timeout=300)
    assert "llama-cpp-python %s" % llama_cpp.__version__ in r.stdout, (r.stdout, r.stderr)
    # The Pi on the LAN: its own namespace on the bridge, lending 16M.
    ns, address, _ = lan.namespace("pi")
    env = dict(SMALL, OFFGRID_P2P_PORT=lan.udp_port, OFFGRID_P2P_INTERVAL=1, OFFGRID_P2P_NAME="pi",
               OFFGRID_P2P_SECRET=SECRET)
    worker = Worker(os.path.join(root, "var", "tmp", "worker"), ["--host", address, "--memory", ARM64_WORKER_MEMORY],
                    cmd=["ip", "netns", "exec", ns] + cmd, env=env, timeout=600)
    try:
        assert "Starting RPC server" in worker.output() and "secret=yes" in worker.output(), worker.output()
        # Nobody without the secret reaches its RPC server.
        with pytest.raises(offgrid.ClusterError, match="refused the connection"):
            offgrid.handshake_dial((address, worker.port), b"guess", offgrid.RPC_MODE_RELAY)
        # The head finds it by its announcements, with no address typed.
        head = start_head(lan, golden[0], budget=ARM64_HEAD_BUDGET)
        heard(head, ["pi"])
        status, body, _ = head.post("/v1/chat/completions", golden_model.REQUEST, timeout=600)
        assert status == 200, (body, head.output()[-3000:], worker.output()[-3000:])
        assert body["choices"][0]["message"]["content"] == golden[1]
        [loaded] = head.get("/health")[1]["loaded"]
        split = loaded["split"]
        assert split["head"]["layers"] == 1, split
        assert [(w["name"], w["layers"]) for w in split["workers"]] == [("pi", 1)], split
        assert "head connected" in worker.output()
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.output()[-3000:]
