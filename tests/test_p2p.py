"""LAN peers: the datagram parser and peer table on their own, the manifest
and blob routes on a real server, and whole nodes in real network
namespaces joined by veth pairs to a bridge, each running its own
`offgrid.py serve --p2p` with its own store."""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

import offgrid
from conftest import IN_CI, Server, run_cli, wait_for, write_gguf

SECRET = "clinic-lan-secret"


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def announcement(secret=None, **fields):
    msg = {"p": offgrid.P2P_PROTOCOL, "t": "announce", "id": "ab" * 8, "name": "deck", "version": "0.1.0",
           "port": 11611, "tls": False, "seq": 7, "ts": time.time(), "digest": "0123abcd"}
    msg.update(fields)
    if secret is not None:
        msg["mac"] = offgrid.peer_mac(secret, offgrid.canonical(msg))
    return offgrid.canonical(msg).encode()


def reason(data, secret=None, now=None):
    try:
        offgrid.parse_datagram(data, secret, time.time() if now is None else now)
    except offgrid.DatagramDropped as e:
        return e.args[0]
    return "ok"


# -- datagrams and the peer table, without a network ---------------------------

def test_datagram_parser_accepts_good_and_names_what_is_wrong():
    key = SECRET.encode()
    assert reason(announcement()) == "ok"
    assert reason(announcement(key), key) == "ok"
    assert reason(b"x" * (offgrid.P2P_DATAGRAM_MAX + 1)) == "oversized"
    assert reason(announcement()[:-9]) == "malformed"  # truncated
    assert reason(b"\xff\xfe garbage") == "malformed"
    assert reason(b"[1, 2]") == "malformed"
    assert reason(b"[" * 1020) == "malformed"  # nests too deeply
    for bad in ({"port": 0}, {"port": 70000}, {"port": "80"}, {"seq": -1}, {"seq": True}, {"id": "../x"},
                {"name": ""}, {"name": "a\nb"}, {"t": "hello"}, {"digest": "zz"}, {"ts": "now"}, {"p": "other/1"},
                {"tls": "yes"}):
        assert reason(announcement(**bad)) == "malformed", bad
    assert reason(announcement(), key) == "unsigned"
    assert reason(announcement(b"another secret"), key) == "bad_signature"
    tampered = json.loads(announcement(key))
    tampered["port"] = 8080
    assert reason(json.dumps(tampered).encode(), key) == "bad_signature"
    assert reason(announcement(key, ts=time.time() - 3600), key) == "stale"
    assert reason(announcement(key)) == "signed"  # a node without the secret cannot talk to it anyway


def test_peer_table_drops_copies_and_replays_and_forgets_the_silent():
    table = offgrid.PeerTable(expiry_s=5)
    now = 1000.0
    first = json.loads(announcement(seq=5))
    assert table.heard(first, "10.0.0.2", now)["name"] == "deck"  # new: fetch its manifest
    assert table.heard(first, "10.0.0.2", now) is None
    assert table.heard(json.loads(announcement(seq=4)), "10.0.0.2", now + 1) is None
    assert table.counters()["dropped"]["duplicate"] == 1
    assert table.counters()["dropped"]["replayed"] == 1
    table.set_models("ab" * 8, "0123abcd", [])
    assert table.heard(json.loads(announcement(seq=6)), "10.0.0.2", now + 2) is None  # digest unchanged
    assert [p["name"] for p in table.alive(now + 6)] == ["deck"]
    assert table.alive(now + 8) == []
    table.heard(json.loads(announcement(seq=9, id="cd" * 8)), "10.0.0.3", now)
    table.heard(json.loads(announcement(seq=10, id="cd" * 8, t="bye")), "10.0.0.3", now + 1)
    assert table.alive(now + 1) == []


def test_byte_ranges():
    assert offgrid.byte_range(None, 100) is None
    assert offgrid.byte_range("bytes=0-9", 100) == (0, 9)
    assert offgrid.byte_range("bytes=90-", 100) == (90, 99)
    assert offgrid.byte_range("bytes=90-500", 100) == (90, 99)
    assert offgrid.byte_range("bytes=-10", 100) == (90, 99)
    assert offgrid.byte_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole file
    assert offgrid.byte_range("bytes=9-3", 100) is None
    for header in ("bytes=100-", "bytes=-0"):
        with pytest.raises(offgrid.ApiError) as e:
            offgrid.byte_range(header, 100)
        assert e.value.status == 416


