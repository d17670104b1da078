"""Anthropic's Messages API: the adapter's reading of content blocks and its
errors, the encoder on recorded events read back with the `anthropic`
package's types, and a real server (SmolLM2, and its thinking copy) behind
an API key through the official client: create, stream, a tool round trip,
stop sequences, thinking blocks, count_tokens, errors and auth."""

import json
import urllib.request

import pytest

import offgrid
from conftest import need
from offgrid import CallArguments, CallStart, Delta, Done, Thinking

CONFIG = {"max_tokens_limit": 4096, "default_max_tokens": 10}
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                            "additionalProperties": False}}
TIME = {"name": "get_time", "description": "The time now in a time zone.",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}


def read(body):
    return offgrid.anthropic_messages_request(dict({"max_tokens": 50}, **body), CONFIG)


# The adapter ###################################################################

def test_content_blocks_become_the_cores_messages():
    request, stream = read({
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools.",
                                                           "cache_control": {"type": "ephemeral"}}],
        "tools": [WEATHER, TIME], "tool_choice": {"type": "tool", "name": "get_time"}, "stream": True,
        "messages": [
            {"role": "user", "content": "Weather in Paris and time in Tokyo?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Two tools.", "signature": "x"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"zone": "Asia/Tokyo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "09:00"}],
                 "is_error": True},
                {"type": "text", "text": "Thanks."}]}]})
    assert stream is True and request.max_tokens == 50
    assert [(m["role"], m["content"]) for m in request.messages] == [
        ("system", "Be brief.\nUse tools."), ("user", "Weather in Paris and time in Tokyo?"),
        ("assistant", "Let me look."), ("tool", "Sunny"), ("tool", "Error: 09:00"), ("user", "Thanks.")]
    assert request.messages[2]["tool_calls"] == [
        {"id": "toolu_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        {"id": "toolu_2", "name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]
    assert request.messages[2]["thinking"] == "Two tools."
    assert [m["tool_call_id"] for m in request.messages[3:5]] == ["toolu_1", "toolu_2"]
    assert request.tool_choice == ("function", "get_time") and request.tools[1]["function"]["name"] == "get_time"
    assert request.tools[0]["function"]["parameters"] == WEATHER["input_schema"]


@pytest.mark.parametrize("choice, mode, parallel", [
    (None, ("auto", None), None), ({"type": "auto"}, ("auto", None), None), ({"type": "any"}, ("required", None), None),
    ({"type": "none"}, ("none", None), None), ({"type": "any", "disable_parallel_tool_use": True}, ("required", None),
                                               False)])
def test_tool_choice_modes(choice, mode, parallel):
    body = {"tools": [WEATHER], "messages": [{"role": "user", "content": "x"}]}
    if choice:
        body["tool_choice"] = choice
    request, _ = read(body)
    assert (request.tool_choice, request.parallel_tool_calls) == (mode, parallel)


def test_a_last_assistant_turn_is_the_start_of_the_reply():
    request, _ = read({"messages": [{"role": "user", "content": "Count to three."},
                                    {"role": "assistant", "content": [{"type": "text", "text": "One, two,"}]}]})
    assert [m["role"] for m in request.messages] == ["user"] and request.prefill == "One, two,"
    offgrid.prepare_request(request, None)
    assert request.prompt_suffix == "One, two,"


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]},
     "tools[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "a b", "input_schema": {}}]},
     "tools[0].name"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "a", "input_schema": {"type": "array"}}]},
     "tools[0].input_schema.type"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "get_time"}}, "tool_choice.name"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "required"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 100}},
     "thinking.budget_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 2000}},
     "thinking.budget_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 1.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "container": "c"}, "container"),
    ({"messages": [{"role": "user", "content": "x"}], "mcp_servers": [{}]}, "mcp_servers"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, "max_tokens"),
])
def test_what_is_wrong_or_not_implemented_is_a_400_naming_it(body, param):
    body = dict({"max_tokens": 1000}, **body)
    if body["max_tokens"] is None:
        del body["max_tokens"]
    with pytest.raises(offgrid.ApiError) as e:
        offgrid.anthropic_messages_request(body, CONFIG)
    assert (e.value.status, e.value.param) == (400, param)
    assert offgrid.anthropic_error(e.value) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": e.value.message}}


# The encoder ###################################################################

INFO = {"prompt_tokens": 9, "completion_tokens": 6, "cached_tokens": 0, "ttft_s": 0.01, "prompt_s": 0.01,
        "decode_s": 0.02, "queued_s": 0.0}
RECORDED = [Thinking(0, "Paris is "), Thinking(0, "a city."), Delta(0, "Let me look.", None),
            CallStart(0, 0, "call_abc", "get_weather"), CallArguments(0, 0, '{"city": "Paris"}'), Done(0, "eos", INFO)]


