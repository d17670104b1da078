"""Variants and Ollama's model-making API: `offgrid create`/`cp`, a variant's
system prompt, template and defaults in replies, /api/create, /api/copy,
/api/blobs, /api/show and /api/push with the official `ollama` client, and
a variant that travels on a stick to a second home."""

import hashlib
import json
import os
import urllib.request

import pytest

import offgrid
from conftest import SMOL, link_or_copy, need, run_cli

PIRATE = "You are a pirate named Captain Redbeard. Always say 'Arrr' and your name."
QUESTION = [{"role": "user", "content": "What is your name?"}]


def one_error_line(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offgrid: error: "), result.stderr
    return lines[0]


@pytest.fixture
def golden_models(tmp_path, golden_wide):
    models = tmp_path / "models"
    models.mkdir()
    link_or_copy(golden_wide["f16"], models / "golden.gguf")
    return str(models)


def test_create_cp_list_and_remove_from_the_cli(tmp_path, golden_models):
    def cli(*args):
        return run_cli(list(args) + ["--models-dir", golden_models], tmp_path)
    result = cli("create", "clinic", "--from", "golden", "--system", "Be brief.", "--param", "temperature=0.3",
                 "--param", "stop=END", "--param", "num_predict=20")
    assert result.returncode == 0, result.stderr
    assert "created clinic: a variant of golden (shares its file, nothing copied)" in result.stdout
    assert cli("cp", "clinic", "clinic-test").returncode == 0
    listed = {m["id"]: m for m in json.loads(cli("list", "--json").stdout)}
    assert listed["clinic"]["base"] == listed["clinic-test"]["base"] == "golden"
    assert listed["clinic"]["file"] == listed["golden"]["file"] == "golden.gguf"
    assert listed["clinic-test"]["system"] == "Be brief."
    assert listed["clinic-test"]["defaults"] == {"temperature": 0.3, "stop": ["END"], "max_tokens": 20}
    assert sorted(os.listdir(golden_models)) == ["clinic-test.manifest.json", "clinic.manifest.json",
                                                 "golden.gguf", "golden.manifest.json"]
    table = cli("list").stdout
    assert "BASE" in table and "(shared)" in table
    line = one_error_line(cli("remove", "golden", "-y"))
    assert line == "offgrid: error: not removing golden: variants use it: clinic, clinic-test (remove them first)"
    result = cli("remove", "clinic-test", "-y")
    assert result.returncode == 0 and "golden's file stays" in result.stdout
    assert os.path.isfile(os.path.join(golden_models, "golden.gguf"))
    # A variant of a variant shares the same file and starts from its settings.
    assert cli("create", "clinic-2", "--from", "clinic", "--param", "temperature=0.5").returncode == 0
    second = offgrid.ModelStore(golden_models).get("clinic-2")
    assert second["base"] == "golden" and second["system"] == "Be brief."
    assert second["defaults"]["temperature"] == 0.5 and second["defaults"]["stop"] == ["END"]


def test_create_refusals_are_one_line(tmp_path, golden_models):
    def cli(*args):
        return run_cli(["create"] + list(args) + ["--models-dir", golden_models], tmp_path)
    assert "parameter num_ctx is not one a variant can set" in one_error_line(
        cli("v", "--from", "golden", "--param", "num_ctx=4096"))
    assert "parameter temperature: must be between 0 and 2, got 7" in one_error_line(
        cli("v", "--from", "golden", "--param", "temperature=7"))
    go = tmp_path / "go.tmpl"
    go.write_text("{{ .System }} {{ .Prompt }}")
    assert "looks like a Go template" in one_error_line(cli("v", "--from", "golden", "--template", str(go)))
    broken = tmp_path / "broken.j2"
    broken.write_text("{% for m in messages %}{{ m.content }")
    assert "template does not render a short chat" in one_error_line(
        cli("v", "--from", "golden", "--template", str(broken)))
    assert "golden is an installed model with a file of its own" in one_error_line(
        cli("golden", "--from", "golden", "--system", "x"))
    assert "'nope' is not installed" in one_error_line(cli("v", "--from", "nope"))
    assert sorted(os.listdir(golden_models)) == ["golden.gguf", "golden.manifest.json"]


@pytest.mark.model
def test_variant_template_and_defaults_shape_the_request(tmp_path, golden_models, start_server):
    """On the golden model (llama-2 format): a variant's Jinja template
    makes a different prompt, its max_tokens default applies, and the
    request's own max_tokens wins over it."""
    template = tmp_path / "chat.j2"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    result = run_cli(["create", "tagged", "--from", "golden", "--template", str(template), "--param",
                      "max_tokens=3", "--param", "temperature=0", "--models-dir", golden_models], tmp_path)
    assert result.returncode == 0, result.stderr
    srv = start_server(models_dir=golden_models, args=["--model", "golden"])

    def ask(model, **extra):
        status, body, _ = srv.post("/v1/chat/completions", dict({"model": model, "messages": [
            {"role": "user", "content": "Once upon a time"}], "max_tokens": 3, "temperature": 0}, **extra))
        assert status == 200, body
        return body
    plain, tagged = ask("golden"), ask("tagged")
    assert plain["usage"]["prompt_tokens"] != tagged["usage"]["prompt_tokens"]
    status, body, _ = srv.post("/v1/chat/completions", {"model": "tagged", "messages": [
        {"role": "user", "content": "Once upon a time"}]})
    assert status == 200 and body["usage"]["completion_tokens"] <= 3, body
    short = ask("tagged", max_tokens=1)
    assert short["usage"]["completion_tokens"] == 1
    status, body, _ = srv.get("/v1/models")
    cards = {m["id"]: m for m in body["data"]}
    assert cards["tagged"]["base"] == "golden" and cards["golden"]["base"] is None


@pytest.mark.slow
@pytest.mark.model
def test_ollama_client_creates_copies_uploads_and_shows(tmp_path, smol_gguf, golden_wide, start_server):
    need("ollama", "the official Ollama client")
    import ollama
    models = tmp_path / "models"
    models.mkdir()
    link_or_copy(smol_gguf, models / (SMOL["id"] + ".gguf"))
    srv = start_server(models_dir=str(models), args=["--model", SMOL["id"]])
    client = ollama.Client(host=srv.url)
    greedy = {"temperature": 0, "num_predict": 16}

    plain = client.chat(model=SMOL["id"], messages=QUESTION, options=greedy).message.content
    assert "Redbeard" not in plain
    client.create(model="pirate", from_=SMOL["id"], system=PIRATE, parameters=greedy)
    reply = client.chat(model="pirate", messages=QUESTION)
    assert "Redbeard" in reply.message.content, reply.message.content
    assert reply.eval_count <= 16
    # The request's own values win over the variant's defaults.
    short = client.chat(model="pirate", messages=QUESTION, options={"num_predict": 2})
    assert short.eval_count == 2 and short.done_reason == "length"

    assert client.copy("pirate", "pirate-copy").status == "success"
    for name in ("pirate", "pirate-copy"):
        shown = client.show(name)
        assert 'SYSTEM """%s"""' % PIRATE in shown.modelfile and "FROM %s:latest" % SMOL["id"] in shown.modelfile
        assert "temperature" in shown.parameters and "num_predict" in shown.parameters
        assert shown.details.parent_model == SMOL["id"]
        status, raw, _ = srv.post("/api/show", {"model": name})
        assert status == 200 and raw["system"] == PIRATE and "<|im_start|>" in raw["template"]
    assert client.show(SMOL["id"]).details.parent_model == ""

    # A GGUF uploaded by digest, then a model made from it.
    digest = "sha256:" + offgrid.sha256_file(golden_wide["f16"])
    head = urllib.request.Request(srv.url + "/api/blobs/" + digest, method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(head)
    assert missing.value.code == 404
    assert client.create_blob(golden_wide["f16"]) == digest
    assert urllib.request.urlopen(head).status == 200
    progress = [p.status for p in client.create(model="golden", files={"golden-f16.gguf": digest}, stream=True)]
    assert progress[-1] == "success" and progress[0].startswith("creating new layer")
    golden = client.show("golden")
    assert golden.details.quantization_level == "F16" and golden.details.parent_model == ""
    assert os.path.getsize(str(models / "golden.gguf")) == os.path.getsize(golden_wide["f16"])
    # Quantized on the way, as `ollama create -q` asks.
    steps = list(client.create(model="golden-small", from_="golden", quantize="q8_0", stream=True))
    assert any(s.status == "quantizing F16 model to Q8_0" and s.total for s in steps)
    assert steps[-1].status == "success"
    assert client.show("golden-small").details.quantization_level == "Q8_0"

    with pytest.raises(ollama.ResponseError) as wrong:
        client.create(model="bad", from_=SMOL["id"], template="{{ .System }}{{ .Prompt }}")
    assert wrong.value.status_code == 400 and "Go template" in str(wrong.value)
    with pytest.raises(ollama.ResponseError) as push:
        client.push("pirate")
    assert push.value.status_code == 400 and "export" in str(push.value) and "peers" in str(push.value)
    with pytest.raises(ollama.ResponseError) as in_use:
        client.delete(SMOL["id"])
    assert in_use.value.status_code == 409 and "pirate, pirate-copy" in str(in_use.value)
    tags = {m.model: m for m in client.list().models}
    assert tags["pirate:latest"].details.parent_model == SMOL["id"]


def test_blob_upload_is_verified(tmp_path, start_server, make_gguf):
    srv = start_server(models_dir=str(tmp_path / "models"), wait_model=False)
    path = make_gguf("tiny.gguf")
    with open(path, "rb") as f:
        data = f.read()
    right = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + "0" * 64
    status, body, _ = srv.request("POST", "/api/blobs/" + wrong, data)
    assert status == 400 and "nothing was kept" in body["error"], body
    status, body, _ = srv.request("POST", "/api/blobs/sha256:xyz", data)
    assert status == 400 and "sha256:<64 hex digits>" in body["error"]
    not_gguf = b"hello"
    status, body, _ = srv.request("POST", "/api/blobs/sha256:" + hashlib.sha256(not_gguf).hexdigest(),
                                  not_gguf)
    assert status == 400 and "not a whole GGUF" in body["error"], body
    blobs = tmp_path / "models" / ".blobs"
    assert not os.path.isdir(str(blobs)) or os.listdir(str(blobs)) == []
    assert srv.request("POST", "/api/blobs/" + right, data)[0] == 201
    assert srv.request("POST", "/api/blobs/" + right, data)[0] == 200  # already here
    assert os.listdir(str(blobs)) == ["sha256-" + right[7:]]
    status, body, _ = srv.post("/api/create", {"model": "x", "files": {"x.gguf": wrong}})
    assert status == 400 and "was not uploaded" in body["error"]


@pytest.mark.model
def test_variant_survives_export_and_import_onto_a_second_home(tmp_path, golden_models):
    first = ["--models-dir", golden_models]
    assert run_cli(["create", "clinic", "--from", "golden", "--system", "Be brief.", "--param",
                    "temperature=0.2"] + first, tmp_path).returncode == 0
    stick = tmp_path / "stick"
    stick.mkdir()
    result = run_cli(["export", "clinic", str(stick)] + first, tmp_path)
    assert result.returncode == 0, result.stderr
    on_stick = json.loads((stick / "offgrid" / "manifest.json").read_text())
    assert [m["id"] for m in on_stick["models"]] == ["golden"]
    [variant] = on_stick["variants"]
    assert variant["id"] == "clinic" and variant["base_sha256"] == on_stick["models"][0]["sha256"]
    second = tmp_path / "second"
    second.mkdir()
    (tmp_path / "home2").mkdir()
    result = run_cli(["import", str(stick / "offgrid"), "--models-dir", str(second)], tmp_path / "home2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 imported, 0 skipped, 0 failed" in result.stdout
    store = offgrid.ModelStore(str(second))
    clinic = store.get("clinic")
    assert clinic["base"] == "golden" and clinic["system"] == "Be brief."
    assert clinic["defaults"] == {"temperature": 0.2}
    assert clinic["sha256"] == store.get("golden")["sha256"] == variant["base_sha256"]
    again = run_cli(["import", str(stick / "offgrid"), "--models-dir", str(second)], tmp_path / "home2")
    assert "0 imported, 2 skipped, 0 failed" in again.stdout
