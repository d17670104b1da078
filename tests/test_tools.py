"""Tool calls: tools and tool_choice validation, chat templates rendered
with tools, the streaming call parser on recorded replies of each family,
and call grammars with the real SmolLM2 model."""

import json
import re

import pytest

import offgrid
from conftest import HERMES_TOOL_TEMPLATE, need

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def bad(fn, *args):
    with pytest.raises(offgrid.ApiError) as e:
        fn(*args)
    assert e.value.status == 400
    assert e.value.message.startswith(e.value.param + ": ")
    return e.value


# Validation ##################################################################

def test_check_tools_normalizes_description_and_parameters():
    tools = offgrid.check_tools([{"type": "function", "function": {"name": "ping"}}, WEATHER])
    assert tools[0] == {"type": "function", "function": {
        "name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}}}
    assert tools[1] == WEATHER
    assert offgrid.check_tools(None) == []


@pytest.mark.parametrize("tools, param, code", [
    ({"type": "function"}, "tools", "invalid_type"),
    ([WEATHER, "get_time"], "tools[1]", "invalid_type"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "tools[0].type", "invalid_value"),
    ([{"type": "function"}], "tools[0].function", "missing_parameter"),
    ([WEATHER, {"type": "function", "function": {"description": "no name"}}], "tools[1].function.name",
     "missing_parameter"),
    ([{"type": "function", "function": {"name": "get weather"}}], "tools[0].function.name", "invalid_value"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name", "invalid_value"),
    ([WEATHER, TIME, WEATHER], "tools[2].function.name", "duplicate_tool"),
    ([{"type": "function", "function": {"name": "x", "parameters": "{}"}}], "tools[0].function.parameters",
     "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters.type", "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"type": "text"}}}}}],
     "tools[0].function.parameters.properties.a.type", "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "items": 3}}}}}],
     "tools[0].function.parameters.properties.a.items", "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {}, "required": "a"}}}],
     "tools[0].function.parameters.required", "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}}}],
     "tools[0].function.parameters.required", "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"enum": []}}}}}],
     "tools[0].function.parameters.properties.a.enum", "invalid_schema"),
    ([{"type": "function", "function": {"name": "x", "description": 7}}], "tools[0].function.description",
     "invalid_type"),
    ([{"type": "function", "function": {"name": "x", "examples": []}}], "tools[0].function.examples",
     "unsupported_parameter"),
    ([{"type": "function", "function": {"name": "x"}, "cache_control": {}}], "tools[0].cache_control",
     "unsupported_parameter"),
])
def test_malformed_tool_is_a_400_naming_it(tools, param, code):
    e = bad(offgrid.check_tools, tools)
    assert (e.param, e.code) == (param, code)


def test_check_tools_names_the_field_under_another_parameter_name():
    assert bad(offgrid.check_tools, [{"type": "function", "function": {}}], "functions").param == \
        "functions[0].function.name"


def test_tool_choice_modes_and_named_function():
    tools = offgrid.check_tools([WEATHER, TIME])
    assert offgrid.check_tool_choice(None, tools) == ("auto", None)
    assert offgrid.check_tool_choice(None, []) == ("none", None)
    for mode in ("none", "auto", "required"):
        assert offgrid.check_tool_choice(mode, tools) == (mode, None)
    assert offgrid.check_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools) == \
        ("function", "get_time")
    assert offgrid.check_tool_choice("none", []) == ("none", None)


@pytest.mark.parametrize("choice, param", [
    ("any", "tool_choice"),
    (3, "tool_choice"),
    ({"type": "tool", "function": {"name": "get_time"}}, "tool_choice.type"),
    ({"type": "function"}, "tool_choice.function.name"),
    ({"type": "function", "function": {"name": "get_date"}}, "tool_choice.function.name"),
    ({"type": "function", "function": {"name": "get_time"}, "strict": True}, "tool_choice.strict"),
])
def test_bad_tool_choice_is_a_400_naming_it(choice, param):
    tools = offgrid.check_tools([WEATHER, TIME])
    assert bad(offgrid.check_tool_choice, choice, tools).param == param


def test_tool_choice_required_without_tools_is_refused():
    e = bad(offgrid.check_tool_choice, "required", [])
    assert e.param == "tool_choice" and "no tools" in e.message


# Template formats ############################################################

# The tool-call markers as they appear in the families' own chat templates
# (excerpts: Qwen 2.5, Hermes 2 Pro, Llama 3.1 and 3.2, Mistral Nemo).
QWEN_EXCERPT = ('{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
                'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n" }}')
LLAMA31_EXCERPT = ('{%- if builtin_tools is defined %}{{- "<|python_tag|>" + tool_call.name }}{%- endif %}'
                   '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}')
LLAMA32_EXCERPT = ('{%- if message.role == "tool" or message.role == "ipython" %}'
                   '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}{%- endif %}')
MISTRAL_EXCERPT = ('{%- elif message.tool_calls is defined and message.tool_calls is not none %}'
                   '{{- "[TOOL_CALLS][" }}')


def test_tool_format_from_template_markers(smol_gguf):
    assert offgrid.tool_format(QWEN_EXCERPT) == "hermes"
    assert offgrid.tool_format(LLAMA31_EXCERPT) == "llama3"
    assert offgrid.tool_format(LLAMA32_EXCERPT) == "llama3"
    assert offgrid.tool_format(MISTRAL_EXCERPT) == "mistral"
    assert offgrid.tool_format(None) == "generic"
    assert offgrid.tool_format(offgrid.read_gguf(smol_gguf)["chat_template"]) == "generic"
    assert offgrid.tool_format(HERMES_TOOL_TEMPLATE) == "hermes"


# Rendering ###################################################################

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Oslo and the time there?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": \"CET\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, snow"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]


def test_generic_template_gets_our_tool_prompt_and_text_history(smol_gguf):
    template = offgrid.read_gguf(smol_gguf)["chat_template"]
    tools = offgrid.check_tools([WEATHER, TIME])
    prompt = offgrid.render_chat_prompt(template, HISTORY, tools)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are terse.\n\nYou can call functions")
    assert json.dumps(tools[0]) in system and json.dumps(tools[1]) in system
    assert "<tool_call>" in system and "If no function is needed" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
            '"arguments": {"zone": "CET"}}\n</tool_call><|im_end|>\n') in prompt
    # Both results in one user turn, each naming the function it answers.
    assert ('<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": "4 degrees, snow"}\n'
            '</tool_response>\n<tool_response>\n{"name": "get_time", "content": "14:05"}\n'
            '</tool_response><|im_end|>\n<|im_start|>assistant\n') in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_generic_prompt_says_what_tool_choice_demands(smol_gguf):
    template = offgrid.read_gguf(smol_gguf)["chat_template"]
    tools = offgrid.check_tools([WEATHER, TIME])
    user = [{"role": "user", "content": "hi"}]
    required = offgrid.render_chat_prompt(template, user, tools, ("required", None))
    named = offgrid.render_chat_prompt(template, user, tools, ("function", "get_time"))
    assert "Call one of these functions now." in required
    assert "Call the function get_time now." in named
    # No system message of the user's: ours replaces the template's default.
    assert "SmolLM" not in required
    plain = offgrid.render_chat_prompt(template, user)
    assert plain == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                     "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_rendering_without_tools_matches_llama_cpp_python(smol_gguf):
    """ChatTemplate is a drop-in for the Jinja2ChatFormatter the engine used."""
    need("llama_cpp", "the reference chat formatter")
    from llama_cpp import llama_chat_format
    template = offgrid.read_gguf(smol_gguf)["chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b>"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    theirs = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    ours = offgrid.ChatTemplate(template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert ours.render(messages) == theirs(messages=messages).prompt
    assert ours.stops == ["<|im_end|>"]


def test_native_template_renders_tools_calls_and_results():
    tools = offgrid.check_tools([WEATHER, TIME])
    prompt = offgrid.render_chat_prompt(HERMES_TOOL_TEMPLATE, HISTORY, tools)
    assert prompt.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert "<tools>\n%s\n%s\n</tools>" % (json.dumps(tools[0]), json.dumps(tools[1])) in prompt
    # Arguments sent as a JSON string are written as an object, not quoted twice.
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}'
            '\n</tool_call><|im_end|>\n') in prompt
    assert ('<|im_start|>user\n<tool_response>\n4 degrees, snow\n</tool_response>\n<tool_response>\n14:05\n'
            '</tool_response><|im_end|>\n<|im_start|>assistant\n') in prompt


