"""The GGUF header reader: figures of the real starter model, round-trips of
metadata written by conftest's GGUF writer, and refusal of files that are
cut short, not GGUF at all, or of a version we do not read."""

import functools
import mmap
import os
import struct

import pytest

from offgrid import GGUFError, read_gguf
from conftest import write_gguf

STARTER_FIGURES = {
    "architecture": "gemma3",
    "quantization": "Q4_K_M",
    "parameters": 268098176,
    "context_length": 32768,
    "chat_template": None,
    "gguf_version": 3,
}


def said(error, path):
    """The error message with the file's path taken out, so that a word in
    the path (pytest puts the test name there) cannot satisfy a check."""
    message = str(error)
    assert str(path) in message, "the message names the file: %s" % message
    return message.replace(str(path), "<path>")


def copy_head(src, dst, n, data_from=None):
    """Write the first n bytes of src to dst. With data_from, only the bytes
    before that offset are copied and the rest of the n bytes is left as a
    hole (zeros): the reader never looks at tensor data, only at where it
    ends, so a cut deep in the 241 MB starter costs no big copy."""
    left = n if data_from is None else min(n, data_from)
    with open(src, "rb") as fin, open(str(dst), "wb") as fout:
        while left:
            block = fin.read(min(left, 16 << 20))
            if not block:
                break
            fout.write(block)
            left -= len(block)
        fout.truncate(n)
    return str(dst)


# The real starter model #####################################################

def test_starter_model_figures(starter_gguf):
    info = read_gguf(starter_gguf)
    for key, value in STARTER_FIGURES.items():
        assert info[key] == value, key
    assert info["tensor_count"] == 236
    assert info["metadata"]["general.architecture"] == "gemma3"
    assert info["metadata"]["general.file_type"] == 15  # llama_ftype MOSTLY_Q4_K_M
    assert info["metadata"]["gemma3.context_length"] == 32768
    # huge arrays (the token list) are not kept in the small metadata
    assert not any(isinstance(v, (list, dict)) for v in info["metadata"].values())
    assert "tokenizer.ggml.tokens" not in info["metadata"]


