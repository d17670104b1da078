"""Model lifetime: several models share a RAM budget (least recently used
idle one out first), idle models unload after keep_alive, and /api/ps,
/health and /metrics say what is loaded. Two installed models are hard links
of the real starter file under two names; memory is read from the server
process's VmRSS."""

import os
import time

import pytest

import offgrid
from conftest import need

pytestmark = pytest.mark.model

CTX = 512
PARALLEL = 2


@pytest.fixture
def two_models(tmp_path, starter_gguf):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        os.link(starter_gguf, str(folder / name))
    return str(folder)


def estimate(starter_gguf):
    """What the engine counts for one generation model at CTX x PARALLEL."""
    info = offgrid.read_gguf(starter_gguf)
    return (os.path.getsize(starter_gguf) + offgrid.kv_cache_bytes(info["metadata"], CTX * PARALLEL)
            + offgrid.output_buffer_bytes(info, PARALLEL))


def serve(start_server, models_dir, budget, keep_alive=300):
    need("llama_cpp", "model lifetime tests")
    return start_server(models_dir=models_dir, env={
        "OFFGRID_CTX": CTX, "OFFGRID_PARALLEL": PARALLEL, "OFFGRID_MAX_LOADED_BYTES": budget,
        "OFFGRID_KEEP_ALIVE": keep_alive})


def rss(srv):
    with open("/proc/%d/status" % srv.proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


def ps(srv):
    return [m["model"].split(":")[0] for m in srv.get("/api/ps")[1]["models"]]


def loaded_metric(srv):
    need("prometheus_client", "the /metrics parser")
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "offgrid_model_loaded" and s.value == 1}


def complete(srv, model):
    status, body, _ = srv.post("/v1/completions", {"model": model, "prompt": "The sea", "max_tokens": 8,
                                                   "temperature": 0})
    assert status == 200, body
    return body