def test_tojson_in_templates_is_plain_json():
    # (The comment makes it a template that takes tools.)
    prompt = offgrid.render_chat_prompt("{# <tool_call> #}{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}",
                                        [{"role": "user", "content": "x"}], [{"a": "<é&>"}])
    assert prompt == '[{"a": "<é&>"}]|{\n  "a": "<é&>"\n}'


def test_template_that_refuses_the_messages_is_a_400():
    template = ("{% for m in messages %}{% if m.role == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    e = bad(offgrid.render_chat_prompt, template, [{"role": "system", "content": "x"}])
    assert e.param == "messages" and "System role not supported" in e.message


def test_template_runs_sandboxed():
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    e = bad(offgrid.render_chat_prompt, template, [{"role": "user", "content": "x"}])
    assert e.code == "template_error"


# Parsing #####################################################################

def parse(fmt, text, cuts=()):
    """Feed `text` cut at `cuts`; return the merged text and the calls."""
    parser = offgrid.ToolCallParser(fmt)
    events, start = [], 0
    for cut in list(cuts) + [len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    events += parser.finish()
    text_out, calls = "", {}
    for event in events:
        if event[0] == "text":
            assert event[1]
            text_out += event[1]
        elif event[0] == "call":
            _, index, call_id, name = event
            assert index == len(calls) and re.match(r"^call_[0-9a-f]{24}$", call_id)
            calls[index] = [name, ""]
        else:
            _, index, fragment = event
            calls[index][1] += fragment
    out = [(name, json.loads(arguments)) for name, arguments in calls.values()]
    assert [[n, json.loads(a)] for _, n, a in parser.calls] == [list(c) for c in out]
    return text_out, out


RECORDED = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
               '{"zone": "CET"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {"zone": "CET"})]),
    ("generic", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "a}\\"]<tool_call>"}}\n</tool_call>',
     "", [("get_time", {"zone": 'a}"]<tool_call>'})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
     "", [("get_weather", {"city": "Oslo", "unit": "celsius"})]),
    ("llama3", '<|python_tag|>{"type": "function", "name": "get_time", "parameters": {"zone": "CET"}}; '
               '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}',
     "", [("get_time", {"zone": "CET"}), ("get_weather", {"city": "Rome", "unit": "celsius"})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}, '
                '"id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {"zone": "CET"}}]',
     "", [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {"zone": "CET"})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
     "Sure.", [("get_time", {"zone": "CET"})]),
]


@pytest.mark.parametrize("fmt, reply, text, calls", RECORDED, ids=[r[0] for r in RECORDED])
def test_calls_parse_whole_and_split_at_every_position(fmt, reply, text, calls):
    assert parse(fmt, reply) == (text, calls)
    for cut in range(1, len(reply)):
        assert parse(fmt, reply, [cut]) == (text, calls), cut
    assert parse(fmt, reply, range(1, len(reply))) == (text, calls)


@pytest.mark.parametrize("fmt, reply", [
    ("hermes", 'Here: <tool_call>\n{"name": "get_time", "arguments": {"zone": }\n</tool_call> done'),
    ("hermes", 'Maybe <tool_call>{"arguments": {}}</tool_call>'),
    ("hermes", 'Cut off <tool_call>\n{"name": "get_time", "argum'),
    ("hermes", 'Text with <tool_ca'),
    ("generic", '<tool_call>["get_time"]</tool_call>'),
    ("llama3", '{"answer": 42}'),
    ("llama3", '  {"name": "get_time", "parameters": [1]}'),
    ("llama3", '<|python_tag|>brave_search.call(query="x")'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "CET"}}, 7]'),
    ("mistral", '[TOOL_CALLS]get time[ARGS]{}'),
    ("mistral", '[TOOL_CALLS]get_time[ARGS]{"zone": '),
])
def test_malformed_call_comes_out_as_text_losing_nothing(fmt, reply):
    for cuts in ([], range(1, len(reply))):
        assert parse(fmt, reply, cuts) == (reply, [])