# -- the peer routes on a real server on 127.0.0.1 ---------------------------------

def small_model(make_gguf, name, size_mb=1, seed=0):
    """A valid GGUF file of about size_mb MiB; different seeds give different files."""
    path = make_gguf(name, metadata={"general.name": "%s-%d" % (name, seed)},
                     tensors=(("w", (size_mb * 256, 1024)),))
    return path


def install(models_dir, path, model_id):
    return offgrid.ModelStore(str(models_dir)).install([path], model_id, "test")


def raw_get(url, path, headers=None):
    """(status, headers, body bytes) of a GET, with the path sent exactly as given."""
    import http.client
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_blobs_serve_installed_models_by_sha256_with_ranges_and_nothing_else(start_server, tmp_path, make_gguf):
    models = tmp_path / "models"
    manifest = install(models, small_model(make_gguf, "a.gguf"), "tiny-a")
    (models / "notes.txt").write_text("private")
    # A file dropped in by hand has no sha256 yet: the node hashes it, then offers it.
    dropped = small_model(make_gguf, "by-hand.gguf", seed=9)
    shutil.copy(dropped, str(models / "by-hand.gguf"))
    data = open(str(models / manifest["file"]), "rb").read()
    srv = start_server(models_dir=str(models), wait_model=False,
                       env={"OFFGRID_P2P": "1", "OFFGRID_P2P_PORT": free_udp_port()})

    def offered():
        status, body, _ = srv.get("/v1/p2p/manifest")
        assert status == 200, body
        return body if len(body["data"]) == 2 else None
    body = wait_for("the dropped-in file to be hashed", offered)
    assert sorted(m["sha256"] for m in body["data"]) == sorted([manifest["sha256"], offgrid.sha256_file(dropped)])
    assert body["digest"] == offgrid.models_digest(body["data"])
    blob = "/v1/p2p/blobs/" + manifest["sha256"]
    status, headers, got = raw_get(srv.url, blob)
    assert status == 200 and got == data and headers["Accept-Ranges"] == "bytes"
    status, headers, got = raw_get(srv.url, blob, {"Range": "bytes=100-199"})
    assert status == 206 and got == data[100:200]
    assert headers["Content-Range"] == "bytes 100-199/%d" % len(data)
    status, headers, got = raw_get(srv.url, blob, {"Range": "bytes=%d-" % len(data)})
    assert status == 416 and json.loads(got)["error"]["code"] == "range_not_satisfiable"
    assert headers["Content-Range"] == "bytes */%d" % len(data)
    manifest_sha = hashlib.sha256(open(str(models / "tiny-a.manifest.json"), "rb").read()).hexdigest()
    for path in ("/v1/p2p/blobs/" + "0" * 64, "/v1/p2p/blobs/" + manifest_sha, "/v1/p2p/blobs/tiny-a",
                 "/v1/p2p/blobs/tiny-a.gguf", "/v1/p2p/blobs/..%2Fnotes.txt", "/v1/p2p/blobs/%2e%2e",
                 "/v1/p2p/blobs/notes.txt", "/v1/p2p/blobs/" + manifest["sha256"] + "%00",
                 "/v1/p2p/blobs/../../etc/passwd", "/v1/p2p/blobs/%2Fetc%2Fpasswd",
                 "/v1/p2p/blobs/" + manifest["sha256"] + "/x"):
        status, _headers, got = raw_get(srv.url, path)
        assert status == 404, (path, status)
        assert b"private" not in got and b"GGUF" not in got, path
    assert "offgrid_p2p_bytes_served_total %d" % (len(data) + 100) in raw_get(srv.url, "/metrics")[2].decode()


