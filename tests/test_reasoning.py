"""Reasoning models: think tags found in chat templates, the streaming
splitter on recorded replies split at every position, the switches of each
API, the encoders' reasoning fields, and the thinking copy of SmolLM2 on a
real server through the official clients."""

import json

import pytest

import offgrid
from conftest import HERMES_TOOL_TEMPLATE, THINK_TEMPLATE, need
from offgrid import Delta, Done, Thinking
from test_core import replay

# Excerpts of real templates, each where it writes or splits at its tags.
QWEN3_EXCERPT = (
    "{%- set reasoning_content = message.reasoning_content %}{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
R1_DISTILL_EXCERPT = ("{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
                      "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
R1_DISTILL_OLD_EXCERPT = ("{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
                          "{% endif %}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")
COMMAND_EXCERPT = "{{ '<|START_THINKING|>' + message.tool_plan + '<|END_THINKING|>' }}"
SEED_EXCERPT = "{{ '<seed:think>' + message.reasoning_content + '</seed:think>' }}"
THINKING_EXCERPT = "{{ '<thinking>' + message.reasoning_content + '</thinking>' }}"


def test_thinking_models_are_known_by_their_templates_tags(smol_gguf):
    assert offgrid.think_tags(QWEN3_EXCERPT) == ("<think>", "</think>")
    assert offgrid.think_tags(R1_DISTILL_EXCERPT) == ("<think>", "</think>")
    assert offgrid.think_tags(R1_DISTILL_OLD_EXCERPT) == ("<think>", "</think>")
    assert offgrid.think_tags(COMMAND_EXCERPT) == ("<|START_THINKING|>", "<|END_THINKING|>")
    assert offgrid.think_tags(SEED_EXCERPT) == ("<seed:think>", "</seed:think>")
    assert offgrid.think_tags(THINKING_EXCERPT) == ("<thinking>", "</thinking>")
    assert offgrid.think_tags(THINK_TEMPLATE) == ("<think>", "</think>")
    assert offgrid.think_tags(offgrid.read_gguf(smol_gguf)["chat_template"]) is None
    assert offgrid.think_tags(HERMES_TOOL_TEMPLATE) is None
    assert offgrid.think_tags("{{ 'only <think> opens' }}") is None
    assert offgrid.think_tags(None) is None


# The splitter ####################################################################

# (tags, starts inside, the model's text, thinking, answer): replies as
# reasoning models write them.
RECORDED = [
    (("<think>", "</think>"), False, "<think>\nThe user asks for 2+2. That is 4.\n</think>\n\n2 + 2 = 4.",
     "The user asks for 2+2. That is 4.", "2 + 2 = 4."),
    (("<think>", "</think>"), True, "Okay, a greeting.\nI answer kindly.\n</think>\n\nHello! How can I help?",
     "Okay, a greeting.\nI answer kindly.", "Hello! How can I help?"),
    (("<think>", "</think>"), True, "\n\n</think>\n\nParis.", "", "Paris."),
    (("<think>", "</think>"), False, "  \nNo thinking here, and a <think> tag in the answer stays.",
     "", "  \nNo thinking here, and a <think> tag in the answer stays."),
    (("<think>", "</think>"), False, "<think>\nStill thinking when max_tokens cut it off\n",
     "Still thinking when max_tokens cut it off", ""),
    (("<think>", "</think>"), False, "<thin", "", "<thin"),
    (("<think>", "</think>"), True, "a < b and </thinker> is no tag</think>x</think>",
     "a < b and </thinker> is no tag", "x</think>"),
    (("<thinking>", "</thinking>"), False, "<thinking>Plan: say hi.</thinking>Hi!", "Plan: say hi.", "Hi!"),
    (("<|START_THINKING|>", "<|END_THINKING|>"), True, "Look up the weather.<|END_THINKING|><|START_RESPONSE|>",
     "Look up the weather.", "<|START_RESPONSE|>"),
    (("<seed:think>", "</seed:think>"), False, "\n<seed:think>hmm</seed:think>ok", "hmm", "ok"),
]


def run_splitter(tags, inside, pieces):
    splitter = offgrid.ThinkSplitter(*tags, inside=inside)
    items = []
    for out in [splitter.feed(piece) for piece in pieces] + [splitter.finish()]:
        assert all(text for _, text in out), out  # no empty items
        assert all(a[0] != b[0] for a, b in zip(out, out[1:])), out  # neighbours merged
        items += out
    return ("".join(t for kind, t in items if kind == "thinking"), "".join(t for kind, t in items if kind == "text"))


@pytest.mark.parametrize("tags, inside, text, thinking, answer", RECORDED)
def test_splitter_on_recorded_replies_split_at_every_position(tags, inside, text, thinking, answer):
    assert run_splitter(tags, inside, [text]) == (thinking, answer)
    assert run_splitter(tags, inside, list(text)) == (thinking, answer)  # one character per delta
    for i in range(len(text) + 1):
        assert run_splitter(tags, inside, [text[:i], text[i:]]) == (thinking, answer), i
    for i in range(0, len(text) + 1, 3):
        for j in range(i, len(text) + 1):
            assert run_splitter(tags, inside, [text[:i], text[i:j], text[j:]]) == (thinking, answer), (i, j)


def test_thinking_streams_before_the_closing_tag_arrives():
    splitter = offgrid.ThinkSplitter("<think>", "</think>")
    assert splitter.feed("<think>\nFirst") == [("thinking", "First")]
    assert splitter.feed(" idea </th") == [("thinking", " idea")]  # the layout and a maybe-tag wait
    assert splitter.feed("ink>\n\nAns") == [("text", "Ans")]
    assert splitter.feed("wer") == [("text", "wer")]
    assert splitter.finish() == []


# The switches ##################################################################

QWEN3_LIKE = THINK_TEMPLATE.replace(
    "'<|im_start|>assistant\\n<think>\\n'",
    "'<|im_start|>assistant\\n' + ('<think>\\n\\n</think>\\n\\n' if enable_thinking is defined and "
    "not enable_thinking else '')")
OPENS_NOTHING = THINK_TEMPLATE.replace("'<|im_start|>assistant\\n<think>\\n'", "'<|im_start|>assistant\\n'")


def prepared(template, think, param="think"):
    request = offgrid.GenerationRequest(model="m", messages=[offgrid.chat_message("user", "hi")], think=think,
                                        think_param=param)
    return offgrid.prepare_thinking(request, template)


def test_the_template_that_opens_the_tag_starts_the_reply_in_thinking_and_off_closes_it():
    r = prepared(THINK_TEMPLATE, None)
    assert (r.think_tags, r.thinking_open, r.prompt_suffix, r.template_vars) == (("<think>", "</think>"), True, "", {})
    assert prepared(THINK_TEMPLATE, True).thinking_open and prepared(THINK_TEMPLATE, "high").thinking_open
    r = prepared(THINK_TEMPLATE, False)
    assert (r.thinking_open, r.prompt_suffix) == (False, "</think>\n\n")


def test_a_template_with_enable_thinking_is_switched_by_it():
    r = prepared(QWEN3_LIKE, False)
    assert r.template_vars == {"enable_thinking": False} and (r.thinking_open, r.prompt_suffix) == (False, "")
    rendered = offgrid.ChatTemplate(QWEN3_LIKE).render([{"role": "user", "content": "hi"}], variables=r.template_vars)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    r = prepared(QWEN3_LIKE, True)
    assert r.template_vars == {"enable_thinking": True} and r.prompt_suffix == "" and not r.thinking_open
    assert prepared(QWEN3_LIKE, None).template_vars == {}


def test_a_reply_held_by_a_grammar_from_its_start_or_begun_by_the_client_skips_thinking():
    request = offgrid.GenerationRequest(model="m", messages=[offgrid.chat_message("user", "hi")], think=True,
                                        format={"type": "json_object", "schema": None})
    offgrid.prepare_request(request, THINK_TEMPLATE)
    assert request.grammar and (request.thinking_open, request.prompt_suffix) == (False, "</think>\n\n")
    request = offgrid.GenerationRequest(model="m", messages=[offgrid.chat_message("user", "hi")], think=True,
                                        format={"type": "json_object", "schema": None})
    offgrid.prepare_request(request, QWEN3_LIKE)
    assert request.template_vars == {"enable_thinking": False} and request.prompt_suffix == ""
    request = offgrid.GenerationRequest(model="m", messages=[offgrid.chat_message("user", "hi")], prefill="Sure")
    offgrid.prepare_request(request, THINK_TEMPLATE)
    assert (request.think_tags, request.prompt_suffix) == (None, "</think>\n\nSure")


def test_off_without_a_switch_or_an_opened_tag_writes_an_empty_thought():
    r = prepared(OPENS_NOTHING, False)
    assert (r.thinking_open, r.prompt_suffix) == (False, "<think>\n\n</think>\n\n")
    assert prepared(OPENS_NOTHING, None).prompt_suffix == ""


@pytest.mark.parametrize("think, param", [(True, "think"), ("low", "think"), ("high", "reasoning_effort")])
def test_a_switch_to_a_model_that_does_not_think_is_refused(smol_gguf, think, param):
    template = offgrid.read_gguf(smol_gguf)["chat_template"]
    with pytest.raises(offgrid.ApiError) as e:
        prepared(template, think, param)
    assert (e.value.status, e.value.param) == (400, param)
    assert e.value.message == '%s: "m" does not support thinking' % param
    assert prepared(template, False).think_tags is None  # off: nothing to switch off


@pytest.mark.parametrize("dialect, body, think", [
    ("ollama_chat", {"think": True}, True), ("ollama_chat", {"think": False}, False),
    ("ollama_generate", {"think": "medium"}, "medium"),
    ("chat", {"reasoning_effort": "none"}, False), ("chat", {"reasoning_effort": "low"}, "low"),
])
def test_switches_are_read_under_each_apis_name(dialect, body, think):
    base = {"chat": {"messages": [{"role": "user", "content": "x"}]}, "ollama_chat": {"model": "m", "messages": []},
            "ollama_generate": {"model": "m", "prompt": "x"}}[dialect]
    assert offgrid.read_params(dict(base, **body), dialect, {"max_tokens_limit": 9})["think"] == think


@pytest.mark.parametrize("dialect, body, param", [
    ("ollama_chat", {"model": "m", "messages": [], "think": "max"}, "think"),
    ("ollama_chat", {"model": "m", "messages": [], "think": 1}, "think"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": True}, "reasoning_effort"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "maximal"}, "reasoning_effort"),
    ("chat", {"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}]},
     "messages[0].reasoning_content"),
    ("ollama_chat", {"model": "m", "messages": [{"role": "assistant", "content": "x", "thinking": 3}]},
     "messages[0].thinking"),
])
def test_bad_switch_values_are_refused_by_name(dialect, body, param):
    with pytest.raises(offgrid.ApiError) as e:
        offgrid.read_params(body, dialect, {"max_tokens_limit": 9})
    assert (e.value.status, e.value.param) == (400, param)


def test_earlier_thinking_goes_to_the_template_as_reasoning_content():
    [m] = offgrid.read_params({"model": "m", "messages": [{"role": "assistant", "content": "4", "thinking": "2+2"}]},
                              "ollama_chat", {})["messages"]
    assert offgrid.template_messages([m]) == [{"role": "assistant", "content": "4", "reasoning_content": "2+2"}]


# The encoders #####################################################################

INFO = {"prompt_tokens": 7, "completion_tokens": 5, "cached_tokens": 0, "ttft_s": 0.01, "prompt_s": 0.01,
        "decode_s": 0.02, "queued_s": 0.0}
THOUGHT = [Thinking(0, "Two plus"), Thinking(0, " two."), Delta(0, "4", None), Done(0, "eos", INFO)]


def test_openai_chat_carries_reasoning_content_in_the_message_and_the_deltas():
    need("openai", "reading replies with the SDK's types")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    request = offgrid.GenerationRequest(kind="chat", messages=[offgrid.chat_message("user", "2+2?")])
    body = replay(offgrid.OpenAIChatEncoder, request, THOUGHT, False).body
    message = ChatCompletion.model_validate(body).choices[0].message
    assert (message.content, message.model_extra["reasoning_content"]) == ("4", "Two plus two.")
    wire = replay(offgrid.OpenAIChatEncoder, request, THOUGHT, True)
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[6:]))
              for e in b"".join(wire.chunks).decode().split("\n\n") if e.startswith("data: {")]
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Two plus two."
    assert "".join(d.content or "" for d in deltas) == "4"
    # Thinking and answer never share a delta.
    assert not any(d.content and d.model_extra.get("reasoning_content") for d in deltas)


def test_ollama_chat_and_generate_carry_thinking():
    need("ollama", "reading replies with the Ollama types")
    import ollama
    request = offgrid.GenerationRequest(kind="chat", messages=[offgrid.chat_message("user", "2+2?")])
    body = replay(offgrid.OllamaChatEncoder, request, THOUGHT, False).body
    reply = ollama.ChatResponse.model_validate(body)
    assert (reply.message.thinking, reply.message.content) == ("Two plus two.", "4")
    lines = [ollama.ChatResponse.model_validate(json.loads(line)) for chunk in
             replay(offgrid.OllamaChatEncoder, request, THOUGHT, True).chunks for line in chunk.splitlines()]
    assert "".join(r.message.thinking or "" for r in lines) == "Two plus two."
    assert "".join(r.message.content for r in lines) == "4" and lines[-1].done
    body = replay(offgrid.OllamaGenerateEncoder, request, THOUGHT, False).body
    reply = ollama.GenerateResponse.model_validate(body)
    assert (reply.thinking, reply.response) == ("Two plus two.", "4")
    plain = replay(offgrid.OllamaGenerateEncoder, request, THOUGHT[2:], False).body
    assert "thinking" not in plain


# On a real server: the thinking copy of SmolLM2 ###################################

THINK = "smollm2-135m-instruct-think"
SMOL = "smollm2-135m-instruct-q4_1"
ASK = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, smol_think_store):
    from conftest import Server
    need("llama_cpp", "inference tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_think_store, args=["--model", THINK])
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def openai_client(thinker):
    need("openai", "the OpenAI client tests")
    import openai
    return openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def ollama_client(thinker):
    need("ollama", "the Ollama client tests")
    import ollama
    return ollama.Client(host=thinker.url, timeout=300)


def test_the_reply_of_a_template_that_opens_the_tag_is_thinking(openai_client):
    r = openai_client.chat.completions.create(model=THINK, messages=ASK, temperature=0, max_tokens=40)
    message = r.choices[0].message
    thinking = message.model_extra.get("reasoning_content")
    # SmolLM2 never learnt to close the tag: all it writes is thinking.
    assert thinking and thinking.strip() == thinking and "<think>" not in thinking
    assert message.content == "" and r.usage.completion_tokens > 0
    with openai_client.chat.completions.create(model=THINK, messages=ASK, temperature=0, max_tokens=40,
                                               stream=True) as stream:
        deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == ""


def test_reasoning_effort_none_closes_the_tag_and_the_model_answers(openai_client):
    r = openai_client.chat.completions.create(model=THINK, messages=ASK, temperature=0, max_tokens=40,
                                              reasoning_effort="none")
    message = r.choices[0].message
    assert message.content.strip() and "reasoning_content" not in (message.model_extra or {})
    assert "</think>" not in message.content


def test_a_forced_tool_call_or_json_on_a_thinking_model_is_the_answer(openai_client):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    r = openai_client.chat.completions.create(
        model=THINK, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[weather],
        tool_choice="required", temperature=0, max_tokens=40)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert r.choices[0].finish_reason == "tool_calls"
    r = openai_client.chat.completions.create(model=THINK, messages=ASK, temperature=0, max_tokens=40,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})