def test_text_before_a_call_is_sent_before_the_call_completes():
    parser = offgrid.ToolCallParser("hermes")
    assert parser.feed("The weather: <tool") == [("text", "The weather: ")]
    assert parser.feed('_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}') == []
    events = parser.feed("\n</tool_call>")
    assert [e[0] for e in events] == ["call", "arguments"]
    assert events[0][1:] == (0,) + (events[0][2], "get_time") and events[1] == ("arguments", 0, '{"zone": "CET"}')
    assert parser.finish() == []


def test_call_without_closing_tag_at_the_end_is_a_call():
    assert parse("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n') == \
        ("", [("get_time", {"zone": "CET"})])


def test_text_after_a_call_is_kept():
    assert parse("hermes", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nAnd more.') == \
        ("And more.", [("get_time", {})])


def test_plain_reply_streams_through_unchanged():
    reply = "No tools needed: 2 + 2 = 4. {braces} and <tags> stay."
    for fmt in offgrid.TOOL_FORMATS:
        assert parse(fmt, reply, range(1, len(reply))) == (reply, [])


# Grammars ####################################################################

NESTED = {"type": "function", "function": {
    "name": "book_trip", "description": "Book a trip",
    "parameters": {"type": "object", "properties": {
        "travellers": {"type": "integer", "minimum": 1, "maximum": 9},
        "legs": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["from", "to"]}},
        "class": {"enum": ["economy", "business"]},
        "note": {"type": ["string", "null"]}},
        "required": ["travellers", "legs", "class"]}}}


