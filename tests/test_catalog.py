"""The catalog: the built-in list of real GGUF files, what fits this machine,
local catalog.json overrides with one-line errors, and GET /v1/catalog."""

import json
import os
import re
import shutil

import pytest

import offgrid
from conftest import run_cli

HF_PREFIX = "https://huggingface.co/"
PB = 1024 ** 5


def catalog(home, *args):
    r = run_cli(["catalog"] + list(args), home)
    return r


def catalog_json(home, *args):
    r = catalog(home, "--json", *args)
    assert r.returncode == 0, r.stderr
    return {e["id"]: e for e in json.loads(r.stdout)}


def write_catalog(home, data):
    os.makedirs(str(home), exist_ok=True)
    with open(os.path.join(str(home), "catalog.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def local_entry(**fields):
    entry = {"id": "local-model-q4_k_m", "file": "local.Q4_K_M.gguf", "url": "http://127.0.0.1:9/local.Q4_K_M.gguf",
             "size": 1000, "sha256": "ab" * 32}
    entry.update(fields)
    return entry


# The built-in list ###########################################################

def test_builtin_catalog_has_the_promised_families_with_exact_sizes_and_hashes():
    entries = offgrid.Catalog.load("/nonexistent").entries
    assert 20 <= len(entries) <= 26
    families = {e["family"] for e in entries.values()}
    for family in ("tinyllama-1.1b-chat", "llama-2-7b-chat", "mistral-7b-instruct-v0.2", "phi-2",
                   "qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "gemma-3-1b-it", "smollm2-135m-instruct",
                   "phi-3.5-mini-instruct", "nomic-embed-text-v1.5", "bge-small-en-v1.5"):
        assert family in families, family
    for entry in entries.values():
        offgrid.validate_catalog_entry(entry, entry["id"])
        assert isinstance(entry["size"], int) and entry["size"] > 1000000
        assert re.match(r"^[0-9a-f]{64}$", entry["sha256"])
        assert entry["license"] and entry["parameters"] and entry["quantization"] and entry["min_ram_gb"]
        # The only hosts written into the code are the catalog's Hugging Face URLs.
        if entry["url"]:
            assert entry["url"] == HF_PREFIX + entry["hf_repo"] + "/resolve/main/" + entry["file"]
        assert entry["chat_format"] == ("gemma" if entry["family"].startswith("gemma") else None)
        assert entry["embedding"] == (entry["family"] in ("nomic-embed-text-v1.5", "bge-small-en-v1.5"))
    # Per family: one or two quantizations, never the same file twice.
    per_family = {}
    for entry in entries.values():
        per_family.setdefault(entry["family"], []).append(entry["quantization"])
    assert all(1 <= len(q) <= 2 for q in per_family.values()), per_family
    files = [e["file"] for e in entries.values()]
    assert len(files) == len(set(files))


@pytest.mark.parametrize("packaged", offgrid.PACKAGED_MODELS, ids=lambda m: m["id"])
def test_packaged_models_are_in_the_catalog_with_their_package(packaged):
    entry = offgrid.Catalog.load("/nonexistent").get(packaged["id"])
    assert entry["package"] == packaged["package"] and entry["file"] == packaged["file"]
    assert entry["sha256"] == packaged["sha256"] and entry["url"] is None
    files = offgrid.packaged_files(packaged)
    if files:
        assert entry["size"] == sum(os.path.getsize(f) for f in files)


def test_starter_is_the_instruction_tuned_smollm2():
    entry = offgrid.Catalog.load("/nonexistent").get(offgrid.STARTER["id"])
    assert entry["family"] == "smollm2-135m-instruct" and entry["quantization"] == "Q4_1"
    assert entry["license"] == "Apache-2.0" and entry["chat_format"] is None  # its own chatml template
    assert entry["size"] == 98362432


def test_lookup_by_id_family_and_quant():
    cat = offgrid.Catalog.load("/nonexistent")
    assert cat.get("tinyllama-1.1b-chat-q5_k_m")["quantization"] == "Q5_K_M"
    assert cat.get("tinyllama-1.1b-chat")["quantization"] == "Q4_K_M"  # the family's first
    assert cat.get("tinyllama-1.1b-chat", "q5_k_m")["id"] == "tinyllama-1.1b-chat-q5_k_m"
    assert cat.get("tinyllama-1.1b-chat-q4_k_m", "Q5_K_M")["id"] == "tinyllama-1.1b-chat-q5_k_m"
    with pytest.raises(offgrid.NotInCatalog, match="has no Q8_0 .*Q4_K_M, Q5_K_M"):
        cat.get("tinyllama-1.1b-chat", "Q8_0")
    with pytest.raises(offgrid.NotInCatalog, match="not in the catalog"):
        cat.get("gpt-5")


# What fits ###################################################################

def test_fits_reads_ram_and_disk():
    entry = {"size": 4 * 1024 ** 3, "min_ram_gb": 8}
    roomy = {"ram_available": 16 * 1024 ** 3, "disk_free": 100 * 1024 ** 3}
    assert offgrid.Catalog.fits(entry, roomy) == []
    reasons = offgrid.Catalog.fits(entry, {"ram_available": 2 * 1024 ** 3, "disk_free": 1024 ** 3})
    assert reasons == ["needs 8.0 GiB RAM, 2.0 GiB available", "needs 4.0 GiB disk, 1.0 GiB free"]
    # An installed model needs no more disk.
    assert offgrid.Catalog.fits(entry, {"ram_available": 16 * 1024 ** 3, "disk_free": 0}, installed=True) == []


def test_catalog_fits_lists_only_what_runs_here(tmp_path):
    write_catalog(tmp_path, {"models": [
        local_entry(id="small-q4_k_m", min_ram_gb=0.001),
        local_entry(id="huge-ram-q4_k_m", file="huge-ram.gguf", min_ram_gb=10 ** 6),
        local_entry(id="huge-disk-q4_k_m", file="huge-disk.gguf", size=PB, min_ram_gb=0.001),
    ]})
    everything = catalog_json(tmp_path)
    assert everything["small-q4_k_m"]["fits"] is True and everything["small-q4_k_m"]["why_not"] is None
    assert everything["huge-ram-q4_k_m"]["fits"] is False
    assert "RAM" in everything["huge-ram-q4_k_m"]["why_not"]
    assert everything["huge-disk-q4_k_m"]["fits"] is False
    assert "disk" in everything["huge-disk-q4_k_m"]["why_not"]
    fitting = catalog_json(tmp_path, "--fits")
    assert "small-q4_k_m" in fitting
    assert "huge-ram-q4_k_m" not in fitting and "huge-disk-q4_k_m" not in fitting
    assert all(e["fits"] for e in fitting.values())
    assert set(fitting) < set(everything)
    r = catalog(tmp_path, "--fits")
    assert r.returncode == 0, r.stderr
    assert "small-q4_k_m" in r.stdout and "huge-ram-q4_k_m" not in r.stdout
    r = catalog(tmp_path)
    line = [l for l in r.stdout.splitlines() if l.startswith("huge-disk-q4_k_m")][0]
    assert "no: needs 1024.0 TiB disk" in line
    assert r.stdout.splitlines()[0].split() == ["ID", "KIND", "PARAMS", "QUANT", "SIZE", "MIN", "RAM",
                                                "LICENSE", "FITS", "HERE"]
    assert "RAM available" in r.stdout


def test_catalog_marks_installed_models(tmp_path, make_gguf):
    path = make_gguf("mine.gguf")
    sha = offgrid.sha256_file(path)
    write_catalog(tmp_path, {"models": [local_entry(id="mine", file="mine.gguf", size=os.path.getsize(path),
                                                    sha256=sha, min_ram_gb=0.001)]})
    assert catalog_json(tmp_path)["mine"]["installed"] is False
    store = offgrid.ModelStore(os.path.join(str(tmp_path), "models"))
    store.install([path], "mine", "test", expected_sha256=sha)
    assert catalog_json(tmp_path)["mine"]["installed"] is True
    line = [l for l in catalog(tmp_path).stdout.splitlines() if l.startswith("mine ")][0]
    assert line.rstrip().endswith("installed")


# Local catalog.json ##########################################################

def test_local_catalog_adds_and_overrides_by_id(tmp_path):
    lan = "http://192.168.1.10:8000/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"
    write_catalog(tmp_path, """
        // the ship's file server
        {"models": [
          {"id": "tinyllama-1.1b-chat-q4_k_m", "url": "%s"},
          {"id": "my-model", "file": "my-model.Q5_K_M.gguf", "size": 1234, "sha256": "%s",
           "license": "MIT", "chat_format": "chatml"}
        ]}""" % (lan, "CD" * 32))
    entries = catalog_json(tmp_path)
    tiny = entries["tinyllama-1.1b-chat-q4_k_m"]
    builtin = offgrid.Catalog.load("/nonexistent").get("tinyllama-1.1b-chat-q4_k_m")
    assert tiny["url"] == lan
    assert {k: v for k, v in tiny.items() if k not in ("url", "installed", "fits", "why_not")} == {
        k: v for k, v in builtin.items() if k != "url"}
    mine = entries["my-model"]
    assert mine["family"] == "my-model" and mine["quantization"] == "Q5_K_M"
    assert mine["sha256"] == "cd" * 32 and mine["url"] is None
    assert len(entries) == len(offgrid.Catalog.load("/nonexistent").entries) + 1


@pytest.mark.parametrize("models, fragment", [
    ([local_entry(sha256="xyz")], "sha256 must be 64 hex digits"),
    ([local_entry(size="big")], "size must be a whole number of bytes"),
    ([local_entry(size=True)], "size must be a whole number of bytes"),
    ([local_entry(size=0)], "size must be a positive number"),
    ([local_entry(url="ftp://host/x.gguf")], "url must be an http:// or https:// URL"),
    ([local_entry(colour="red")], "unknown field 'colour'"),
    ([local_entry(id="Bad Id")], "id 'Bad Id' must be lowercase"),
    ([local_entry(chat_format="klingon")], "chat_format 'klingon' is not one of"),
    ([{"id": "new-model", "file": "x.gguf"}], "size is required"),
    ([local_entry(file="../escape.gguf")], "not a plain file name"),
    ([local_entry(file="/etc/passwd.gguf")], "not a plain file name"),
    ([local_entry(file="dir/x.gguf")], "not a plain file name"),
    ([local_entry(file="model.bin")], "must end in .gguf"),
    (["just a string"], 'must be an object with an "id"'),
])
def test_bad_local_catalog_is_one_line_error_naming_the_entry(tmp_path, models, fragment):
    write_catalog(tmp_path, {"models": models})
    r = catalog(tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offgrid: error: "), r.stderr
    assert os.path.join(str(tmp_path), "catalog.json") + ": models[0]" in lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid json"),
    ('{"entries": []}', 'must hold {"models": ['),
    ('[1, 2]', "must hold a table"),
])
def test_malformed_local_catalog_file_is_one_line_error(tmp_path, text, fragment):
    write_catalog(tmp_path, text)
    r = catalog(tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr


def test_download_of_escaping_file_name_from_override_is_refused(tmp_path):
    write_catalog(tmp_path, {"models": [{"id": "smollm2-135m-instruct-q4_k_m", "file": "../../x.gguf"}]})
    r = run_cli(["download", "smollm2-135m-instruct-q4_k_m"], tmp_path)
    assert r.returncode == 2
    assert "not a plain file name" in r.stderr and r.stderr.count("\n") == 1
    assert not os.path.exists(os.path.join(str(tmp_path), "models"))


# Over HTTP ###################################################################

def test_catalog_over_http(tmp_path, make_gguf, start_server):
    write_catalog(tmp_path / "home", {"models": [
        local_entry(id="small-q4_k_m", min_ram_gb=0.001),
        local_entry(id="huge-ram-q4_k_m", file="huge.gguf", min_ram_gb=10 ** 6),
    ]})
    models = tmp_path / "home" / "models"
    models.mkdir()
    shutil.copy(make_gguf("tiny.gguf"), str(models))
    srv = start_server(home=tmp_path / "home", wait_model=False)
    status, body, _ = srv.get("/v1/catalog")
    assert status == 200 and body["object"] == "list"
    ids = [e["id"] for e in body["data"]]
    assert "tinyllama-1.1b-chat-q4_k_m" in ids and "small-q4_k_m" in ids and "huge-ram-q4_k_m" in ids
    assert body["ram_available"] > 0 and body["disk_free"] > 0
    status, fitting, _ = srv.get("/v1/catalog?fits=true")
    assert status == 200
    fit_ids = [e["id"] for e in fitting["data"]]
    assert "small-q4_k_m" in fit_ids and "huge-ram-q4_k_m" not in fit_ids
    # A broken catalog.json is an error in the API's shape, not a crash.
    write_catalog(tmp_path / "home", {"models": [local_entry(sha256="nope")]})
    status, body, _ = srv.get("/v1/catalog")
    assert status == 500 and body["error"]["code"] == "invalid_catalog"
    assert "sha256 must be 64 hex digits" in body["error"]["message"]
