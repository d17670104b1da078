"""The generation core: each dialect's encoder on a recorded event sequence
(read back with the official clients' own types and stream helpers), the
parameter table, and the two dialects kept in step on a real server."""

import io
import json

import pytest

from conftest import need

import offgrid
from offgrid import CallArguments, CallStart, Delta, Done, Logprob

INFO = {"prompt_tokens": 7, "completion_tokens": 3, "cached_tokens": 0, "ttft_s": 0.01, "prompt_s": 0.01,
        "decode_s": 0.02, "queued_s": 0.0}
LP = [Logprob("Hel", b"Hel", -0.25, [("Hel", b"Hel", -0.25), ("Hi", b"Hi", -1.5)]),
      Logprob("lo", b"lo", -0.5, [("lo", b"lo", -0.5), ("p", b"p", -2.0)])]
# A text reply cut by a stop string, as the engine sends it.
TEXT = [Delta(0, "Hel", LP[:1]), Delta(0, "lo", LP[1:]), Done(0, "stop", INFO, stop="\n\n")]
# A tool call, as the core makes it from the model's text.
CALL = [CallStart(0, 0, "call_abc", "get_weather"), CallArguments(0, 0, '{"city": '),
        CallArguments(0, 0, '"Paris"}'), Done(0, "eos", INFO)]
# Two choices (n=2) interleaved.
TWO = [Delta(1, "B", None), Delta(0, "A", None), Done(1, "length", INFO), Done(0, "eos", INFO)]


class Wire:
    """Where an encoder's bytes go instead of a socket: the stream's chunks
    or the one JSON body."""

    def __init__(self):
        self.headers_sent, self.media, self.chunks, self.body = False, None, [], None
        self.wfile = io.BytesIO()

    def start_stream(self, media):
        self.headers_sent, self.media = True, media

    def write_chunk(self, data):
        self.chunks.append(data)

    def send_json(self, status, obj, headers=None):
        self.headers_sent, self.status, self.body = True, status, obj


def replay(encoder_class, request, events, stream, include_usage=False, model="m"):
    wire = Wire()
    encoder = encoder_class(wire, request, model, stream, include_usage)
    reply = offgrid.Reply(request)
    for event in events:
        reply.add(event)
        if stream:
            encoder.event(event, reply.choices[event.choice])
    encoder.finish(reply)
    return wire


def sse(wire):
    text = b"".join(wire.chunks).decode()
    assert text.endswith("data: [DONE]\n\n") and wire.wfile.getvalue() == b"0\r\n\r\n"
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def chat_request(**kw):
    return offgrid.GenerationRequest(kind="chat", messages=[offgrid.chat_message("user", "hi")], **kw)


def test_openai_chat_body_and_stream_read_back_by_the_openai_types():
    need("openai", "reading replies with the SDK's types")
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    request = chat_request(logprobs=True, top_logprobs=2)
    body = replay(offgrid.OpenAIChatEncoder, request, TEXT, stream=False).body
    reply = ChatCompletion.model_validate(body)
    assert reply.choices[0].message.content == "Hello" and reply.choices[0].finish_reason == "stop"
    assert body["choices"][0]["message"]["refusal"] is None
    assert [t.token for t in reply.choices[0].logprobs.content] == ["Hel", "lo"]
    assert reply.choices[0].logprobs.content[0].top_logprobs[1].token == "Hi"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chunks = sse(replay(offgrid.OpenAIChatEncoder, request, TEXT, stream=True, include_usage=True))
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    final = state.get_final_completion()
    assert final.choices[0].message.content == "Hello" and final.choices[0].finish_reason == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])


def test_openai_chat_tool_call_assembles_in_the_sdk_stream_helper():
    need("openai", "reading replies with the SDK's types")
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    request = chat_request()
    body = replay(offgrid.OpenAIChatEncoder, request, CALL, stream=False).body
    reply = ChatCompletion.model_validate(body)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].message.content is None and reply.choices[0].finish_reason == "tool_calls"
    assert call.id == "call_abc" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    state = ChatCompletionStreamState()
    for c in sse(replay(offgrid.OpenAIChatEncoder, request, CALL, stream=True)):
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    [call] = state.get_final_completion().choices[0].message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("call_abc", "get_weather", '{"city": "Paris"}')