@pytest.mark.parametrize("fmt", offgrid.TOOL_FORMATS)
@pytest.mark.parametrize("parallel", [False, True])
def test_grammar_compiles_for_every_format(fmt, parallel):
    need("llama_cpp", "llama.cpp's grammar parser")
    from llama_cpp import LlamaGrammar
    tools = offgrid.check_tools([WEATHER, TIME, NESTED])
    for choice in [("required", None), ("function", "book_trip")]:
        gbnf = offgrid.tool_grammar(tools, choice, fmt, parallel=parallel)
        assert gbnf.startswith("root ::= ")
        LlamaGrammar.from_string(gbnf, verbose=False)
    assert offgrid.tool_grammar(tools, ("auto", None), fmt) is None
    assert offgrid.tool_grammar(tools, ("none", None), fmt) is None


def test_grammar_names_the_tool_whose_schema_it_cannot_use():
    need("llama_cpp", "llama.cpp's JSON-schema converter")
    tools = offgrid.check_tools([TIME, {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}])
    e = bad(offgrid.tool_grammar, tools, ("required", None), "hermes")
    assert e.param == "tools[1].function.parameters" and e.code == "invalid_schema"


def check_arguments(tool, arguments):
    """The arguments validate against the tool's parameters schema."""
    schema = tool["function"]["parameters"]
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema:
        jsonschema.validate(arguments, schema)
    else:  # the schemas used here: required keys present, enums kept
        assert isinstance(arguments, dict)
        for key in schema.get("required", []):
            assert key in arguments
        for key, sub in schema.get("properties", {}).items():
            if key in arguments and "enum" in sub:
                assert arguments[key] in sub["enum"]