def replay(events, stream, request=None):
    from test_core import replay
    request = request or offgrid.GenerationRequest(kind="chat", messages=[offgrid.chat_message("user", "x")])
    return replay(offgrid.AnthropicEncoder, request, events, stream)


def test_message_body_and_events_read_back_by_the_anthropic_types():
    need("anthropic", "reading replies with the SDK's types")
    import pydantic
    from anthropic.types import Message, RawMessageStreamEvent
    message = Message.model_validate(replay(RECORDED, False).body)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Paris is a city." and message.content[1].text == "Let me look."
    assert (message.content[2].id, message.content[2].input) == ("toolu_abc", {"city": "Paris"})
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("tool_use", 9, 6)
    wire = replay(RECORDED, True)
    text = b"".join(wire.chunks).decode()
    frames = [f.split("\n") for f in text.split("\n\n") if f]
    names = [f[0][len("event: "):] for f in frames]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    events = [pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(json.loads(f[1][len("data: "):]))
              for f in frames if f[0] != "event: ping"]
    assert [e.index for e in events if e.type == "content_block_start"] == [0, 1, 2]
    assert events[-2].delta.stop_reason == "tool_use" and events[-2].usage.input_tokens == 9


def test_stop_reason_says_which_stop_sequence():
    request = offgrid.GenerationRequest(kind="chat", messages=[], stop=["END", "STOP"])
    body = replay([Delta(0, "a", None), Done(0, "stop", INFO, stop="STOP")], False, request).body
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "STOP")
    body = replay([Delta(0, "a", None), Done(0, "stop", INFO, stop="<|im_end|>")], False, request).body
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    body = replay([Delta(0, "a", None), Done(0, "length", INFO)], False, request).body
    assert body["stop_reason"] == "max_tokens" and body["content"] == [{"type": "text", "text": "a"}]


# On a real server, behind an API key ###########################################

SMOL = "smollm2-135m-instruct-q4_1"
THINK = "smollm2-135m-instruct-think"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Newer anthropic clients leave sampling fields out of their signatures;
# the API takes them still.
T0 = {"temperature": 0}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, smol_think_store):
    need("llama_cpp", "inference tests")
    from conftest import Server
    from test_security import create_key
    home = tmp_path_factory.mktemp("home")
    key = create_key(home, "app")
    srv = Server(home, smol_think_store, args=["--model", SMOL])
    srv.key = key
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def client(keyed):
    need("anthropic", "the Anthropic client tests")
    import anthropic
    return anthropic.Anthropic(base_url=keyed.url, api_key=keyed.key, max_retries=0, timeout=300)


def test_create_answers_with_a_text_block_and_usage(client):
    m = client.messages.create(model=SMOL, max_tokens=40, extra_body=T0, system="Answer in one sentence.",
                               messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert m.type == "message" and m.role == "assistant" and m.model == SMOL and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens > 10 and m.usage.output_tokens > 0


def test_max_tokens_and_stop_sequences_say_why_the_reply_ended(client):
    ask = [{"role": "user", "content": "Count from one to ten in words."}]
    cut = client.messages.create(model=SMOL, max_tokens=3, extra_body=T0, messages=ask)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    whole = client.messages.create(model=SMOL, max_tokens=40, extra_body=T0, messages=ask).content[0].text
    word = whole.split()[2].strip(",.")
    stopped = client.messages.create(model=SMOL, max_tokens=40, extra_body=T0, messages=ask,
                                     stop_sequences=["zzz", word])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert stopped.content[0].text == whole[:whole.index(word)]


def test_stream_helper_assembles_the_same_text(client):
    ask = [{"role": "user", "content": "Name three colours."}]
    whole = client.messages.create(model=SMOL, max_tokens=30, extra_body=T0, messages=ask)
    with client.messages.stream(model=SMOL, max_tokens=30, extra_body=T0, messages=ask) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens,
                                                                    whole.usage.output_tokens)