def test_peer_routes_are_closed_when_sharing_is_off(start_server, tmp_path, make_gguf):
    models = tmp_path / "models"
    manifest = install(models, small_model(make_gguf, "a.gguf"), "tiny-a")
    srv = start_server(models_dir=str(models), wait_model=False)
    for path in ("/v1/p2p/manifest", "/v1/p2p/blobs/" + manifest["sha256"]):
        status, body, _ = srv.get(path)
        assert status == 404 and body["error"]["code"] == "p2p_disabled", body
    status, body, _ = srv.get("/v1/p2p/peers")
    assert status == 200 and body["enabled"] is False and body["data"] == []
    status, body, _ = srv.post("/v1/p2p/pull", {"id": "tiny-a"})
    assert status == 404 and body["error"]["code"] == "p2p_disabled"
    status, body, _ = srv.post("/v1/p2p/pull", {"id": 5})
    assert status == 400 and body["error"]["param"] == "id"
    status, body, _ = srv.post("/v1/p2p/pull", {"id": "x", "from": "y"})
    assert status == 400 and body["error"]["param"] == "from"


def signed(node_id, method, path, secret, ts=None):
    ts = "%.3f" % (time.time() if ts is None else ts)
    return {offgrid.PEER_HEADER: "%s %s %s" % (node_id, ts, offgrid.peer_mac(
        secret.encode(), "%s %s %s %s" % (method, path, node_id, ts)))}


def test_peer_routes_take_a_signature_or_a_key(start_server, tmp_path, make_gguf):
    models = tmp_path / "models"
    manifest = install(models, small_model(make_gguf, "a.gguf"), "tiny-a")
    key = "sk-test-p2p-admin"
    srv = start_server(models_dir=str(models), wait_model=False,
                       env={"OFFGRID_P2P": "1", "OFFGRID_P2P_PORT": free_udp_port(), "OFFGRID_P2P_SECRET": SECRET,
                            "OFFGRID_API_KEY": key})
    path = "/v1/p2p/manifest"
    node = "12" * 8
    assert srv.get(path)[0] == 401
    assert srv.request("GET", path, headers=signed(node, "GET", path, SECRET))[0] == 200
    status, body, _ = srv.request("GET", path, headers=signed(node, "GET", path, "wrong secret"))
    assert status == 401 and body["error"]["code"] == "invalid_peer_signature"
    stale = signed(node, "GET", path, SECRET, ts=time.time() - 3600)
    assert srv.request("GET", path, headers=stale)[0] == 401
    # A signature is for one path: it does not open another.
    blob = "/v1/p2p/blobs/" + manifest["sha256"]
    assert srv.request("GET", blob, headers=signed(node, "GET", path, SECRET))[0] == 401
    assert raw_get(srv.url, blob, signed(node, "GET", blob, SECRET))[0] == 200
    assert srv.request("GET", path, headers={"Authorization": "Bearer " + key})[0] == 200
    assert srv.request("GET", path, headers={"Authorization": "Bearer sk-wrong"})[0] == 401
    # The peer signature opens only the peer routes.
    assert srv.request("GET", "/v1/p2p/peers", headers=signed(node, "GET", "/v1/p2p/peers", SECRET))[0] == 401
    status, body, _ = srv.request("GET", "/v1/p2p/peers", headers={"Authorization": "Bearer " + key})
    assert status == 200 and body["enabled"] is True and body["node"]["name"]


def test_secret_alone_closes_the_peer_routes_to_others(start_server, tmp_path, make_gguf):
    models = tmp_path / "models"
    install(models, small_model(make_gguf, "a.gguf"), "tiny-a")
    srv = start_server(models_dir=str(models), wait_model=False,
                       env={"OFFGRID_P2P": "1", "OFFGRID_P2P_PORT": free_udp_port(), "OFFGRID_P2P_SECRET": SECRET})
    status, body, _ = srv.get("/v1/p2p/manifest")
    assert status == 401 and body["error"]["code"] == "missing_peer_signature"
    # A made-up key does not get around the secret when the node has no keys.
    assert srv.request("GET", "/v1/p2p/manifest", headers={"Authorization": "Bearer anything"})[0] == 401
    assert srv.get("/v1/models")[0] == 200  # the rest of an open API stays open


def test_config_checks_the_peer_settings(tmp_path):
    for env, text in (({"OFFGRID_P2P_GROUP": "10.0.0.1"}, "multicast"), ({"OFFGRID_P2P_PORT": "0"}, "p2p_port"),
                      ({"OFFGRID_P2P_INTERVAL": "0"}, "p2p_interval")):
        result = run_cli(["config", "show"], tmp_path, env=env)
        assert result.returncode == 2 and text in result.stderr, result.stderr
    result = run_cli(["config", "show", "--json"], tmp_path, env={"OFFGRID_P2P_SECRET": "do-not-print-me"})
    assert result.returncode == 0 and "do-not-print-me" not in result.stdout
    assert json.loads(result.stdout)["values"]["p2p_secret"]["value"] == "hidden"


