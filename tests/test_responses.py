"""The Responses API (POST /v1/responses and the stored responses): the
adapter's reading of input items and refusals, the encoder against a
recorded event sequence, the store's bounds, and end to end with the real
SmolLM2, the official `openai` client and the `openai-agents` package."""

import json
import os

import pytest

import offgrid
from conftest import Server, need

SMOL = "smollm2-135m-instruct-q4_1"
HERMES = "smollm2-135m-instruct-hermes"
CONFIG = {"max_tokens_limit": 8192, "default_max_tokens": 1024}
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}


def read(body, stored=None):
    return offgrid.openai_responses_request(body, CONFIG, stored)


def refusal(body, stored=None):
    with pytest.raises(offgrid.ApiError) as e:
        read(body, stored)
    assert e.value.status == 400, e.value.message
    return e.value


# -- the adapter ---------------------------------------------------------------

def test_string_input_is_one_user_message_after_the_instructions():
    request, stream, record = read({"input": "Hi there", "instructions": "Be brief."})
    assert [(m["role"], m["content"]) for m in request.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert stream is False and record["store"] is True
    [item] = record["input"]
    assert item["type"] == "message" and item["content"] == [{"type": "input_text", "text": "Hi there"}]
    assert item["id"].startswith("msg_")


def test_items_become_chat_turns_with_calls_joined_to_their_assistant_turn():
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                        {"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."},
                                                             {"type": "refusal", "refusal": ""}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "Rain"}]},
    ]
    request, _, record = read({"input": items, "tools": [WEATHER]})
    turns = [(m["role"], m["content"], [c["id"] for c in m["tool_calls"] or ()], m["tool_call_id"], m["name"])
             for m in request.messages]
    assert turns == [("system", "Use tools.", [], None, None), ("user", "Weather in Paris?", [], None, None),
                     ("assistant", "Checking.", ["call_1", "call_2"], None, None),
                     ("tool", "Sunny", [], "call_1", "get_weather"), ("tool", "Rain", [], "call_2", "get_weather")]
    assert request.messages[2]["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert request.tools[0]["function"]["name"] == "get_weather" and request.tool_choice == ("auto", None)
    assert [i["type"] for i in record["input"]] == [i.get("type", "message") for i in items]
    assert record["tools"] == [WEATHER]


def test_previous_response_comes_before_the_new_input():
    earlier = [{"id": "msg_a", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
               {"id": "msg_b", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]}]
    asked = []

    def stored(response_id):
        asked.append(response_id)
        return earlier
    request, _, record = read({"input": "And you?", "previous_response_id": "resp_x", "instructions": "Short."},
                              stored)
    assert asked == ["resp_x"] and record["history"] == earlier
    assert [(m["role"], m["content"]) for m in request.messages] == [
        ("system", "Short."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "And you?")]
    e = refusal({"input": "x", "previous_response_id": "resp_gone"}, lambda _id: None)
    assert e.param == "previous_response_id" and e.code == "previous_response_not_found"


def test_text_format_and_tool_choice_are_read_under_their_own_names():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    request, _, record = read({"input": "x", "text": {"format": {"type": "json_schema", "name": "n",
                                                                 "schema": schema, "strict": True}}})
    assert request.format == {"type": "json_schema", "schema": schema}
    assert read({"input": "x", "text": {"format": {"type": "json_object"}}})[0].format["type"] == "json_object"
    assert read({"input": "x", "text": {"format": {"type": "text"}}})[0].format is None
    request, _, record = read({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                                 "name": "get_weather"},
                               "parallel_tool_calls": False, "max_output_tokens": 50, "temperature": 0.5,
                               "top_p": 0.5})
    assert request.tool_choice == ("function", "get_weather") and request.parallel_tool_calls is False
    assert (request.max_tokens, request.temperature, request.top_p) == (50, 0.5, 0.5)
    assert record["tool_choice"] == {"type": "function", "name": "get_weather"}


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({"input": [3]}, "input[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": ["hi", {"type": "function_call_output", "call_id": "nope", "output": "x"}][1:]}, "input[0].call_id"),
    ({"input": [{"role": "user", "content": "x", "colour": "red"}]}, "input[0].colour"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice.name"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 9000}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"input": "x", "reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"input": "x", "reasoning": "high"}, "reasoning"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "n": 2}, "n"),
    ({"input": "x", "stream": "yes"}, "stream"),
])
def test_bad_or_unimplemented_fields_are_a_400_naming_them(body, param):
    assert refusal(body).param == param


