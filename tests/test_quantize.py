"""offgrid quantize: llama.cpp's quantizer on the golden model's F16 and F32
files, the result's header, size and a check generation, the refusals, and
a SIGKILL in the middle that leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys

import pytest

import offgrid
from conftest import OFFGRID, free_env, link_or_copy, need, run_cli, wait_for

# Bits per weight a quantized golden model may take, all tensors counted:
# Q8_0 is 8.5 (the 1-D norms stay F32); Q4_K_M keeps the output matrix at
# Q6_K and half the V and FFN-down matrices at Q6_K.
BITS = {"Q8_0": (8.3, 9.2), "Q4_K_M": (4.6, 6.4)}
SOURCE_BITS = {"f16": 16, "f32": 32}


@pytest.fixture
def golden_store(tmp_path, golden_wide):
    models = tmp_path / "models"
    models.mkdir()
    for dtype, path in golden_wide.items():
        link_or_copy(path, models / ("golden-%s.gguf" % dtype))
    return str(models)


def quantize(models, home, *args):
    result = run_cli(["quantize", "--models-dir", models] + list(args) + ["--json"], home, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_quantize_golden_model_to_q8_0_and_q4_k_m(tmp_path, golden_store, dtype):
    source = offgrid.ModelStore(golden_store).get("golden-" + dtype)
    source_size = os.path.getsize(os.path.join(golden_store, source["file"]))
    for qtype in ("Q8_0", "Q4_K_M"):
        name = "golden-%s-%s" % (dtype, qtype.lower())
        manifest = quantize(golden_store, tmp_path, "golden-" + dtype, qtype, "--name", name)
        path = os.path.join(golden_store, manifest["file"])
        header = offgrid.read_gguf(path)
        assert header["metadata"]["general.file_type"] == offgrid.QUANT_TYPES[qtype][0]
        assert header["quantization"] == manifest["quantization"] == qtype
        size = os.path.getsize(path)
        assert size == manifest["size"]
        low, high = BITS[qtype]
        ratio = size / float(source_size)
        assert low / SOURCE_BITS[dtype] < ratio < high / SOURCE_BITS[dtype], (qtype, dtype, ratio)
        assert manifest["quantized_from"] == {"id": "golden-" + dtype, "sha256": offgrid.sha256_file(
            os.path.join(golden_store, source["file"])), "quantization": dtype.upper()}
        assert manifest["sha256"] == offgrid.sha256_file(path)
        # Loaded and asked before it was installed: eight greedy tokens.
        assert manifest["check"]["tokens"] == offgrid.QUANT_CHECK_TOKENS and manifest["check"]["text"]
    listed = {m["id"]: m for m in json.loads(run_cli(["list", "--json", "--models-dir", golden_store],
                                                     tmp_path).stdout)}
    assert {"golden-%s-q8_0" % dtype, "golden-%s-q4_k_m" % dtype} <= set(listed)
    assert not [n for n in os.listdir(golden_store) if n.startswith(".")], os.listdir(golden_store)


@pytest.mark.slow
@pytest.mark.model
def test_quantized_model_answers_over_http(tmp_path, golden_store, start_server):
    quantize(golden_store, tmp_path, "golden-f16", "Q4_K_M")
    srv = start_server(models_dir=golden_store, args=["--model", "golden-q4_k_m"])
    status, body, _ = srv.post("/v1/completions", {"model": "golden-q4_k_m", "prompt": "Once upon a time",
                                                   "max_tokens": 4, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["text"]


def test_quantize_lists_types_with_size_and_memory(tmp_path, golden_store):
    result = run_cli(["quantize", "golden-f16", "--models-dir", golden_store, "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    types = {t["type"]: t for t in out["types"]}
    assert set(types) == set(offgrid.QUANT_TYPES)
    assert types["Q2_K"]["size"] < types["Q4_K_M"]["size"] < types["Q8_0"]["size"] < types["F16"]["size"]
    assert all(t["ram"] > t["size"] for t in types.values())
    assert out["auto"] in offgrid.QUANT_PREFERENCE
    text = run_cli(["quantize", "golden-f16", "--models-dir", golden_store], tmp_path).stdout
    assert "Q4_K_M" in text and "RAM TO RUN" in text and "auto picks" in text


def one_error_line(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offgrid: error: "), result.stderr
    return lines[0]


def test_quantize_refusals_are_one_line(tmp_path, golden_store):
    def cli(*args):
        return run_cli(["quantize", "--models-dir", golden_store] + list(args), tmp_path)
    assert "unknown quantization type 'Q9'" in one_error_line(cli("golden-f16", "Q9"))
    assert "'nope' is not installed" in one_error_line(cli("nope", "Q8_0"))
    assert "invalid model name" in one_error_line(cli("golden-f16", "Q8_0", "--name", "Bad Name"))
    assert "golden-f32 is already installed" in one_error_line(cli("golden-f16", "Q8_0", "--name", "golden-f32"))
    names = set(os.listdir(golden_store))
    assert not [n for n in names if n.endswith(".gguf") and n.startswith("golden-") and "q8" in n]


@pytest.mark.model
def test_already_quantized_model_is_refused(tmp_path, smol_gguf):
    models = tmp_path / "models"
    models.mkdir()
    link_or_copy(smol_gguf, models / "smol.gguf")
    result = run_cli(["quantize", "smol", "Q4_K_M", "--models-dir", str(models)], tmp_path)
    assert "smol is already quantized (Q4_1" in one_error_line(result)
    assert sorted(os.listdir(str(models))) == ["smol.gguf", "smol.manifest.json"]


def test_quantize_refuses_when_the_disk_is_too_small(tmp_path, golden_wide):
    """A 40 MB filesystem (tmpfs in a user namespace) holding the 36 MB F16
    model: the Q8_0 copy (about 20 MB) does not fit, and the refusal says
    how much it needs before anything is written."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        need("__no_user_namespaces__", "a small filesystem for the disk check (unshare -rm)")
    models = tmp_path / "small"
    models.mkdir()
    script = ("mount -t tmpfs -o size=40m none {m} && cp {src} {m}/golden-f16.gguf && "
              "exec {py} {offgrid} quantize golden-f16 Q8_0 --models-dir {m}").format(
        m=models, src=golden_wide["f16"], py=sys.executable, offgrid=OFFGRID)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=free_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    line = one_error_line(result)
    assert "not enough space in %s to quantize golden-f16 to Q8_0: about" % models in line, line
    assert "MiB needed" in line and "free" in line