@pytest.fixture(scope="module")
def smol_llm(smol_gguf):
    need("llama_cpp", "tool calls with the real model")
    from llama_cpp import Llama
    return Llama(model_path=smol_gguf, n_ctx=2048, n_threads=1, seed=7, verbose=False)


@pytest.fixture(scope="module")
def hermes_llm(smol_hermes_gguf):
    need("llama_cpp", "tool calls with the real model")
    from llama_cpp import Llama
    return Llama(model_path=smol_hermes_gguf, n_ctx=2048, n_threads=1, seed=7, verbose=False)


def template_of(llm):
    eos = llm.token_eos()
    return offgrid.ChatTemplate(llm.metadata["tokenizer.chat_template"],
                                eos_token=llm._model.token_get_text(eos))


def generate(llm, template, messages, tools, choice, parallel=False, max_tokens=160):
    """Render, generate greedily with the call grammar, and stream the
    pieces through a parser: (the parser's text, its calls, the raw reply)."""
    from llama_cpp import LlamaGrammar
    prompt = template.render(messages, tools, choice)
    gbnf = offgrid.tool_grammar(tools, choice, template.format, parallel=parallel)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    parser = offgrid.ToolCallParser(template.format)
    events, raw = [], ""
    for chunk in llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, stream=True,
                                       grammar=LlamaGrammar.from_string(gbnf, verbose=False)):
        piece = chunk["choices"][0]["text"]
        raw += piece
        events += parser.feed(piece)
        finish = chunk["choices"][0]["finish_reason"]
    events += parser.finish()
    assert finish == "stop", raw  # the grammar ended and the model stopped, not cut at max_tokens
    text = "".join(e[1] for e in events if e[0] == "text")
    return text, parser.calls, raw


ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.mark.model
def test_required_call_with_the_real_model_parses_and_validates(smol_llm):
    template = template_of(smol_llm)
    assert template.format == "generic"
    tools = offgrid.check_tools([WEATHER, TIME, NESTED])
    text, calls, raw = generate(smol_llm, template, ASK, tools, ("required", None))
    assert text == "" and len(calls) == 1, raw
    call_id, name, arguments = calls[0]
    assert call_id.startswith("call_")
    tool = [t for t in tools if t["function"]["name"] == name][0]
    check_arguments(tool, json.loads(arguments))


@pytest.mark.model
def test_named_function_with_the_real_model_calls_that_function(smol_llm):
    template = template_of(smol_llm)
    tools = offgrid.check_tools([WEATHER, TIME, NESTED])
    messages = [{"role": "user", "content": "Book me and my sister from Oslo to Rome, business class."}]
    text, calls, raw = generate(smol_llm, template, messages, tools, ("function", "book_trip"), max_tokens=300)
    assert [c[1] for c in calls] == ["book_trip"], raw
    check_arguments(NESTED, json.loads(calls[0][2]))


@pytest.mark.model
def test_native_hermes_template_with_the_real_model_gives_a_parsed_call(hermes_llm, smol_hermes_gguf):
    assert offgrid.read_gguf(smol_hermes_gguf)["chat_template"] == HERMES_TOOL_TEMPLATE
    template = template_of(hermes_llm)
    assert template.format == "hermes"
    tools = offgrid.check_tools([WEATHER, TIME])
    prompt = template.render(ASK, tools, ("required", None))
    assert "<tools>\n" + json.dumps(tools[0]) in prompt and "You can call functions" not in prompt
    text, calls, raw = generate(hermes_llm, template, ASK, tools, ("required", None))
    assert re.match(r"^<tool_call>\s*\{[\s\S]*\}\s*</tool_call>$", raw), raw
    assert text == "" and len(calls) == 1, raw
    tool = [t for t in tools if t["function"]["name"] == calls[0][1]][0]
    check_arguments(tool, json.loads(calls[0][2]))