@functools.lru_cache(maxsize=None)
def starter_cut_points(path):
    """Byte counts that cut the starter file in each of its parts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            first_tensor = buf.find(b"token_embd.weight")  # in the first tensor description
            n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        finally:
            buf.close()
    assert first_tensor > 0 and n_tensors == 236 and n_kv == 33
    return {
        "header-after-magic": 4,
        "header-in-version": 6,
        "header-in-counts": 16,
        "header-last-byte-missing": 23,
        "metadata-first-key": 30,
        "metadata-early": 100,
        "metadata-1k": 1000,
        "metadata-token-list": 4000000,
        "tensor-info": first_tensor + 5,
        "tensor-data-start": first_tensor + 100000,
        "tensor-data-middle": size // 2,
        "tensor-data-last-byte-missing": size - 1,
    }


CUTS = ["header-after-magic", "header-in-version", "header-in-counts", "header-last-byte-missing",
        "metadata-first-key", "metadata-early", "metadata-1k", "metadata-token-list", "tensor-info",
        "tensor-data-start", "tensor-data-middle", "tensor-data-last-byte-missing"]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_starter_file_is_refused_as_truncated(starter_gguf, tmp_path, where):
    points = starter_cut_points(starter_gguf)
    n = points[where]
    # everything up to well past the tensor descriptions is copied for real
    path = copy_head(starter_gguf, tmp_path / "cut.gguf", n, data_from=points["tensor-info"] + (1 << 20))
    assert os.path.getsize(path) == n
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    assert "truncated" in said(e.value, path), "cut at byte %d (%s): %s" % (n, where, e.value)


def test_complete_copy_of_starter_header_and_data_reads(starter_gguf, tmp_path):
    # the cut test is only meaningful if the uncut file reads: a hard link
    # costs nothing and proves the reader accepts the exact full size
    link = str(tmp_path / "whole.gguf")
    try:
        os.link(starter_gguf, link)
    except OSError:
        pytest.skip("hard links are not available here")
    assert read_gguf(link)["parameters"] == STARTER_FIGURES["parameters"]


# Made files #################################################################

def test_metadata_values_round_trip(make_gguf):
    path = make_gguf(metadata={
        "general.name": "Tiny ü model",
        "general.file_type": 7,
        "llama.context_length": 4096,
        "llama.block_count": 12,
        "llama.rope.freq_base": 0.5,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "custom.big": 4000000000,
    })
    info = read_gguf(path)
    assert info["name"] == "Tiny ü model"
    assert info["architecture"] == "llama"
    assert info["quantization"] == "Q8_0"
    assert info["context_length"] == 4096
    assert info["gguf_version"] == 3
    assert info["chat_template"] is None
    meta = info["metadata"]
    assert meta["general.name"] == "Tiny ü model"
    assert meta["llama.block_count"] == 12
    assert meta["llama.rope.freq_base"] == 0.5
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["custom.big"] == 4000000000
    assert meta["general.file_type"] == 7


def test_arrays_are_skipped_and_later_keys_still_read(make_gguf):
    tokens = ["tok%d" % i for i in range(300)]  # longer than the kept limit
    path = make_gguf(metadata={
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": list(range(100)),
        "tokenizer.ggml.short": ["a", "b"],
        "after.arrays": 42,
        "after.string": "still here",
    })
    info = read_gguf(path)
    assert info["metadata"]["after.arrays"] == 42
    assert info["metadata"]["after.string"] == "still here"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.short"):
        assert key not in info["metadata"]


def test_chat_template_is_returned_but_not_kept_in_metadata(make_gguf):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    info = read_gguf(make_gguf(metadata={"tokenizer.chat_template": template}))
    assert info["chat_template"] == template
    assert "tokenizer.chat_template" not in info["metadata"]


def test_long_strings_are_left_out_of_metadata(make_gguf):
    info = read_gguf(make_gguf(metadata={"general.description": "x" * 600, "general.short": "y" * 10}))
    assert "general.description" not in info["metadata"]
    assert info["metadata"]["general.short"] == "y" * 10


def test_parameter_count_is_the_sum_of_tensor_elements(make_gguf):
    tensors = [("a", (4, 8)), ("b", (16,)), ("c", (3, 5, 7)), ("d", (1,))]
    info = read_gguf(make_gguf(tensors=tensors))
    assert info["parameters"] == 4 * 8 + 16 + 3 * 5 * 7 + 1
    assert info["tensor_count"] == 4


def test_file_without_tensors_has_zero_parameters(make_gguf):
    info = read_gguf(make_gguf(tensors=()))
    assert info["parameters"] == 0
    assert info["tensor_count"] == 0


def test_context_length_comes_from_the_architecture_key(make_gguf):
    info = read_gguf(make_gguf(metadata={"general.architecture": "qwen2", "qwen2.context_length": 8192}))
    assert info["architecture"] == "qwen2"
    assert info["context_length"] == 8192


def test_gguf_version_2_is_read(make_gguf):
    assert read_gguf(make_gguf(version=2))["gguf_version"] == 2


@pytest.mark.parametrize("version", [1, 4, 0xFFFF])
def test_unsupported_version_is_refused(make_gguf, version):
    path = make_gguf(version=version)
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    assert "version %d" % version in said(e.value, path)
    assert "not supported" in said(e.value, path)


def made_cut_points(path):
    """Byte counts that cut a made file (one tensor named unique.tensor) in
    each part."""
    with open(path, "rb") as f:
        data = f.read()
    name_at = data.find(b"unique.tensor")
    assert name_at > 0
    info_start = name_at - 8  # the name's length prefix
    return {
        "header": 20,
        "metadata-key": 24 + 4,
        "metadata-value": info_start - 3,
        "tensor-info-name": name_at + 3,
        "tensor-info-offset": info_start + 8 + len(b"unique.tensor") + 4 + 2 * 8 + 4 + 3,
        "tensor-data-first-byte": len(data) - 128,
        "tensor-data-last-byte": len(data) - 1,
    }


@pytest.mark.parametrize("where", ["header", "metadata-key", "metadata-value", "tensor-info-name",
                                   "tensor-info-offset", "tensor-data-first-byte", "tensor-data-last-byte"])
def test_truncated_made_file_is_refused_as_truncated(make_gguf, tmp_path, where):
    whole = make_gguf(tensors=[("unique.tensor", (4, 8))])  # 128 bytes of F32 data at the end
    assert read_gguf(whole)["parameters"] == 32
    n = made_cut_points(whole)[where]
    path = copy_head(whole, tmp_path / "cut.gguf", n)
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    assert "truncated" in said(e.value, path), "cut at byte %d (%s): %s" % (n, where, e.value)


def test_text_file_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("These are my notes about models, not a model at all.\n" * 10)
    with pytest.raises(GGUFError) as e:
        read_gguf(str(path))
    assert "not a GGUF" in said(e.value, path)


def test_short_text_file_is_not_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_text("hello")
    with pytest.raises(GGUFError) as e:
        read_gguf(str(path))
    assert "not a GGUF" in said(e.value, path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(GGUFError):
        read_gguf(str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(GGUFError) as e:
        read_gguf(str(tmp_path / "absent.gguf"))
    assert "cannot open" in said(e.value, tmp_path / "absent.gguf")


def test_unknown_value_type_is_refused(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"odd" + struct.pack("<I", 99)
    path = tmp_path / "odd.gguf"
    path.write_bytes(head + b"\0" * 64)
    with pytest.raises(GGUFError) as e:
        read_gguf(str(path))
    assert "unknown GGUF value type 99" in said(e.value, path)


def test_absurd_counts_are_refused_without_reading_them(tmp_path):
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 1 << 60) + b"\0" * 64)
    with pytest.raises(GGUFError):
        read_gguf(str(path))


# Quantization from the file name ############################################

def meta_without_file_type(**extra):
    meta = {"general.architecture": "llama", "general.name": "Tiny", "llama.context_length": 256}
    meta.update(extra)
    return meta


@pytest.mark.parametrize("name,quant", [
    ("foo-Q5_K_M.gguf", "Q5_K_M"),
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("model.q8_0.gguf", "Q8_0"),
    ("phi_IQ4_XS.gguf", "IQ4_XS"),
    ("tiny-f16.gguf", "F16"),
    ("tiny-BF16.gguf", "BF16"),
])
def test_quantization_falls_back_to_the_file_name(tmp_path, name, quant):
    path = write_gguf(tmp_path / name, meta_without_file_type(), [("w", (4, 8))])
    assert read_gguf(path)["quantization"] == quant


def test_quantization_from_file_type_beats_the_file_name(tmp_path):
    path = write_gguf(tmp_path / "foo-Q5_K_M.gguf", meta_without_file_type(**{"general.file_type": 2}),
                      [("w", (4, 8))])
    assert read_gguf(path)["quantization"] == "Q4_0"


def test_unknown_file_type_falls_back_to_the_file_name(tmp_path):
    path = write_gguf(tmp_path / "foo-Q6_K.gguf", meta_without_file_type(**{"general.file_type": 999}),
                      [("w", (4, 8))])
    assert read_gguf(path)["quantization"] == "Q6_K"


def test_quantization_is_none_when_neither_file_type_nor_name_says(tmp_path):
    path = write_gguf(tmp_path / "mystery-model.gguf", meta_without_file_type(), [("w", (4, 8))])
    assert read_gguf(path)["quantization"] is None