# -- whole nodes in network namespaces ---------------------------------------

def lan_unavailable():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the ip command (iproute2) is not installed"
    return None


class Lan:
    """A bridge in this namespace (with an address, so the test can reach
    the nodes) and one network namespace per node, each joined to it by a
    veth pair. Names carry a random tag so parallel runs do not clash."""

    def __init__(self, tmp_path):
        self.tag = "%04x" % random.randrange(1 << 16)
        self.tmp = tmp_path
        self.bridge = "ogb" + self.tag
        self.nodes = []
        self.namespaces = []
        self.links = []
        self.udp_port = random.randrange(20000, 30000)
        taken = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        while True:
            self.prefix = "10.%d.%d" % (random.randrange(100, 250), random.randrange(256))
            if self.prefix + "." not in taken:
                break
        self.ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        self.ip("addr", "add", self.prefix + ".1/24", "brd", "+", "dev", self.bridge)
        self.ip("link", "set", self.bridge, "up")

    @staticmethod
    def ip(*args):
        result = subprocess.run(["ip"] + list(args), capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError("ip %s: %s" % (" ".join(args), result.stderr.strip()))

    def namespace(self, name):
        """A namespace on the bridge; returns (namespace, address)."""
        index = len(self.namespaces) + 2
        ns, host_end = "og%s%s" % (self.tag, name), "ogv%s%d" % (self.tag, index)
        self.ip("netns", "add", ns)
        self.namespaces.append(ns)
        self.ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(host_end)
        self.ip("link", "set", host_end, "master", self.bridge)
        self.ip("link", "set", host_end, "up")
        address = "%s.%d" % (self.prefix, index)
        self.ip("-n", ns, "addr", "add", address + "/24", "brd", "+", "dev", "eth0")
        self.ip("-n", ns, "link", "set", "eth0", "up")
        self.ip("-n", ns, "link", "set", "lo", "up")
        wrapper = self.tmp / ("python-in-" + ns)
        wrapper.write_text("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n" % (ns, sys.executable))
        wrapper.chmod(0o755)
        return ns, address, str(wrapper)

    def node(self, name, models=(), secret=SECRET, interval=1, env=None):
        """`offgrid serve --p2p` in a namespace of its own, with its own store."""
        ns, address, python = self.namespace(name)
        home = self.tmp / name
        models_dir = home / "models"
        # Every node holds a model of its own, so that none installs the
        # starter model (hundreds of MB) at start.
        own = write_gguf(self.tmp / ("own-%s.gguf" % name), {"general.architecture": "llama",
                                                            "general.name": "own-" + name})
        for path, model_id in list(models) + [(own, "own-" + name)]:
            install(models_dir, path, model_id)
        extra = {"OFFGRID_P2P_PORT": self.udp_port, "OFFGRID_P2P_INTERVAL": interval, "OFFGRID_P2P_NAME": name,
                 "OFFGRID_LOG_REQUESTS": "0"}
        if secret:
            extra["OFFGRID_P2P_SECRET"] = secret
        extra.update(env or {})
        srv = Server(home, str(models_dir), python=python, args=["--p2p", "--host", address, "--insecure"],
                     env=extra, wait_model=False)
        srv.name, srv.python, srv.home, srv.models_dir, srv.address = name, python, home, models_dir, address
        self.nodes.append(srv)
        return srv

    def close(self):
        for srv in self.nodes:
            try:
                srv.stop(timeout=10)
            except Exception:
                pass
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)


@pytest.fixture
def lan(tmp_path):
    why = lan_unavailable()
    if why:
        if IN_CI:
            pytest.fail("CI must run the LAN tests, but: " + why)
        pytest.skip(why)
    try:
        net = Lan(tmp_path)
    except RuntimeError as e:
        if IN_CI:
            pytest.fail("cannot make network namespaces: %s" % e)
        pytest.skip("cannot make network namespaces: %s" % e)
    try:
        yield net
    finally:
        net.close()