def test_reasoning_effort_is_the_cores_thinking_switch():
    request, _, record = read({"input": "x", "reasoning": {"effort": "none"}})
    assert request.think is False and request.think_param == "reasoning.effort"
    request, _, record = read({"input": "x", "reasoning": {"effort": "high", "summary": None}})
    assert request.think == "high" and record["reasoning"] == {"effort": "high", "summary": None}
    assert read({"input": "x"})[0].think is None


def test_harmless_fields_are_accepted():
    request, stream, record = read({"input": "x", "user": "u1", "store": False, "include": [], "background": False,
                                    "truncation": "disabled", "metadata": {"k": "v"},
                                    "reasoning": {"effort": None, "summary": None},
                                    "stream": True, "stream_options": {"include_obfuscation": False},
                                    "safety_identifier": "s", "prompt_cache_key": "k"})
    assert stream is True and record["store"] is False and record["metadata"] == {"k": "v"}


# -- the encoder, on a recorded event sequence ----------------------------------

class Recording:
    """The HTTP side an encoder writes to, keeping what it is given."""

    def __init__(self):
        self.headers_sent, self.chunks, self.json = False, [], None

    def start_stream(self, media):
        self.headers_sent, self.media = True, media

    def write_chunk(self, data):
        self.chunks.append(data)

    def send_json(self, status, obj):
        self.json = (status, obj)

    @property
    def wfile(self):
        return self

    def write(self, data):
        self.chunks.append(data)

    def events(self):
        out = []
        for block in b"".join(self.chunks).decode().split("\n\n"):
            if block.startswith("event: "):
                head, data = block.split("\n", 1)
                obj = json.loads(data[len("data: "):])
                assert head == "event: " + obj["type"]
                out.append(obj)
        return out


def recorded_reply(request, events):
    reply = offgrid.Reply(request)
    for event in events:
        reply.add(event)
    return reply


