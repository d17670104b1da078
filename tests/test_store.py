"""The model store: verified atomic installs with manifests, adoption of
loose .gguf files, refusal of manifests pointing outside the folder, cleanup
of crash leftovers, and the chat format chosen per model.

The 241 MB starter model is installed once per session (conftest's
`model_store`); everything that writes uses small GGUF files instead."""

import hashlib
import json
import os

import pytest

import offgrid
from offgrid import ModelStore, StoreError

STARTER_ID = offgrid.GEMMA["id"]


def sha256_of(path):
    return hashlib.sha256(open(str(path), "rb").read()).hexdigest()


def store_files(root):
    return sorted(os.listdir(str(root))) if os.path.isdir(str(root)) else []


def read_manifest(root, model_id):
    with open(os.path.join(str(root), model_id + offgrid.MANIFEST_SUFFIX)) as f:
        return json.load(f)


# Installing #################################################################

def test_install_from_starter_chunks_writes_verified_file_and_manifest(model_store):
    # model_store was filled by install_starter(), i.e. install() over the
    # starter package's chunk files with the expected sha256.
    chunks = offgrid.packaged_files(offgrid.GEMMA)
    assert chunks and len(chunks) == 4
    assert sorted(os.listdir(model_store)) == [offgrid.GEMMA["file"], STARTER_ID + offgrid.MANIFEST_SUFFIX]
    gguf = os.path.join(model_store, offgrid.GEMMA["file"])
    size = os.path.getsize(gguf)
    assert size == sum(os.path.getsize(c) for c in chunks)
    manifest = read_manifest(model_store, STARTER_ID)
    assert manifest["id"] == STARTER_ID
    assert manifest["file"] == offgrid.GEMMA["file"]
    assert manifest["size"] == size
    assert manifest["sha256"] == offgrid.GEMMA["sha256"]
    assert offgrid.sha256_file(gguf) == offgrid.GEMMA["sha256"]
    assert manifest["source"] == "pypi:" + offgrid.GEMMA["package"]
    assert manifest["chat_format"] == "gemma"
    assert manifest["architecture"] == "gemma3"
    assert manifest["parameters"] == 268098176
    assert manifest["quantization"] == "Q4_K_M"
    assert manifest["context_length"] == 32768
    assert manifest["has_chat_template"] is False
    assert manifest["added"].endswith("Z") and len(manifest["added"]) == len("2025-01-01T00:00:00Z")
    assert ModelStore(model_store).models() == [manifest]


def test_install_small_file_writes_manifest_and_returns_it(make_gguf, tmp_path):
    src = make_gguf("src.gguf", tensors=[("w", (8, 8))])
    root = tmp_path / "store"
    manifest = ModelStore(str(root)).install([src], "tiny-model", "test:src", expected_sha256=sha256_of(src).upper())
    assert store_files(root) == ["tiny-model.gguf", "tiny-model.manifest.json"]
    assert open(str(root / "tiny-model.gguf"), "rb").read() == open(src, "rb").read()
    assert read_manifest(root, "tiny-model") == manifest
    assert manifest["id"] == "tiny-model"
    assert manifest["file"] == "tiny-model.gguf"
    assert manifest["size"] == os.path.getsize(src)
    assert manifest["sha256"] == sha256_of(src)
    assert manifest["source"] == "test:src"
    assert manifest["parameters"] == 64
    assert manifest["chat_format"] == "llama-2"  # llama without a template


def test_install_concatenates_chunks_in_order(make_gguf, tmp_path):
    src = make_gguf("whole.gguf", tensors=[("w", (16, 16))])
    data = open(src, "rb").read()
    parts = []
    for i, (a, b) in enumerate([(0, 10), (10, 300), (300, len(data))]):
        part = tmp_path / ("whole.gguf.part%02d" % i)
        part.write_bytes(data[a:b])
        parts.append(str(part))
    root = tmp_path / "store"
    manifest = ModelStore(str(root)).install(parts, "joined", "test", expected_sha256=hashlib.sha256(data).hexdigest(),
                                             expected_size=len(data))
    assert open(str(root / "joined.gguf"), "rb").read() == data
    assert manifest["size"] == len(data)