def peers_of(srv):
    status, body, _ = srv.get("/v1/p2p/peers")
    assert status == 200, body
    return body


def see(srv, names, with_models=True):
    def check():
        data = peers_of(srv)["data"]
        seen = {p["name"]: p for p in data}
        if set(seen) == set(names) and (not with_models or all(len(p["models"]) > 1 for p in data)):
            return seen
        return None
    return check


def wait_job(srv, job, timeout=60):
    def check():
        status, body, _ = srv.get("/v1/models/download/" + job)
        assert status == 200, body
        return body if body["status"] in ("done", "failed", "cancelled") else None
    return wait_for("job %s" % job, check, timeout)


@pytest.mark.slow
def test_three_nodes_find_each_other_and_c_pulls_what_only_a_has(lan, make_gguf):
    only_a = small_model(make_gguf, "only-a.gguf", seed=1)
    both = small_model(make_gguf, "both.gguf", seed=2)
    a = lan.node("a", [(only_a, "only-a"), (both, "shared")])
    b = lan.node("b", [(both, "shared")])
    c = lan.node("c")
    started = time.time()
    seen = wait_for("C to see A and B with their models", see(c, {"a", "b"}), timeout=15)
    took = time.time() - started
    assert took < 5 * 1, "three nodes took %.1fs to meet (interval 1s)" % took
    wait_for("A to see B and C", see(a, {"b", "c"}, with_models=False))
    wait_for("B to see A and C", see(b, {"a", "c"}, with_models=False))
    listing = peers_of(c)
    assert listing["enabled"] is True and listing["node"]["name"] == "c"
    assert all(p["name"] != "c" for p in listing["data"])  # our own announcements are not a peer
    peer_a = seen["a"]
    assert peer_a["address"] == a.address and peer_a["port"] == a.port and peer_a["age_s"] < 5
    assert sorted(m["id"] for m in peer_a["models"]) == ["only-a", "own-a", "shared"]
    assert {"id", "file", "size", "sha256", "quantization"} <= set(peer_a["models"][0])
    assert "offgrid_p2p_peers 2" in raw_get(c.url, "/metrics")[2].decode()

    # The CLI in C's namespace finds them too, by asking.
    result = run_cli(["peers", "--json", "--wait", "1.5"], c.home, python=c.python,
                     env={"OFFGRID_P2P_PORT": lan.udp_port, "OFFGRID_P2P_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    assert {p["name"] for p in json.loads(result.stdout)["data"]} == {"a", "b", "c"}

    status, body, _ = c.post("/v1/p2p/pull", {"id": "only-a"})
    assert status == 202, body
    assert set(body) >= {"job", "id", "file", "status", "bytes_done", "bytes_total"}
    job = wait_job(c, body["job"])
    assert job["status"] == "done", job
    assert job["source"].startswith("peer:a "), job
    status, model, _ = c.get("/v1/models/only-a")
    assert status == 200 and model["sha256"] == offgrid.sha256_file(only_a)
    status, body, _ = c.post("/v1/p2p/pull", {"id": "nobody-has-this"})
    assert status == 404 and body["error"]["code"] == "model_not_on_peers" and "only-a" in body["error"]["message"]
    status, body, _ = c.post("/v1/p2p/pull", {"id": "shared", "peer": "z"})
    assert status == 404 and body["error"]["param"] == "peer"


@pytest.mark.slow
def test_a_peer_that_dies_mid_transfer_is_replaced_by_another(lan, make_gguf):
    big = small_model(make_gguf, "big.gguf", size_mb=4, seed=3)
    a = lan.node("a", [(big, "big")])
    b = lan.node("b", [(big, "big")])
    c = lan.node("c")
    wait_for("C to see A and B", see(c, {"a", "b"}))
    part = c.models_dir / ("big.gguf" + offgrid.PART_SUFFIX)
    log = open(str(c.home / "pull.log"), "w+")
    pull = subprocess.Popen([c.python, offgrid.__file__, "pull", "big", "--peer", "a", "--limit-rate", "1M",
                             "--wait", "1.5", "--models-dir", str(c.models_dir)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(c.home),
                            env=dict(os.environ, OFFGRID_HOME=str(c.home / "cli"), OFFGRID_P2P_PORT=str(lan.udp_port),
                                     OFFGRID_P2P_SECRET=SECRET))
    try:
        wait_for("a quarter of the file from A", lambda: part.exists() and part.stat().st_size > 1 << 20, 30)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        assert pull.wait(60) == 0, open(log.name).read()
    finally:
        if pull.poll() is None:
            pull.kill()
        log.close()
    out = open(log.name).read()
    assert "peer:b" in out and "installed big" in out, out
    assert offgrid.sha256_file(str(c.models_dir / "big.gguf")) == offgrid.sha256_file(big)
    assert not part.exists()
    # B sent only what A had not: the .part was resumed, not started over.
    served = [line for line in raw_get(b.url, "/metrics")[2].decode().splitlines()
              if line.startswith("offgrid_p2p_bytes_served_total ")]
    assert 0 < int(served[0].split()[1]) <= os.path.getsize(big) - (1 << 20), served


@pytest.mark.slow
def test_a_peer_serving_tampered_bytes_is_caught_and_not_used_again(lan, make_gguf):
    good = small_model(make_gguf, "good.gguf", seed=4)
    lan.node("b", [(good, "model")])
    t = lan.node("t", [(good, "model")])
    c = lan.node("c")
    # T's copy rots (or is altered) after install: its manifest still claims the true sha256.
    with open(str(t.models_dir / "model.gguf"), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\x01" * 50)
    sha = offgrid.sha256_file(good)
    wait_for("C to see B and T", see(c, {"b", "t"}))
    status, body, _ = c.post("/v1/p2p/pull", {"id": "model", "peer": "t"})
    assert status == 202, body
    job = wait_job(c, body["job"])
    assert job["status"] == "done" and job["source"].startswith("peer:b "), job
    assert offgrid.sha256_file(str(c.models_dir / "model.gguf")) == sha
    bad = {p["name"]: p["bad"] for p in peers_of(c)["data"]}
    assert bad == {"b": [], "t": [sha]}, bad
    assert "peer served wrong bytes" in c.output(), c.output()[-3000:]
    # Not used again for that file, even when asked for by name.
    os.unlink(str(c.models_dir / "model.gguf"))
    status, body, _ = c.post("/v1/p2p/pull", {"id": "model", "peer": "t"})
    job = wait_job(c, body["job"])
    assert job["status"] == "done" and job["source"].startswith("peer:b "), job


@pytest.mark.slow
def test_wrong_secret_is_never_listed_and_garbage_leaves_the_table_intact(lan, make_gguf):
    model = small_model(make_gguf, "m.gguf", seed=5)
    a = lan.node("a", [(model, "m")])
    c = lan.node("c")
    d = lan.node("d", [(model, "m")], secret="not-the-clinic-secret")
    wait_for("C to see A", see(c, {"a"}))

    # Catch one of A's real announcements on the bridge, to replay it later.
    catcher = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    catcher.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    catcher.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    catcher.bind(("", lan.udp_port))
    catcher.settimeout(5)
    while True:
        data, (sender, _) = catcher.recvfrom(4096)
        if sender == a.address:
            captured = data
            break
    catcher.close()
    time.sleep(2.5)  # A announces again, so the captured one is old

    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    target = (lan.prefix + ".255", lan.udp_port)
    rng = random.Random(1)
    genuine = json.loads(captured)
    floods = [captured, b"", b"{", b"\0" * 1500, b"x" * 65000, captured[:40], json.dumps(
        dict(genuine, seq=genuine["seq"] + 10 ** 6)).encode()]  # a forged seq: the MAC no longer matches
    for i in range(2000):
        sender.sendto(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), target)
        sender.sendto(floods[i % len(floods)], (c.address, lan.udp_port))
    sender.close()

    time.sleep(3)
    assert c.proc.poll() is None and a.proc.poll() is None
    seen = wait_for("C to still list A alone", see(c, {"a"}))
    assert seen["a"]["models"]
    dropped = peers_of(c)["datagrams"]["dropped"]
    for why in ("malformed", "oversized", "replayed", "bad_signature"):
        assert dropped[why] > 0, (why, dropped)
    metrics = raw_get(c.url, "/metrics")[2].decode()
    assert 'offgrid_p2p_datagrams_dropped_total{reason="malformed"}' in metrics
    # D, with another secret, is in nobody's table, and sees nobody.
    assert {p["name"] for p in peers_of(a)["data"]} == {"c"}
    assert peers_of(d)["data"] == []
    assert peers_of(d)["datagrams"]["dropped"]["bad_signature"] > 0
    assert d.get("/v1/p2p/manifest")[0] == 401


@pytest.mark.slow
def test_download_tries_peers_before_the_internet(lan, make_gguf):
    model = small_model(make_gguf, "cat.gguf", seed=6)
    a = lan.node("a", [(model, "catalogued")])
    c = lan.node("c")
    wait_for("C to see A", see(c, {"a"}))
    home = c.home / "cli"
    home.mkdir()
    # The catalog's URL leads nowhere: the file can only come from the peer.
    entry = {"id": "catalogued", "file": "catalogued.gguf", "url": "http://127.0.0.1:9/catalogued.gguf",
             "size": os.path.getsize(model), "sha256": offgrid.sha256_file(model)}
    (home / "catalog.json").write_text(json.dumps({"models": [entry]}))
    env = {"OFFGRID_P2P": "1", "OFFGRID_P2P_PORT": lan.udp_port, "OFFGRID_P2P_SECRET": SECRET}
    dest = str(c.home / "elsewhere")
    result = run_cli(["download", "catalogued", "--models-dir", dest, "--wait", "1.5"], home, python=c.python,
                     env=env)
    assert result.returncode == 0, result.stderr
    assert "from peer:a" in result.stdout and "1 peer has it: a" in result.stderr, result.stdout + result.stderr
    # With the only peer gone, download goes to the internet (here: a URL that refuses).
    a.stop()
    result = run_cli(["download", "catalogued", "--models-dir", str(c.home / "third"), "--wait", "1"], home,
                     python=c.python, env=env)
    assert result.returncode == 1 and "no peer has it" in result.stderr, result.stderr
    assert "127.0.0.1:9" in result.stderr


@pytest.mark.slow
def test_several_peers_share_one_transfer_and_a_liar_among_them_is_found(lan, make_gguf):
    chunk = offgrid.SWARM_CHUNK // (1 << 20)
    big = small_model(make_gguf, "swarm.gguf", size_mb=3 * chunk, seed=7)
    other = small_model(make_gguf, "other.gguf", size_mb=3 * chunk, seed=8)
    a = lan.node("a", [(big, "swarm")])
    b = lan.node("b", [(big, "swarm"), (other, "other")])
    t = lan.node("t", [(other, "other")])
    c = lan.node("c")
    # Every chunk T may be given is wrong, whichever share of the ranges it gets.
    with open(str(t.models_dir / "other.gguf"), "r+b") as f:
        for i in range(3):
            f.seek(i * offgrid.SWARM_CHUNK + offgrid.SWARM_CHUNK // 2)
            f.write(b"\x01" * 50)
    wait_for("C to see A, B and T", see(c, {"a", "b", "t"}))

    def served(srv):
        lines = [line for line in raw_get(srv.url, "/metrics")[2].decode().splitlines()
                 if line.startswith("offgrid_p2p_bytes_served_total ")]
        return int(lines[0].split()[1])
    status, body, _ = c.post("/v1/p2p/pull", {"id": "swarm"})
    job = wait_job(c, body["job"])
    assert job["status"] == "done" and job["source"] == "peers:a,b", job
    assert offgrid.sha256_file(str(c.models_dir / "swarm.gguf")) == offgrid.sha256_file(big)
    # Both peers sent chunks, and no byte was sent twice.
    assert served(a) > 0 and served(b) > 0 and served(a) + served(b) == os.path.getsize(big)

    # B and T offer "other"; T's copy is wrong. The shared transfer fails its
    # hash, then one peer at a time finds T out, and B's copy is installed.
    status, body, _ = c.post("/v1/p2p/pull", {"id": "other", "peer": "t"})
    job = wait_job(c, body["job"])
    assert job["status"] == "done" and job["source"].startswith("peer:b "), job
    assert offgrid.sha256_file(str(c.models_dir / "other.gguf")) == offgrid.sha256_file(other)
    bad = {p["name"]: p["bad"] for p in peers_of(c)["data"]}
    assert bad == {"a": [], "b": [], "t": [offgrid.sha256_file(other)]}, bad
