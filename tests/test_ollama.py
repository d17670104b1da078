"""The Ollama-compatible API, driven by the official `ollama` Python client,
and the Prometheus /metrics endpoint read by prometheus_client's parser."""

import json

import pytest

from conftest import need

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def ollama_client(server):
    need("ollama", "the Ollama client tests")
    import ollama
    return ollama.Client(host=server.url, timeout=120)


def test_version_tags_show_and_ps(ollama_client, server):
    status, body, _ = server.get("/api/version")
    assert status == 200 and body["version"].count(".") == 2
    [model] = ollama_client.list().models
    assert model.model == MODEL + ":latest"
    assert model.digest == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert model.details.format == "gguf" and model.details.family == "gemma3"
    assert model.details.quantization_level == "Q4_K_M"
    shown = ollama_client.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] == 32768
    assert [m.model for m in ollama_client.ps().models] == [MODEL + ":latest"]


def test_chat_plain_and_streamed(ollama_client):
    messages = [{"role": "user", "content": "Name a fruit."}]
    options = {"num_predict": 10, "temperature": 0}
    plain = ollama_client.chat(model=MODEL, messages=messages, options=options)
    assert plain.done and plain.done_reason in ("stop", "length")
    assert plain.message.role == "assistant"
    assert 0 < plain.eval_count <= 10 and plain.prompt_eval_count > 0
    parts = list(ollama_client.chat(model=MODEL + ":latest", messages=messages, options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == plain.message.content
    assert parts[-1].eval_count == plain.eval_count


def test_generate_plain_streamed_and_raw(ollama_client):
    options = {"num_predict": 6, "temperature": 0, "seed": 3}
    plain = ollama_client.generate(model=MODEL, prompt="Once upon a time", options=options)
    assert plain.done and plain.response
    streamed = list(ollama_client.generate(model=MODEL, prompt="Once upon a time", options=options, stream=True))
    assert "".join(p.response for p in streamed) == plain.response
    raw = ollama_client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=options)
    assert raw.done and raw.eval_count == 6 or raw.done_reason == "stop"


def test_generate_with_format_json_is_json(ollama_client):
    r = ollama_client.generate(model=MODEL, raw=True, format="json", options={"num_predict": 60, "temperature": 0},
                               prompt='Q: What is the capital of France?\nA: {"answer": "Paris"}\n'
                                      'Q: What is the capital of Spain?\nA: ')
    assert r.done_reason == "stop", r.response
    assert isinstance(json.loads(r.response), dict)


def test_empty_generate_loads_the_model(ollama_client):
    r = ollama_client.generate(model=MODEL, prompt="")
    assert r.done and r.done_reason == "load"


def test_errors_in_ollama_shape(ollama_client, server):
    import ollama
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="nosuch", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and MODEL in e.value.error
    status, body, _ = server.post("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                "options": {"tfs_z": 0.5}})
    assert status == 400 and set(body) == {"error"} and "tfs_z" in body["error"]
    status, body, _ = server.post("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x",
                                                                              "images": ["aGk="]}]})
    assert status == 400 and "images" in body["error"]


def parse_metrics(server):
    need("prometheus_client", "the /metrics tests")
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_metrics_parse_and_move_with_requests(server):
    before = parse_metrics(server)
    status, r, _ = server.post("/v1/completions", {"prompt": "The sea", "max_tokens": 4})
    assert status == 200
    server.post("/v1/completions", {"prompt": 5})
    after = parse_metrics(server)
    ok = dict(endpoint="completions", method="POST", status="200")
    bad = dict(endpoint="completions", method="POST", status="400")
    assert value(after, "offgrid_requests_total", **ok) == value(before, "offgrid_requests_total", **ok) + 1
    assert value(after, "offgrid_requests_total", **bad) == value(before, "offgrid_requests_total", **bad) + 1
    done = r["usage"]["completion_tokens"]
    key = dict(model=MODEL, kind="completion")
    assert value(after, "offgrid_tokens_total", **key) == value(before, "offgrid_tokens_total", **key) + done
    assert value(after, "offgrid_time_to_first_token_seconds_count") == \
        value(before, "offgrid_time_to_first_token_seconds_count") + 1
    assert value(after, "offgrid_request_duration_seconds_count", endpoint="completions") >= 2
    assert value(after, "offgrid_model_loaded", model=MODEL) == 1
    assert value(after, "offgrid_queue_requests", state="running") == 0
    assert value(after, "offgrid_memory_total_bytes") > 0
    assert value(after, "offgrid_models_installed") == 1


def test_pull_from_catalog_with_progress_then_delete(start_server, tmp_path, make_gguf):
    need("ollama", "the Ollama client tests")
    import ollama
    from test_download import FileServer, entry_for, gguf_with_random_data, write_catalog
    data = gguf_with_random_data(make_gguf, "pulled.gguf", rows=2048)
    files = FileServer({"/files/pulled.Q4_K_M.gguf": data})
    files.rate = 2 * 1024 * 1024  # slow enough to report progress more than once
    try:
        home = tmp_path / "home"
        write_catalog(home, [entry_for(data, files.url + "/files/pulled.Q4_K_M.gguf", model_id="pulled-q4_k_m",
                                       file="pulled.Q4_K_M.gguf")])
        models = tmp_path / "models"
        models.mkdir()
        srv = start_server(home=home, models_dir=str(models), wait_model=False)
        client = ollama.Client(host=srv.url, timeout=120)
        parts = list(client.pull("pulled-q4_k_m:latest", stream=True))
        assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
        progress = [p for p in parts if p.total]
        assert progress and progress[-1].completed == progress[-1].total == len(data)
        assert progress[0].digest == "sha256:" + __import__("hashlib").sha256(data).hexdigest()
        assert "pulled-q4_k_m:latest" in [m.model for m in client.list().models]
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("not-in-catalog")
        assert e.value.status_code == 404
        client.delete("pulled-q4_k_m")
        assert "pulled-q4_k_m:latest" not in [m.model for m in client.list().models]
        with pytest.raises(ollama.ResponseError) as e:
            client.delete("pulled-q4_k_m")
        assert e.value.status_code == 404
    finally:
        files.close()