def test_encoder_streams_reasoning_text_and_a_call_as_typed_events():
    request, _, record = read({"input": "x", "tools": [WEATHER], "stream": True})
    request.temperature, request.top_p = 0.0, 1.0
    done = offgrid.Done(0, "eos", {"prompt_tokens": 7, "completion_tokens": 9, "cached_tokens": 2})
    events = [offgrid.Thinking(0, "The user wants "), offgrid.Thinking(0, "weather."),
              offgrid.Delta(0, "Let me look"), offgrid.Delta(0, "."),
              offgrid.Delta(0, "\n"), offgrid.CallStart(0, 0, "call_9", "get_weather"),
              offgrid.CallArguments(0, 0, '{"city": "Paris"}'), done]
    wire, saved = Recording(), []
    encoder = offgrid.ResponsesEncoder(wire, request, SMOL, True, record, lambda r: saved.append(r) or True)
    reply = recorded_reply(request, [])
    for event in events:
        reply.add(event)
        encoder.event(event, reply.choices[0])
    encoder.finish(reply)
    sent = wire.events()
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
    assert [e["type"] for e in sent] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = sent[-1]["response"]
    reasoning, message, call = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [
        {"type": "reasoning_text", "text": "The user wants weather."}]
    assert message["content"][0]["text"] == "Let me look.\n" and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_9", "get_weather", '{"city": "Paris"}')
    assert [e["output_index"] for e in sent if e["type"] == "response.output_item.added"] == [0, 1, 2]
    assert final["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 9,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16}
    assert saved == [{"response": final, "history": [], "input": record["input"]}] and final["store"] is True
    assert sent[0]["response"]["status"] == "in_progress" and sent[0]["response"]["id"] == final["id"]
    # The same reply whole: the same items, in the same order.
    wire = Recording()
    offgrid.ResponsesEncoder(wire, request, SMOL, False, record).finish(reply)
    status, whole = wire.json
    assert status == 200 and [i["type"] for i in whole["output"]] == ["reasoning", "message", "function_call"]
    assert [i.get("content") or i.get("arguments") for i in whole["output"]] == [
        i.get("content") or i.get("arguments") for i in final["output"]]


def test_encoder_holds_back_blank_text_before_a_call_and_ends_incomplete_at_the_limit():
    request, _, record = read({"input": "x", "tools": [WEATHER], "stream": True})
    wire = Recording()
    encoder = offgrid.ResponsesEncoder(wire, request, SMOL, True, record)
    reply = offgrid.Reply(request)
    for event in [offgrid.Delta(0, "\n"), offgrid.CallStart(0, 0, "call_1", "get_weather"),
                  offgrid.CallArguments(0, 0, "{}"), offgrid.Done(0, "eos", {"prompt_tokens": 1,
                                                                             "completion_tokens": 1})]:
        reply.add(event)
        encoder.event(event, reply.choices[0])
    encoder.finish(reply)
    assert [i["type"] for i in wire.events()[-1]["response"]["output"]] == ["function_call"]
    wire = Recording()
    encoder = offgrid.ResponsesEncoder(wire, request, SMOL, True, record)
    reply = offgrid.Reply(request)
    for event in [offgrid.Delta(0, "Once upon"), offgrid.Done(0, "length", {"prompt_tokens": 1,
                                                                            "completion_tokens": 2})]:
        reply.add(event)
        encoder.event(event, reply.choices[0])
    encoder.finish(reply)
    last = wire.events()[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"


def test_encoder_ends_a_failed_stream_with_the_error_and_a_store_that_fails_loses_no_reply():
    request, _, record = read({"input": "x", "stream": True})
    wire = Recording()
    encoder = offgrid.ResponsesEncoder(wire, request, SMOL, True, record)
    reply = offgrid.Reply(request)
    reply.add(offgrid.Delta(0, "Hel"))
    encoder.event(offgrid.Delta(0, "Hel"), reply.choices[0])
    encoder.fail(offgrid.ApiError(503, "the server is shutting down", code="shutting_down"))
    error, failed = wire.events()[-2:]
    assert error["type"] == "error" and error["code"] == "shutting_down"
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["message"] == "the server is shutting down"
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hel"

    def full_disk(record):
        raise OSError(28, "No space left on device")
    wire = Recording()
    reply = offgrid.Reply(request)
    reply.add(offgrid.Delta(0, "Hello"))
    reply.add(offgrid.Done(0, "eos", {"prompt_tokens": 1, "completion_tokens": 1}))
    offgrid.ResponsesEncoder(wire, request, SMOL, False, record, full_disk).finish(reply)
    status, response = wire.json
    assert status == 200 and response["output"][0]["content"][0]["text"] == "Hello" and response["store"] is False


# -- the store -----------------------------------------------------------------

def record_of(response_id, text="x"):
    return {"response": {"id": response_id, "output": [{"type": "message", "role": "assistant", "id": "msg_o",
                                                        "content": [{"type": "output_text", "text": text}]}]},
            "history": [], "input": [{"type": "message", "role": "user", "id": "msg_i",
                                      "content": [{"type": "input_text", "text": "q"}]}]}


def rid(n):
    return "resp_%024x" % n


def test_store_keeps_at_most_its_count_and_bytes_dropping_the_oldest(tmp_path):
    folder = str(tmp_path / "responses")
    store = offgrid.ResponseStore(folder, 3, 1 << 20)
    for n in range(5):
        assert store.save(record_of(rid(n)))
    assert sorted(os.listdir(folder)) == [rid(n) + ".json" for n in (2, 3, 4)]
    assert store.load(rid(1)) is None and store.load(rid(4)) == record_of(rid(4))
    # A new store on the same folder (a restart) knows the order from the files.
    store = offgrid.ResponseStore(folder, 3, 1 << 20)
    store.save(record_of(rid(5)))
    assert sorted(os.listdir(folder)) == [rid(n) + ".json" for n in (3, 4, 5)]
    assert store.conversation(rid(5))[0]["id"] == "msg_i" and store.conversation(rid(5))[-1]["id"] == "msg_o"
    # Bytes: a big one pushes out as many old ones as it needs, never itself.
    size = os.path.getsize(os.path.join(folder, rid(5) + ".json"))
    store = offgrid.ResponseStore(folder, 100, 3 * size + 200)
    assert store.save(record_of(rid(6), "y" * (size + 100)))
    assert sorted(os.listdir(folder)) == [rid(n) + ".json" for n in (5, 6)]
    assert not store.save(record_of(rid(7), "z" * (4 * size)))  # over the limit alone: not kept
    assert store.load(rid(7)) is None and store.load(rid(6)) is not None
    assert store.delete(rid(6)) and not store.delete(rid(6)) and store.load(rid(6)) is None
    # Only our ids name files: nothing else is read, written or removed.
    assert store.load("../config") is None and not store.delete("resp_../../x")


# -- end to end: the real model and the official clients ------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory, smol_store):
    need("llama_cpp", "inference tests")
    need("openai", "the OpenAI client tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_store)
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def client_for(srv, **kw):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300, **kw)


def test_create_stream_and_read_back_with_the_openai_client(smol):
    client = client_for(smol)
    ask = dict(model=SMOL, input="Name one color.", instructions="Answer in one short sentence.", temperature=0,
               max_output_tokens=200, metadata={"case": "1"})
    r = client.responses.create(**ask)
    assert r.status == "completed" and r.output_text.strip() and r.model == SMOL
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == ask["instructions"] and r.metadata == {"case": "1"} and r.max_output_tokens == 200
    with client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == r.output_text  # greedy: the same reply, whole or streamed
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    [item] = client.responses.input_items.list(r.id).data
    assert item.type == "message" and item.content[0].text == "Name one color."
    # input_items a page at a time, newest first unless order=asc.
    turns = [{"role": "user", "content": "One."}, {"role": "assistant", "content": "Two."},
             {"role": "user", "content": "Three."}]
    three = client.responses.create(model=SMOL, input=turns, max_output_tokens=5)
    page = client.responses.input_items.list(three.id, limit=2)
    assert [i.content[0].text for i in page.data] == ["Three.", "Two."] and page.has_more
    rest = client.responses.input_items.list(three.id, limit=2, after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["One."] and not rest.has_more
    assert [i.role for i in client.responses.input_items.list(three.id, order="asc").data] == [
        "user", "assistant", "user"]
    status, body, _ = smol.get("/v1/responses/%s/input_items?limit=500" % three.id)
    assert status == 400 and body["error"]["param"] == "limit"
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_limit_json_format_store_false_and_delete(smol):
    import openai
    client = client_for(smol)
    short = client.responses.create(model=SMOL, input="Tell me a long story.", max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 20}}, "required": ["color"],
              "additionalProperties": False}
    r = client.responses.create(model=SMOL, input="Name a color as JSON.", max_output_tokens=60, store=False,
                                text={"format": {"type": "json_schema", "name": "color", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"color"} and r.text.format.type == "json_schema"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)  # store: false
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=SMOL, input="More?", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"
    client.responses.delete(short.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(short.id)
    assert e.value.body["code"] == "response_not_found"
    status, body, _ = smol.request("DELETE", "/v1/responses/" + short.id)
    assert status == 404 and body["error"]["param"] == "response_id"


def test_unimplemented_fields_are_refused_over_http_in_openai_shape(smol):
    for body, param in [({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
                        ({"input": "x", "background": True}, "background"),
                        ({"input": "x", "seed": 1}, "seed")]:
        status, reply, _ = smol.post("/v1/responses", body)
        assert status == 400 and reply["error"]["param"] == param, reply
        assert reply["error"]["type"] == "invalid_request_error" and param in reply["error"]["message"]
    status, reply, _ = smol.post("/v1/responses", {"input": "x", "reasoning": {"effort": "high"}})
    assert status == 400 and reply["error"]["param"] == "reasoning.effort", reply  # SmolLM2 does not think
    assert smol.post("/v1/responses", {"input": "x", "reasoning": {"effort": "none"}, "max_output_tokens": 2,
                                       "store": False})[0] == 200  # off: nothing to switch off
    assert smol.get("/v1/responses/resp_nope")[0] == 404
    status, reply, _ = smol.get("/v1/responses/%s/input_items?limit=0" % rid(1))
    assert status == 404  # no such response, before the query is looked at


def test_previous_response_id_and_bounds_across_a_restart(tmp_path, smol_store):
    need("llama_cpp", "inference tests")
    need("openai", "the OpenAI client tests")
    home = tmp_path / "home"
    env = {"OFFGRID_RESPONSES_MAX_COUNT": "2"}
    srv = Server(home, smol_store, env=env)
    try:
        client = client_for(srv)
        first = client.responses.create(model=SMOL, input="My name is Ada. Say hello to me.", temperature=0,
                                        max_output_tokens=40)
    finally:
        assert srv.stop() == 0
    srv = Server(home, smol_store, env=env)
    try:
        client = client_for(srv)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        alone = client.responses.create(model=SMOL, input="What is my name?", temperature=0, max_output_tokens=20,
                                        store=False)
        after = client.responses.create(model=SMOL, input="What is my name?", temperature=0, max_output_tokens=20,
                                        previous_response_id=first.id)
        assert after.previous_response_id == first.id
        # The stored turn (input and output) came before the new input.
        assert after.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
        items = client.responses.input_items.list(after.id, order="asc").data
        assert [i.content[0].text for i in items] == ["What is my name?"]
        # responses_max_count 2: a third stored response drops the oldest.
        third = client.responses.create(model=SMOL, input="Hi", max_output_tokens=5)
        status, _, _ = srv.get("/v1/responses/" + first.id)
        assert status == 404 and client.responses.retrieve(third.id).id == third.id
        assert sorted(os.listdir(str(home / "responses"))) == sorted([after.id + ".json", third.id + ".json"])
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def hermes(tmp_path_factory, smol_hermes_store):
    need("llama_cpp", "inference tests")
    need("openai", "the OpenAI client tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_hermes_store)
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def test_function_tool_round_trip_with_the_openai_client(hermes):
    client = client_for(hermes)
    ask = dict(model=HERMES, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
               temperature=0, max_output_tokens=60)
    r = client.responses.create(**ask)
    [call] = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    assert r.status == "completed" and r.tools[0].name == "get_weather"
    with client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    [streamed] = [item for item in final.output if item.type == "function_call"]
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    answer = client.responses.create(model=HERMES, previous_response_id=r.id, tools=[WEATHER], temperature=0,
                                     max_output_tokens=40,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 31 degrees."}])
    assert answer.status == "completed" and answer.output[0].type == "message"
    assert answer.output_text.strip()
    # The same conversation sent whole, without the store.
    whole = client.responses.create(model=HERMES, tools=[WEATHER], temperature=0, max_output_tokens=40, store=False,
                                    input=[{"role": "user", "content": "What is the weather in Paris?"},
                                           call.model_dump(exclude_none=True),
                                           {"type": "function_call_output", "call_id": call.call_id,
                                            "output": "Sunny, 31 degrees."}])
    assert whole.output_text == answer.output_text


def test_openai_agents_runs_an_agent_with_a_function_tool(hermes):
    need("agents", "the OpenAI Agents SDK test")
    import asyncio

    import openai
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return "Sunny, 31 degrees."

    async def run():
        client = openai.AsyncOpenAI(base_url=hermes.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        agent = Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                      model=OpenAIResponsesModel(model=HERMES, openai_client=client),
                      model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60))
        return await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    result = asyncio.run(run())
    assert calls and all(isinstance(c, str) and c for c in calls)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"], kinds
    assert kinds[-1] == "message_output_item" and isinstance(result.final_output, str) and result.final_output


def test_openai_agents_streams_a_structured_output(hermes):
    need("agents", "the OpenAI Agents SDK test")
    import asyncio

    import openai
    import pydantic
    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled
    set_tracing_disabled(True)

    class Color(pydantic.BaseModel):
        name: str

    async def run():
        client = openai.AsyncOpenAI(base_url=hermes.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        agent = Agent(name="colors", instructions="Name a color.", output_type=Color,
                      model=OpenAIResponsesModel(model=HERMES, openai_client=client))
        result = Runner.run_streamed(agent, "Which color is the sky?")
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds
    result, kinds = asyncio.run(run())
    assert "raw_response_event" in kinds  # the typed events, through the SDK's stream
    assert isinstance(result.final_output, Color) and result.final_output.name


THINK = "smollm2-135m-instruct-think"


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, smol_think_store):
    need("llama_cpp", "inference tests")
    need("openai", "the OpenAI client tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_think_store, args=["--model", THINK])
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def test_thinking_model_reasoning_items_streamed_switched_and_continued(thinker):
    client = client_for(thinker)
    ask = dict(model=THINK, input="What is 2+2?", temperature=0, max_output_tokens=60)
    r = client.responses.create(**ask)
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text.strip()
    with client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_item.done")
    assert [i.type for i in final.output] == [i.type for i in r.output]
    assert final.output[0].content[0].text == r.output[0].content[0].text
    # Continued: the reasoning item is taken back and not sent to the model.
    after = client.responses.create(model=THINK, input="And 3+3?", previous_response_id=r.id, temperature=0,
                                    max_output_tokens=60, reasoning={"effort": "none"})
    assert after.reasoning.effort == "none" and after.status in ("completed", "incomplete")
    assert all(item.type != "reasoning" for item in after.output) and after.output_text.strip()
