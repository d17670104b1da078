"""Safe on a shared network and hard to break: API keys and their scopes,
binding, connection deadlines and limits, hostile input, rate limits, TLS
and graceful shutdown. Every test runs a real `offgrid serve` subprocess and
talks to it over real sockets."""

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import need, run_cli

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(status, body, expected_status, code=None, param=None):
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
        assert param in err["message"], err
    return err


def create_key(home, name=None, scope="inference"):
    os.makedirs(str(home), exist_ok=True)
    args = ["keys", "create", "--scope", scope] + (["--name", name] if name else [])
    r = run_cli(args, home, timeout=60)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("og-") and len(key) > 40, r.stdout
    return key


def bearer(key):
    return {"Authorization": "Bearer " + key}


def recv_all(sock, until=None, timeout=30):
    """Read until the peer closes (or `until` appears); returns the bytes."""
    sock.settimeout(timeout)
    data = b""
    while until is None or until not in data:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def closed_within(sock, seconds):
    """Seconds until the server closed this connection, or None if it did not."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(65536):
                return time.monotonic() - started
    except ConnectionResetError:
        return time.monotonic() - started
    except socket.timeout:
        return None


# API keys ###################################################################

def test_keys_cli_creates_lists_and_revokes_and_stores_only_hashes(tmp_path):
    key = create_key(tmp_path, "laptop")
    admin = create_key(tmp_path, "ops", scope="admin")
    stored = (tmp_path / "keys.json").read_text()
    assert key not in stored and admin not in stored
    entries = json.loads(stored)["keys"]
    import hashlib
    assert {e["sha256"] for e in entries} == {hashlib.sha256(k.encode()).hexdigest() for k in (key, admin)}
    assert oct(os.stat(str(tmp_path / "keys.json")).st_mode & 0o777) == "0o600"

    listed = json.loads(run_cli(["keys", "list", "--json"], tmp_path).stdout)
    assert [(e["name"], e["scope"]) for e in listed] == [("laptop", "inference"), ("ops", "admin")]
    assert all(set(e) == {"id", "name", "scope", "created"} for e in listed)
    table = run_cli(["keys", "list"], tmp_path).stdout
    assert "laptop" in table and listed[0]["id"] in table and key not in table

    for args, words in [(["keys", "create", "--name", "laptop"], ["laptop", "exists"]),
                        (["keys", "create", "--scope", "root"], ["--scope", "root"]),
                        (["keys", "revoke", "nosuch"], ["nosuch", listed[0]["id"]]),
                        (["keys", "revoke"], ["id or name"])]:
        r = run_cli(args, tmp_path)
        lines = r.stderr.splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("offgrid: error:"), r.stderr
        assert all(w in lines[0] for w in words), lines[0]

    r = run_cli(["keys", "revoke", "laptop"], tmp_path)
    assert r.returncode == 0 and listed[0]["id"] in r.stdout
    r = run_cli(["keys", "revoke", listed[1]["id"]], tmp_path)
    assert r.returncode == 0
    assert json.loads(run_cli(["keys", "list", "--json"], tmp_path).stdout) == []


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, model_store):
    """A server with an inference key and an admin key in keys.json."""
    need("llama_cpp", "inference tests")
    from conftest import Server
    home = tmp_path_factory.mktemp("keyed-home")
    keys = {"inference": create_key(home, "app"), "admin": create_key(home, "ops", scope="admin"),
            "spare": create_key(home, "spare")}
    srv = Server(home, model_store)
    srv.keys = keys
    srv.home = home
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def test_inference_key_may_generate_and_read_models_and_stats(keyed):
    key = keyed.keys["inference"]
    for path in ("/v1/models", "/v1/models/" + MODEL, "/stats"):
        status, body, _ = keyed.request("GET", path, headers=bearer(key))
        assert status == 200, (path, body)
    status, body, _ = keyed.post("/v1/chat/completions", CHAT, headers={"x-api-key": key})
    assert status == 200 and body["object"] == "chat.completion"
    assert "key=" in keyed.output() and key not in keyed.output()


def test_openai_client_sends_its_api_key(keyed):
    need("openai", "the OpenAI client tests")
    import openai
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=keyed.keys["inference"], max_retries=0)
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=2)
    assert r.usage.completion_tokens > 0
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="og-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_routes_without_a_scope_need_admin(keyed):
    # Unknown paths are admin-only, as is any route added without a scope:
    # an inference key is refused, an admin key learns the path is unknown.
    status, body, _ = keyed.request("GET", "/v1/nothing-here", headers=bearer(keyed.keys["inference"]))
    err = assert_error(status, body, 403, code="insufficient_scope")
    assert "admin" in err["message"] and "inference" in err["message"]
    status, body, _ = keyed.request("GET", "/v1/nothing-here", headers=bearer(keyed.keys["admin"]))
    assert_error(status, body, 404, code="not_found")
    for path in ("/v1/models", "/stats"):
        assert keyed.request("GET", path, headers={"x-api-key": keyed.keys["admin"]})[0] == 200
    # A wrong method on an inference path is a 405, not a 403.
    status, body, _ = keyed.request("GET", "/v1/chat/completions", headers=bearer(keyed.keys["inference"]))
    assert_error(status, body, 405)


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer og-not-a-key"}, "invalid_api_key"),
    ({"x-api-key": "og-not-a-key"}, "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
    ({"Authorization": "Bearer "}, "missing_api_key"),
])
def test_missing_or_wrong_key_is_401_with_a_bearer_challenge(keyed, headers, code):
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/stats", None),
                               ("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/nothing", None)]:
        status, payload, response_headers = keyed.request(method, path, body, headers=headers)
        assert_error(status, payload, 401, code=code)
        assert response_headers["WWW-Authenticate"].startswith("Bearer")


def test_health_is_open_and_reveals_no_paths_or_keys(keyed):
    status, health, _ = keyed.get("/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL
    text = json.dumps(health)
    assert str(keyed.home) not in text and "models" not in text.replace('"model"', "")
    assert "/" not in "".join(v for v in _strings(health) if v != health.get("inference"))
    for key in keyed.keys.values():
        assert key not in text


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_revoked_key_is_refused_without_restart(keyed):
    key = keyed.keys["spare"]
    assert keyed.request("GET", "/v1/models", headers=bearer(key))[0] == 200
    r = run_cli(["keys", "revoke", "spare"], keyed.home)
    assert r.returncode == 0, r.stderr
    status, body, _ = keyed.request("GET", "/v1/models", headers=bearer(key))
    assert_error(status, body, 401, code="invalid_api_key")
    assert keyed.request("GET", "/v1/models", headers=bearer(keyed.keys["inference"]))[0] == 200
    # A key created now works at once too.
    fresh = create_key(keyed.home, "fresh")
    assert keyed.request("GET", "/v1/models", headers=bearer(fresh))[0] == 200


def test_keys_from_environment_and_config_are_admin(start_server, model_store, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"api_keys": ["og-from-config-1", "og-from-config-2"]}))
    srv = start_server(home=home, models_dir=model_store, env={"OFFGRID_API_KEY": "og-from-env"})
    for key in ("og-from-config-1", "og-from-config-2", "og-from-env"):
        assert srv.request("GET", "/v1/models", headers=bearer(key))[0] == 200
        assert srv.request("GET", "/v1/unknown", headers=bearer(key))[0] == 404  # admin: past the 403
    assert_error(*srv.get("/v1/models")[:2], 401, code="missing_api_key")
    assert "og-from" not in srv.output()
    shown = run_cli(["config", "show"], home, env={"OFFGRID_API_KEY": "og-from-env"})
    assert shown.returncode == 0 and "og-from" not in shown.stdout and "3 hidden" in shown.stdout


def test_revoking_the_last_key_locks_the_api(start_server, model_store, tmp_path):
    home = tmp_path / "home"
    key = create_key(home, "only")
    srv = start_server(home=home, models_dir=model_store)
    assert srv.request("GET", "/v1/models", headers=bearer(key))[0] == 200
    assert run_cli(["keys", "revoke", "only"], home).returncode == 0
    assert_error(*srv.get("/v1/models")[:2], 401)


# Binding ####################################################################

def test_lan_address_without_a_key_refuses_to_start(tmp_path, model_store):
    r = run_cli(["serve", "--host", "0.0.0.0", "--port", "0", "--models-dir", model_store], tmp_path, timeout=60)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("offgrid: error:") and "0.0.0.0" in lines[0]
    assert "offgrid keys create" in lines[0] and "--insecure" in lines[0]


def test_insecure_starts_on_a_lan_address_with_a_loud_warning(start_server, model_store):
    srv = start_server(models_dir=model_store, args=["--host", "0.0.0.0", "--insecure"])
    assert srv.url.startswith("http://0.0.0.0:")
    assert "WARNING: NO API KEY" in srv.output()
    assert srv.get("/v1/models")[0] == 200


def test_lan_address_with_a_key_starts_without_warning(start_server, model_store, tmp_path):
    home = tmp_path / "home"
    key = create_key(home)
    srv = start_server(home=home, models_dir=model_store, args=["--host", "0.0.0.0"])
    assert "WARNING" not in srv.output()
    assert srv.request("GET", "/v1/models", headers=bearer(key))[0] == 200
    assert srv.get("/v1/models")[0] == 401


@pytest.mark.parametrize("host", [None, "127.0.0.2", "localhost"])
def test_loopback_needs_no_key(start_server, model_store, host):
    srv = start_server(models_dir=model_store, args=["--host", host] if host else [])
    assert srv.url.startswith("http://127.0.0.%d:" % (2 if host == "127.0.0.2" else 1))
    assert srv.get("/v1/models")[0] == 200
    assert "WARNING" not in srv.output()


# Connections ################################################################

@pytest.fixture(scope="module")
def strict(tmp_path_factory, model_store):
    """A server with short deadlines and few connections."""
    need("llama_cpp", "inference tests")
    from conftest import Server
    srv = Server(tmp_path_factory.mktemp("strict-home"), model_store,
                 env={"OFFGRID_HEADER_TIMEOUT": "2", "OFFGRID_IDLE_TIMEOUT": "2", "OFFGRID_MAX_CONNECTIONS": "4",
                      "OFFGRID_MAX_TOKENS_LIMIT": "16"})
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def trickle(sock, data, every, stop):
    try:
        for i in range(len(data)):
            if stop.is_set():
                return
            sock.send(data[i:i + 1])
            time.sleep(every)
    except OSError:
        pass


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n" + b"{" * 300,
])
def test_slowloris_is_cut_off_while_others_are_served(strict, request_bytes):
    slow = socket.create_connection(("127.0.0.1", strict.port))
    stop = threading.Event()
    # The headers arrive fast in the body case; it is the body that trickles.
    head, _, rest = request_bytes.partition(b"\r\n\r\n")
    if b"POST" in head:
        slow.sendall(head + b"\r\n\r\n")
        request_bytes = rest
    sender = threading.Thread(target=trickle, args=(slow, request_bytes, 0.2, stop), daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        # Meanwhile other clients are answered at once.
        for _ in range(3):
            t = time.monotonic()
            assert strict.get("/health")[0] == 200
            assert time.monotonic() - t < 2.0
        took = closed_within(slow, 6)
        assert took is not None, "the server kept a trickling client past header_timeout"
        assert 1.5 <= time.monotonic() - started <= 5.0
    finally:
        stop.set()
        slow.close()


def test_idle_keep_alive_connection_is_closed_and_busy_one_is_not(strict):
    conn = http.client.HTTPConnection("127.0.0.1", strict.port, timeout=30)
    # A connection in use every half second stays open past the idle timeout.
    for _ in range(7):
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        sock = conn.sock
        time.sleep(0.5)
    assert conn.sock is sock
    took = closed_within(sock, 6)
    assert took is not None and 1.0 <= took <= 4.5, took
    conn.close()


def test_connections_past_the_limit_get_503_and_close(strict):
    held = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", strict.port))
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = recv_all(extra, timeout=10)
        extra.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply
        assert b"Retry-After: 2" in head and b"Connection: close" in head
        assert_error(503, json.loads(body), 503, code="too_many_connections")
    finally:
        held[0].close()
    time.sleep(0.5)
    assert strict.get("/health")[0] == 200
    for sock in held[1:]:
        sock.close()


def test_max_tokens_above_the_ceiling_is_400(strict):
    status, body, _ = strict.post("/v1/completions", {"prompt": "Once", "max_tokens": 17})
    err = assert_error(status, body, 400, param="max_tokens")
    assert "16" in err["message"]
    status, body, _ = strict.post("/v1/chat/completions", dict(CHAT, max_tokens=None, max_completion_tokens=99))
    assert_error(status, body, 400, param="max_completion_tokens")
    status, body, _ = strict.post("/v1/completions", {"prompt": "Once", "max_tokens": 16})
    assert status == 200
    # Without max_tokens the default (1024) is held to the ceiling too.
    status, body, _ = strict.post("/v1/completions", {"prompt": "Once upon a time", "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= 16


# Hostile input ###############################################################

def test_100_mb_body_is_refused_from_its_length_and_the_client_reads_the_413(keyed):
    # The 413 comes from Content-Length before any of the body is used; the
    # server then reads the rest away (for a bounded time, see
    # test_connections.py) so that a client still sending sees the reply.
    sock = socket.create_connection(("127.0.0.1", keyed.port))
    total = 100 * 1024 * 1024
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (keyed.keys["admin"].encode(), total))
    sent = [0]

    def send_body():
        block = b"x" * 65536
        try:
            while sent[0] < total:
                sent[0] += sock.send(block)
        except OSError:
            pass
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    reply = recv_all(sock, until=b"}}", timeout=30)
    sender.join(30)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"\r\nConnection: close" in reply.partition(b"\r\n\r\n")[0]
    assert_error(413, json.loads(reply.partition(b"\r\n\r\n")[2]), 413, code="body_too_large")
    assert keyed.get("/health")[0] == 200


@pytest.mark.parametrize("depth", [50, 900, 990, 5000, 200000])
def test_deeply_nested_json_is_400_not_a_crash(keyed, depth):
    admin = bearer(keyed.keys["admin"])
    for body in (b'{"prompt": "x", "n": ' + b"[" * depth + b"]" * depth + b"}",
                 b'{"messages": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}",
                 b'{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "d", '
                 b'"schema": ' + b'{"items": ' * depth + b"{}" + b"}" * depth + b"}}}"):
        status, payload, _ = keyed.request("POST", "/v1/completions", body, headers=admin)
        assert_error(status, payload, 400)
    assert "Traceback" not in keyed.output()
    assert keyed.get("/health")[0] == 200


def test_invalid_utf8_in_body_path_and_headers(keyed):
    admin = keyed.keys["admin"]
    status, body, _ = keyed.request("POST", "/v1/completions", b'{"prompt": "\xff\xfe\xc3"}', headers=bearer(admin))
    assert_error(status, body, 400, code="invalid_json")
    reply = raw(keyed, b"GET /v1/models/%ff%fe\xff HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                admin.encode() + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404"), reply
    assert_error(404, json.loads(reply.partition(b"\r\n\r\n")[2]), 404)
    reply = raw(keyed, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: \xff\xc3\x28\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 401"), reply
    assert_error(401, json.loads(reply.partition(b"\r\n\r\n")[2]), 401)
    assert "Traceback" not in keyed.output()


def raw(server, data):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(data)
    reply = recv_all(sock, until=b"}}", timeout=30)
    sock.close()
    return reply


def response_header_names(reply):
    head = reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    return {line.split(b":", 1)[0].strip().lower() for line in head}


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/models/x%0d%0aSet-Cookie:%20evil=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/nothing%0d%0aSet-Cookie:%20evil=1%0d%0a%0d%0a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: og-x\rSet-Cookie: evil=1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer og-x\r\n Set-Cookie: evil=1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer og-x%0d%0aSet-Cookie: evil=1\r\n\r\n",
    b"GET /v1/models\rSet-Cookie: evil=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/models HTTP/1.1 Set-Cookie: evil=1\r\nHost: x\r\n\r\n",
])
def test_header_injection_does_not_reach_the_response(keyed, request_bytes):
    reply = raw(keyed, request_bytes)
    assert reply.startswith(b"HTTP/1.1 4"), reply
    assert "set-cookie" not in {n.decode("latin-1") for n in response_header_names(reply)}, reply
    assert reply.count(b"\r\n\r\n") == 1
    # Even http.server's own refusals come in the API's error shape.
    assert_error(int(reply[9:12]), json.loads(reply.partition(b"\r\n\r\n")[2]), int(reply[9:12]))


@pytest.mark.parametrize("path", [
    "/v1/models/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/models/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/v1/models/%2e%2e",
    "/v1/models/..",
    "/v1/models/..%5C..%5Cetc%5Cpasswd",
    "/v1/models/%252e%252e%252fetc%252fpasswd",
    "/v1/models/%2Fetc%2Fpasswd",
    "/v1/models/gemma-3-270m-q4_k_m.gguf%00.json",
    "/v1/models/../../../../etc/passwd",
    "/v1/models/.manifest.json",
])
def test_path_traversal_in_path_parameters_is_404(keyed, path):
    status, body, _ = keyed.request("GET", path, headers=bearer(keyed.keys["admin"]))
    assert_error(status, body, 404)
    text = json.dumps(body)
    assert "root:" not in text and "/bin/" not in text and str(keyed.home) not in text


# Rate limit ##################################################################

def test_rate_limit_answers_429_with_retry_after_per_key(start_server, model_store, tmp_path):
    home = tmp_path / "home"
    first, second = create_key(home, "first"), create_key(home, "second")
    srv = start_server(home=home, models_dir=model_store, env={"OFFGRID_RATE_LIMIT_PER_MINUTE": "3"})
    for _ in range(3):
        assert srv.request("GET", "/v1/models", headers=bearer(first))[0] == 200
    status, body, headers = srv.request("GET", "/v1/models", headers=bearer(first))
    err = assert_error(status, body, 429, code="rate_limit_exceeded")
    assert "rate_limit_per_minute" in err["message"]
    assert 1 <= int(headers["Retry-After"]) <= 20
    # Another key has its own allowance; /health is never limited.
    assert srv.request("GET", "/v1/models", headers=bearer(second))[0] == 200
    for _ in range(5):
        assert srv.get("/health")[0] == 200


def test_rate_limit_without_keys_is_per_address(start_server, model_store):
    srv = start_server(models_dir=model_store, env={"OFFGRID_RATE_LIMIT_PER_MINUTE": "2"})
    assert [srv.get("/v1/models")[0] for _ in range(3)] == [200, 200, 429]
    status, body, headers = srv.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 429 and int(headers["Retry-After"]) >= 1


# TLS #########################################################################

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed (needed to make a test certificate)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def tls_server(start_server, model_store, tls_files, **kw):
    cert, key = tls_files
    srv = start_server(models_dir=model_store, args=["--tls-cert", cert, "--tls-key", key], wait_model=False, **kw)
    assert srv.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=cert)
    deadline = time.time() + 60
    while time.time() < deadline:
        if https_json(srv, context, "GET", "/health")[1].get("model"):
            return srv, context
        time.sleep(0.1)
    raise AssertionError("model did not load:\n" + srv.output())


def https_json(srv, context, method, path, body=None):
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=context, timeout=60)
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def test_tls_serves_the_openai_client_and_streams(start_server, model_store, tls_files):
    need("openai", "the OpenAI client tests")
    import httpx
    import openai
    srv, context = tls_server(start_server, model_store, tls_files)
    with httpx.Client(verify=context) as http_client:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", http_client=http_client, max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.usage.completion_tokens > 0
        chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                                temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Without the certificate the client refuses the server, and plain
    # http on the https port gets nowhere; the server carries on.
    with pytest.raises(ssl.SSLError):
        https_json(srv, ssl.create_default_context(), "GET", "/health")
    plain = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" not in recv_all(plain, timeout=10)
    plain.close()
    assert https_json(srv, context, "GET", "/health")[0] == 200
    assert "Traceback" not in srv.output()


def test_tls_disconnect_stops_generation_and_full_stream_is_not_cut(start_server, model_store, tls_files):
    srv, context = tls_server(start_server, model_store, tls_files)
    body = json.dumps({"prompt": "Chapter one. It was a dark and stormy night, and", "max_tokens": 2000,
                       "stream": True, "temperature": 0.9, "seed": 3}).encode()
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=60),
                               server_hostname="127.0.0.1")
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    sock.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        status, stats = https_json(srv, context, "GET", "/stats")
        if stats["queue"]["running"] == 0:
            break
        time.sleep(0.05)
    assert stats["queue"]["running"] == 0
    assert stats["models"][MODEL]["cancelled"] == 1
    # A stream whose client stays is not mistaken for a disconnect.
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=context, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": 16, "stream": True}),
                 {"Content-Type": "application/json"})
    text = conn.getresponse().read()
    assert text.endswith(b"data: [DONE]\n\n")
    assert https_json(srv, context, "GET", "/stats")[1]["models"][MODEL]["cancelled"] == 1


def test_tls_needs_both_files_and_readable_ones(tmp_path, model_store, tls_files):
    cert, key = tls_files
    for args, words in [(["--tls-cert", cert], ["tls_key", "tls_cert"]),
                        (["--tls-cert", cert, "--tls-key", cert], [cert]),
                        (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", key], ["none.pem"])]:
        r = run_cli(["serve", "--port", "0", "--models-dir", model_store] + args, tmp_path, timeout=60)
        lines = r.stderr.splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("offgrid: error:"), r.stderr
        assert all(w in lines[0] for w in words), lines[0]


# Shutdown ####################################################################

def start_stream(srv, max_tokens):
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    body = json.dumps({"prompt": "Chapter one. It was a dark and stormy night, and", "max_tokens": max_tokens,
                       "stream": True, "temperature": 0.9, "seed": 3}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 2:
        received += sock.recv(65536)
    return sock, received


def sse_events(raw_bytes):
    return [line[6:] for line in raw_bytes.split(b"\n") if line.startswith(b"data: ")]


def test_sigterm_lets_a_running_stream_finish(start_server, model_store):
    srv = start_server(models_dir=model_store, env={"OFFGRID_SHUTDOWN_GRACE": "60"})
    idle = socket.create_connection(("127.0.0.1", srv.port))
    sock, received = start_stream(srv, 200)  # a few seconds of work, so SIGTERM lands mid-stream
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # New connections are refused, idle ones closed, the stream carries on.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).sendall(b"GET /health HTTP/1.1\r\n\r\n")
    assert closed_within(idle, 3) is not None
    assert srv.proc.poll() is None
    received += recv_all(sock, timeout=60)
    events = sse_events(received)
    assert events[-1] == b"[DONE]", received[-300:]
    assert all(b'"error"' not in e for e in events)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert srv.proc.wait(30) == 0
    log = srv.output()
    assert log.index("shutting down") < log.index("request method=POST") < log.index("stopped")


def test_sigterm_cuts_a_stream_after_the_grace_and_exits_0(start_server, model_store):
    srv = start_server(models_dir=model_store, env={"OFFGRID_SHUTDOWN_GRACE": "1"})
    sock, received = start_stream(srv, 4000)
    t = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    received += recv_all(sock, timeout=30)
    assert srv.proc.wait(30) == 0
    took = time.monotonic() - t
    assert took < 10, took
    events = sse_events(received)
    assert events[-1] == b"[DONE]", received[-300:]
    err = json.loads(events[-2])
    assert err["error"]["code"] == "shutting_down", err
    assert "cancelling" in srv.output() and "Traceback" not in srv.output()


def test_second_signal_skips_the_grace(start_server, model_store):
    srv = start_server(models_dir=model_store, env={"OFFGRID_SHUTDOWN_GRACE": "600"})
    sock, received = start_stream(srv, 4000)
    srv.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert srv.proc.poll() is None
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(15) == 0
    assert b"shutting_down" in received + recv_all(sock, timeout=10)
