"""Request memory: what a request adds beyond its model is predicted from
the request before any of it is built, held against max_request_bytes while
it runs, and a request that would need more is refused with a 400 or 503
that says how much it needs (offgrid.py, Engine: Request memory)."""

import http.client
import json
import re

import pytest

import offgrid
from conftest import OFFGRID, Server, need, wait_for  # noqa: F401

SMOL_ID = offgrid.STARTER["id"]
MIB = 1 << 20
COUNT = [{"role": "user", "content": "Count from 1 to 10000, separated by commas."}]
NO_END = {"2": -100}  # SmolLM2's end of turn: the reply runs to max_tokens


def server_with_budget(start_server, smol_store, budget):
    need("llama_cpp", "inference tests")
    return start_server(models_dir=smol_store, env={"OFFGRID_MAX_REQUEST_BYTES": budget})


def metric(srv, name):
    status, _body, _headers = srv.request("GET", "/health")
    assert status == 200
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return float(re.search(r"^%s (\S+)$" % name, text, re.M).group(1))


def needs_mib(message):
    """The MiB a refusal says the request needs."""
    m = re.search(r"needs about ([0-9.]+) (MiB|GiB)", message)
    assert m, message
    return float(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)


def test_logprobs_of_many_long_choices_over_the_budget_get_400_naming_the_need(start_server, smol_store):
    srv = server_with_budget(start_server, smol_store, 64 * MIB)
    import openai
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SMOL_ID, messages=COUNT, max_tokens=4096, n=8, logprobs=True,
                                       top_logprobs=20)
    error = e.value.body
    assert error["code"] == "request_too_large"
    assert "logprobs" in error["message"] and "64.0 MiB" in error["message"] and "max_request_bytes" in error["message"]
    # 8 choices x 4,096 tokens x 21 entries: hundreds of MiB, never run.
    assert needs_mib(error["message"]) > 256
    # The same request with one choice and no logprobs fits, and runs.
    reply = client.chat.completions.create(model=SMOL_ID, messages=COUNT, max_tokens=8)
    assert reply.choices[0].message.content
    # Ollama's dialect, in Ollama's error shape.
    status, body, _ = srv.post("/api/chat", {"model": SMOL_ID, "messages": COUNT, "stream": False, "logprobs": True,
                                             "top_logprobs": 20, "options": {"num_predict": 8192}})
    assert status == 400 and set(body) == {"error"} and "needs about" in body["error"], body
    assert metric(srv, "offgrid_request_memory_bytes") == 0


