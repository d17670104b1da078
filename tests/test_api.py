"""The HTTP API against a real server on the real starter model: the
official openai client, raw http.client for SSE framing and keep-alive,
every kind of bad input, concurrency, disconnects and the queue."""

import http.client
import json
import socket
import threading
import time

import pytest

from conftest import need

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def client(server):
    need("openai", "the OpenAI client tests")
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(server, timeout=10):
    """Wait until nothing runs or waits in the engine; return the queue."""
    deadline = time.time() + timeout
    while True:
        queue = server.get("/health")[1]["queue"]
        if (queue["running"], queue["waiting"]) == (0, 0) or time.time() > deadline:
            return queue
        time.sleep(0.05)


def assert_error(status, body, expected_status, param=None, code=None):
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split("[")[0].split(".")[0] in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- the openai client ---------------------------------------------------------

def test_chat_completion_with_openai_client(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Name a colour."}],
        max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_matches_plain_chat(client):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Greedy decoding of the same prompt in the same context is deterministic.
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_continues_text_with_openai_client(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, seed=1)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                              seed=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model=MODEL, prompt="In the village there lived", max_tokens=12, temperature=1.0, seed=42)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_stop_string_cuts_the_reply(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_logit_bias_bans_a_token(client, starter_gguf):
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0).choices[0].text
    assert first
    from llama_cpp import Llama
    vocab = Llama(model_path=starter_gguf, vocab_only=True, verbose=False)
    token = vocab.tokenize(first.encode(), add_bos=False, special=False)[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                  logit_bias={str(token): -100})
    assert r.choices[0].text != first


def test_json_schema_reply_parses_and_validates(client):
    schema = {"type": "object",
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                             "colours": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "colours"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"name", "age", "colours"}
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert all(isinstance(c, str) for c in value["colours"])


def test_json_object_reply_parses(client):
    # A base model asked for free-form JSON may ramble until max_tokens; a
    # few-shot prompt gives it a natural end, and the grammar keeps every
    # token inside JSON.
    prompt = ('Q: What is the capital of France?\nA: {"answer": "Paris"}\n'
              'Q: What is the capital of Spain?\nA: ')
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].text
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_models_endpoints_describe_the_installed_model(client, server):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids
    status, card, _ = server.get("/v1/models/" + MODEL)
    assert status == 200
    assert card["id"] == MODEL and card["object"] == "model"
    assert card["quantization"] == "Q4_K_M" and card["architecture"] == "gemma3"
    assert card["chat_format"] == "gemma" and card["loaded"] is True
    status, body, _ = server.get("/v1/models/nosuch")
    err = assert_error(status, body, 404, param="model", code="model_not_found")
    assert MODEL in err["message"]


# -- SSE framing and keep-alive with raw http.client -------------------------------

def read_sse(response):
    """Split a streamed body into its events, checking the framing."""
    raw = response.read().decode("utf-8")
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    for event in events[:-1]:
        assert event.startswith("data: ") or event.startswith(":"), event
        assert "\n" not in event, event
    return [e[6:] for e in events[:-1] if e.startswith("data: ")]


def test_sse_framing_and_keep_alive(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("Content-Type").startswith("text/event-stream")
    assert r.getheader("Transfer-Encoding") == "chunked"
    events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # The same connection carries further requests.
    sock = conn.sock
    for _ in range(3):
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        assert conn.sock is sock
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "chat.completion"
    assert conn.sock is sock
    conn.close()


def test_model_may_be_omitted(server):
    status, body, _ = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and body["model"] == MODEL


# -- bad input ---------------------------------------------------------------

def raw_request(server, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body, headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data), r


@pytest.mark.parametrize("body, param, code", [
    ({"messages": "hello"}, "messages", "invalid_value"),
    ({}, "messages", "missing_parameter"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "unsupported_content"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}, "max_tokens", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": True}, "top_k", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 3}, "stop", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_parameter"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions",
     "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function",
     "missing_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 7}, "model", "invalid_type"),
])
def test_bad_chat_parameters_are_named(server, body, param, code):
    status, payload, _ = server.post("/v1/chat/completions", body)
    assert_error(status, payload, 400, param=param, code=code)


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x", "echo": True, "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "suffix": "after"}, "suffix"),
    ({"prompt": "x", "n": 0}, "n"),
])
def test_bad_completion_parameters_are_named(server, body, param):
    status, payload, _ = server.post("/v1/completions", body)
    assert_error(status, payload, 400, param=param)


