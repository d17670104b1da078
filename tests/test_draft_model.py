"""Speculative decoding with a draft model (`draft_model` in a model's
manifest), against a real server: greedy replies are the same tokens as
without drafting, on the starter (a Q8_0 requantization of it as target,
the starter itself as draft) and on the golden model (a copy of itself as
draft, and a wider model of other weights whose drafts are mostly
rejected); a draft model of another vocabulary is refused with an error
naming both models; the draft's memory counts with its target's. The
counters show that the draft model really drafted, so no test passes
vacuously. (The first steps a draft model drafts in are probes that draft
whatever the cost estimates say, so every test here sees drafts however
loaded the machine is.)"""

import json
import os
import threading
import urllib.request

import pytest

from conftest import OFFGRID, Server, free_env, link_or_copy, need

pytestmark = [pytest.mark.model, pytest.mark.slow]

STARTER = "smollm2-135m-instruct-q4_1"
TARGET = "smol-q8"  # the starter requantized to Q8_0, drafted for by the starter
PARAGRAPH = ("The river rises in the hills above the town and runs for forty miles to the sea. "
             "In spring the snow melts and the water climbs the stone walls of the old mill.")


def set_manifest(folder, model_id, **fields):
    path = os.path.join(folder, model_id + ".manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(fields)
    with open(path + ".new", "w") as f:
        json.dump(manifest, f)
    os.replace(path + ".new", path)


@pytest.fixture(scope="module")
def draft_store(tmp_path_factory, smol_gguf):
    """A models folder: the starter, smol-q8 (its Q8_0 requantization, made
    with `offgrid quantize`) drafting with the starter, the golden model
    drafting with a copy of itself, golden-rival (the golden model again)
    drafting with a wider golden model of other weights, and two models
    whose draft_model is wrong: smol-bad (the golden model's vocabulary)
    and smol-missing (no such model)."""
    need("llama_cpp", "draft model tests")
    import golden_model
    import subprocess
    import sys
    import offgrid
    folder = str(tmp_path_factory.mktemp("draft-models"))
    home = tmp_path_factory.mktemp("quantize-home")
    offgrid.ModelStore(folder).install_starter()
    p = subprocess.run([sys.executable, OFFGRID, "quantize", STARTER, "Q8_0", "--allow-requantize", "--name", TARGET,
                        "--models-dir", folder], env=free_env(home), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    golden_model.write_model(os.path.join(folder, "golden-tiny.gguf"))
    link_or_copy(os.path.join(folder, "golden-tiny.gguf"), os.path.join(folder, "golden-copy.gguf"))
    link_or_copy(os.path.join(folder, "golden-tiny.gguf"), os.path.join(folder, "golden-rival.gguf"))
    golden_model.write_model(os.path.join(folder, "golden-wide.gguf"), dtype="f16", n_embd=256)
    smol_file = offgrid.ModelStore(folder).get(STARTER)["file"]
    for name in ("smol-bad", "smol-missing"):
        link_or_copy(os.path.join(folder, smol_file), os.path.join(folder, name + ".gguf"))
    assert {m["id"] for m in offgrid.ModelStore(folder).models()} >= {
        STARTER, TARGET, "golden-tiny", "golden-copy", "golden-rival", "golden-wide", "smol-bad", "smol-missing"}
    set_manifest(folder, TARGET, draft_model=STARTER)
    set_manifest(folder, "golden-tiny", draft_model="golden-copy")
    set_manifest(folder, "golden-rival", draft_model="golden-wide")
    set_manifest(folder, "smol-bad", draft_model="golden-copy")
    set_manifest(folder, "smol-missing", draft_model="no-such-model")
    return folder


@pytest.fixture(scope="module")
def draft_server(tmp_path_factory, draft_store):
    srv = Server(tmp_path_factory.mktemp("home"), draft_store,
                 env={"OFFGRID_PARALLEL": "2", "OFFGRID_MODEL": TARGET, "OFFGRID_KEEP_ALIVE": "-1"})
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def model_drafts(server, model):
    """(drafted, accepted) tokens of the model's draft model so far, from /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("offgrid_draft_") and 'model="%s"' % model in line and 'drafter="model"' in line:
            counts[line.split("{")[0]] = int(float(line.rsplit(" ", 1)[1]))
    return (counts.get("offgrid_draft_tokens_total", 0), counts.get("offgrid_draft_accepted_tokens_total", 0))


def tokens_of(reply):
    choice = reply["choices"][0]
    if "message" in choice:
        return [t["token"] for t in choice["logprobs"]["content"]], choice["message"]["content"]
    return choice["logprobs"]["tokens"], choice["text"]


def chat(server, model, content, speculative, **extra):
    body = dict({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                 "max_tokens": 64, "logprobs": True, "speculative": speculative}, **extra)
    status, reply, _ = server.post("/v1/chat/completions", body, timeout=600)
    assert status == 200, reply
    return reply


def test_draft_model_greedy_equals_plain_greedy_on_the_starter(draft_server):
    before = model_drafts(draft_server, TARGET)
    for content in ("Write a short story about a dog who learns to swim.",
                    "Repeat this text exactly, word for word:\n\n" + PARAGRAPH):
        plain = chat(draft_server, TARGET, content, False)
        fast = chat(draft_server, TARGET, content, True)
        assert tokens_of(fast) == tokens_of(plain)
        assert fast["usage"] == plain["usage"]
        assert fast["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    after = model_drafts(draft_server, TARGET)
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    slots = draft_server.get("/v1/slots")[1]
    assert slots["model"] == TARGET and slots["draft_model"] == STARTER
    assert all(s["model_accepted_tokens"] <= s["model_drafted_tokens"] <= s["drafted_tokens"] for s in slots["slots"])


def test_draft_model_keeps_the_target_distribution_when_sampling(draft_server):
    """A seeded sampled reply is the same with and without the draft model:
    each position is still drawn by the target's own sampler, in order; the
    draft only decides which positions one decode verifies. Two requests at
    once, one drafting, share a batch with a plain one."""
    content = "Write a short poem about the sea."
    seeded = dict(temperature=0.8, seed=7, logprobs=False, max_tokens=48)
    alone = chat(draft_server, TARGET, content, False, **seeded)["choices"][0]["message"]["content"]
    before = model_drafts(draft_server, TARGET)
    results = [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        results[i] = chat(draft_server, TARGET, content, i == 0, **seeded)["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert results == [alone, alone]
    # n > 1 and a grammar: the sampler chain sees the same tokens in the same order.
    fmt = {"response_format": {"type": "json_object"}, "n": 2, "logprobs": False}
    content = "Return this JSON object unchanged: " + json.dumps({"name": "mill", "crops": ["barley", "beans"]})
    plain = chat(draft_server, TARGET, content, False, **fmt)
    fast = chat(draft_server, TARGET, content, True, **fmt)
    assert [c["message"]["content"] for c in fast["choices"]] == [c["message"]["content"] for c in plain["choices"]]
    json.loads(fast["choices"][0]["message"]["content"])
    assert model_drafts(draft_server, TARGET)[0] >= before[0]


def test_draft_model_greedy_equals_plain_greedy_on_the_golden_model(draft_server):
    import golden_model
    body = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 48, "logprobs": 1}
    for model in ("golden-tiny", "golden-rival"):
        before = model_drafts(draft_server, model)
        replies = {}
        for speculative in (False, True):
            status, reply, _ = draft_server.post("/v1/completions", dict(body, model=model, speculative=speculative))
            assert status == 200, reply
            replies[speculative] = reply
        assert tokens_of(replies[True]) == tokens_of(replies[False])
        assert replies[True]["usage"] == replies[False]["usage"]
        after = model_drafts(draft_server, model)
        assert after[0] > before[0], (model, before, after)
        if model == "golden-tiny":
            # Its draft is a copy of itself: every drafted token is taken.
            assert after[1] - before[1] == after[0] - before[0], (before, after)
        else:
            # Another model's drafts: most are rejected and rolled back.
            assert after[1] - before[1] < after[0] - before[0], (before, after)
    # The golden request itself is unchanged by the draft model.
    replies = []
    for speculative in (True, False):
        status, reply, _ = draft_server.post("/v1/chat/completions", dict(golden_model.REQUEST, speculative=speculative))
        assert status == 200, reply
        replies.append(reply["choices"][0]["message"]["content"])
    assert replies[0] == replies[1]


def test_a_draft_model_with_another_vocabulary_is_refused(draft_server):
    status, reply, _ = draft_server.post("/v1/chat/completions", {
        "model": "smol-bad", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 500, reply
    error = reply["error"]
    assert error["code"] == "draft_model_mismatch", error
    message = error["message"]
    assert "smol-bad" in message and "golden-copy" in message and "vocabulary" in message, message
    assert "32000 tokens against 49152" in message, message
    # The Ollama dialect says the same in its own shape.
    status, reply, _ = draft_server.post("/api/generate", {"model": "smol-bad", "prompt": "Hi", "stream": False})
    assert status == 500 and "another vocabulary" in reply["error"], reply
    status, reply, _ = draft_server.post("/v1/completions", {"model": "smol-missing", "prompt": "Hi", "max_tokens": 4})
    assert status == 500, reply
    assert "no-such-model is not installed" in reply["error"]["message"], reply
    # Nothing of the refused models stays loaded; the server goes on.
    loaded = {m["model"] for m in draft_server.get("/api/ps")[1]["models"]}
    assert not loaded & {"smol-bad:latest", "smol-missing:latest"}, loaded
    assert chat(draft_server, TARGET, "Hi", False, max_tokens=4)["usage"]["completion_tokens"] > 0


def test_draft_model_memory_counts_with_its_target(draft_server, tmp_path):
    chat(draft_server, TARGET, "Hi", True, max_tokens=2)
    chat(draft_server, STARTER, "Hi", False, max_tokens=2)
    health = draft_server.get("/health")[1]
    loaded = {m["id"]: m for m in health["loaded"] if m["mode"] == "generate"}
    target, starter = loaded[TARGET], loaded[STARTER]
    draft = target["draft_model"]
    assert draft["id"] == STARTER and starter["draft_model"] is None
    # The same model at the same context: the draft takes what the starter
    # alone takes, and the target's bytes include it.
    assert draft["bytes"] == starter["bytes"] > 90 << 20
    q8_file = os.path.getsize(os.path.join(draft_server_models(draft_server), TARGET + ".gguf"))
    assert target["bytes"] > q8_file + draft["bytes"]
    ps = {m["model"]: m for m in draft_server.get("/api/ps")[1]["models"]}
    assert ps[TARGET + ":latest"]["size"] == target["bytes"]
    # A budget that holds the target and the starter, but not with the
    # draft counted too: loading the target unloads the starter for room.
    budget = target["bytes"] + starter["bytes"] - draft["bytes"] // 2
    srv = Server(tmp_path / "home", draft_server_models(draft_server),
                 env={"OFFGRID_PARALLEL": "2", "OFFGRID_MODEL": STARTER, "OFFGRID_MAX_LOADED_BYTES": str(budget),
                      "OFFGRID_KEEP_ALIVE": "-1"})
    try:
        chat(srv, STARTER, "Hi", False, max_tokens=2)
        chat(srv, TARGET, "Hi", True, max_tokens=2)
        names = [m["model"] for m in srv.get("/api/ps")[1]["models"]]
        assert names == [TARGET + ":latest"], names
        assert "reason=room" in srv.output(), srv.output()[-2000:]
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]


def draft_server_models(server):
    """The models folder the server was started with."""
    cmd = server.proc.args
    return cmd[cmd.index("--models-dir") + 1]
