"""The HTTP transport as clients meet it: HEAD on every GET route, a
keep-alive connection that survives every error the server can answer,
replies a client still sending its body can read, and a per-address cap on
connections. No model is needed: every server here has an empty store."""

import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import run_cli

ADMIN_KEY = "sk-test-connections-admin"


def tiny_store(tmp_path, make_gguf):
    """A models folder holding one tiny GGUF, so serve does not copy the
    starter model in; nothing here loads it."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    shutil.copy(make_gguf("tiny.gguf"), str(models / "tiny.gguf"))
    return str(models)


@pytest.fixture
def bare(start_server, tmp_path, make_gguf):
    """A server with no keys and no model it could load."""
    return start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)


NO_LENGTH = object()  # a request with neither Content-Length nor a body


def exchange(conn, method, path, body=None, headers=None):
    """One request on `conn`; (status, headers dict, body bytes)."""
    if body is NO_LENGTH:
        conn.putrequest(method, path)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
    else:
        conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


# HEAD #######################################################################

# GET routes whose reply does not change between two requests, so HEAD's
# headers must equal GET's byte for byte (Date aside).
STEADY = ["/", "/ui", "/openapi.json", "/v1/models", "/v1/catalog", "/api/tags", "/api/ps", "/api/version",
          "/v1/models/download", "/nosuch", "/v1/chat/completions", "/api/chat"]


def test_head_is_get_without_the_body_on_every_get_route(bare):
    import offgrid
    conn = http.client.HTTPConnection("127.0.0.1", bare.port, timeout=30)
    exchange(conn, "GET", "/health")
    sock = conn.sock
    app = offgrid.App(offgrid.Config.load({}, env={"OFFGRID_HOME": "/nonexistent"}),
                      store=offgrid.ModelStore("/nonexistent"), engine=object())
    get_paths = {p.pattern.strip("^$").replace("\\", "") for m, p, *_ in app.routes
                 if m == "GET" and "(?P" not in p.pattern}
    assert set(STEADY) - get_paths == {"/nosuch", "/v1/chat/completions", "/api/chat"}
    # Every GET route, changing ones too (uptime, metrics), and some with path parameters.
    for path in STEADY + sorted(get_paths - set(STEADY)) + [
            "/v1/models/nosuch", "/v1/models/download/nosuch", "/v1/p2p/blobs/" + "0" * 64]:
        get_status, get_headers, get_body = exchange(conn, "GET", path)
        head_status, head_headers, head_body = exchange(conn, "HEAD", path)
        assert head_status == get_status, (path, head_status, get_status)
        assert head_body == b"", path
        assert int(head_headers["content-length"]) > 0 and "transfer-encoding" not in head_headers, path
        if path in STEADY:
            get_headers.pop("date"), head_headers.pop("date")
            assert head_headers == get_headers, path
            assert int(head_headers["content-length"]) == len(get_body), path
        else:
            assert set(head_headers) == set(get_headers), path
        # Nothing of a body was left on the wire: the connection carries on.
        assert conn.sock is sock, path
    assert exchange(conn, "GET", "/health")[0] == 200 and conn.sock is sock


def test_curl_head_shows_get_headers(bare):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    _status, _headers, page = exchange(http.client.HTTPConnection("127.0.0.1", bare.port, timeout=30), "GET", "/")
    for path, status, length in (("/", 200, len(page)), ("/nosuch", 404, None)):
        r = subprocess.run(["curl", "-sS", "-I", "--max-time", "30", bare.url + path], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].strip() == "HTTP/1.1 %d %s" % (status, http.client.responses[status]), r.stdout
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        headers = {k.lower(): v.strip() for k, v in headers.items()}
        assert headers["content-type"].startswith("text/html" if status == 200 else "application/json"), headers
        if length is not None:
            assert int(headers["content-length"]) == length, headers


def test_head_on_a_post_route_is_405_allowing_post(bare):
    conn = http.client.HTTPConnection("127.0.0.1", bare.port, timeout=30)
    status, headers, body = exchange(conn, "HEAD", "/v1/embeddings")
    assert status == 405 and headers["allow"] == "POST" and body == b""
    status, headers, _ = exchange(conn, "PUT", "/health")
    assert status == 405 and headers["allow"] == "GET, HEAD"


# One connection, every error ################################################

@pytest.fixture
def guarded(start_server, tmp_path, make_gguf):
    """A server with keys, a small body limit and a rate limit."""
    home = tmp_path / "guarded-home"
    os.makedirs(str(home))
    r = run_cli(["keys", "create", "--scope", "inference"], home, timeout=60)
    assert r.returncode == 0, r.stderr
    srv = start_server(home=home, models_dir=tiny_store(tmp_path, make_gguf), wait_model=False,
                       env={"OFFGRID_API_KEY": ADMIN_KEY, "OFFGRID_MAX_BODY_BYTES": "4096",
                            "OFFGRID_RATE_LIMIT_PER_MINUTE": "12"})
    srv.inference_key = r.stdout.strip()
    return srv


def test_every_error_keeps_the_connection_or_says_connection_close(guarded):
    admin = {"Authorization": "Bearer " + ADMIN_KEY, "Content-Type": "application/json"}
    inference = {"Authorization": "Bearer " + guarded.inference_key, "Content-Type": "application/json"}
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "a" * 2000}]})
    # (what, method, path, body, headers, status, the server must close)
    cases = [
        ("bad JSON", "POST", "/v1/chat/completions", "{nope", admin, 400, False),
        ("no key", "POST", "/v1/chat/completions", body, {}, 401, False),
        ("wrong key", "POST", "/api/chat", body, {"Authorization": "Bearer wrong"}, 401, False),
        ("small scope", "POST", "/api/pull", body, inference, 403, False),
        ("unknown route", "POST", "/api/nosuch", body, admin, 404, False),
        ("no such model", "POST", "/api/show", json.dumps({"model": "nosuch"}), admin, 404, False),
        ("wrong method", "PUT", "/v1/models", body, admin, 405, False),
        ("wrong method, no key", "DELETE", "/health", body, {}, 405, False),
        ("no length", "POST", "/v1/chat/completions", NO_LENGTH, admin, 411, False),
        ("too large", "POST", "/v1/chat/completions", "x" * 200000, admin, 413, True),
        ("bad length", "POST", "/v1/chat/completions", NO_LENGTH, dict(admin, **{"Content-Length": "ten"}), 400,
         True),
        ("chunked", "POST", "/v1/chat/completions", iter([b"{}"]), admin, 411, True),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
    seen = set()
    for what, method, path, data, headers, status, closes in cases:
        exchange(conn, "GET", "/health")
        sock = conn.sock
        got, reply_headers, reply = exchange(conn, method, path, data, headers)
        assert got == status, (what, got, reply)
        assert reply and "error" in json.loads(reply), (what, reply)
        if closes:
            assert reply_headers.get("connection") == "close", (what, reply_headers)
        else:
            assert "connection" not in reply_headers, (what, reply_headers)
            # The same connection carries the next request.
            assert exchange(conn, "GET", "/health")[0] == 200, what
            assert conn.sock is sock, what
        seen.add(status)
    # The rate limit (12 a minute for the key) is reached within a few
    # more keyed requests; each 429 keeps the connection too.
    exchange(conn, "GET", "/health")
    sock = conn.sock
    for _ in range(30):
        got, reply_headers, reply = exchange(conn, "POST", "/api/show", json.dumps({"model": "nosuch"}), admin)
        if got == 429:
            break
        assert got == 404, reply
    assert got == 429 and reply_headers["retry-after"] and "connection" not in reply_headers, reply
    assert exchange(conn, "GET", "/health")[0] == 200 and conn.sock is sock
    seen.add(429)
    assert seen == {400, 401, 403, 404, 405, 411, 413, 429}


def test_malformed_request_line_is_answered_then_closed(bare):
    sock = socket.create_connection(("127.0.0.1", bare.port), timeout=30)
    sock.sendall(b"GARBAGE\r\n\r\n")
    reply = recv_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    assert b"\r\nConnection: close\r\n" in reply


def recv_until_closed(sock, timeout=30):
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_413_is_readable_by_clients_that_send_the_whole_body_first(bare):
    """urllib, http.client and httpx send all of a body before they read;
    the server answers 413 from Content-Length and reads the rest away
    (for a bounded time) so the client gets to read the reply."""
    import httpx
    big = b"x" * (64 * 1024 * 1024)
    req = urllib.request.Request(bare.url + "/v1/chat/completions", data=big, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and e.value.headers["Connection"] == "close"
    assert json.loads(e.value.read())["error"]["code"] == "body_too_large"
    r = httpx.post(bare.url + "/api/chat", content=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    assert bare.get("/health")[0] == 200


def test_a_client_that_never_stops_sending_is_cut_off_after_the_413(bare):
    sock = socket.create_connection(("127.0.0.1", bare.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
    sock.setblocking(False)
    reply, block, deadline = b"", b"x" * 65536, time.monotonic() + 60
    while time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock], [], 1)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
        elif writable:
            try:
                sock.send(block)
            except (BrokenPipeError, ConnectionResetError):
                break
    else:
        raise AssertionError("the server read an endless body for a minute")
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


# Connections per client address ############################################

def test_one_address_cannot_take_every_connection(start_server, tmp_path, make_gguf):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False,
                       env={"OFFGRID_HEADER_TIMEOUT": "300"})
    slow = []
    try:
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            s.sendall(b"GET /hea")  # half a request line, never finished
            slow.append(s)
        # The ones past the address's share are refused with a 503 at once;
        # the rest wait, holding their connections.
        refused, deadline = [], time.monotonic() + 60
        pending = list(slow)
        while pending and time.monotonic() < deadline:
            readable, _, _ = select.select(pending, [], [], 1)
            for s in readable:
                refused.append(recv_until_closed(s))
                pending.remove(s)
            if len(refused) == 48:
                break
        held = 64 - len(refused)
        print("slow connections one address holds: %d of 64" % held)
        assert held == 16, held
        for reply in refused:
            assert reply.startswith(b"HTTP/1.1 503 "), reply
            assert b"max_connections_per_client" in reply and b"Connection: close" in reply
        # Another address is served while they are held.
        other = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30, source_address=("127.0.0.2", 0))
        status, _headers, body = exchange(other, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        other.close()
    finally:
        for s in slow:
            s.close()
    # Once they are gone the address gets its share back.
    deadline = time.monotonic() + 30
    while srv.get("/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_expect_100_continue_gets_the_body_then_the_reply(bare):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    # curl asks with Expect: 100-continue and waits for the 100 before it
    # sends the body; the reply must be about that body.
    body = json.dumps({"model": "nosuch", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = subprocess.run(["curl", "-sS", "--max-time", "60", "-H", "Expect: 100-continue", "-H",
                        "Content-Type: application/json", "--data-binary", "@-", "-w", "\\n%{http_code}",
                        bare.url + "/v1/chat/completions"], input=body, capture_output=True, text=True, timeout=90)
    reply, _, code = r.stdout.rpartition("\n")
    assert code == "404" and json.loads(reply)["error"]["code"] == "model_not_found", r.stdout[-500:]
    # A refused one (wrong method) reads the body away and keeps the
    # connection: curl's second request needs no new one.
    r = subprocess.run(["curl", "-sS", "--max-time", "60", "-H", "Expect: 100-continue", "-X", "PUT",
                        "--data-binary", "@-", "-w", "\\n%{http_code} %{num_connects}\\n",
                        bare.url + "/v1/models", bare.url + "/health"],
                       input=body, capture_output=True, text=True, timeout=90)
    assert r.stdout.count("method_not_allowed") == 2, r.stdout[-500:]
    assert [line for line in r.stdout.splitlines() if line.startswith("405 ")] == ["405 1", "405 0"], r.stdout