def test_invalid_json_body(server):
    status, body, _ = server.post("/v1/chat/completions", b'{"messages": [')
    err = assert_error(status, body, 400, code="invalid_json")
    assert "JSON" in err["message"]
    status, body, _ = server.post("/v1/chat/completions", b'["a list"]')
    assert_error(status, body, 400, code="invalid_json")
    status, body, _ = server.post("/v1/chat/completions", b'{"messages": "\xff\xfe"}')
    assert_error(status, body, 400, code="invalid_json")
    deep = b"[" * 100000 + b"]" * 100000
    status, body, _ = server.post("/v1/completions", deep)
    assert_error(status, body, 400, code="invalid_json")


def test_prompt_longer_than_context(server):
    status, body, _ = server.post("/v1/completions", {"prompt": "word " * 6000, "max_tokens": 4})
    err = assert_error(status, body, 400, param="prompt", code="context_length_exceeded")
    assert "4096" in err["message"]
    tokens = int(err["message"].split("the prompt is ")[1].split()[0])
    assert tokens > 4096
    status, body, _ = server.post("/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "word " * 6000}]})
    assert_error(status, body, 400, param="messages", code="context_length_exceeded")


def test_body_over_limit_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(100 * 1024 * 1024))
    conn.endheaders()
    conn.send(b'{"prompt": "' + b"x" * 65536)
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    err = assert_error(r.status, body, 413, code="body_too_large")
    assert str(100 * 1024 * 1024) in err["message"]


def test_missing_content_length_is_411(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    assert_error(r.status, json.loads(r.read()), 411, code="length_required")
    conn.close()


def test_wrong_method_and_unknown_path(server):
    status, body, r = raw_request(server, "GET", "/v1/chat/completions")
    assert_error(status, body, 405, code="method_not_allowed")
    assert r.getheader("Allow") == "POST"
    status, body, r = raw_request(server, "DELETE", "/health")
    assert_error(status, body, 405)
    status, body, _ = raw_request(server, "GET", "/v1/nothing-here")
    err = assert_error(status, body, 404, code="not_found")
    assert "/v1/nothing-here" in err["message"]


def test_unknown_model_lists_installed(server):
    status, body, _ = server.post("/v1/chat/completions",
                                  {"model": "llama-9000", "messages": [{"role": "user", "content": "x"}]})
    err = assert_error(status, body, 404, param="model", code="model_not_found")
    assert "llama-9000" in err["message"] and MODEL in err["message"]


# -- health, stats, log --------------------------------------------------------

def test_health_stats_and_access_log(server):
    status, health, _ = server.get("/health")
    assert status == 200
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["inference"] == "ready"
    assert health["queue"]["capacity"] == 16
    for key in ("cpu_percent", "ram_total", "ram_available", "disk_free", "process_rss"):
        assert key in health["system"], key
    assert health["system"]["ram_total"] > health["system"]["ram_available"] > 0
    before = server.get("/stats")[1]["models"].get(MODEL, {"requests": 0, "completion_tokens": 0})
    status, r, _ = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 5})
    assert status == 200
    after = server.get("/stats")[1]["models"][MODEL]
    assert after["requests"] == before["requests"] + 1
    assert after["completion_tokens"] == before["completion_tokens"] + r["usage"]["completion_tokens"]
    assert after["mean_ttft_s"] > 0 and after["mean_tokens_per_s"] > 0
    log = server.output()
    assert "request method=POST path=/v1/completions status=200" in log
    assert "tokens_out=%d" % r["usage"]["completion_tokens"] in log
    assert "Traceback" not in log


