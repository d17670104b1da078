"""Speculative decoding by prompt lookup, against real servers on the golden
model and on the starter (SmolLM2): with drafting on, greedy replies are the
same tokens as without it, alone and in a batch beside sequences that do
not draft, with stops, max_tokens, logprobs, grammars and n > 1; the
counters show that drafting really happened, so no test passes vacuously."""

import json
import os
import shutil
import threading
import urllib.request

import pytest

from conftest import Server, need

pytestmark = [pytest.mark.model, pytest.mark.slow]

STARTER = "smollm2-135m-instruct-q4_1"

# A paragraph to copy: the reply quotes the prompt, so lookup drafts it.
PARAGRAPH = ("The river rises in the hills above the town and runs for forty miles to the sea. "
             "In spring the snow melts and the water climbs the stone walls of the old mill. "
             "Farmers along its banks plant barley and beans, and the children fish from the bridge.")
CODE = ("def area(width, height):\n    return width * height\n\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n")
ECHO_CHATS = [
    "Repeat this text exactly, word for word:\n\n" + PARAGRAPH,
    "Copy this code exactly, in a code block:\n\n" + CODE,
]


def tokens_of(reply):
    """The reply's tokens as the logprobs list them, and its text."""
    choice = reply["choices"][0]
    if "message" in choice:
        return [t["token"] for t in choice["logprobs"]["content"]], choice["message"]["content"]
    return choice["logprobs"]["tokens"], choice["text"]