def test_reasoning_effort_on_a_model_that_does_not_think_is_refused(openai_client):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=5, reasoning_effort="high")
    assert e.value.body["param"] == "reasoning_effort" and "does not support thinking" in e.value.body["message"]
    # "none" asks nothing of a model that does not think.
    r = openai_client.chat.completions.create(model=SMOL, messages=ASK, max_tokens=5, reasoning_effort="none")
    assert r.choices[0].message.content


def test_ollama_think_on_off_and_streamed(ollama_client):
    on = ollama_client.chat(model=THINK, messages=ASK, think=True, options={"temperature": 0, "num_predict": 30})
    assert on.message.thinking and on.message.content == ""
    off = ollama_client.chat(model=THINK, messages=ASK, think=False, options={"temperature": 0, "num_predict": 30})
    assert off.message.content.strip() and not off.message.thinking
    parts = list(ollama_client.chat(model=THINK, messages=ASK, think=True, stream=True,
                                    options={"temperature": 0, "num_predict": 30}))
    assert "".join(p.message.thinking or "" for p in parts) == on.message.thinking and parts[-1].done
    gen = ollama_client.generate(model=THINK, prompt=ASK[0]["content"], think="high",
                                 options={"temperature": 0, "num_predict": 30})
    assert gen.thinking == on.message.thinking and gen.response == ""
    # Earlier thinking in the history is taken (the template drops it).
    history = ASK + [{"role": "assistant", "content": "4", "thinking": "Two plus two is four."},
                     {"role": "user", "content": "And 3+3?"}]
    again = ollama_client.chat(model=THINK, messages=history, options={"temperature": 0, "num_predict": 10})
    assert again.message.thinking