def test_install_with_wrong_sha256_leaves_nothing(make_gguf, tmp_path):
    src = make_gguf("src.gguf")
    root = tmp_path / "store"
    store = ModelStore(str(root))
    with pytest.raises(StoreError) as e:
        store.install([src], "bad-hash", "test", expected_sha256="0" * 64)
    assert "sha256 mismatch" in str(e.value)
    assert "bad-hash" in str(e.value)
    assert store_files(root) == []  # no .gguf, no manifest, no temporary file
    assert store.models() == []


def test_install_of_a_non_gguf_file_leaves_nothing(tmp_path):
    src = tmp_path / "readme.gguf"
    src.write_text("not a model\n" * 20)
    root = tmp_path / "store"
    with pytest.raises(offgrid.GGUFError):
        ModelStore(str(root)).install([str(src)], "readme", "test")
    assert store_files(root) == []


def test_install_with_wrong_size_is_refused_before_writing(make_gguf, tmp_path):
    src = make_gguf("src.gguf")
    root = tmp_path / "store"
    with pytest.raises(StoreError) as e:
        ModelStore(str(root)).install([src], "sized", "test", expected_size=os.path.getsize(src) + 1)
    assert "expected %d" % (os.path.getsize(src) + 1) in str(e.value)
    assert store_files(root) == []


@pytest.mark.parametrize("model_id", ["../escape", "Upper", "", "a/b", ".hidden", "x" * 129])
def test_install_refuses_invalid_model_ids(make_gguf, tmp_path, model_id):
    src = make_gguf("src.gguf")
    with pytest.raises(StoreError) as e:
        ModelStore(str(tmp_path / "store")).install([src], model_id, "test")
    assert "invalid model id" in str(e.value)
    assert not os.path.exists(str(tmp_path / "escape.gguf"))
    assert store_files(tmp_path / "store") == []


def test_install_replaces_an_installed_model_atomically(make_gguf, tmp_path):
    root = tmp_path / "store"
    store = ModelStore(str(root))
    store.install([make_gguf("a.gguf", tensors=[("w", (4,))])], "m", "first")
    second = store.install([make_gguf("b.gguf", tensors=[("w", (4, 4))])], "m", "second")
    assert store_files(root) == ["m.gguf", "m.manifest.json"]
    assert store.get("m") == second
    assert second["parameters"] == 16


# Listing and adoption #######################################################

