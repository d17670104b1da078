"""Continuous batching against a real server on the real starter model:
requests that run at the same time in one llama.cpp context keep their own
sampling, stops, grammar, limits and cancellation, and a chat's earlier
turns are not evaluated twice."""

import http.client
import json
import re
import socket
import threading
import time
import urllib.request

import pytest

import offgrid
from conftest import Server, need

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "gemma-3-270m-q4_k_m"
# A continuation the base model is sure of, token after token: it runs as
# long as max_tokens allows and never ends on its own.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory, model_store):
    """A server with four slots whatever the machine's cores."""
    need("llama_cpp", "batching tests")
    srv = Server(tmp_path_factory.mktemp("home"), model_store, env={"OFFGRID_PARALLEL": "4"})
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(s["state"] == "idle" for s in server.get("/v1/slots")[1]["slots"]):
            return
        time.sleep(0.05)
    raise AssertionError("slots still busy: %s" % server.get("/v1/slots")[1])


class Stream:
    """One streaming request on its own connection, read on its own thread,
    with the time of its first and last text chunk."""

    def __init__(self, server, body, path="/v1/completions"):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.conn.request("POST", path, json.dumps(dict(body, stream=True)),
                          {"Content-Type": "application/json"})
        # Kept here: http.client drops conn.sock (on the reader thread) when
        # a reply ends the connection, and close() must still reach it.
        self.sock = self.conn.sock
        self.parts, self.finish, self.error = [], None, None
        self.first_at = self.last_at = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            r = self.conn.getresponse()
            assert r.status == 200, r.read()
            for line in r:
                line = line.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                choice = event["choices"][0]
                text = choice.get("text") if "text" in choice else choice["delta"].get("content")
                if text:
                    self.parts.append(text)
                    self.last_at = time.monotonic()
                    if self.first_at is None:
                        self.first_at = self.last_at
                if choice["finish_reason"]:
                    self.finish = choice["finish_reason"]
        except OSError as e:  # the client hung up itself, or a real failure for result()
            self.error = e
        except Exception as e:  # reported by result()
            self.error = e

    def result(self, timeout=120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not finish"
        assert self.error is None, repr(self.error)
        return "".join(self.parts)

    def close(self):
        """Hang up, as a client that went away (the reader thread still
        holds the socket, so close() alone would not end the connection)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the server had already ended it: running() says whether that was expected
        self.sock.close()

    def running(self):
        """Still receiving its reply: no error, no finish, thread alive."""
        return self.thread.is_alive() and self.error is None and self.finish is None


def completion(server, **body):
    status, reply, _ = server.post("/v1/completions", dict(body, model=MODEL))
    assert status == 200, reply
    return reply


def test_concurrent_greedy_replies_match_replies_run_alone(batch_server):
    # Prompts whose every greedy step has a clear winner. Where the top two
    # tokens are nearly tied (a story's "little" vs "small", 0.12 apart),
    # running next to other sequences changes the order of floating-point
    # sums enough to flip the choice and the two texts part ways from there;
    # llama.cpp's own server slots do the same. These prompts have no such
    # ties within 32 tokens, so batched and alone must agree exactly.
    prompts = [COUNTING, "Monday, Tuesday, Wednesday,", "10, 20, 30, 40,", "def fibonacci(n):"]
    alone = [completion(batch_server, prompt=p, max_tokens=32, temperature=0)["choices"][0]["text"]
             for p in prompts]
    wait_idle(batch_server)
    streams = [Stream(batch_server, {"prompt": p, "max_tokens": 32, "temperature": 0}) for p in prompts]
    together = [s.result() for s in streams]
    assert together == alone
    # They really ran at the same time: each started before any finished.
    assert max(s.first_at for s in streams) < min(s.last_at for s in streams)


def test_greedy_argmax_gives_llama_cpps_greedy_tokens(batch_server):
    # Plain greedy requests take the argmax of the logits (BatchScheduler.sample);
    # a zero logit bias changes no logit but sends the request through
    # llama.cpp's own sampler chain (logit bias, then greedy). Same prompts
    # with clear winners as above, run one at a time: the texts must agree.
    wait_idle(batch_server)
    for prompt in (COUNTING, "Monday, Tuesday, Wednesday,", "def fibonacci(n):"):
        plain = completion(batch_server, prompt=prompt, max_tokens=32, temperature=0)
        chain = completion(batch_server, prompt=prompt, max_tokens=32, temperature=0, logit_bias={"7": 0})
        assert plain["choices"][0]["text"] == chain["choices"][0]["text"], prompt
        assert plain["usage"]["completion_tokens"] == chain["usage"]["completion_tokens"] > 0


def test_sampling_settings_stay_per_request_in_one_batch(batch_server):
    wait_idle(batch_server)
    sampled = dict(prompt="In the village there lived", max_tokens=24, temperature=1.0)
    streams = [Stream(batch_server, dict(sampled, seed=1)),
               Stream(batch_server, dict(sampled, seed=2)),
               Stream(batch_server, {"prompt": COUNTING, "max_tokens": 40, "temperature": 0}),
               Stream(batch_server, {"prompt": COUNTING, "max_tokens": 40, "temperature": 0, "stop": "15"})]
    texts = [s.result() for s in streams]
    # Each sequence draws with its own seeded chain. (Whether one seed gives
    # the same text batched as alone is not asserted: a draw that lands
    # near a boundary between two tokens can flip when the batch shifts the
    # logits by a hundredth; test_api pins seeds for requests run alone.)
    assert texts[0] != texts[1]
    assert texts[2].startswith(" 11, 12, 13, 14, 15, 16") and streams[2].finish == "length"
    assert texts[3] == " 11, 12, 13, 14, " and streams[3].finish == "stop"
    assert max(s.first_at for s in streams) < min(s.last_at for s in streams)


def test_cancelled_request_frees_its_slot_while_others_go_on(batch_server):
    wait_idle(batch_server)
    streams = [Stream(batch_server, {"prompt": COUNTING, "max_tokens": 1500, "temperature": 0})
               for _ in range(3)]
    deadline = time.time() + 30
    while time.time() < deadline:
        slots = batch_server.get("/v1/slots")[1]["slots"]
        if sum(s["state"] == "generating" for s in slots) == 3 and all(s.parts for s in streams):
            break
        time.sleep(0.05)
    running = {s["request_id"]: s for s in slots if s["state"] == "generating"}
    assert len(running) == 3, slots
    streams[0].close()
    deadline = time.time() + 120
    while time.time() < deadline:
        slots = batch_server.get("/v1/slots")[1]["slots"]
        if sum(s["state"] == "generating" for s in slots) == 2:
            break
        time.sleep(0.05)
    freed = [s for s in slots if s["request_id"] is None and s["id"] in [r["id"] for r in running.values()]]
    assert len(freed) == 1, (running, slots)
    assert freed[0]["cached_tokens"] == 0  # its KV cells went with it
    before = {s["request_id"]: s["generated_tokens"] for s in slots if s["state"] == "generating"}
    time.sleep(1.0)
    after = {s["request_id"]: s["generated_tokens"] for s in batch_server.get("/v1/slots")[1]["slots"]
             if s["state"] == "generating"}
    assert set(after) == set(before) and all(after[k] > before[k] for k in before), (before, after)
    for s in streams[1:]:
        s.close()
    wait_idle(batch_server)
    stats = batch_server.get("/stats")[1]
    assert stats["models"][MODEL]["cancelled"] >= 3
    assert stats["engine"]["tokens_per_s"] > 0


def test_grammar_request_and_free_request_share_a_batch(batch_server):
    wait_idle(batch_server)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    free = Stream(batch_server, {"prompt": COUNTING, "max_tokens": 200, "temperature": 0})
    constrained = Stream(batch_server, {
        "messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 120,
        "temperature": 0, "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "person", "schema": schema}}},
        path="/v1/chat/completions")
    both = False
    deadline = time.time() + 60
    while time.time() < deadline and constrained.thread.is_alive():
        slots = batch_server.get("/v1/slots")[1]["slots"]
        if sum(s["state"] == "generating" for s in slots) == 2:
            both = True
        time.sleep(0.02)
    value = json.loads(constrained.result())
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert free.result().startswith(" 11, 12, 13")
    assert both, "the two requests never generated at the same time"
    assert free.first_at < constrained.last_at and constrained.first_at < free.last_at


def test_prefix_of_a_chat_is_reused_on_the_next_turn(batch_server):
    wait_idle(batch_server)
    messages = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
    status, first, _ = batch_server.post("/v1/chat/completions",
                                         {"messages": messages, "max_tokens": 24, "temperature": 0})
    assert status == 200
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "What happened next?"}]
    status, second, _ = batch_server.post("/v1/chat/completions",
                                          {"messages": messages, "max_tokens": 8, "temperature": 0})
    assert status == 200
    slots = batch_server.get("/v1/slots")[1]["slots"]
    last = [s for s in slots if s["prompt_tokens"] == second["usage"]["prompt_tokens"]]
    assert last, slots
    # The whole first turn (its prompt and the reply) came from the cache.
    assert last[0]["reused_tokens"] >= first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 2
    assert last[0]["cached_tokens"] >= second["usage"]["prompt_tokens"]


def test_context_running_out_ends_only_that_request(start_server, model_store):
    srv = start_server(models_dir=model_store, env={"OFFGRID_PARALLEL": "2", "OFFGRID_CTX": "256"})
    slots = srv.get("/v1/slots")[1]
    assert slots["parallel"] == 2 and slots["ctx_per_slot"] == 256
    long_prompt = ", ".join(str(i) for i in range(1, 61)) + ","
    long = Stream(srv, {"prompt": long_prompt, "max_tokens": 1000, "temperature": 0})
    short = Stream(srv, {"prompt": COUNTING, "max_tokens": 120, "temperature": 0})
    long_text, short_text = long.result(), short.result()
    assert long.finish == "length" and long_text.startswith(" 61, 62, 63")
    assert short.finish == "length" and short_text.startswith(" 11, 12, 13, 14")
    assert long.first_at < short.last_at and short.first_at < long.last_at
    # The long one filled its 256 tokens; the short one got all it asked for.
    status, body, _ = srv.post("/v1/completions", {"prompt": long_prompt, "max_tokens": 1000, "temperature": 0})
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 256
    assert body["choices"][0]["text"] == long_text
    status, body, _ = srv.post("/v1/completions", {"prompt": COUNTING, "max_tokens": 120, "temperature": 0})
    assert body["usage"]["completion_tokens"] == 120


def test_queue_starts_behind_the_slots(start_server, model_store):
    # As many sequences as full contexts: each slot has a KV stream of its own.
    srv = start_server(models_dir=model_store, env={"OFFGRID_PARALLEL": "2", "OFFGRID_SEQUENCES": "2",
                                                    "OFFGRID_QUEUE_SIZE": "1"})
    assert srv.get("/v1/slots")[1]["kv"]["unified"] is False
    streams = [Stream(srv, {"prompt": COUNTING, "max_tokens": 1500, "temperature": 0}) for _ in range(3)]
    # Generous: on a loaded machine the first steps of two sequences can
    # take a while; the state is what is waited for, not its speed.
    deadline = time.time() + 180
    while srv.get("/health")[1]["queue"] != {"waiting": 1, "running": 2, "capacity": 1}:
        assert time.time() < deadline, srv.get("/health")[1]["queue"]
        time.sleep(0.05)
    status, body, headers = srv.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503 and body["error"]["code"] == "queue_full"
    # A running request that leaves lets the waiting one in.
    assert all(s.running() for s in streams), [(s.error, s.finish, len(s.parts)) for s in streams]
    streams[0].close()
    deadline = time.time() + 120
    while srv.get("/health")[1]["queue"] != {"waiting": 0, "running": 2, "capacity": 1}:
        assert time.time() < deadline, srv.get("/health")[1]["queue"]
        time.sleep(0.05)
    for s in streams[1:]:
        s.close()


# The KV cells of `parallel` full contexts, shared by more sequences: two
# contexts of 1,024 tokens (2,048 cells) for four sequences.

@pytest.fixture(scope="module")
def pool_server(tmp_path_factory, model_store):
    need("llama_cpp", "batching tests")
    srv = Server(tmp_path_factory.mktemp("home"), model_store,
                 env={"OFFGRID_PARALLEL": "2", "OFFGRID_SEQUENCES": "4", "OFFGRID_CTX": "1024"})
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def kv(server):
    return server.get("/v1/slots")[1]["kv"]


def wait_for(what, check, timeout=180):
    """Poll check() until it returns something true; generous, since on a
    loaded machine each step of four sequences can take a while."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, "timed out waiting for %s" % what
        time.sleep(0.05)


def counting(start, end):
    return ", ".join(str(i) for i in range(start, end)) + ","


def test_more_requests_than_parallel_run_at_once_when_they_fit(pool_server):
    wait_idle(pool_server)
    slots = pool_server.get("/v1/slots")[1]
    assert slots["parallel"] == 2 and slots["sequences"] == 4 and slots["ctx_per_slot"] == 1024
    assert len(slots["slots"]) == 4 and slots["kv"]["unified"] is True and slots["kv"]["cells"] == 2048
    # Four requests of 31 + 400 tokens at most: 1,724 cells, within the 2,048.
    streams = [Stream(pool_server, {"prompt": counting(10 * i + 1, 10 * i + 11), "max_tokens": 400,
                                    "temperature": 0}) for i in range(4)]
    slots = wait_for("four sequences generating", lambda: (lambda s: s if sum(
        x["state"] == "generating" for x in s["slots"]) == 4 else None)(pool_server.get("/v1/slots")[1]))
    running = [x for x in slots["slots"] if x["state"] == "generating"]
    assert all(x["reserved_cells"] == x["prompt_tokens"] + 400 for x in running), running
    assert slots["kv"]["reserved"] == sum(x["reserved_cells"] for x in running)
    assert slots["kv"]["reserved"] + slots["kv"]["cached"] + slots["kv"]["free"] == 2048
    with urllib.request.urlopen(pool_server.url + "/metrics", timeout=60) as r:
        metrics = r.read().decode()
    cells = {state: int(n) for state, n in re.findall(
        r'^offgrid_kv_cells\{model="%s",state="(\w+)"\} (\d+)$' % re.escape(MODEL), metrics, re.M)}
    assert set(cells) == {"reserved", "cached", "free"} and sum(cells.values()) == 2048, metrics
    assert re.search(r"^offgrid_slots 4$", metrics, re.M), metrics
    for s in streams:
        assert s.running(), (s.error, s.finish)
        s.close()
    wait_idle(pool_server)


def test_request_that_does_not_fit_waits_then_matches_its_reply_alone(pool_server):
    wait_idle(pool_server)
    prompt = "Monday, Tuesday, Wednesday,"
    alone = completion(pool_server, prompt=prompt, max_tokens=24, temperature=0)
    # Two requests that may fill their whole context reserve all 2,048 cells.
    long = [Stream(pool_server, {"prompt": counting(1 + 100 * i, 11 + 100 * i), "max_tokens": 5000,
                                 "temperature": 0}) for i in range(2)]
    wait_for("two long requests generating", lambda: sum(
        x["state"] == "generating" for x in pool_server.get("/v1/slots")[1]["slots"]) == 2)
    deferred = kv(pool_server)["deferred"]
    assert kv(pool_server)["reserved"] == 2048
    short = Stream(pool_server, {"prompt": prompt, "max_tokens": 24, "temperature": 0})
    wait_for("the short request put off", lambda: kv(pool_server)["deferred"] > deferred)
    # It waits in the queue, with slots free but no cells for it.
    assert pool_server.get("/health")[1]["queue"]["waiting"] == 1
    slots = pool_server.get("/v1/slots")[1]["slots"]
    assert sum(x["state"] == "generating" for x in slots) == 2 and not short.parts
    assert all(s.running() for s in long), [(s.error, s.finish) for s in long]
    long[0].close()  # its cells are freed: the short one fits now
    assert short.result() == alone["choices"][0]["text"] and short.finish == "length"
    assert long[1].running(), (long[1].error, long[1].finish)
    long[1].close()
    wait_idle(pool_server)


def test_idle_slots_cached_prefixes_give_way(pool_server):
    wait_idle(pool_server)
    # Four prompts of about 200 tokens run together, so each leaves its own
    # slot holding its cells as a prefix cache.
    prompts = [counting(1000 * i + 1, 1000 * i + 60) for i in range(1, 5)]
    streams = [Stream(pool_server, {"prompt": p, "max_tokens": 4, "temperature": 0}) for p in prompts]
    for s in streams:
        s.result()
    wait_idle(pool_server)
    before = kv(pool_server)
    assert before["reserved"] == 0 and before["cached"] > 600, before
    # Two requests that may fill their whole context need all 2,048 cells:
    # the idle slots' prefixes must go.
    long = [Stream(pool_server, {"prompt": counting(1 + 100 * i, 11 + 100 * i), "max_tokens": 5000,
                                 "temperature": 0}) for i in range(2)]
    wait_for("two long requests generating", lambda: sum(
        x["state"] == "generating" for x in pool_server.get("/v1/slots")[1]["slots"]) == 2)
    after = kv(pool_server)
    assert after["reserved"] == 2048 and after["cached"] == 0 and after["free"] == 0, after
    assert after["evicted"] > before["evicted"], (before, after)
    idle = [x for x in pool_server.get("/v1/slots")[1]["slots"] if x["state"] == "idle"]
    assert len(idle) == 2 and all(x["cached_tokens"] == 0 for x in idle), idle
    for s in long:
        assert s.running(), (s.error, s.finish)
        s.close()
    wait_idle(pool_server)


def test_decode_without_a_free_cell_ends_the_newest_request_cleanly(starter_gguf):
    # Admission (idle_slot) never lets this happen; started by hand here, two
    # requests of 107 + 60 cells at most share 256 cells, so llama.cpp
    # runs out of cells halfway (llama_decode status 1). The request started
    # last ends with a 503 that says so, the other goes on to its full length.
    need("llama_cpp", "batching tests")
    import llama_cpp
    llm = llama_cpp.Llama(model_path=starter_gguf, n_ctx=offgrid.TOKENIZER_CTX, n_batch=offgrid.TOKENIZER_BATCH,
                          verbose=False)
    scheduler = offgrid.BatchScheduler(llm, 2, 1, 256, 64, 2, True)
    try:
        assert scheduler.unified and scheduler.cells == 256 and scheduler.n_ctx == 256
        text = counting(1, 30)
        prompt = llm.tokenize(text.encode(), add_bos=True, special=True)
        # Both prompts and a few tokens of each reply fit; both whole replies do not.
        assert 2 * len(prompt) + 16 < 256 < 2 * (len(prompt) + 60), len(prompt)
        jobs = []
        for slot in scheduler.slots:
            request = offgrid.resolve_request(offgrid.GenerationRequest(
                kind="completion", prompt=text, max_tokens=60, temperature=0, ignore_eos=True),
                {"id": MODEL}, {"max_tokens_limit": 8192, "default_max_tokens": 1024})
            jobs.append(offgrid.Job("completion", {"id": MODEL}, request))
            scheduler.start(slot, jobs[-1], prompt, [], 60, 0, time.monotonic())
        while scheduler.active():
            scheduler.step()
        events = [[job.events.get_nowait() for _ in range(job.events.qsize())] for job in jobs]
    finally:
        scheduler.close()
        llm.close()
    assert scheduler.no_cell == 1
    first, second = events
    done = first[-1]
    assert isinstance(done, offgrid.Done) and done.reason == "length", done
    assert done.info["completion_tokens"] == 60
    assert "".join(e.text for e in first[:-1]).startswith(" 30, 31, 32, 33")
    failure = second[-1]
    assert isinstance(failure, offgrid.Failure), failure
    assert failure.error.status == 503 and failure.error.code == "kv_cache_full", failure.error.message
    assert all(isinstance(e, offgrid.Delta) for e in second[:-1]) and len(second) > 1