def wait_for(check, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


MiB = 1 << 20


def test_second_model_unloads_the_first_when_the_budget_fits_one(start_server, two_models, starter_gguf):
    one = estimate(starter_gguf)
    size = os.path.getsize(starter_gguf)
    srv = serve(start_server, two_models, int(one * 1.5))
    complete(srv, "alpha")
    assert ps(srv) == ["alpha"]
    rss_alpha = rss(srv)
    complete(srv, "beta")
    assert ps(srv) == ["beta"]
    health = srv.get("/health")[1]
    assert [m["id"] for m in health["loaded"]] == ["beta"] and health["model"] == "beta"
    assert health["max_loaded_bytes"] == int(one * 1.5)
    assert loaded_metric(srv) == {"beta"}
    rss_beta = rss(srv)
    assert "reason=room" in srv.output()
    # The control: a budget for both keeps both, and memory grows by about a model.
    both = serve(start_server, two_models, int(one * 2.5))
    complete(both, "alpha")
    rss_both_one = rss(both)
    complete(both, "beta")
    assert sorted(ps(both)) == ["alpha", "beta"] and loaded_metric(both) == {"alpha", "beta"}
    rss_both = rss(both)
    print("model file %.0f MiB, estimate %.0f MiB; budget for one: alpha %.0f MiB -> beta %.0f MiB; "
          "budget for two: alpha %.0f MiB -> alpha+beta %.0f MiB" % (
              size / MiB, one / MiB, rss_alpha / MiB, rss_beta / MiB, rss_both_one / MiB, rss_both / MiB))
    assert rss_beta < rss_alpha + 0.4 * size
    assert rss_both > rss_both_one + 0.5 * size


def test_keep_alive_zero_unloads_right_after_the_request(start_server, two_models, starter_gguf):
    need("ollama", "the Ollama client tests")
    import ollama
    srv = serve(start_server, two_models, estimate(starter_gguf) * 3)
    client = ollama.Client(host=srv.url, timeout=120)
    complete(srv, "alpha")
    rss_loaded = rss(srv)
    r = client.generate(model="alpha", prompt="The sea", options={"num_predict": 4}, keep_alive=0)
    assert r.done
    assert wait_for(lambda: ps(srv) == [], 5), ps(srv)
    assert loaded_metric(srv) == set() and srv.get("/health")[1]["loaded"] == []
    rss_unloaded = rss(srv)
    print("RSS loaded %.0f MiB, after keep_alive 0 %.0f MiB" % (rss_loaded / MiB, rss_unloaded / MiB))
    assert rss_unloaded < rss_loaded - 0.4 * os.path.getsize(starter_gguf)
    # An empty generate loads; with keep_alive 0 it unloads, as in Ollama.
    assert client.generate(model="beta", prompt="").done_reason == "load"
    assert ps(srv) == ["beta"]
    assert client.generate(model="beta", prompt="", keep_alive=0).done_reason == "unload"
    assert ps(srv) == []


def test_short_keep_alive_unloads_after_idle(start_server, two_models, starter_gguf):
    srv = serve(start_server, two_models, estimate(starter_gguf) * 3)
    status, body, _ = srv.post("/api/generate", {"model": "alpha", "prompt": "The sea", "stream": False,
                                                 "options": {"num_predict": 4}, "keep_alive": "2s"})
    assert status == 200
    done = time.time()
    [entry] = [m for m in srv.get("/api/ps")[1]["models"] if m["model"] == "alpha:latest"]
    expires = offgrid._parse_time(entry["expires_at"][:19] + "Z")
    assert done - 2 <= expires <= done + 4, entry["expires_at"]
    assert "alpha" in ps(srv)
    assert wait_for(lambda: "alpha" not in ps(srv), 15)
    assert time.time() - done >= 1.0
    assert "alpha" not in loaded_metric(srv)
    # A negative keep_alive keeps the model until its room is needed.
    status, body, _ = srv.post("/api/generate", {"model": "beta", "prompt": "", "keep_alive": -1})
    assert status == 200 and body["done_reason"] == "load"
    [entry] = srv.get("/api/ps")[1]["models"]
    assert entry["expires_at"] is None


def test_keep_alive_from_config_unloads_the_startup_model(start_server, two_models, starter_gguf):
    srv = serve(start_server, two_models, estimate(starter_gguf) * 3, keep_alive=1)
    assert wait_for(lambda: ps(srv) == [], 15)
    assert srv.get("/health")[1]["model"] is None
    # The next request loads it again.
    complete(srv, "alpha")
    assert "alpha" in ps(srv)


def test_keep_alive_values_parse_as_ollama_reads_them():
    parse = offgrid.parse_keep_alive
    assert parse(None) is None
    assert parse(0) == 0 and parse("0") == 0
    assert parse(30) == 30 and parse("30") == 30
    assert parse("5m") == 300 and parse("1h30m") == 5400 and parse("1.5s") == 1.5 and parse("250ms") == 0.25
    assert parse(-1) == offgrid.KEEP_FOREVER and parse("-5m") == offgrid.KEEP_FOREVER
    for bad in ("soon", "5 minutes", True, [1], "m"):
        with pytest.raises(offgrid.ApiError) as e:
            parse(bad)
        assert e.value.status == 400 and e.value.param == "keep_alive"


def test_a_keep_alive_longer_than_a_thread_may_wait_means_forever(start_server, model_store):
    # Found by schemathesis: keep_alive 4e16 seconds made the engine's wait
    # overflow, and every later request stayed queued.
    srv = serve(start_server, model_store, budget=0)
    body = {"model": "gemma-3-270m-q4_k_m", "prompt": "The sea", "stream": False, "options": {"num_predict": 2}}
    for keep_alive in (4e16, "999999999h"):
        status, reply, _ = srv.post("/api/generate", dict(body, keep_alive=keep_alive))
        assert status == 200 and reply["done"], reply
        [model] = srv.get("/api/ps")[1]["models"]
        assert model["expires_at"] is None or model["expires_at"].startswith("2"), model
        [loaded] = srv.get("/health")[1]["loaded"]
        assert loaded["keep_alive_s"] is None, loaded  # forever
    status, reply, _ = srv.post("/api/generate", dict(body, keep_alive=1))
    assert status == 200 and reply["done"], reply
