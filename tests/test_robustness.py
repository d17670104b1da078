"""Hard to break: a soak of a real server under mixed concurrent traffic
(answers, leaks, log), and SIGKILL at several moments of every operation
that writes files (download, import, export, config and key writes), each
followed by a check that nothing half-written is listed or unreadable and
that running the same command again finishes the job."""

import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import offgrid
from conftest import IN_CI, OFFGRID, Server, free_env, need, run_cli
from test_download import ENV, MODEL_FILE, MODEL_ID, FileServer, entry_for, gguf_with_random_data, write_catalog

STARTER_ID = offgrid.GEMMA["id"]


def proc_status(pid):
    """(threads, resident KiB) of a live process, from /proc/PID/status."""
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0])


# Soak #######################################################################

CLIENTS = 8
PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "What is water?", "One word: sea.",
           "Tell me a fact.", "Hello!", "Write a short line."]


class Client:
    """One of the soak's clients: a keep-alive connection for its requests
    (a fresh socket for the ones it cuts off), checking every answer."""

    def __init__(self, port):
        self.port = port
        self.conn = None
        self.last_used = 0.0

    def _conn(self):
        # The server closes a keep-alive connection idle for idle_timeout
        # (30 s); like any pooling client, do not send on one that old (a
        # cut-off stream waiting for a slot can keep it idle that long).
        if self.conn is not None and time.monotonic() - self.last_used > 15:
            self.conn.close()
            self.conn = None
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        return self.conn

    def call(self, method, path, body=None, raw=None):
        """(status, response bytes, headers) over the keep-alive connection."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            payload = r.read()
        except Exception:
            conn.close()
            self.conn = None
            raise
        self.last_used = time.monotonic()
        if r.will_close:
            conn.close()
            self.conn = None
        return r.status, payload, r.headers

    def cut_stream(self, body, reset):
        """Start a streamed chat, read up to the first event, then hang up
        (a FIN, or an RST when `reset`). Returns the status seen."""
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            got = b""
            for _ in range(1000):
                if b"data: " in got:
                    break
                piece = s.recv(4096)
                if not piece:
                    break
                got += piece
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            s.close()
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", got)
        assert m and b"data: " in got, got[:300]
        return int(m.group(1))


def sse_events(payload):
    events = [line[6:] for line in payload.decode().split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", payload[-300:]
    return [json.loads(e) for e in events[:-1]]


def soak_request(client, kind, rng):
    """Send one request of `kind`; returns its status after checking the
    body is what that status should carry."""
    max_tokens = rng.randint(4, 16)
    chat = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": max_tokens}
    if kind == "chat_stream":
        status, payload, _ = client.call("POST", "/v1/chat/completions", dict(chat, stream=True))
        if status == 200:
            chunks = sse_events(payload)
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]
        return status
    if kind == "chat":
        status, payload, _ = client.call("POST", "/v1/chat/completions", chat)
        if status == 200:
            reply = json.loads(payload)
            assert isinstance(reply["choices"][0]["message"]["content"], str)
            assert reply["usage"]["completion_tokens"] <= max_tokens
        return status
    if kind == "completion":
        status, payload, _ = client.call("POST", "/v1/completions",
                                         {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens})
        if status == 200:
            reply = json.loads(payload)
            assert isinstance(reply["choices"][0]["text"], str)
            assert reply["usage"]["completion_tokens"] <= max_tokens
        return status
    if kind in ("cut_fin", "cut_rst"):
        return client.cut_stream(dict(chat, stream=True, max_tokens=16), reset=kind == "cut_rst")
    if kind in ("bad_json", "wrong_type", "unknown_model"):
        if kind == "bad_json":
            status, payload, _ = client.call("POST", "/v1/chat/completions", raw=b'{"messages": [')
            code = "invalid_json"
        elif kind == "wrong_type":
            status, payload, _ = client.call("POST", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": "ten"}
                                             if rng.random() < 0.5 else {"prompt": 7})
            code = None
        else:
            status, payload, _ = client.call("POST", "/v1/chat/completions", dict(chat, model="no-such-model"))
            code = "model_not_found"
        error = json.loads(payload)["error"]
        assert error["message"] and (code is None or error["code"] == code), error
        return status
    path = {"health": "/health", "models": "/v1/models", "stats": "/stats", "metrics": "/metrics"}[kind]
    status, payload, headers = client.call("GET", path)
    if status == 200:
        if kind == "metrics":
            assert b"offgrid_requests_total" in payload
        else:
            json.loads(payload)
    return status


# Each kind, how often it appears in the plan, and the status it must get.
SOAK_MIX = collections.OrderedDict([
    ("chat_stream", (50, 200)), ("chat", (30, 200)), ("completion", (45, 200)),
    ("cut_fin", (15, 200)), ("cut_rst", (15, 200)),
    ("bad_json", (25, 400)), ("wrong_type", (25, 400)), ("unknown_model", (25, 404)),
    ("health", (30, 200)), ("models", (25, 200)), ("stats", (25, 200)), ("metrics", (20, 200)),
])


SOAK_ENDPOINT = {"chat_stream": "chat_completions", "chat": "chat_completions", "cut_fin": "chat_completions",
                 "cut_rst": "chat_completions", "bad_json": "chat_completions", "unknown_model": "chat_completions",
                 "completion": "completions", "wrong_type": "completions", "health": "health",
                 "models": "list_models", "stats": "stats", "metrics": "metrics"}


def run_plan(port, plan, seed):
    """Send every request of `plan` from CLIENTS threads at once. Returns
    [(kind, status or the exception's repr)], one per request."""
    todo = list(plan)
    lock = threading.Lock()
    results = []

    def worker(n):
        rng = random.Random(seed * 100 + n)
        client = Client(port)
        while True:
            with lock:
                if not todo:
                    break
                kind = todo.pop()
            try:
                outcome = soak_request(client, kind, rng)
            except Exception as e:  # recorded, then reported with the rest
                outcome = repr(e)
            with lock:
                results.append((kind, outcome))
        if client.conn is not None:
            client.conn.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "a soak client is stuck"
    return results


def metrics_counts(srv):
    status, payload, _ = Client(srv.port).call("GET", "/metrics")
    assert status == 200
    counts = collections.Counter()
    for m in re.finditer(r'^offgrid_requests_total\{endpoint="([^"]+)",method="[A-Z]+",status="(\d+)"\} (\d+)$',
                         payload.decode(), re.M):
        counts[(m.group(1), int(m.group(2)))] += int(m.group(3))
    return counts


def settle(srv, baseline_threads, timeout=30):
    """Wait until the queue is empty and the thread count is back near the
    baseline; returns (threads, rss KiB, queue)."""
    deadline = time.monotonic() + timeout
    while True:
        queue = srv.get("/health")[1]["queue"]
        threads, rss = proc_status(srv.proc.pid)
        idle = queue["running"] == 0 and queue["waiting"] == 0
        if (idle and threads <= baseline_threads + 2) or time.monotonic() > deadline:
            return threads, rss, queue
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.model
def test_soak_mixed_concurrent_traffic_answers_everything_and_leaks_nothing(tmp_path, model_store):
    need("llama_cpp", "the soak test")
    srv = Server(tmp_path / "home", model_store)
    try:
        pid = srv.proc.pid
        # Warm up every path once per client, so the baseline includes what
        # the first requests allocate for good (slots, caches, buffers).
        warm = [kind for kind in SOAK_MIX for _ in range(CLIENTS // 2)]
        warm_results = run_plan(srv.port, warm, seed=1)
        assert [r for r in warm_results if r[1] != SOAK_MIX[r[0]][1]] == []
        threads0, rss0, _ = settle(srv, baseline_threads=10 ** 6)
        time.sleep(1)
        threads0, rss0 = proc_status(pid)
        before = metrics_counts(srv)

        plan = [kind for kind, (n, _) in SOAK_MIX.items() for _ in range(n)]
        random.Random(7).shuffle(plan)
        peaks = [threads0, rss0]
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                threads, rss = proc_status(pid)
                peaks[:] = [max(peaks[0], threads), max(peaks[1], rss)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            results = run_plan(srv.port, plan, seed=2)
        finally:
            done.set()
            sampler.join(5)
        took = time.monotonic() - started
        peak_threads, peak_rss = peaks

        assert len(results) == len(plan), "not every request was answered"
        unexpected = [(kind, got) for kind, got in results if got != SOAK_MIX[kind][1]]
        assert unexpected == [], "unexpected answers: %r" % unexpected[:20]

        threads1, rss1, queue = settle(srv, threads0)
        time.sleep(1)
        threads1, rss1 = proc_status(pid)
        growth_mib = (rss1 - rss0) / 1024.0
        print("\nsoak: %d requests from %d clients in %.1f s; threads %d before, %d at peak, %d settled; "
              "RSS %.1f MiB before, %.1f MiB at peak, %.1f MiB settled (growth %+.1f MiB)" % (
                  len(plan), CLIENTS, took, threads0, peak_threads, threads1, rss0 / 1024.0, peak_rss / 1024.0,
                  rss1 / 1024.0, growth_mib))
        assert queue == dict(queue, running=0, waiting=0), queue
        assert threads1 <= threads0 + 2, "threads: %d before the soak, %d after" % (threads0, threads1)
        assert growth_mib < 64, "RSS grew by %.1f MiB over the soak" % growth_mib

        # The server counted what the clients saw, by endpoint and status
        # (/health left out: settle() polls it). The /metrics read that
        # took `before` counts too.
        after = metrics_counts(srv)
        delta = {k: after[k] - before.get(k, 0) for k in after
                 if after[k] != before.get(k, 0) and k[0] != "health"}
        wanted = collections.Counter({("metrics", 200): 1})
        for kind in plan:
            if kind != "health":
                wanted[(SOAK_ENDPOINT[kind], SOAK_MIX[kind][1])] += 1
        assert delta == dict(wanted), (delta, wanted)

        assert srv.get("/health")[0] == 200
    finally:
        code = srv.stop()
    log = srv.output()
    assert "Traceback" not in log and "request failed" not in log, log[-5000:]
    assert code == 0, log[-3000:]


# SIGKILL ####################################################################
#
# Each operation is run as `offgrid.py ...`; its progress lines (one per
# 10%, on stderr when it is not a terminal) say where it is, and it is
# killed at the first line at or past a target: early, middle, late, and
# right after the last byte (while it fsyncs, verifies and renames).

KILL_AT = (10, 50, 90, 100)


def run_and_kill(args, home, label, at_percent, env=None, timeout=120):
    """Run offgrid ARGS and SIGKILL it at the first progress line of
    `label` at or past `at_percent`. Returns (killed, percent seen, stderr)."""
    os.makedirs(str(home), exist_ok=True)
    proc = subprocess.Popen([sys.executable, OFFGRID] + list(args), env=free_env(home, **(env or {})),
                            cwd=str(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # the read below ends when the process does
    watchdog.start()
    seen, percent = [], None
    try:
        pattern = re.compile(r"^%s (\d+)%% " % re.escape(label))
        for line in proc.stderr:
            seen.append(line)
            m = pattern.match(line)
            if m and int(m.group(1)) >= at_percent:
                percent = int(m.group(1))
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stderr.close()
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, "".join(seen)
    return killed and percent is not None, percent, "".join(seen)


def listed(home, models_dir=None):
    args = ["list", "--json"] + (["--models-dir", models_dir] if models_dir else [])
    r = run_cli(args, home)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def assert_only_whole_models(home, models_dir, expected_ids=None):
    """Every model `list` shows has a recorded sha256 that its file has."""
    models = listed(home, models_dir)
    for m in models:
        assert m["sha256"], "listed without a verified sha256: %r" % m
        path = os.path.join(models_dir, m["file"])
        assert os.path.getsize(path) == m["size"], m
        assert offgrid.sha256_file(path) == m["sha256"], "listed but not whole: %r" % m
    if expected_ids is not None:
        assert sorted(m["id"] for m in models) in [sorted(ids) for ids in expected_ids], models
    return models


@pytest.mark.slow
def test_download_killed_at_several_moments_resumes_and_installs_whole(tmp_path, make_gguf):
    data = gguf_with_random_data(make_gguf, "src.gguf", rows=3000)  # ~3 MiB
    files = FileServer({"/files/" + MODEL_FILE: data})
    try:
        files.rate = 768 * 1024  # about 4 s for the whole file
        home = tmp_path / "home"
        url = files.url + "/files/" + MODEL_FILE
        write_catalog(home, [entry_for(data, url)])
        store = os.path.join(str(home), "models")
        part = os.path.join(store, MODEL_FILE + ".part")
        kept = []
        for at in KILL_AT:
            killed, percent, err = run_and_kill(["download", MODEL_ID], home, MODEL_ID, at, env=ENV)
            assert "Traceback" not in err
            if not killed:
                break  # it finished first: nothing left to interrupt
            assert_only_whole_models(home, store, expected_ids=[[], [MODEL_ID]])
            if os.path.exists(part):
                kept.append(os.path.getsize(part))
                assert kept[-1] <= len(data)
        assert kept and kept[0] < len(data), "never killed mid-transfer: %r" % kept
        r = run_cli(["download", MODEL_ID], home, env=ENV)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        # Every run after a kill asked for the rest, not the whole file.
        asked = [rng for rng in files.ranges() if rng]
        for size in kept:
            if size < len(data):
                assert "bytes=%d-" % size in asked, (kept, files.ranges())
        print("\ndownload: killed with the .part at %r of %d bytes; requests %r" % (kept, len(data), files.ranges()))
        models = assert_only_whole_models(home, store, expected_ids=[[MODEL_ID]])
        assert models[0]["sha256"] == entry_for(data, url)["sha256"] and models[0]["source"] == url
        assert not os.path.exists(part)
    finally:
        files.close()


def big_gguf(make_gguf, name="big.gguf", mib=128):
    """A valid GGUF of about `mib` MiB, not all zeros (a byte in the wrong
    place changes its sha256)."""
    path = make_gguf(name, tensors=[("w", (mib * 256, 1024))])
    with open(path, "r+b") as f:
        for i in range(1 << 20, os.path.getsize(path), 1 << 20):
            f.seek(i)
            f.write(i.to_bytes(8, "little"))
    return path


@pytest.mark.slow
def test_import_killed_at_several_moments_never_lists_a_half_model(tmp_path, make_gguf):
    src = big_gguf(make_gguf)
    sha = offgrid.sha256_file(src)
    home = tmp_path / "home"
    store = os.path.join(str(home), "models")
    outcomes = []
    for at in KILL_AT:
        killed, percent, err = run_and_kill(["import", src], home, "import big", at)
        outcomes.append(percent if killed else "finished")
        assert "Traceback" not in err
        assert_only_whole_models(home, store, expected_ids=[[], ["big"]])
        if not killed:
            break
    print("\nimport: killed at %r; left in the store: %r" % (outcomes, sorted(os.listdir(store))))
    assert outcomes[0] != "finished", "import was never caught mid-copy"
    r = run_cli(["import", src, "--json"], home)
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads(r.stdout)["models"][0]["status"]
    assert status in ("imported", "skipped"), r.stdout
    models = assert_only_whole_models(home, store, expected_ids=[["big"]])
    assert models[0]["sha256"] == sha
    # The rerun cleared every temporary copy a kill left behind.
    assert [n for n in os.listdir(store) if n.endswith(".tmp")] == []


@pytest.mark.slow
def test_export_killed_at_several_moments_resumes_and_verifies(tmp_path, make_gguf):
    src = big_gguf(make_gguf)
    sha = offgrid.sha256_file(src)
    home = tmp_path / "home"
    offgrid.ModelStore(os.path.join(str(home), "models")).install([src], "big", "test")
    stick = tmp_path / "stick"
    stick.mkdir()
    folder = stick / "offgrid"
    outcomes = []
    for at in KILL_AT:
        killed, percent, err = run_and_kill(["export", "big", str(stick)], home, "export big", at)
        outcomes.append(percent if killed else "finished")
        assert "Traceback" not in err
        # Whatever the stick lists is whole; a partial copy is not listed.
        if (folder / "manifest.json").exists():
            for e in json.load(open(str(folder / "manifest.json")))["models"]:
                assert offgrid.sha256_file(str(folder / e["file"])) == e["sha256"]
        if not killed:
            break
    print("\nexport: killed at %r; on the stick: %r" % (outcomes, sorted(os.listdir(str(folder)))))
    assert outcomes[0] != "finished", "export was never caught mid-copy"
    r = run_cli(["export", "big", str(stick), "--json"], home)
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads(r.stdout)["models"][0]["status"]
    assert status == "already on the stick" or status.startswith(("resumed (", "copied")), status
    assert offgrid.sha256_file(str(folder / "big.gguf")) == sha
    assert json.load(open(str(folder / "manifest.json")))["models"][0]["sha256"] == sha
    assert not (folder / ".big.gguf.partial").exists()
    # And the stick imports on the next machine, verified.
    other = tmp_path / "other"
    other.mkdir()
    r = run_cli(["import", str(folder), "--json"], other)
    assert r.returncode == 0, r.stdout + r.stderr
    assert assert_only_whole_models(other, os.path.join(str(other), "models"), [["big"]])[0]["sha256"] == sha


def kill_after(args, home, delay):
    """Run offgrid ARGS and SIGKILL it `delay` seconds in (if still running)."""
    proc = subprocess.Popen([sys.executable, OFFGRID] + list(args), env=free_env(home), cwd=str(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err
    return proc.returncode == -signal.SIGKILL


def timed(args, home):
    started = time.monotonic()
    r = run_cli(args, home)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - started


ROUNDS = 16


@pytest.mark.slow
def test_config_init_killed_leaves_old_or_new_file_never_half(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = os.path.join(str(home), "config.json")
    old = '{"port": 1234}\n'
    new = offgrid.starter_config_text()
    full = timed(["config", "init", "--force"], home)
    # Kills spread over the second half of a run and a little past it: the
    # first half is the interpreter starting, the write comes at the end.
    seen = collections.Counter()
    for i in range(ROUNDS):
        with open(path, "w") as f:
            f.write(old)
        killed = kill_after(["config", "init", "--force"], home, full * (0.5 + 0.6 * i / ROUNDS))
        with open(path) as f:
            text = f.read()
        assert text in (old, new), "config.json is half written:\n" + text
        offgrid.read_config_file(path)  # parses
        seen["old" if text == old else "new"] += 1
        seen["killed"] += killed
    leftovers = [n for n in os.listdir(str(home)) if n.endswith(".tmp")]
    print("\nconfig init: a run takes %.2f s; after %d kills spread over it: %r; temporary files left: %d" % (
        full, ROUNDS, dict(seen), len(leftovers)))
    assert seen["killed"] >= ROUNDS // 4
    r = run_cli(["config", "init", "--force"], home)
    assert r.returncode == 0, r.stderr
    assert open(path).read() == new
    assert [n for n in os.listdir(str(home)) if n.endswith(".tmp")] == []  # the next write cleans up
    assert run_cli(["config", "show", "--json"], home).returncode == 0


@pytest.mark.slow
def test_keys_create_killed_leaves_a_readable_key_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = os.path.join(str(home), "keys.json")
    full = timed(["keys", "create", "--name", "first"], home)
    seen = collections.Counter()
    count = 1
    for i in range(ROUNDS):
        killed = kill_after(["keys", "create"], home, full * (0.5 + 0.6 * i / ROUNDS))
        entries = offgrid.KeyFile(path).read()  # parses, or raises
        with open(path) as f:
            assert len(json.load(f)["keys"]) == len(entries)  # no entry was half written
        assert len(entries) in (count, count + 1)
        seen["added" if len(entries) > count else "not added"] += 1
        seen["killed"] += killed
        count = len(entries)
    leftovers = [n for n in os.listdir(str(home)) if n.endswith(".tmp")]
    print("\nkeys create: a run takes %.2f s; after %d kills spread over it: %r; temporary files left: %d" % (
        full, ROUNDS, dict(seen), len(leftovers)))
    assert seen["killed"] >= ROUNDS // 4
    r = run_cli(["keys", "create", "--json"], home)
    assert r.returncode == 0, r.stderr
    assert [n for n in os.listdir(str(home)) if n.endswith(".tmp")] == []  # the next write cleans up
    listed_keys = json.loads(run_cli(["keys", "list", "--json"], home).stdout)
    assert len(listed_keys) == count + 1 and listed_keys[0]["name"] == "first"


def test_temporary_files_a_killed_writer_left_in_home_are_removed(tmp_path, start_server):
    # What a SIGKILL between atomic_write's mkstemp and its rename leaves.
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text("{}\n")
    leftovers = [".config.json.k1w2e3.tmp", ".keys.json.a8b9c0.tmp"]
    for name in leftovers:
        (home / name).write_text('{"half": ')
    keep = home / ".notes.tmp"  # not ours: left alone
    keep.write_text("x")
    r = run_cli(["keys", "create", "--name", "a"], home)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(str(home))) == sorted([".config.json.k1w2e3.tmp", ".notes.tmp", "config.json",
                                                    "keys.json", "keys.json.lock"])
    (home / ".keys.json.d4e5f6.tmp").write_text("")
    srv = start_server(home=home, models_dir=str(tmp_path / "models"), wait_model=False)
    srv.stop()
    assert sorted(n for n in os.listdir(str(home)) if n != "serve.log") == [
        ".notes.tmp", "config.json", "keys.json", "keys.json.lock"]


@pytest.mark.slow
@pytest.mark.model
def test_server_on_a_store_with_crash_leftovers_lists_only_whole_models(tmp_path, make_gguf, starter_gguf):
    need("llama_cpp", "serving the starter model")
    home = tmp_path / "home"
    store = os.path.join(str(home), "models")
    os.makedirs(store)
    # The starter model, installed properly (hard-linked: never written to).
    os.link(starter_gguf, os.path.join(store, offgrid.GEMMA["file"]))
    with open(os.path.join(os.path.dirname(starter_gguf), STARTER_ID + offgrid.MANIFEST_SUFFIX), "rb") as f:
        manifest = f.read()
    with open(os.path.join(store, STARTER_ID + offgrid.MANIFEST_SUFFIX), "wb") as f:
        f.write(manifest)
    # Leftovers made the real way: an import and a download, each killed.
    src = big_gguf(make_gguf, mib=96)
    killed, _, _ = run_and_kill(["import", src], home, "import big", 50)
    assert killed
    tmp_left = [n for n in os.listdir(store) if n.endswith(".tmp")]
    data = gguf_with_random_data(make_gguf, "dl.gguf", rows=2000)
    files = FileServer({"/files/" + MODEL_FILE: data})
    try:
        files.rate = 512 * 1024
        files.slow_after = len(data) * 3 // 4  # not done before the kill, however loaded the machine
        write_catalog(home, [entry_for(data, files.url + "/files/" + MODEL_FILE)])
        killed, _, _ = run_and_kill(["download", MODEL_ID], home, MODEL_ID, 50, env=ENV)
        assert killed
    finally:
        files.close()
    part = os.path.join(store, MODEL_FILE + ".part")
    assert os.path.getsize(part) < len(data)
    # A manifest whose file never arrived (a download killed before its rename).
    with open(os.path.join(store, "ghost" + offgrid.MANIFEST_SUFFIX), "w") as f:
        json.dump(dict(json.loads(manifest), id="ghost", file="ghost.gguf"), f)
    print("\nleftovers before serve: %r (temporary: %r)" % (sorted(os.listdir(store)), tmp_left))

    srv = Server(home)
    try:
        status, body, _ = srv.get("/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == [STARTER_ID], body
        status, reply, _ = srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})
        assert status == 200, reply
    finally:
        code = srv.stop()
    assert code == 0 and "Traceback" not in srv.output(), srv.output()[-3000:]
    assert [n for n in os.listdir(store) if n.endswith(".tmp")] == []  # cleaned at start
    assert os.path.exists(part)  # kept: a later download resumes it
    assert_only_whole_models(home, store, expected_ids=[[STARTER_ID]])


def tracee_pid(tracer_pid, timeout=30):
    """The offgrid process strace started (strace also forks short-lived
    children of its own at startup, to probe what ptrace supports)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/task/%d/children" % (tracer_pid, tracer_pid)) as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        for pid in children:
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")
                if argv[0] == sys.executable.encode() and OFFGRID.encode() in argv:
                    return pid
            except OSError:
                pass
        time.sleep(0.005)
    raise AssertionError("strace did not start offgrid")


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["import", "download"])
def test_killed_between_manifest_and_model_renames_lists_nothing_unverified(tmp_path, make_gguf, operation):
    """The last step of an install is two renames, the manifest's and the
    model's. strace holds the process for 3 s after each rename, so the kill
    lands exactly between them: the store must not list the model then, and
    certainly not as an unverified file found in the folder."""
    strace = shutil.which("strace")
    if strace is None:
        if IN_CI:
            pytest.fail("strace is not installed but CI must run the rename-window test")
        pytest.skip("strace is not installed")
    home = tmp_path / "home"
    home.mkdir()
    store = os.path.join(str(home), "models")
    files = None
    if operation == "import":
        src = make_gguf("between.gguf", tensors=[("w", (256, 256))])
        args, model_id, file_name = ["import", src], "between", "between.gguf"
        sha = offgrid.sha256_file(src)
    else:
        data = gguf_with_random_data(make_gguf, "src.gguf", rows=300)
        files = FileServer({"/files/" + MODEL_FILE: data})
        write_catalog(home, [entry_for(data, files.url + "/files/" + MODEL_FILE)])
        args, model_id, file_name = ["download", MODEL_ID], MODEL_ID, MODEL_FILE
        sha = entry_for(data, "")["sha256"]
    renames = "rename,renameat,renameat2"
    try:
        for step in (1, 2):  # killed after the first rename, then after the second
            proc = subprocess.Popen(
                [strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=" + renames,
                 "-e", "inject=%s:delay_exit=3000000" % renames, sys.executable, OFFGRID] + args,
                env=free_env(home, PYTHONDONTWRITEBYTECODE="1", **ENV), cwd=str(home),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                child = tracee_pid(proc.pid)
                finals = [os.path.join(store, file_name), os.path.join(store, model_id + offgrid.MANIFEST_SUFFIX)]
                deadline = time.monotonic() + 60
                while sum(os.path.exists(p) for p in finals) < step and time.monotonic() < deadline:
                    if proc.poll() is not None:
                        err = proc.stderr.read().decode()
                        if "ptrace" in err or "Operation not permitted" in err:
                            pytest.skip("strace cannot trace here: " + err.strip()[:200])
                        raise AssertionError("finished before the renames were caught:\n" + err)
                    time.sleep(0.005)
                os.kill(child, signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.wait(30)
                proc.stderr.close()
            present = sorted(os.path.basename(p) for p in finals if os.path.exists(p))
            models = assert_only_whole_models(home, store)
            print("\n%s killed after rename %d: %r in the store; listed: %r" % (
                operation, step, present, [m["id"] for m in models]))
            if step == 1:
                assert models == [], "listed after only one of the two renames: %r" % models
        r = run_cli(args, home, env=ENV)
        assert r.returncode == 0, r.stdout + r.stderr
        models = assert_only_whole_models(home, store, expected_ids=[[model_id]])
        assert models[0]["sha256"] == sha and models[0]["source"] != "found in models_dir"
    finally:
        if files is not None:
            files.close()