# -- concurrency, disconnects, the queue ---------------------------------------------

def test_four_concurrent_clients_all_finish(client):
    results = [None] * 4
    errors = []

    def ask(i):
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me about boat number %d." % i}],
                max_tokens=24, temperature=0.5, seed=i, stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                          chunks[-1].usage)
        except Exception as e:  # reported below with the client number
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for text, usage in results:
        assert usage.completion_tokens > 0
        assert isinstance(text, str)


def start_long_stream(server, max_tokens=2000):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    body = json.dumps({"prompt": "Chapter one. It was a dark and stormy night, and", "max_tokens": max_tokens,
                       "stream": True, "temperature": 0.9, "seed": 3}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_disconnect_stops_generation_and_frees_the_queue(server):
    wait_idle(server)
    before = server.get("/stats")[1]["models"].get(MODEL, {"cancelled": 0})["cancelled"]
    sock = start_long_stream(server)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    assert server.get("/health")[1]["queue"]["running"] == 1
    sock.close()
    queue = wait_idle(server, timeout=5)
    assert queue == {"waiting": 0, "running": 0, "capacity": 16}
    # The request is counted as cancelled, and the next one is served.
    assert server.get("/stats")[1]["models"][MODEL]["cancelled"] == before + 1
    assert "finish=client_closed" in server.output()
    status, body, _ = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
    assert status == 200


def test_disconnect_of_plain_request_stops_generation(server):
    wait_idle(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0.9,
                       "seed": 5}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 10
    while server.get("/health")[1]["queue"]["running"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    sock.close()
    assert wait_idle(server, timeout=5)["running"] == 0


def test_full_queue_answers_503_and_waiting_stream_gets_keepalive(start_server, model_store):
    # One slot, so the second request waits and the third finds the queue
    # full (with more slots the queue starts behind them: test_batching.py).
    srv = start_server(models_dir=model_store, env={"OFFGRID_QUEUE_SIZE": "1", "OFFGRID_PARALLEL": "1",
                                                    "OFFGRID_SEQUENCES": "1"})
    running = start_long_stream(srv)
    first = b""
    while b"data: " not in first:
        first += running.recv(65536)
    waiting = start_long_stream(srv, max_tokens=5)
    deadline = time.time() + 10
    while srv.get("/health")[1]["queue"]["waiting"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    status, body, headers = srv.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert_error(status, body, 503, code="queue_full")
    assert headers.get("Retry-After") == "2"
    # The waiting client hears a keep-alive comment while it waits.
    waiting.settimeout(10)
    seen = b""
    while b": waiting" not in seen:
        data = waiting.recv(65536)
        assert data, seen
        seen += data
    assert b"HTTP/1.1 200" in seen and b"text/event-stream" in seen
    running.close()
    while b"data: [DONE]" not in seen:
        data = waiting.recv(65536)
        assert data, seen
        seen += data
    waiting.close()
    assert wait_idle(srv)["running"] == 0


def test_engine_failure_is_500_and_server_keeps_serving(start_server, model_store, make_gguf, tmp_path):
    import os
    import shutil
    models = tmp_path / "models"
    models.mkdir()
    os.link(os.path.join(model_store, MODEL + ".gguf"), str(models / (MODEL + ".gguf")))
    shutil.copy(make_gguf("broken.gguf", {"general.architecture": "nonexistent_arch"}), str(models))
    srv = start_server(models_dir=str(models), args=["--model", MODEL])
    status, body, _ = srv.post("/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 2})
    err = assert_error(status, body, 500, code="model_load_failed")
    assert "broken" in err["message"] and "Traceback" not in err["message"]
    status, body, _ = srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    assert srv.get("/health")[1]["model"] == MODEL


def test_sigterm_exits_cleanly(start_server, model_store):
    srv = start_server(models_dir=model_store)
    assert srv.stop() == 0
    assert "stopped" in srv.output()