def test_models_adopts_a_loose_gguf_file(make_gguf, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    made = make_gguf("x.gguf", metadata={"general.architecture": "qwen2", "qwen2.context_length": 2048},
                     tensors=[("w", (4, 8))])
    os.rename(made, str(root / "My Model Q8_0.gguf"))
    models = ModelStore(str(root)).models()
    assert len(models) == 1
    manifest = models[0]
    assert manifest["id"] == "my-model-q8_0"
    assert manifest["file"] == "My Model Q8_0.gguf"
    assert manifest["sha256"] is None
    assert manifest["source"] == "found in models_dir"
    assert manifest["architecture"] == "qwen2"
    assert manifest["context_length"] == 2048
    assert manifest["chat_format"] == "chatml"
    assert manifest["size"] == os.path.getsize(str(root / "My Model Q8_0.gguf"))
    # the adoption is remembered in a manifest
    assert read_manifest(root, "my-model-q8_0") == manifest
    assert ModelStore(str(root)).models() == [manifest]
    assert ModelStore(str(root)).get("My Model Q8_0.gguf") == manifest


def test_adopting_a_loose_file_never_overwrites_an_installed_models_manifest(make_gguf, tmp_path):
    # "Foo.gguf" dropped by hand makes the same id as the installed "foo"
    root = tmp_path / "store"
    store = ModelStore(str(root))
    src = make_gguf("src.gguf")
    installed = store.install([src], "foo", "test:verified", expected_sha256=sha256_of(src))
    loose = make_gguf("loose.gguf", tensors=[("w", (2, 2))])
    os.rename(loose, str(root / "Foo.gguf"))
    for _ in range(3):  # listing twice more must not flip anything either
        models = store.models()
        ids = [m["id"] for m in models]
        assert len(ids) == len(set(ids)), "two models share an id: %s" % models
        assert sorted(m["file"] for m in models) == ["Foo.gguf", "foo.gguf"]
        assert read_manifest(root, "foo") == installed, "the installed model's manifest was overwritten"
        assert store.get("foo") == installed


def test_models_adopts_the_real_starter_file_dropped_in(starter_gguf, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    try:
        os.link(starter_gguf, str(root / "gemma.gguf"))  # no 241 MB copy
    except OSError:
        pytest.skip("hard links are not available here")
    [manifest] = ModelStore(str(root)).models()
    assert manifest["id"] == "gemma"
    assert manifest["sha256"] is None
    assert manifest["architecture"] == "gemma3"
    assert manifest["chat_format"] == "gemma"
    assert manifest["parameters"] == 268098176


def test_models_skips_a_non_gguf_file_named_gguf(make_gguf, tmp_path, capfd):
    root = tmp_path / "store"
    root.mkdir()
    (root / "x.gguf").write_text("this is not a model, just a text file with a .gguf name\n")
    (root / "empty.gguf").write_bytes(b"")
    os.rename(make_gguf("real.gguf"), str(root / "real.gguf"))
    models = ModelStore(str(root)).models()
    assert [m["id"] for m in models] == ["real"]
    assert not os.path.exists(str(root / ("x" + offgrid.MANIFEST_SUFFIX)))
    assert not os.path.exists(str(root / ("empty" + offgrid.MANIFEST_SUFFIX)))
    assert "skipping file in models_dir" in capfd.readouterr().err


def test_models_ignores_hidden_and_other_files(make_gguf, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    os.rename(make_gguf("a.gguf"), str(root / ".partial.gguf"))
    (root / "notes.txt").write_text("hello")
    (root / "model.gguf.part").write_bytes(b"GGUF")
    assert ModelStore(str(root)).models() == []


def test_models_of_a_missing_folder_is_empty(tmp_path):
    assert ModelStore(str(tmp_path / "nowhere")).models() == []
    assert not os.path.exists(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("bad_file", ["../outside.gguf", "sub/../../outside.gguf", "ABSOLUTE"])
def test_manifest_pointing_outside_the_folder_is_ignored(make_gguf, tmp_path, bad_file):
    root = tmp_path / "store"
    root.mkdir()
    outside = make_gguf("outside.gguf")  # a real GGUF next to the store, in tmp_path
    assert os.path.dirname(outside) == str(tmp_path)
    if bad_file == "ABSOLUTE":
        bad_file = outside
    manifest = {"id": "evil", "file": bad_file, "size": 1, "sha256": None, "source": "test"}
    (root / ("evil" + offgrid.MANIFEST_SUFFIX)).write_text(json.dumps(manifest))
    store = ModelStore(str(root))
    assert store.models() == []
    assert store.get("evil") is None


def test_broken_manifests_are_ignored_and_the_file_is_adopted(make_gguf, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    os.rename(make_gguf("m.gguf"), str(root / "m.gguf"))
    (root / ("m" + offgrid.MANIFEST_SUFFIX)).write_text("{not json")
    (root / ("n" + offgrid.MANIFEST_SUFFIX)).write_text(json.dumps(["a list"]))
    (root / ("o" + offgrid.MANIFEST_SUFFIX)).write_text(json.dumps({"id": "o", "file": "gone.gguf"}))
    models = ModelStore(str(root)).models()
    assert [m["id"] for m in models] == ["m"]
    assert models[0]["source"] == "found in models_dir"


def test_models_are_sorted_by_id(make_gguf, tmp_path):
    root = tmp_path / "store"
    store = ModelStore(str(root))
    for model_id in ("zeta", "alpha", "mid"):
        store.install([make_gguf(model_id + ".gguf")], model_id, "test")
    assert [m["id"] for m in store.models()] == ["alpha", "mid", "zeta"]


# Copying and hashing ########################################################

@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks, hash lag, handed-over bytes and writeback steps of some KiB,
    so that a file of a few MiB goes through each of them many times."""
    monkeypatch.setattr(offgrid, "COPY_BLOCK", 64 * 1024)
    monkeypatch.setattr(offgrid, "HASH_LAG", 256 * 1024)
    monkeypatch.setattr(offgrid, "HANDED_MAX", 96 * 1024)
    monkeypatch.setattr(offgrid, "WRITEBACK_STEP", 128 * 1024)


def random_file(path, size):
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", None])
def test_transfer_file_copies_and_hashes_the_whole_file_whichever_way_it_copies(tmp_path, small_blocks, way):
    # None: through a buffer, as where the kernel refuses (another file system, another platform).
    data = random_file(tmp_path / "src", 3 * 1024 * 1024 + 12345)
    kept = 100000
    (tmp_path / "dst").write_bytes(data[:kept] + b"junk past what is kept")
    sizes = []
    with offgrid.TransferFile(str(tmp_path / "dst"), keep=kept) as out:
        out._kernel_copy = way
        copied = out.copy_from(str(tmp_path / "src"), kept, sizes.append)
        sha = out.finish()
    assert copied == len(data) - kept and out.size == len(data)
    assert (tmp_path / "dst").read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest() == offgrid.sha256_file(str(tmp_path / "dst"))
    assert sizes == sorted(sizes) and sizes[-1] == len(data) and len(sizes) > 10


@pytest.mark.parametrize("rest", ["copied", "written"])
def test_transfer_file_hashes_the_bytes_it_keeps(tmp_path, small_blocks, rest):
    # A resumed transfer: the hash covers the kept bytes as they are on
    # disk, so a byte that went bad in them fails the whole file's sha256.
    data = random_file(tmp_path / "src", 2 * 1024 * 1024)
    kept = bytearray(data[:1024 * 1024])
    kept[500000] ^= 0x01
    (tmp_path / "part").write_bytes(bytes(kept))
    with offgrid.TransferFile(str(tmp_path / "part"), keep=len(kept)) as out:
        if rest == "copied":
            out.copy_from(str(tmp_path / "src"), len(kept))
        else:  # as a download writes what arrives
            for i in range(len(kept), len(data), 50000):
                out.write(data[i:i + 50000])
        sha = out.finish()
    assert sha != hashlib.sha256(data).hexdigest()
    assert sha == hashlib.sha256(bytes(kept) + data[len(kept):]).hexdigest()


def test_transfer_file_restart_forgets_what_was_written(tmp_path, small_blocks):
    data = os.urandom(700000)
    (tmp_path / "part").write_bytes(b"")
    with offgrid.TransferFile(str(tmp_path / "part")) as out:
        for _ in range(10):
            out.write(os.urandom(100000))
        out.restart()
        for i in range(0, len(data), 30000):
            out.write(data[i:i + 30000])
        sha = out.finish()
    assert (tmp_path / "part").read_bytes() == data and sha == hashlib.sha256(data).hexdigest()


def test_a_file_cut_short_under_the_hash_is_an_error_not_a_hang(tmp_path, small_blocks):
    random_file(tmp_path / "part", 300000)
    with offgrid.TransferFile(str(tmp_path / "part"), keep=300000) as out:
        with pytest.raises(OSError) as e:
            out.advance(600000)  # says bytes were written that are not there
            out.finish()
    assert "ends at byte 300000 while 600000 were written" in str(e.value)


def test_install_refuses_a_copy_with_one_byte_changed_in_the_middle(make_gguf, tmp_path, small_blocks):
    src = make_gguf("src.gguf", tensors=[("w", (512, 1024))])  # 2 MiB: many blocks
    good = sha256_of(src)
    with open(src, "r+b") as f:
        f.seek(os.path.getsize(src) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x80]))
    root = tmp_path / "store"
    with pytest.raises(StoreError) as e:
        ModelStore(str(root)).install([src], "mid", "test", expected_sha256=good)
    assert "sha256 mismatch" in str(e.value) and "nothing installed" in str(e.value)
    assert store_files(root) == []


# Cleanup ####################################################################

def test_clean_temporary_removes_tmp_leftovers_and_keeps_parts(make_gguf, tmp_path):
    root = tmp_path / "store"
    store = ModelStore(str(root))
    store.install([make_gguf("m.gguf")], "m", "test")
    leftovers = [".m.gguf.abc123.tmp", ".m.manifest.json.xyz.tmp"]
    kept = ["big.gguf.part", ".big.gguf.part", "visible.tmp", "m.gguf", "m.manifest.json"]
    for name in leftovers + kept[:3]:
        (root / name).write_bytes(b"x" * 10)
    assert store.clean_temporary() == 2
    assert store_files(root) == sorted(kept)
    assert store.clean_temporary() == 0


def test_clean_temporary_of_a_missing_folder_does_nothing(tmp_path):
    assert ModelStore(str(tmp_path / "nowhere")).clean_temporary() == 0


# The starter model ##########################################################

def test_install_starter_is_idempotent(model_store):
    store = ModelStore(model_store)
    gguf = os.path.join(model_store, offgrid.GEMMA["file"])
    before_files = sorted(os.listdir(model_store))
    before_stat = os.stat(gguf)
    before_manifest = read_manifest(model_store, STARTER_ID)
    again = store.install_packaged(offgrid.GEMMA)
    assert again == before_manifest
    after_stat = os.stat(gguf)
    assert (after_stat.st_ino, after_stat.st_mtime_ns) == (before_stat.st_ino, before_stat.st_mtime_ns)
    assert sorted(os.listdir(model_store)) == before_files
    assert read_manifest(model_store, STARTER_ID) == before_manifest


def test_install_starter_next_to_another_model_keeps_both(make_gguf, tmp_path, starter_gguf):
    # a store that already holds the starter under its id (hard-linked, to
    # avoid a copy) and another model: install_starter installs nothing new
    root = tmp_path / "store"
    store = ModelStore(str(root))
    store.install([make_gguf("other.gguf")], "other", "test")
    try:
        os.link(starter_gguf, str(root / offgrid.GEMMA["file"]))
    except OSError:
        pytest.skip("hard links are not available here")
    manifest = store.install_packaged(offgrid.GEMMA)
    assert manifest["id"] == STARTER_ID
    assert [m["id"] for m in store.models()] == [STARTER_ID, "other"]
    assert not [n for n in os.listdir(str(root)) if n.endswith(".tmp")]


# Chat format ################################################################

def test_chat_format_is_gemma_for_gemma3_without_template():
    assert offgrid.chat_format_for({"architecture": "gemma3", "chat_template": None}) == "gemma"
    assert offgrid.chat_format_for({"architecture": "gemma2"}) == "gemma"


def test_chat_format_is_none_when_the_model_has_a_template():
    assert offgrid.chat_format_for({"architecture": "gemma3", "chat_template": "{{ messages }}"}) is None
    assert offgrid.chat_format_for({"architecture": "llama", "chat_template": "{{ x }}"}) is None


def test_chat_format_by_architecture_defaults_to_chatml():
    assert offgrid.chat_format_for({"architecture": "qwen2"}) == "chatml"
    assert offgrid.chat_format_for({"architecture": "llama"}) == "llama-2"
    assert offgrid.chat_format_for({"architecture": "brand-new-arch"}) == "chatml"
    assert offgrid.chat_format_for({"architecture": None}) == "chatml"


def test_chat_format_of_the_real_starter_file_is_gemma(starter_gguf):
    assert offgrid.chat_format_for(offgrid.read_gguf(starter_gguf)) == "gemma"


def test_manifest_of_a_model_with_template_has_no_chat_format(make_gguf, tmp_path):
    src = make_gguf("t.gguf", metadata={"general.architecture": "gemma3", "gemma3.context_length": 8192,
                                        "tokenizer.chat_template": "{% for m in messages %}{% endfor %}"})
    manifest = ModelStore(str(tmp_path / "store")).install([src], "templated", "test")
    assert manifest["has_chat_template"] is True
    assert manifest["chat_format"] is None


def test_explicit_chat_format_is_kept_in_the_manifest(make_gguf, tmp_path):
    manifest = ModelStore(str(tmp_path / "store")).install([make_gguf("c.gguf")], "c", "test",
                                                           chat_format="chatml")
    assert manifest["chat_format"] == "chatml"
