"""Embeddings: OpenAI's /v1/embeddings driven by the official `openai`
client, Ollama's /api/embed by the `ollama` client, both on the real starter
model loaded in embedding mode (mean pooling, unit-length vectors)."""

import base64
import math
import struct

import pytest

from conftest import need

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
N_EMBD = 640  # gemma3.embedding_length of the starter model


@pytest.fixture(scope="module")
def openai_client(server):
    need("openai", "the OpenAI client tests")
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def close(a, b, tol=1e-5):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def test_openai_client_float_and_base64_give_the_same_unit_vector(openai_client):
    floats = openai_client.embeddings.create(model=MODEL, input="The sea is blue.", encoding_format="float")
    [item] = floats.data
    assert item.object == "embedding" and item.index == 0
    assert len(item.embedding) == N_EMBD
    assert abs(norm(item.embedding) - 1.0) < 1e-4
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    assert floats.model == MODEL
    b64 = openai_client.embeddings.create(model=MODEL, input="The sea is blue.", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)
    decoded = list(struct.unpack("<%df" % (len(raw) // 4), raw))
    assert close(decoded, item.embedding)
    # Without encoding_format the client asks for base64 and decodes it itself.
    default = openai_client.embeddings.create(model=MODEL, input="The sea is blue.")
    assert close(list(default.data[0].embedding), item.embedding)


def test_list_input_keeps_order_and_counts_every_token(openai_client):
    texts = ["The sea is blue.", "Stock prices fell sharply on Monday.", "The sea is blue."]
    result = openai_client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in result.data] == [0, 1, 2]
    vectors = [d.embedding for d in result.data]
    assert close(vectors[0], vectors[2], 1e-4)
    assert not close(vectors[0], vectors[1], 1e-2)
    alone = [openai_client.embeddings.create(model=MODEL, input=t, encoding_format="float") for t in texts[:2]]
    # Short inputs share one decode; other batch shapes take other kernel
    # paths, so a text's vector moves in the fourth decimal with its company.
    for single, batched in zip(alone, vectors):
        assert cosine(single.data[0].embedding, batched) > 0.999
    assert result.usage.prompt_tokens == 2 * alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens


def test_many_short_inputs_in_one_request_match_each_sent_alone(server):
    """More inputs than one decode takes (offgrid.EMBED_SEQS), of several
    lengths: batched as separate sequences, each vector stays within cosine
    0.999 of the one its text gets alone, in the order given."""
    import offgrid
    subjects = ["The sea", "A red fox", "Stock prices on Monday", "The nine o'clock train", "Rain"]
    verbs = ["is calm", "jumps over the fence near the old barn", "fell", "leaves", "is expected"]
    texts = ["%s %s (%d)." % (subjects[i % 5], verbs[i // 5 % 5], i) for i in range(offgrid.EMBED_SEQS + 6)]
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": texts, "encoding_format": "float"})
    assert status == 200 and [d["index"] for d in body["data"]] == list(range(len(texts)))
    lowest = 1.0
    for text, item in zip(texts, body["data"]):
        status, alone, _ = server.post("/v1/embeddings", {"model": MODEL, "input": text, "encoding_format": "float"})
        assert status == 200
        lowest = min(lowest, cosine(alone["data"][0]["embedding"], item["embedding"]))
    assert lowest >= 0.999, lowest
    # Different texts keep different vectors in the batch.
    assert cosine(body["data"][0]["embedding"], body["data"][1]["embedding"]) < 0.999
    print("lowest cosine, batched against alone: %.6f" % lowest)


def test_ollama_embed_matches_the_openai_vector(server, openai_client):
    need("ollama", "the Ollama client tests")
    import ollama
    client = ollama.Client(host=server.url, timeout=120)
    r = client.embed(model=MODEL, input=["The sea is blue.", "Snow is white."])
    assert len(r.embeddings) == 2 and all(len(v) == N_EMBD for v in r.embeddings)
    assert r.prompt_eval_count > 0 and r.total_duration > 0
    ref = openai_client.embeddings.create(model=MODEL, input="The sea is blue.", encoding_format="float")
    # The two inputs shared a decode; alone, a vector moves in the fourth decimal.
    assert cosine(list(r.embeddings[0]), ref.data[0].embedding) > 0.999
    single = client.embed(model=MODEL + ":latest", input="Snow is white.")
    assert cosine(list(single.embeddings[0]), list(r.embeddings[1])) > 0.999
    again = client.embed(model=MODEL, input="Snow is white.")
    assert close(list(again.embeddings[0]), list(single.embeddings[0]), 1e-6)


def test_ollama_legacy_embeddings_route_gives_the_raw_vector(server, openai_client):
    need("ollama", "the Ollama client tests")
    import ollama
    client = ollama.Client(host=server.url, timeout=120)
    r = client.embeddings(model=MODEL, prompt="The sea is blue.", keep_alive="5m", options={"temperature": 0})
    assert len(r.embedding) == N_EMBD
    # As in Ollama, this older route does not scale the vector to unit
    # length; scaled, it is the vector the other routes give.
    length = norm(r.embedding)
    assert abs(length - 1.0) > 1e-3, length
    ref = openai_client.embeddings.create(model=MODEL, input="The sea is blue.", encoding_format="float")
    assert close([x / length for x in r.embedding], ref.data[0].embedding, 1e-4)
    # No prompt only loads the model.
    assert list(client.embeddings(model=MODEL + ":latest").embedding) == []
    with pytest.raises(ollama.ResponseError) as e:
        client.embeddings(model="nosuch", prompt="x")
    assert e.value.status_code == 404
    status, body, _ = server.post("/api/embeddings", {"model": MODEL, "prompt": ["x"]})
    assert status == 400 and set(body) == {"error"} and "prompt" in body["error"], body


def test_ollama_embed_takes_dimensions_like_the_openai_route(server):
    need("ollama", "the Ollama client tests")
    import ollama
    client = ollama.Client(host=server.url, timeout=120)
    r = client.embed(model=MODEL, input="Snow is white.", dimensions=N_EMBD)
    assert len(r.embeddings[0]) == N_EMBD
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=MODEL, input="Snow is white.", dimensions=64)
    assert e.value.status_code == 400
    assert "dimensions" in e.value.error and str(N_EMBD) in e.value.error and "shorten" in e.value.error
    status, body, _ = server.post("/api/embed", {"model": MODEL, "input": "x", "dimensions": "64"})
    assert status == 400 and "dimensions" in body["error"] and "whole number" in body["error"], body


def test_refused_inputs_name_the_parameter(server):
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": [[1, 2, 3]]})
    assert status == 400 and body["error"]["param"] == "input" and "token" in body["error"]["message"]
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": ""})
    assert status == 400 and body["error"]["param"] == "input"
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 64})
    assert status == 400 and body["error"]["param"] == "dimensions" and str(N_EMBD) in body["error"]["message"]
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": N_EMBD})
    assert status == 200 and len(body["data"][0]["embedding"]) == N_EMBD
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"})
    assert status == 400 and body["error"]["param"] == "encoding_format"
    status, body, _ = server.post("/v1/embeddings", {"model": "nosuch", "input": "x"})
    assert status == 404 and body["error"]["param"] == "model"
    status, body, _ = server.post("/v1/embeddings", {"model": MODEL, "input": ["x"] * 2049})
    assert status == 400 and body["error"]["param"] == "input" and "2048" in body["error"]["message"], body


def test_input_longer_than_the_context_is_a_400_with_both_lengths(start_server, model_store):
    srv = start_server(models_dir=model_store, env={"OFFGRID_CTX": "256"})
    long_text = "word " * 400
    status, body, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": ["short", long_text]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    message = body["error"]["message"]
    assert "256" in message and "40" in message and "input[1]" in message, message
    # Ollama truncates by default, and refuses the same way with truncate false.
    status, body, _ = srv.post("/api/embed", {"model": MODEL, "input": long_text})
    assert status == 200 and body["prompt_eval_count"] == 256 and len(body["embeddings"][0]) == N_EMBD
    status, body, _ = srv.post("/api/embed", {"model": MODEL, "input": long_text, "truncate": False})
    assert status == 400 and "256" in body["error"]


def proc_status_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def test_a_40000_word_input_stays_within_the_memory_its_model_announced(start_server, model_store):
    """Gemma 3's vocabulary makes every decoded token carry 262,144 logits:
    decoded in one piece, 4,096 tokens took the server from 680 MB to 9.8 GB.
    Decoded in chunks, the peak stays within what /api/ps says the model
    takes, which is what max_loaded_bytes is checked against."""
    srv = start_server(models_dir=model_store)
    before = proc_status_kib(srv.proc.pid, "VmRSS") * 1024
    text = " ".join("word%d" % i for i in range(40000))
    status, body, _ = srv.post("/api/embed", {"model": MODEL, "input": text, "truncate": True}, timeout=600)
    assert status == 200 and body["prompt_eval_count"] == 4096 and len(body["embeddings"][0]) == N_EMBD
    peak = proc_status_kib(srv.proc.pid, "VmHWM") * 1024
    status, ps, _ = srv.get("/api/ps")
    [embed] = [m for m in ps["models"] if m["mode"] == "embed"]
    # Python's own share of one request (the text, its tokens, the reply) is
    # a few MB; the margin leaves room for the allocator.
    assert peak - before <= embed["size"] + (64 << 20), (peak - before, embed["size"])
    print("peak RSS growth %.0f MiB, announced %.0f MiB" % ((peak - before) / 2 ** 20, embed["size"] / 2 ** 20))


def test_an_embedding_model_over_the_memory_budget_is_a_503_that_says_what_it_needs(start_server, model_store):
    """Its buffers would come on top of a budget it alone exceeds: refused
    before anything loads, with the size it needs and the budget."""
    budget = 300 << 20  # less than the model's file, KV cache and decode buffers together
    srv = start_server(models_dir=model_store, env={"OFFGRID_MAX_LOADED_BYTES": str(budget)})
    status, body, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": "The sea is blue."})
    assert status == 503 and body["error"]["code"] == "insufficient_memory", body
    message = body["error"]["message"]
    assert "needs" in message and "MiB" in message and "300.0 MiB" in message and "max_loaded_bytes" in message
    status, body, _ = srv.post("/api/embed", {"model": MODEL, "input": "The sea is blue."})
    assert status == 503 and "needs" in body["error"], body
    status, ps, _ = srv.get("/api/ps")
    assert status == 200 and not [m for m in ps["models"] if m["mode"] == "embed"]