# The `ollama` CLI ############################################################
#
# What the CLI sends, read from its source (cmd/cmd.go and api/client.go in
# ollama/ollama): every command first checks the server with HEAD /, then
#   list   GET /api/tags            (prints digest[:12], size, modified_at)
#   ps     GET /api/ps              (digest[:12], size, size_vram, expires_at)
#   show   POST /api/show {"name"}  (model_info[general.architecture], ...)
#   stop   POST /api/show {"model"}, then POST /api/generate {"model",
#          "keep_alive": "0s"} read as NDJSON
#   rm     the same as stop, then DELETE /api/delete {"name"}
# Go's encoder writes each request field, empty or null, unless the field
# says omitempty. Go's client keeps the connection for the next request.
# (`cp` is POST /api/copy.)

GO_SHOW = {"model": "", "system": "", "template": "", "verbose": False, "options": None, "name": ""}
GO_GENERATE = {"model": "", "prompt": "", "suffix": "", "system": "", "template": "", "options": None}


def rfc3339(text):
    import datetime
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_ollama_cli_request_sequences(start_server, model_store, tmp_path, make_gguf):
    import http.client
    import os
    import shutil
    models = tmp_path / "models"
    models.mkdir()
    for name in os.listdir(model_store):
        src, dst = os.path.join(model_store, name), str(models / name)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy(src, dst)
    shutil.copy(make_gguf("dropped.gguf"), str(models / "dropped.gguf"))  # adopted, never hashed
    srv = start_server(models_dir=str(models), wait_model=False)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)

    def call(method, path, body=None, ndjson=False):
        headers = {"Content-Type": "application/json", "User-Agent": "ollama/0.11.0 (amd64 linux) Go/go1.24.0",
                   "Accept": "application/x-ndjson" if ndjson else "application/json"}
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        r = conn.getresponse()
        raw = r.read()
        if method == "HEAD":
            return r.status, raw
        if ndjson:
            return r.status, [json.loads(line) for line in raw.splitlines() if line.strip()]
        return r.status, json.loads(raw) if raw else None

    def heartbeat():
        status, raw = call("HEAD", "/")
        assert status == 200 and raw == b""

    heartbeat()  # ollama list
    sock = conn.sock
    status, tags = call("GET", "/api/tags")
    assert status == 200
    assert sorted(m["name"] for m in tags["models"]) == ["dropped:latest", MODEL + ":latest"]
    for m in tags["models"]:
        assert len(m["digest"]) == 64 and int(m["digest"], 16) >= 0, m
        assert m["size"] > 0 and rfc3339(m["modified_at"]), m

    # `ollama run MODEL` loads it with an empty generate.
    status, [loaded] = call("POST", "/api/generate", dict(GO_GENERATE, model=MODEL), ndjson=True)
    assert status == 200 and loaded["done"] and loaded["done_reason"] == "load", loaded

    heartbeat()  # ollama ps
    status, ps = call("GET", "/api/ps")
    assert status == 200
    [m] = [m for m in ps["models"] if m["name"] == MODEL + ":latest"]
    assert len(m["digest"]) == 64 and m["size"] > 0 and m["size_vram"] == 0, m
    assert m["expires_at"] is None or rfc3339(m["expires_at"]), m

    heartbeat()  # ollama show MODEL
    status, shown = call("POST", "/api/show", dict(GO_SHOW, name=MODEL))
    assert status == 200, shown
    info = shown["model_info"]
    assert info["general.architecture"] == "gemma3" and info["gemma3.context_length"] == 32768
    assert info["general.parameter_count"] > 0 and shown["details"]["quantization_level"] == "Q4_K_M"

    heartbeat()  # ollama stop MODEL
    status, shown = call("POST", "/api/show", dict(GO_SHOW, model=MODEL))
    assert status == 200, shown
    status, lines = call("POST", "/api/generate", dict(GO_GENERATE, model=MODEL, keep_alive="0s"), ndjson=True)
    assert status == 200 and lines and not any("error" in line for line in lines), lines
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "unload", lines
    assert MODEL + ":latest" not in [m["name"] for m in call("GET", "/api/ps")[1]["models"]]

    heartbeat()  # ollama stop nosuch: a 404 whose error the CLI prints
    status, body = call("POST", "/api/show", dict(GO_SHOW, model="nosuch"))
    assert status == 404 and set(body) == {"error"} and "nosuch" in body["error"], body

    heartbeat()  # ollama rm dropped
    status, shown = call("POST", "/api/show", dict(GO_SHOW, model="dropped"))
    assert status == 200, shown
    status, lines = call("POST", "/api/generate", dict(GO_GENERATE, model="dropped", keep_alive="0s"), ndjson=True)
    assert status == 200 and lines[-1]["done"], lines
    status, body = call("DELETE", "/api/delete", {"model": "", "name": "dropped"})
    assert status == 200, body
    assert [m["name"] for m in call("GET", "/api/tags")[1]["models"]] == [MODEL + ":latest"]
    assert not os.path.exists(str(models / "dropped.gguf"))
    # Every command ran on the connection the first heartbeat opened.
    assert conn.sock is sock