def test_schema_grammar_too_large_is_refused_before_it_is_built(start_server, smol_store):
    srv = server_with_budget(start_server, smol_store, 256 * MIB)
    schema = {"type": "array", "items": {"type": "string"}, "maxItems": 100000000}
    status, body, _ = srv.post("/v1/chat/completions", {
        "model": SMOL_ID, "messages": COUNT, "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "many", "schema": schema}}})
    assert status == 400 and body["error"]["code"] == "request_too_large", body
    assert "grammar" in body["error"]["message"] and needs_mib(body["error"]["message"]) > 1024
    # Writing that grammar out would have taken gigabytes: the server never began.
    with open("/proc/%d/status" % srv.proc.pid) as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    assert rss < 1024 * MIB, rss
    small = dict(schema, maxItems=3)
    status, body, _ = srv.post("/v1/chat/completions", {
        "model": SMOL_ID, "messages": [{"role": "user", "content": "Three colours."}], "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "few", "schema": small}}})
    assert status == 200, body
    assert len(json.loads(body["choices"][0]["message"]["content"])) <= 3


def test_schema_bounds_in_the_tens_of_thousands_are_400_and_the_server_lives(start_server, smol_store):
    """The converter writes maxItems 20,000 as 20,000 nested groups, whose
    parsing overflowed the inference thread's stack: a crash of the whole
    server, not a refusal, before the nesting was checked."""
    srv = server_with_budget(start_server, smol_store, 1024 * MIB)
    many = {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 20000}
    status, body, _ = srv.post("/v1/chat/completions", {
        "model": SMOL_ID, "messages": COUNT, "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "many", "schema": many}}})
    assert status == 400 and body["error"]["code"] == "invalid_schema", body
    assert body["error"]["param"] == "response_format" and "nests 20000 groups deep" in body["error"]["message"]
    tool = {"type": "function", "function": {"name": "save", "parameters": {
        "type": "object", "properties": {"words": many}, "required": ["words"]}}}
    status, body, _ = srv.post("/v1/chat/completions", {"model": SMOL_ID, "messages": COUNT, "max_tokens": 8,
                                                        "tools": [tool], "tool_choice": "required"})
    assert status == 400 and body["error"]["param"] == "tools" and "maxItems" in body["error"]["message"], body
    long_text = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 200000}}}
    status, body, _ = srv.post("/api/chat", {"model": SMOL_ID, "messages": COUNT, "stream": False,
                                             "format": long_text, "options": {"num_predict": 8}})
    assert status == 400 and set(body) == {"error"} and "groups deep" in body["error"], body
    # Within the limit the bound is enforced, and the server is the same process.
    few = dict(many, maxItems=900)
    status, body, _ = srv.post("/v1/chat/completions", {
        "model": SMOL_ID, "messages": [{"role": "user", "content": "Three colours."}], "max_tokens": 24,
        "response_format": {"type": "json_schema", "json_schema": {"name": "few", "schema": few}}})
    assert status == 200, body
    assert srv.proc.poll() is None


def test_embeddings_and_bodies_over_the_budget_get_400(start_server, smol_store):
    srv = server_with_budget(start_server, smol_store, 16 * MIB)
    # 2,048 vectors of 576 floats, and their JSON.
    status, body, _ = srv.post("/v1/embeddings", {"model": SMOL_ID, "input": ["a few words"] * 2048})
    assert status == 400 and body["error"]["code"] == "request_too_large", body
    assert "vectors" in body["error"]["message"] and "fewer inputs" in body["error"]["message"]
    status, body, _ = srv.post("/api/embed", {"model": SMOL_ID, "input": ["a few words"] * 2048})
    assert status == 400 and "needs about" in body["error"], body
    status, body, _ = srv.post("/v1/embeddings", {"model": SMOL_ID, "input": ["a few words"] * 8})
    assert status == 200 and len(body["data"]) == 8
    # A body is held from its Content-Length, before it is read: 3 MiB x 8.
    status, body, _ = srv.post("/v1/embeddings", {"model": SMOL_ID, "input": "x " * (3 * MIB // 2)})
    assert status == 400 and "body" in body["error"]["message"] and "smaller body" in body["error"]["message"]


def test_requests_in_flight_share_the_budget_and_the_next_gets_503(start_server, smol_store):
    # One streamed reply of 2,048 tokens holds about 1 MiB... per token figures
    # come from offgrid, so the budget is set from its own prediction.
    request = offgrid.GenerationRequest(max_tokens=2048, n=1)
    one = sum(offgrid.generation_memory(request, 4096).values())
    srv = server_with_budget(start_server, smol_store, int(one * 1.5))
    body = {"model": SMOL_ID, "messages": COUNT, "max_tokens": 2048, "stream": True, "logit_bias": NO_END}
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    first = conn.getresponse()
    assert first.status == 200
    first.readline()  # the reply is under way, its memory held
    assert metric(srv, "offgrid_request_memory_bytes") >= one
    status, refused, headers = srv.post("/v1/chat/completions", dict(body, stream=False))
    assert status == 503 and refused["error"]["code"] == "memory_busy", refused
    assert "requests in flight hold" in refused["error"]["message"] and headers.get("Retry-After")
    conn.close()  # the client leaves; its reply stops and lets go of its memory
    wait_for("the first request's memory to be let go",
             lambda: metric(srv, "offgrid_request_memory_bytes") == 0, timeout=120)
    status, reply, _ = srv.post("/v1/chat/completions", dict(body, stream=False, max_tokens=8))
    assert status == 200, reply


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
    {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 2, "maxItems": 300},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 50}},
     "$defs": {"tag": {"type": "object", "properties": {"k": {"type": "string", "maxLength": 20},
                                                        "v": {"enum": ["a", "b", "c"]}}}}},
    {"anyOf": [{"type": "string", "minLength": 500}, {"type": "number"}, {"const": "none"}]},
])
def test_schema_grammar_prediction_is_never_below_the_grammar_written(schema):
    need("llama_cpp", "the JSON schema converter")
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    written = len(json_schema_to_gbnf(json.dumps(schema)))
    predicted = offgrid.schema_grammar_chars(schema)
    assert written <= predicted <= 40 * written + 4096, (written, predicted)


def test_reply_prediction_grows_with_choices_and_logprobs_and_stops_at_the_context():
    plain = offgrid.generation_memory(offgrid.GenerationRequest(max_tokens=1024), 4096)
    assert set(plain) == {"body", "prompt", "reply"}
    many = offgrid.generation_memory(offgrid.GenerationRequest(max_tokens=1024, n=4), 4096)
    assert many["reply"] == 4 * plain["reply"]
    top = offgrid.generation_memory(offgrid.GenerationRequest(max_tokens=1024, logprobs=True, top_logprobs=20), 4096)
    assert top["logprobs"] > 20 * plain["reply"] / 2
    # No reply outgrows a sequence's context, whatever max_tokens says.
    long = offgrid.generation_memory(offgrid.GenerationRequest(max_tokens=1 << 22), 4096)
    assert long["reply"] == 4 * plain["reply"]