def test_openai_chat_n_choices_keep_their_index_and_reason():
    need("openai", "reading replies with the SDK's types")
    from openai.types.chat import ChatCompletion
    body = replay(offgrid.OpenAIChatEncoder, chat_request(n=2), TWO, stream=False).body
    reply = ChatCompletion.model_validate(body)
    assert [(c.index, c.message.content, c.finish_reason) for c in reply.choices] == [(0, "A", "stop"),
                                                                                      (1, "B", "length")]
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] == 7


def test_openai_completion_logprobs_echo_and_stream():
    need("openai", "reading replies with the SDK's types")
    from openai.types import Completion
    request = offgrid.GenerationRequest(kind="completion", prompt="Say: ", logprobs=True, top_logprobs=2)
    body = replay(offgrid.OpenAICompletionEncoder, request, TEXT, stream=False).body
    reply = Completion.model_validate(body)
    lp = reply.choices[0].logprobs
    assert lp.tokens == ["Hel", "lo"] and lp.text_offset == [0, 3] and lp.top_logprobs[0] == {"Hel": -0.25,
                                                                                                 "Hi": -1.5}
    echo = offgrid.GenerationRequest(kind="completion", prompt="Say: ", echo=True)
    assert replay(offgrid.OpenAICompletionEncoder, echo, TEXT, stream=False).body["choices"][0]["text"] == \
        "Say: Hello"
    chunks = sse(replay(offgrid.OpenAICompletionEncoder, echo, TEXT, stream=True))
    Completion.model_validate(chunks[-1])  # the SDK reads the others unvalidated: their finish_reason is null
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Say: Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def ndjson(wire):
    assert wire.media == "application/x-ndjson" and wire.wfile.getvalue() == b"0\r\n\r\n"
    return [json.loads(line) for line in b"".join(wire.chunks).decode().splitlines()]


def test_ollama_chat_lines_and_body_read_back_by_the_ollama_types():
    need("ollama", "reading replies with the client's types")
    from ollama import ChatResponse
    request = chat_request(logprobs=True, top_logprobs=2)
    lines = ndjson(replay(offgrid.OllamaChatEncoder, request, TEXT, stream=True))
    parts = [ChatResponse.model_validate(line) for line in lines]
    assert "".join(p.message.content for p in parts) == "Hello"
    assert [p.done for p in parts] == [False, False, True] and parts[-1].done_reason == "stop"
    assert lines[0]["logprobs"][0]["top_logprobs"][1]["token"] == "Hi"
    assert parts[-1].eval_count == 3 and parts[-1].prompt_eval_count == 7
    body = ChatResponse.model_validate(replay(offgrid.OllamaChatEncoder, request, TEXT, stream=False).body)
    assert body.message.content == "Hello" and body.done


def test_ollama_chat_tool_call_goes_out_whole_with_object_arguments():
    need("ollama", "reading replies with the client's types")
    from ollama import ChatResponse
    lines = ndjson(replay(offgrid.OllamaChatEncoder, chat_request(), CALL, stream=True))
    [call_line] = [line for line in lines if line["message"].get("tool_calls")]
    call = ChatResponse.model_validate(call_line).message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"
    body = replay(offgrid.OllamaChatEncoder, chat_request(), CALL, stream=False).body
    assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_ollama_generate_says_length_when_cut():
    request = offgrid.GenerationRequest(kind="completion", prompt="x")
    body = replay(offgrid.OllamaGenerateEncoder, request, [Delta(0, "ab"), Done(0, "length", INFO)], False).body
    assert body["response"] == "ab" and body["done_reason"] == "length" and "message" not in body


def test_an_error_after_the_stream_began_ends_it_in_the_dialects_shape():
    error = offgrid.ApiError(500, "the model failed")
    wire = Wire()
    encoder = offgrid.OpenAIChatEncoder(wire, chat_request(), "m", True)
    encoder.event(TEXT[0], offgrid.Reply(chat_request()).choices[0])
    encoder.fail(error)
    assert sse(wire)[-1] == error.body()
    wire = Wire()
    encoder = offgrid.OllamaChatEncoder(wire, chat_request(), "m", True)
    encoder.event(TEXT[0], offgrid.Reply(chat_request()).choices[0])
    encoder.fail(error)
    assert ndjson(wire)[-1] == {"error": "the model failed"}


# -- the parameter table -----------------------------------------------------

