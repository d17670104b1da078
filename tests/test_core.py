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
              "ollama_chat": "OllamaChatRequest", "ollama_generate": "OllamaGenerateRequest"}
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
    ("ollama_generate", {"model": "m", "prompt": "x", "think": True}, "think"),
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
        "draft_num_predict": 3, "f16_kv": True, "num_ctx": 2048, "typical_p": 0.5, "num_predict": -1}},
        "ollama_generate", CONFIG)
    assert values["typical_p"] == 0.5 and "max_tokens" not in values
    assert "options.draft_num_predict" in capfd.readouterr().err


def test_roles_are_matched_whatever_their_case():
    [m] = offgrid.read_params({"messages": [{"role": "User", "content": "x"}]}, "chat", CONFIG)["messages"]
    assert m["role"] == "user"
    [m] = offgrid.read_params({"model": "m", "messages": [{"role": "SYSTEM", "content": "x"}]}, "ollama_chat",
                              CONFIG)["messages"]
    assert m["role"] == "system"