@pytest.mark.slow
@pytest.mark.model
def test_sigkill_mid_quantize_leaves_no_model_and_next_run_is_clean(tmp_path, golden_store):
    cmd = [sys.executable, OFFGRID, "quantize", "golden-f32", "Q4_K_M", "--models-dir", golden_store]
    proc = subprocess.Popen(cmd, env=free_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing():
        return [n for n in os.listdir(golden_store) if offgrid.QUANT_TEMP_TAG in n
                and os.path.getsize(os.path.join(golden_store, n)) > 0]
    temp = wait_for("the quantizer to write its output", writing, timeout=300, every=0.02)[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def quantizer_gone():
        # The child dies with its parent (PR_SET_PDEATHSIG).
        for pid in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if temp.encode() in f.read():
                        return False
            except (OSError, ValueError):
                continue
        return True
    wait_for("the quantizer child to die with its parent", quantizer_gone, timeout=60)
    listed = json.loads(run_cli(["list", "--json", "--models-dir", golden_store], tmp_path).stdout)
    assert "golden-q4_k_m" not in [m["id"] for m in listed]
    assert not os.path.exists(os.path.join(golden_store, "golden-q4_k_m.gguf"))
    manifest = quantize(golden_store, tmp_path, "golden-f32", "Q4_K_M")
    assert manifest["id"] == "golden-q4_k_m"
    assert not [n for n in os.listdir(golden_store) if n.startswith(".")], os.listdir(golden_store)