def test_every_table_row_has_a_reader_and_is_in_the_openapi_bodies():
    doc = offgrid.openapi_document()["components"]["schemas"]
    bodies = {"chat": "ChatCompletionRequest", "completion": "CompletionRequest",
              "ollama_chat": "OllamaChatRequest", "ollama_generate": "OllamaGenerateRequest",
              "responses": "ResponseRequest", "anthropic": "AnthropicMessagesRequest"}
    for p in offgrid.GENERATION_PARAMS:
        assert p.kind in offgrid.PARAM_KINDS, p
        for dialect, name in p.names.items():
            props = doc[bodies[dialect]]["properties"]
            if name.startswith("options."):
                props, name = props["options"]["properties"], name[8:]
            assert name in props, (dialect, name)


CONFIG = {"max_tokens_limit": 100, "default_max_tokens": 10}


@pytest.mark.parametrize("dialect, body, param", [
    ("chat", {"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ("ollama_chat", {"model": "m", "messages": [], "options": {"temperature": 3}}, "options.temperature"),
    ("ollama_chat", {"model": "m", "messages": [], "options": {"tfs_z": 0.5}}, "options.tfs_z"),
    ("ollama_generate", {"model": "m", "prompt": "x", "think": "max"}, "think"),
    ("ollama_generate", {"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ("ollama_generate", {"model": "m", "prompt": "x", "context": [1, 2]}, "context"),
    ("ollama_generate", {"model": "m", "prompt": "x", "images": ["aGk="]}, "images"),
    ("ollama_generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "template"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 101}, "max_tokens"),
])
def test_table_refuses_under_the_dialects_own_name(dialect, body, param):
    with pytest.raises(offgrid.ApiError) as e:
        offgrid.read_params(body, dialect, CONFIG)
    assert e.value.param == param and e.value.status == 400


def test_ollama_ignores_unknown_options_with_a_log_line(capfd):
    values = offgrid.read_params({"model": "m", "prompt": "x", "think": False, "options": {
        "warp_factor": 3, "f16_kv": True, "num_ctx": 2048, "typical_p": 0.5, "num_predict": -1}},
        "ollama_generate", CONFIG)
    assert values["typical_p"] == 0.5 and "max_tokens" not in values
    assert "options.warp_factor" in capfd.readouterr().err


def test_roles_are_matched_whatever_their_case():
    [m] = offgrid.read_params({"messages": [{"role": "User", "content": "x"}]}, "chat", CONFIG)["messages"]
    assert m["role"] == "user"
    [m] = offgrid.read_params({"model": "m", "messages": [{"role": "SYSTEM", "content": "x"}]}, "ollama_chat",
                              CONFIG)["messages"]
    assert m["role"] == "system"


# -- on a real server: SmolLM2, an instruction-tuned model whose chatml
# template knows no tools (the generic tool path) ---------------------------------

SMOL = "smollm2-135m-instruct-q4_1"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smol_store):
    from conftest import Server
    need("llama_cpp", "inference tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_store)
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def openai_client(smol):
    need("openai", "the OpenAI client tests")
    import openai
    return openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def ollama_client(smol):
    need("ollama", "the Ollama client tests")
    import ollama
    return ollama.Client(host=smol.url, timeout=300)


def test_required_tool_call_then_answer_from_its_result(openai_client):
    r = openai_client.chat.completions.create(model=SMOL, messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 31 degrees."}]
    answer = openai_client.chat.completions.create(model=SMOL, messages=history, tools=[WEATHER, TIME],
                                                   tool_choice="none", temperature=0, max_tokens=40)
    assert answer.choices[0].finish_reason in ("stop", "length") and not answer.choices[0].message.tool_calls
    assert "31" in answer.choices[0].message.content, answer.choices[0].message.content


def test_named_tool_streams_through_the_sdk_stream_helper(openai_client):
    with openai_client.chat.completions.stream(
            model=SMOL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "get_time"}}) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}
    assert deltas and final.choices[0].finish_reason == "tool_calls"


def test_parse_with_a_pydantic_model(openai_client):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    r = openai_client.chat.completions.parse(model=SMOL, response_format=City, temperature=0, max_tokens=60,
                                             messages=[{"role": "user", "content": "Name a city in France."}])
    assert isinstance(r.choices[0].message.parsed, City)
    import openai
    tool = openai.pydantic_function_tool(City)
    r = openai_client.chat.completions.parse(model=SMOL, tools=[tool], tool_choice="required", temperature=0,
                                             max_tokens=60, messages=[{"role": "user", "content": "Paris?"}])
    assert isinstance(r.choices[0].message.tool_calls[0].function.parsed_arguments, City)


@pytest.mark.parametrize("tools, param", [
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters.type"),
])
def test_malformed_tools_are_refused_by_name_on_both_apis(smol, tools, param):
    status, body, _ = smol.post("/v1/chat/completions", {"messages": ASK, "tools": tools})
    assert status == 400 and body["error"]["param"] == param, body
    status, body, _ = smol.post("/api/chat", {"model": SMOL, "messages": ASK, "tools": tools})
    assert status == 400 and param in body["error"], body


def test_ollama_tools_and_a_tool_message_round_trip(ollama_client, smol):
    r = ollama_client.chat(model=SMOL, messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert r.done and r.done_reason in ("stop", "length")
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": calls},
                     {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 31 degrees."}]
    answer = ollama_client.chat(model=SMOL, messages=history, tools=[WEATHER],
                                options={"temperature": 0, "num_predict": 40})
    assert answer.done and (answer.message.content or answer.message.tool_calls)
    assert answer.prompt_eval_count > r.prompt_eval_count
    assert "tools" in ollama_client.show(SMOL).capabilities


def test_chat_logprobs_are_the_reply_tokens_with_their_alternatives(openai_client):
    r = openai_client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Say hello."}],
                                              logprobs=True, top_logprobs=3, temperature=0, max_tokens=8)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.token == t.top_logprobs[0].token  # greedy takes the likeliest
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    plain = openai_client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Say hello."}],
                                                  temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_completion_logprobs_and_echo(openai_client):
    r = openai_client.completions.create(model=SMOL, prompt="The sky is", logprobs=2, temperature=0, max_tokens=5)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and all(len(top) <= 2 for top in lp.top_logprobs)
    echo = openai_client.completions.create(model=SMOL, prompt="The sky is", echo=True, temperature=0, max_tokens=5)
    assert echo.choices[0].text == "The sky is" + r.choices[0].text


def test_n_replies_run_side_by_side_with_usage_summed(openai_client, smol):
    r = openai_client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Tell a story."}],
                                              n=3, temperature=1.0, seed=11, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    again = openai_client.chat.completions.create(model=SMOL, n=3, temperature=1.0, seed=11, max_tokens=12,
                                                  messages=[{"role": "user", "content": "Tell a story."}])
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert 3 <= r.usage.completion_tokens <= 36
    stream = openai_client.chat.completions.create(model=SMOL, n=2, temperature=0, max_tokens=6, stream=True,
                                                   stream_options={"include_usage": True},
                                                   messages=[{"role": "user", "content": "Hi"}])
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert texts[0] and texts[1] and 2 <= usage.completion_tokens <= 12
    completion = openai_client.completions.create(model=SMOL, prompt="Once", n=2, temperature=0, max_tokens=4)
    assert [c.index for c in completion.choices] == [0, 1] and all(c.text for c in completion.choices)


def test_ollama_logprobs(ollama_client):
    r = ollama_client.chat(model=SMOL, messages=[{"role": "user", "content": "Say hello."}], logprobs=True,
                           top_logprobs=2, options={"temperature": 0, "num_predict": 6})
    assert "".join(t.token for t in r.logprobs) == r.message.content
    assert all(len(t.top_logprobs) == 2 for t in r.logprobs)


# -- Ollama's generation surface (#17) ---------------------------------------------

# Ollama's documented example with every option, and the legacy ones clients send.
FULL_OPTIONS = {"num_keep": 5, "seed": 42, "num_predict": 8, "top_k": 20, "top_p": 0.9, "min_p": 0.0,
                "typical_p": 0.7, "repeat_last_n": 33, "temperature": 0.8, "repeat_penalty": 1.2,
                "presence_penalty": 1.5, "frequency_penalty": 1.0, "penalize_newline": True,
                "stop": ["\n", "user:"], "numa": False, "num_ctx": 1024, "num_batch": 2, "num_gpu": 1,
                "main_gpu": 0, "use_mmap": True, "num_thread": 8, "draft_num_predict": 3, "f16_kv": True,
                "low_vram": False, "vocab_only": False, "use_mlock": False, "mirostat": 0, "mirostat_tau": 5.0,
                "mirostat_eta": 0.1, "tfs_z": 1.0}


def test_every_documented_option_is_accepted(ollama_client):
    r = ollama_client.generate(model=SMOL, prompt="Hello", options=FULL_OPTIONS)
    assert r.done and r.eval_count <= 8
    r = ollama_client.chat(model=SMOL, messages=[{"role": "user", "content": "Hi"}],
                           options=dict(FULL_OPTIONS, mirostat=2))
    assert r.done


def test_load_and_unload_through_chat_and_generate(ollama_client):
    assert ollama_client.chat(model=SMOL, messages=[]).done_reason == "load"
    assert SMOL + ":latest" in [m.model for m in ollama_client.ps().models]
    assert ollama_client.chat(model=SMOL, messages=[], keep_alive=0).done_reason == "unload"
    assert [m.model for m in ollama_client.ps().models] == []
    assert ollama_client.generate(model=SMOL, prompt="").done_reason == "load"
    assert ollama_client.generate(model=SMOL, keep_alive=0).done_reason == "unload"
    assert ollama_client.generate(model=SMOL + ":latest", prompt="").done_reason == "load"


@pytest.mark.parametrize("call, says", [
    (lambda c: c.generate(model=SMOL, prompt="x", think=True), "does not support thinking"),
    (lambda c: c.chat(model=SMOL, messages=ASK, think="high"), "does not support thinking"),
    (lambda c: c.generate(model=SMOL, prompt="def f(", suffix="return 1"), "does not support insert"),
    (lambda c: c.generate(model=SMOL, prompt="x", images=["aGk="]), "does not support images"),
    (lambda c: c.generate(model=SMOL, prompt="x", template="{{ .Prompt }}"), "template"),
    (lambda c: c.generate(model=SMOL, prompt="x", context=[1, 2, 3]), "context"),
    (lambda c: c.chat(model=SMOL, messages=[dict(ASK[0], images=["aGk="])]), "does not support images"),
])
def test_parameters_that_would_change_the_answer_are_refused(ollama_client, call, says):
    import ollama
    with pytest.raises(ollama.ResponseError) as e:
        call(ollama_client)
    assert e.value.status_code == 400 and says in e.value.error


def test_roles_in_any_case_and_tagged_names_on_v1(smol):
    body = {"model": SMOL + ":latest", "max_tokens": 2, "messages": [{"role": "USER", "content": "Hi"}]}
    status, r, _ = smol.post("/v1/chat/completions", body)
    assert status == 200 and r["model"] == SMOL and r["choices"][0]["message"]["refusal"] is None
    status, r, _ = smol.post("/api/chat", {"model": SMOL, "stream": False, "messages": [{"role": "User",
                                                                                        "content": "Hi"}],
                                           "options": {"num_predict": 2}})
    assert status == 200 and r["done"]


def test_version_names_the_ollama_api_it_matches(smol):
    status, r, _ = smol.get("/api/version")
    assert r == {"version": offgrid.OLLAMA_COMPAT_VERSION, "offgrid": offgrid.__version__}


# -- the two dialects in step --------------------------------------------------------

HI = [{"role": "user", "content": "Count from one to ten."}]


@pytest.mark.parametrize("v1, api, status", [
    ({"messages": HI, "temperature": 3}, {"messages": HI, "options": {"temperature": 3}}, 400),
    ({"messages": HI, "top_k": -1}, {"messages": HI, "options": {"top_k": -1}}, 400),
    ({"messages": HI, "stop": 5}, {"messages": HI, "options": {"stop": 5}}, 400),
    ({"messages": HI, "top_logprobs": 2}, {"messages": HI, "top_logprobs": 2}, 400),
    ({"messages": [{"role": "robot", "content": "x"}]}, {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ({"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "user", "content": 5}]}, 400),
    ({"messages": HI, "tools": [WEATHER, WEATHER]}, {"messages": HI, "tools": [WEATHER, WEATHER]}, 400),
    ({"messages": HI, "model": "nosuch"}, {"messages": HI, "model": "nosuch"}, 404),
])
def test_the_same_request_is_refused_alike_on_v1_and_api(smol, v1, api, status):
    a = smol.post("/v1/chat/completions", v1)
    b = smol.post("/api/chat", dict({"model": SMOL, "stream": False}, **api))
    assert a[0] == b[0] == status, (a, b)
    assert a[1]["error"]["param"].split(".")[-1].split("[")[0] in b[1]["error"], (a, b)


@pytest.mark.parametrize("v1, options, finish", [
    ({"max_tokens": 2}, {"num_predict": 2}, "length"),
    ({"max_tokens": 30, "stop": ["two", "Two", "2"]}, {"num_predict": 30, "stop": ["two", "Two", "2"]}, "stop"),
])
def test_the_same_request_finishes_alike_on_v1_and_api(smol, v1, options, finish):
    a = smol.post("/v1/chat/completions", dict(v1, messages=HI, temperature=0))
    b = smol.post("/api/chat", {"model": SMOL, "stream": False, "messages": HI,
                                "options": dict(options, temperature=0)})
    assert a[1]["choices"][0]["finish_reason"] == b[1]["done_reason"] == finish, (a, b)
    assert a[1]["choices"][0]["message"]["content"] == b[1]["message"]["content"]


# -- LangChain -----------------------------------------------------------------------

def weather_tool():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "Sunny, 31 degrees in %s." % city
    return get_weather


def test_langchain_chat_openai_binds_a_tool_runs_it_and_answers_from_its_result(smol):
    need("langchain_openai", "the LangChain tests")
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI
    get_weather = weather_tool()
    llm = ChatOpenAI(model=SMOL, base_url=smol.url + "/v1", api_key="unused", temperature=0, max_tokens=60,
                     max_retries=0, timeout=300)
    question = HumanMessage("What is the weather in Paris?")
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke([question])
    [call] = ai.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
    result = get_weather.invoke(call)
    answer = llm.bind_tools([get_weather]).invoke([question, ai, result])
    assert not answer.tool_calls and "31" in answer.content, answer


def test_langchain_chat_ollama_binds_a_tool_and_answers_from_its_result(smol):
    """Ollama's API has no tool_choice and SmolLM2-135M does not choose a
    call by itself, so the call here is the one ChatOpenAI forced; ChatOllama
    sends the tools, the call and its result, and answers from the result."""
    need("langchain_ollama", "the LangChain tests")
    need("langchain_openai", "the LangChain tests")
    from langchain_core.messages import HumanMessage
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI
    get_weather = weather_tool()
    question = HumanMessage("What is the weather in Paris?")
    forced = ChatOpenAI(model=SMOL, base_url=smol.url + "/v1", api_key="unused", temperature=0, max_tokens=60,
                        max_retries=0, timeout=300).bind_tools([get_weather], tool_choice="required")
    ai = forced.invoke([question])
    result = get_weather.invoke(ai.tool_calls[0])
    llm = ChatOllama(model=SMOL + ":latest", base_url=smol.url, temperature=0, num_predict=60)
    first = llm.bind_tools([get_weather]).invoke([question])
    assert first.response_metadata["done_reason"] in ("stop", "length")
    answer = llm.bind_tools([get_weather]).invoke([question, ai, result])
    assert not answer.tool_calls and "31" in answer.content, answer


# -- the native path: the copy of SmolLM2 whose template is Hermes-style -----------------

HERMES = "smollm2-135m-instruct-hermes"


@pytest.fixture(scope="module")
def hermes(tmp_path_factory, smol_hermes_store):
    from conftest import Server
    need("llama_cpp", "inference tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_hermes_store)
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


def test_native_template_call_parses_streamed_and_whole(hermes):
    need("openai", "the OpenAI client tests")
    import openai
    client = openai.OpenAI(base_url=hermes.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model=HERMES, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0, max_tokens=60)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and isinstance(json.loads(call.function.arguments), dict)
    with client.chat.completions.stream(model=HERMES, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                        max_tokens=60, tool_choice="required") as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    history = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 31 degrees."}]
    status, body, _ = hermes.post("/api/chat", {"model": HERMES, "stream": False, "tools": [WEATHER, TIME],
                                                "messages": [dict(m, tool_calls=[{"function": {
                                                    "name": call.function.name,
                                                    "arguments": json.loads(call.function.arguments)}}])
                                                    if m.get("tool_calls") else
                                                    {"role": "tool", "content": m["content"]}
                                                    if m["role"] == "tool" else m for m in history],
                                                "options": {"temperature": 0, "num_predict": 30}})
    assert status == 200 and body["done"], body