def drafted(server):
    """(drafted, accepted) tokens so far, from /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    counts = {"offgrid_draft_tokens_total": 0, "offgrid_draft_accepted_tokens_total": 0}
    for line in text.splitlines():
        name = line.split("{")[0]
        if name in counts:
            counts[name] += int(float(line.rsplit(" ", 1)[1]))
    return counts["offgrid_draft_tokens_total"], counts["offgrid_draft_accepted_tokens_total"]


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory, smol_store):
    need("llama_cpp", "speculative decoding tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_store, env={"OFFGRID_PARALLEL": "4"})
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def golden_server(tmp_path_factory):
    need("llama_cpp", "the golden model")
    import golden_model
    folder = tmp_path_factory.mktemp("golden-models")
    golden_model.write_model(str(folder / golden_model.MODEL_FILE))
    srv = Server(tmp_path_factory.mktemp("home"), str(folder), env={"OFFGRID_PARALLEL": "4"})
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def chat(server, content, speculative, **extra):
    body = dict({"model": STARTER, "messages": [{"role": "user", "content": content}], "temperature": 0,
                 "max_tokens": 96, "logprobs": True, "speculative": speculative}, **extra)
    status, reply, _ = server.post("/v1/chat/completions", body)
    assert status == 200, reply
    return reply


def test_speculative_greedy_equals_plain_greedy_on_the_starter(smol_server):
    before = drafted(smol_server)
    for content in ECHO_CHATS:
        plain = chat(smol_server, content, False)
        fast = chat(smol_server, content, True)
        assert tokens_of(fast) == tokens_of(plain)
        assert fast["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert fast["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    after = drafted(smol_server)
    assert after[0] > before[0] and after[1] > before[1], (before, after)


def test_speculative_greedy_equals_plain_greedy_on_the_golden_model(golden_server):
    import golden_model
    # The golden model's random weights fall into a loop after 370 tokens
    # of this prompt: its own reply is what lookup drafts from.
    body = {"model": golden_model.MODEL_ID, "prompt": "Once upon a time " * 8, "temperature": 0,
            "max_tokens": 400, "logprobs": 1}
    replies = {}
    before = drafted(golden_server)
    for speculative in (False, True):
        status, reply, _ = golden_server.post("/v1/completions", dict(body, speculative=speculative))
        assert status == 200, reply
        replies[speculative] = reply
    after = drafted(golden_server)
    assert tokens_of(replies[True]) == tokens_of(replies[False])
    assert replies[True]["usage"] == replies[False]["usage"]
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    # The golden request itself is unchanged by drafting.
    status, reply, _ = golden_server.post("/v1/chat/completions", dict(golden_model.REQUEST, speculative=True))
    status2, reply2, _ = golden_server.post("/v1/chat/completions", golden_model.REQUEST)
    assert status == status2 == 200
    assert reply["choices"][0]["message"]["content"] == reply2["choices"][0]["message"]["content"]


def test_drafting_and_plain_sequences_share_a_batch(smol_server):
    """Four requests at once: two echo chats that draft, a counting one and a
    quoting one that do not. Each reply is the one it gets alone without
    drafting. (Prompts whose replies the model is sure of, token after token:
    a batch's shape may change the last bits of the logits, drafting or not.)"""
    jobs = [(ECHO_CHATS[0], True), (ECHO_CHATS[1], True),
            ("Write the numbers from 1 to 30, separated by commas.", False),
            ("Quote the first sentence of this text exactly: " + PARAGRAPH, False)]
    alone = [tokens_of(chat(smol_server, content, False)) for content, _ in jobs]
    before = drafted(smol_server)
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = tokens_of(chat(smol_server, jobs[i][0], jobs[i][1]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == alone
    after = drafted(smol_server)
    assert after[1] > before[1], (before, after)


def test_stop_strings_and_max_tokens_are_exact_with_drafting(smol_server):
    content = ECHO_CHATS[0]
    plain = chat(smol_server, content, False)
    text = plain["choices"][0]["message"]["content"]
    assert "old mill" in text, text
    # A stop string in the middle of a stretch that drafting copies.
    for speculative in (False, True):
        reply = chat(smol_server, content, speculative, stop=["old mill"])
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["message"]["content"] == text[:text.index("old mill")]
    for limit in (1, 7, 23):
        replies = [chat(smol_server, content, s, max_tokens=limit) for s in (False, True)]
        assert [r["usage"]["completion_tokens"] for r in replies] == [limit, limit]
        assert tokens_of(replies[1]) == tokens_of(replies[0])
        assert replies[1]["choices"][0]["finish_reason"] == "length"
    slots = smol_server.get("/v1/slots")[1]["slots"]
    assert all(s["accepted_tokens"] <= s["drafted_tokens"] for s in slots)


def test_grammar_n_and_seeded_sampling_with_drafting(smol_server):
    content = "Return this JSON object unchanged: " + json.dumps({"name": "mill", "river": "forty miles",
                                                                  "crops": ["barley", "beans"]})
    fmt = {"response_format": {"type": "json_object"}}
    plain = chat(smol_server, content, False, **fmt)
    fast = chat(smol_server, content, True, **fmt)
    assert tokens_of(fast) == tokens_of(plain)
    json.loads(fast["choices"][0]["message"]["content"])
    both = chat(smol_server, ECHO_CHATS[0], True, n=2, logprobs=False)
    alone = chat(smol_server, ECHO_CHATS[0], False, logprobs=False)
    assert [c["message"]["content"] for c in both["choices"]] == [alone["choices"][0]["message"]["content"]] * 2
    # Sampling: the same seed draws the same reply; drafting only changes
    # how many rows each decode verifies, never which draw a token gets.
    seeded = dict(temperature=0.7, seed=11, logprobs=False)
    replies = [chat(smol_server, ECHO_CHATS[1], s, **seeded)["choices"][0]["message"]["content"]
               for s in (False, True)]
    assert replies[0] == replies[1]


def test_prefix_cache_after_drafting_matches_a_cold_run(smol_server):
    """The KV cells a drafting reply leaves (drafts taken, the rest rolled
    back) serve the next turn of the chat as if decoded one at a time."""
    text = ("A lighthouse stands on the northern cape. Its lamp turns twice a minute, and ships "
            "passing the reef at night steer by its light until the harbour lamps come into view.")
    first = [{"role": "user", "content": "Repeat this text exactly:\n\n" + text}]
    reply = chat(smol_server, first[0]["content"], False, logprobs=False)["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": reply},
                      {"role": "user", "content": "Now repeat it once more, exactly."}]
    body = {"model": STARTER, "messages": second, "temperature": 0, "max_tokens": 80, "speculative": False}
    status, cold, _ = smol_server.post("/v1/chat/completions", body)
    assert status == 200, cold
    # The first turn again with drafting: it takes the slot whose cells hold
    # the longest common prefix (the cold run's), drafts and rolls back there.
    before = drafted(smol_server)
    again = chat(smol_server, first[0]["content"], True, logprobs=False)
    assert again["choices"][0]["message"]["content"] == reply
    assert drafted(smol_server)[1] > before[1]
    status, warm, _ = smol_server.post("/v1/chat/completions", body)
    assert status == 200, warm
    # The second turn reused cells past the first turn's prompt: the reply's.
    slot = [s for s in smol_server.get("/v1/slots")[1]["slots"] if s["prompt_tokens"] == warm["usage"]["prompt_tokens"]]
    assert max(s["reused_tokens"] for s in slot) > again["usage"]["prompt_tokens"] + 10, slot
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]


def test_bad_speculative_values_are_refused_naming_the_field(smol_server):
    status, body, _ = smol_server.post("/v1/chat/completions", {
        "model": STARTER, "messages": [{"role": "user", "content": "hi"}], "speculative": "yes"})
    assert status == 400 and body["error"]["param"] == "speculative", body
    status, body, _ = smol_server.post("/v1/completions", {"model": STARTER, "prompt": "hi", "speculative": 1})
    assert status == 400 and body["error"]["param"] == "speculative", body
    status, body, _ = smol_server.post("/api/generate", {"model": STARTER, "prompt": "hi", "stream": False,
                                                         "options": {"speculative": "no"}})
    assert status == 400 and "options.speculative" in body["error"], body
    for path, body in (("/v1/responses", {"model": STARTER, "input": "hi", "speculative": "on"}),
                       ("/v1/messages", {"model": STARTER, "max_tokens": 8, "speculative": 2,
                                         "messages": [{"role": "user", "content": "hi"}]})):
        status, reply, _ = smol_server.post(path, body)
        assert status == 400 and "speculative" in json.dumps(reply), (path, reply)
    status, reply, _ = smol_server.post("/v1/messages", {"model": STARTER, "max_tokens": 4, "speculative": True,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, reply


def test_manifest_and_config_switch_drafting_on_and_off(tmp_path, smol_store):
    """Drafting is off by default; a model's manifest setting wins over the
    config, and a request's over both."""
    need("llama_cpp", "speculative decoding tests")
    models = tmp_path / "models"
    shutil.copytree(smol_store, str(models))
    manifest = models / (STARTER + ".manifest.json")
    assert manifest.exists(), os.listdir(str(models))
    srv = Server(tmp_path / "home", str(models), env={"OFFGRID_PARALLEL": "2"})
    try:
        chat(srv, ECHO_CHATS[0], None, logprobs=False)
        assert drafted(srv) == (0, 0)
        assert not any(s["speculative"] for s in srv.get("/v1/slots")[1]["slots"])
        chat(srv, ECHO_CHATS[0], True, logprobs=False)
        assert drafted(srv)[0] > 0
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]
    data = json.loads(manifest.read_text())
    data["speculative"] = True
    manifest.write_text(json.dumps(data))
    srv = Server(tmp_path / "home2", str(models), env={"OFFGRID_SPECULATIVE": "false", "OFFGRID_PARALLEL": "2"})
    try:
        chat(srv, ECHO_CHATS[0], None, logprobs=False)
        assert drafted(srv)[0] > 0
        before = drafted(srv)
        chat(srv, ECHO_CHATS[0], False, logprobs=False)
        assert drafted(srv) == before
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]


# -- the pieces, without a model ------------------------------------------------

def test_lookup_drafts_what_followed_the_latest_longest_match():
    import offgrid
    slot = offgrid.Slot(0)
    job = offgrid.Job("completion", {"id": "m"}, offgrid.GenerationRequest(kind="completion", prompt="x"))
    slot.start(job, [1, 2, 3, 4, 5, 9, 1, 2, 3], [], 100, None, 0, 0.0, speculative=True)
    assert slot.lookup(3) == (2, [4, 5, 9])
    slot.remember(4)
    assert slot.lookup(8) == (4, [5, 9, 1, 2, 3, 4])
    slot.remember(7)
    assert slot.lookup(8) == (0, [])
    plain = offgrid.Slot(1)
    plain.start(job, [1, 2, 1, 2], [], 100, None, 0, 0.0, speculative=False)
    assert plain.context is None


def test_step_cost_fits_base_and_per_token_seconds():
    import offgrid
    cost = offgrid.StepCost()
    base, per_token = cost.estimate()
    assert per_token / base == offgrid.StepCost.PRIOR_SLOPE
    for _ in range(3):
        cost.add(1, 0.03)
    base, per_token = cost.estimate()  # one batch size: the prior slope, through the measured mean
    assert abs(base + per_token - 0.03) < 1e-9 and abs(per_token / base - offgrid.StepCost.PRIOR_SLOPE) < 1e-9
    for _ in range(20):
        for n in (1, 3, 5, 9):
            cost.add(n, 0.02 + 0.01 * n)
    base, per_token = cost.estimate()
    assert abs(base - 0.02) < 0.003 and abs(per_token - 0.01) < 0.001, (base, per_token)
    cost.add(1, 5.0)  # a step slowed by another process counts as at most twice the expected
    assert abs(cost.estimate()[1] - per_token) < 0.002