@pytest.mark.model
def test_tool_result_fed_back_renders_and_the_model_answers_in_text(hermes_llm):
    """The round trip's second half: the call and its result go back in,
    and with tool_choice auto the reply is generated from them."""
    template = template_of(hermes_llm)
    tools = offgrid.check_tools([WEATHER])
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temperature\": 18, \"sky\": \"clear\"}"}]
    prompt = template.render(messages, tools, ("auto", None))
    assert prompt.endswith('<tool_response>\n{"temperature": 18, "sky": "clear"}\n</tool_response><|im_end|>\n'
                           '<|im_start|>assistant\n')
    tokens = hermes_llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    reply = hermes_llm.create_completion(tokens, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    parser = offgrid.ToolCallParser("hermes")
    events = parser.feed(reply) + parser.finish()
    assert reply.strip()
    assert parser.calls or "".join(e[1] for e in events if e[0] == "text") == reply


def test_mistral_templates_get_nine_character_call_ids():
    """Mistral's templates refuse other ids; a call and its result keep
    matching ids."""
    template = ("{# [TOOL_CALLS] #}{% for m in messages %}{% for c in m.tool_calls or [] %}"
                "{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings "
                "with length 9!') }}{% endif %}[{{ c.id }}]{% endfor %}{% if m.role == 'tool' %}"
                "({{ m.tool_call_id }}){% endif %}{% endfor %}")
    prompt = offgrid.render_chat_prompt(template, HISTORY, offgrid.check_tools([WEATHER, TIME]))
    ids = re.findall(r"\[(\w+)\]", prompt)
    assert len(ids) == 2 and all(re.match(r"^[0-9a-f]{9}$", i) for i in ids) and ids[0] != ids[1]
    assert re.findall(r"\((\w+)\)", prompt) == ids


def lazy_generate(llm, template, messages, tools, max_tokens=120):
    """tool_choice auto as the engine runs it: the model writes freely
    until a trigger of tool_grammar_triggers matches, then the call grammar
    holds. Greedy, through llama.cpp's own lazy grammar sampler."""
    import ctypes

    import llama_cpp as lc
    gbnf = offgrid.tool_grammar(tools, ("required", None), template.format)
    patterns = offgrid.tool_grammar_triggers(template.format)
    vocab = lc.llama_model_get_vocab(llm._model.model)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    grammar = lc.llama_sampler_init_grammar_lazy_patterns(
        vocab, gbnf.encode("utf-8"), b"root", (ctypes.c_char_p * len(patterns))(*[p.encode() for p in patterns]),
        len(patterns), None, 0)
    assert grammar, "llama.cpp refused the lazy grammar"
    lc.llama_sampler_chain_add(chain, grammar)
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    llm.reset()
    llm.eval(llm.tokenize(template.render(messages, tools).encode("utf-8"), add_bos=False, special=True))
    out = b""
    try:
        for _ in range(max_tokens):
            token = lc.llama_sampler_sample(chain, llm._ctx.ctx, -1)
            if lc.llama_vocab_is_eog(vocab, token):
                break
            out += llm.detokenize([token], special=True)
            llm.eval([token])
    finally:
        lc.llama_sampler_free(chain)
    return out.decode("utf-8", "replace")


@pytest.mark.model
def test_auto_lazy_grammar_is_taken_by_llama_cpp_and_leaves_text_free(hermes_llm):
    """tool_choice auto: llama.cpp takes the lazy call grammar and its
    triggers, the model writes its plain answer freely (this small model
    answers the question in text) and the reply holds no broken call."""
    tools = offgrid.check_tools([WEATHER, TIME])
    template = template_of(hermes_llm)
    reply = lazy_generate(hermes_llm, template, ASK, tools, max_tokens=40)
    parser = offgrid.ToolCallParser(template.format)
    events = parser.feed(reply) + parser.finish()
    text = "".join(e[1] for e in events if e[0] == "text")
    assert reply.strip() and "<tool_call>" not in text, reply
    for _, name, arguments in parser.calls:
        tool = [t for t in tools if t["function"]["name"] == name][0]
        check_arguments(tool, json.loads(arguments))