def test_raw_stream_has_named_events_and_a_ping(keyed):
    body = json.dumps({"model": SMOL, "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    req = urllib.request.Request(keyed.url + "/v1/messages", data=body, headers={
        "x-api-key": keyed.key, "anthropic-version": "2023-06-01", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = r.read().decode()
    names = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-2:] == ["message_delta",
                                                                                            "message_stop"]
    for frame in [f for f in text.split("\n\n") if f.startswith("event: ")]:
        name, data = frame.split("\n")
        assert json.loads(data[len("data: "):])["type"] == name[len("event: "):]


def test_tool_round_trip(client):
    m = client.messages.create(model=SMOL, max_tokens=60, extra_body=T0, messages=ASK, tools=[WEATHER, TIME],
                               tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name in ("get_weather", "get_time") and isinstance(use.input, dict)
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": "Sunny, 31 degrees."}]}]
    answer = client.messages.create(model=SMOL, max_tokens=40, extra_body=T0, messages=history,
                                    tools=[WEATHER, TIME], tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and [b.type for b in answer.content] == ["text"]
    assert "31" in answer.content[0].text, answer.content[0].text


def test_named_tool_streams_its_input_as_json_deltas(client):
    with client.messages.stream(model=SMOL, max_tokens=60, extra_body=T0, messages=ASK, tools=[WEATHER, TIME],
                                tool_choice={"type": "tool", "name": "get_time"}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    [use] = final.content
    assert use.type == "tool_use" and use.name == "get_time" and set(use.input) == {"zone"}
    assert "input_json" in kinds and final.stop_reason == "tool_use"


def test_prefill_is_continued(client):
    m = client.messages.create(model=SMOL, max_tokens=20, extra_body=T0, messages=[
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"}])
    assert not m.content[0].text.lstrip().startswith("The capital") and "Paris" in m.content[0].text


def test_thinking_blocks_from_a_thinking_model(client):
    on = client.messages.create(model=THINK, max_tokens=1100, extra_body=T0, messages=[
        {"role": "user", "content": "What is 2+2?"}], thinking={"type": "enabled", "budget_tokens": 1024})
    assert on.content[0].type == "thinking" and on.content[0].thinking.strip()
    with client.messages.stream(model=THINK, max_tokens=1100, extra_body=T0, messages=[
            {"role": "user", "content": "What is 2+2?"}], thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        kinds = {e.type for e in s}
        final = s.get_final_message()
    assert "thinking" in kinds and final.content[0].thinking == on.content[0].thinking
    off = client.messages.create(model=THINK, max_tokens=40, extra_body=T0, thinking={"type": "disabled"},
                                 messages=[{"role": "user", "content": "What is 2+2?"}])
    assert [b.type for b in off.content] == ["text"] and off.content[0].text.strip()


def test_count_tokens_matches_the_replys_input_tokens(client):
    kw = dict(model=SMOL, system="Be brief.", messages=ASK, tools=[WEATHER])
    counted = client.messages.count_tokens(**kw)
    used = client.messages.create(max_tokens=5, extra_body=T0, **kw)
    assert counted.input_tokens == used.usage.input_tokens > 20
    assert client.messages.count_tokens(model=SMOL, messages=ASK).input_tokens < counted.input_tokens
    # A thinking model's switch counts too: off adds the closed tag to the prompt.
    think = [{"role": "user", "content": "What is 2+2?"}]
    on = client.messages.count_tokens(model=THINK, messages=think, thinking={"type": "enabled", "budget_tokens": 2048})
    off = client.messages.count_tokens(model=THINK, messages=think, thinking={"type": "disabled"})
    assert off.input_tokens > on.input_tokens


def test_errors_in_anthropics_shape(client, keyed):
    import anthropic
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=SMOL, max_tokens=5, messages=ASK, extra_body={"container": "c"})
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "container: is not a supported parameter"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=SMOL, max_tokens=5, messages=ASK, thinking={"type": "enabled",
                                                                               "budget_tokens": 1024})
    assert "budget_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=SMOL, max_tokens=2000, messages=ASK, thinking={"type": "enabled",
                                                                                  "budget_tokens": 1024})
    assert e.value.body["error"]["message"] == 'thinking: "%s" does not support thinking' % SMOL
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", max_tokens=5, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error" and "no-such-model" in e.value.body["error"]["message"]
    status, body, _ = keyed.post("/v1/messages", {"model": SMOL, "messages": ASK},
                                 headers={"x-api-key": keyed.key})
    assert status == 400 and body == {"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "max_tokens: is required"}}
    status, body, _ = keyed.post("/v1/messages/count_tokens", {"model": SMOL, "messages": ASK, "max_tokens": 5},
                                 headers={"x-api-key": keyed.key})
    assert status == 400 and body["error"]["message"] == "max_tokens: is not a field of count_tokens"


def test_x_api_key_or_bearer_and_anthropic_version(keyed):
    import anthropic
    bearer = anthropic.Anthropic(base_url=keyed.url, auth_token=keyed.key, max_retries=0, timeout=300)
    assert bearer.messages.create(model=SMOL, max_tokens=2, messages=ASK).usage.output_tokens > 0
    wrong = anthropic.Anthropic(base_url=keyed.url, api_key="og-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=SMOL, max_tokens=2, messages=ASK)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    status, body, _ = keyed.post("/v1/messages", {"model": SMOL, "max_tokens": 2, "messages": ASK})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "x-api-key" in body["error"]["message"]
    status, body, _ = keyed.post("/v1/messages/count_tokens", {"model": SMOL, "messages": ASK},
                                 headers={"x-api-key": keyed.key, "anthropic-version": "2023-06-01",
                                          "anthropic-beta": "token-counting-2024-11-01"})
    assert status == 200 and body["input_tokens"] > 0