def test_ollama_show_lists_thinking_and_refuses_think_where_it_does_not_apply(ollama_client):
    import ollama
    assert "thinking" in ollama_client.show(THINK).capabilities
    assert "thinking" not in ollama_client.show(SMOL).capabilities
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=SMOL, messages=ASK, think=True)
    assert e.value.status_code == 400 and e.value.error == 'think: "%s" does not support thinking' % SMOL


def test_chat_command_keeps_the_thinking_out_of_piped_output(tmp_path, smol_think_store):
    from conftest import run_cli
    need("llama_cpp", "chat")
    args = ["chat", THINK, "--models-dir", smol_think_store, "--max-tokens", "30", "--temperature", "0"]
    result = run_cli(args, tmp_path, input="What is 2+2?")
    assert result.returncode == 0, result.stderr
    # The test model only ever thinks (see above): nothing of it is the answer.
    assert result.stdout.strip() == "", result.stdout
    result = run_cli(["chat", SMOL] + args[2:], tmp_path, input="What is 2+2?")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_responses_api_gives_a_reasoning_item_before_the_answer(openai_client):
    r = openai_client.responses.create(model=THINK, input="What is 2+2?", temperature=0, max_output_tokens=40,
                                       store=False)
    reasoning = r.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].text.strip()
    assert all(item.type != "message" or not item.content[0].text.strip() for item in r.output[1:])
    with openai_client.responses.stream(model=THINK, input="What is 2+2?", temperature=0, max_output_tokens=40,
                                        store=False) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == reasoning.content[0].text == final.output[0].content[0].text
