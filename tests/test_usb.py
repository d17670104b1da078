"""Models on a USB stick or SD card: `export` writes a folder that checks
with `sha256sum -c` and carries offgrid.py; `import` verifies against it and
refuses what does not match or reaches outside; `verify`, `remove`,
DELETE /v1/models/{id} and `quantization`.

"Sticks" are folders under tmp_path, a real 1 MiB tmpfs for the free-space
refusal. Most models are small GGUF files from make_gguf; one round trip
carries the real starter model (hard-linked, never written to)."""

import hashlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import offgrid
from conftest import OFFGRID, Server, free_env, need, run_cli

STARTER_ID = offgrid.GEMMA["id"]


def sha256_of(path):
    return hashlib.sha256(open(str(path), "rb").read()).hexdigest()


def cli(args, home, **kw):
    """run_cli in a home that is created first, as a new machine's is."""
    os.makedirs(str(home), exist_ok=True)
    return run_cli(args, home, **kw)


def one_error_line(result):
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, "expected one line on stderr, got:\n" + result.stderr
    assert lines[0].startswith("offgrid: error:"), lines[0]
    return lines[0]


def cli_json(args, home, expect=0, **kw):
    r = cli(list(args) + ["--json"], home, **kw)
    assert r.returncode == expect, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def flip_byte(path, offset):
    with open(str(path), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def home(tmp_path):
    """An offgrid home whose store holds three small models, installed the
    way every install goes (so each has a recorded sha256)."""
    def fill(make_gguf):
        h = tmp_path / "home"
        store = offgrid.ModelStore(str(h / "models"))
        store.install([make_gguf("a.gguf", tensors=[("w", (64, 64))])], "alpha", "test")
        store.install([make_gguf("b.gguf", {"general.architecture": "qwen2", "qwen2.context_length": 512,
                                            "general.license": "apache-2.0"}, tensors=[("w", (32, 64))])],
                      "beta", "test")
        store.install([make_gguf("c.gguf", tensors=[("w", (16, 16))])], "gamma", "test")
        return h
    return fill


def export(home, stick, *ids, expect=0):
    return cli_json(["export"] + (list(ids) or ["--all"]) + [str(stick)], home, expect=expect)


# Export #####################################################################

def test_export_writes_models_manifest_sums_program_and_readme(tmp_path, make_gguf, home):
    h = home(make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    out = export(h, stick)
    folder = stick / "offgrid"
    assert out["folder"] == str(folder)
    assert [m["status"] for m in out["models"]] == ["copied"] * 3
    assert sorted(os.listdir(str(folder))) == ["README.txt", "SHA256SUMS", "alpha.gguf", "beta.gguf",
                                               "gamma.gguf", "manifest.json", "offgrid.py"]
    manifest = json.load(open(str(folder / "manifest.json")))
    store = offgrid.ModelStore(str(h / "models"))
    by_id = {e["id"]: e for e in manifest["models"]}
    assert sorted(by_id) == ["alpha", "beta", "gamma"]
    for model_id, entry in by_id.items():
        installed = store.get(model_id)
        assert set(entry) == {"id", "file", "size", "sha256", "architecture", "quantization",
                              "context_length", "license", "chat_format"}
        assert entry["sha256"] == installed["sha256"] == sha256_of(folder / entry["file"])
        assert entry["size"] == installed["size"] == os.path.getsize(str(folder / entry["file"]))
        assert entry["chat_format"] == installed["chat_format"]
    assert by_id["beta"]["license"] == "apache-2.0" and by_id["alpha"]["license"] is None
    assert by_id["beta"]["architecture"] == "qwen2" and by_id["beta"]["context_length"] == 512
    assert open(str(folder / "offgrid.py"), "rb").read() == open(OFFGRID, "rb").read()
    readme = open(str(folder / "README.txt")).read()
    assert "offgrid.py import" in readme and "sha256sum -c SHA256SUMS" in readme and "beta" in readme
    # No temporary file is left behind.
    assert not [n for n in os.listdir(str(folder)) if n.startswith(".")]


def test_sha256sum_checks_the_export(tmp_path, make_gguf, home):
    if not shutil.which("sha256sum"):
        pytest.skip("sha256sum is not installed")
    h = home(make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    export(h, stick)
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=str(stick / "offgrid"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == ["alpha.gguf: OK", "beta.gguf: OK", "gamma.gguf: OK",
                                             "offgrid.py: OK"]
    flip_byte(stick / "offgrid" / "beta.gguf", 100)
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=str(stick / "offgrid"),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "beta.gguf: FAILED" in r.stdout


def test_export_named_models_adds_to_what_the_stick_has(tmp_path, make_gguf, home):
    h = home(make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    assert [m["id"] for m in export(h, stick, "beta")["models"]] == ["beta"]
    out = export(h, stick, "alpha", "beta")
    assert [(m["id"], m["status"]) for m in out["models"]] == [("alpha", "copied"),
                                                               ("beta", "already on the stick")]
    listed = json.load(open(str(stick / "offgrid" / "manifest.json")))["models"]
    assert [e["id"] for e in listed] == ["alpha", "beta"]
    sums = open(str(stick / "offgrid" / "SHA256SUMS")).read()
    assert "alpha.gguf" in sums and "beta.gguf" in sums and "gamma.gguf" not in sums


def test_export_hashes_models_without_a_recorded_sha256_first(tmp_path, make_gguf):
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    shutil.copy(make_gguf("loose.gguf"), str(models))  # adopted: no sha256 yet
    assert offgrid.ModelStore(str(models)).get("loose")["sha256"] is None
    stick = tmp_path / "stick"
    stick.mkdir()
    export(tmp_path / "home", stick)
    recorded = offgrid.ModelStore(str(models)).get("loose")["sha256"]
    assert recorded == sha256_of(models / "loose.gguf")
    assert json.load(open(str(stick / "offgrid" / "manifest.json")))["models"][0]["sha256"] == recorded


def test_export_refuses_bad_arguments_in_one_line(tmp_path, make_gguf, home):
    h = home(make_gguf)
    line = one_error_line(cli(["export", str(tmp_path / "not-mounted")], h))
    assert "name the models to export, or pass --all" in line
    line = one_error_line(cli(["export", "--all", str(tmp_path / "not-mounted")], h))
    assert "is not a folder (is the stick mounted?)" in line
    assert not (tmp_path / "not-mounted").exists()
    line = one_error_line(cli(["export", "nope", str(tmp_path)], h))
    assert "'nope' is not installed" in line and "alpha" in line


@pytest.fixture
def small_stick(tmp_path):
    """A real 1 MiB tmpfs mounted as the stick (needs root)."""
    stick = tmp_path / "tiny-stick"
    stick.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stick)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): %s" % (r.stderr.strip() or r.returncode))
    try:
        yield stick
    finally:
        subprocess.run(["umount", str(stick)], check=True)


def test_export_refuses_when_the_stick_is_too_small(tmp_path, make_gguf, small_stick):
    models = tmp_path / "home" / "models"
    model = offgrid.ModelStore(str(models)).install([make_gguf("big.gguf", tensors=[("w", (1024, 1024))])], "big",
                                                    "t")
    line = one_error_line(cli(["export", "big", str(small_stick)], tmp_path / "home"))
    assert "not enough space on %s:" % small_stick in line
    # The model, the program that goes with it, and the margin.
    needed = model["size"] + os.path.getsize(OFFGRID) + offgrid.EXPORT_SPACE_MARGIN
    assert line.endswith(": %s needed, 1.0 MiB free" % offgrid.human_bytes(needed)), line
    assert os.listdir(str(small_stick)) == []  # refused before writing anything


# Resuming ###################################################################

def big_model_home(tmp_path, make_gguf):
    """A home with one 128 MiB model: big enough to be caught mid-copy."""
    h = tmp_path / "home"
    src = make_gguf("big.gguf", tensors=[("w", (8192, 4096))])
    with open(src, "r+b") as f:  # not all zeros, so a wrong offset shows
        for i in range(1 << 20, os.path.getsize(src), 1 << 20):
            f.seek(i)
            f.write(i.to_bytes(8, "little"))
    offgrid.ModelStore(str(h / "models")).install([src], "big", "test")
    return h, src


def test_export_killed_mid_copy_resumes_and_verifies(tmp_path, make_gguf):
    h, src = big_model_home(tmp_path, make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    proc = subprocess.Popen([sys.executable, OFFGRID, "export", "big", str(stick)], env=free_env(h),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("export big 10%"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "export was not caught mid-copy:\n" + "".join(seen)
    folder = stick / "offgrid"
    partial = folder / ".big.gguf.partial"
    assert partial.exists() and 0 < os.path.getsize(str(partial)) < os.path.getsize(src)
    assert not (folder / "big.gguf").exists()  # nothing looks exported
    assert not (folder / "manifest.json").exists()
    out = export(h, stick, "big")
    assert out["models"][0]["status"].startswith("resumed ("), out
    assert sha256_of(folder / "big.gguf") == sha256_of(src)
    assert not partial.exists()
    assert json.load(open(str(folder / "manifest.json")))["models"][0]["sha256"] == sha256_of(src)


def test_export_resumes_a_partial_file_and_restarts_a_wrong_one(tmp_path, make_gguf):
    h, src = big_model_home(tmp_path, make_gguf)
    data = open(src, "rb").read()
    folder = tmp_path / "stick" / "offgrid"
    folder.mkdir(parents=True)
    partial = folder / ".big.gguf.partial"
    # Half the model, the last MiB of it damaged: only the good part is kept.
    half = len(data) // 2
    partial.write_bytes(data[:half - 1000] + b"\xff" * 1000)
    out = export(h, tmp_path / "stick", "big")
    assert out["models"][0]["status"] == "resumed (63.0 MiB were already there)"
    assert sha256_of(folder / "big.gguf") == sha256_of(src)
    # A leftover that shares nothing with the model is written over.
    os.unlink(str(folder / "big.gguf"))
    partial.write_bytes(b"junk" * 5000000)
    out = export(h, tmp_path / "stick", "big")
    assert out["models"][0]["status"] == "copied"
    assert sha256_of(folder / "big.gguf") == sha256_of(src)
    # A complete, matching model on the stick is not written again.
    mtime = os.stat(str(folder / "big.gguf")).st_mtime_ns
    assert export(h, tmp_path / "stick", "big")["models"][0]["status"] == "already on the stick"
    assert os.stat(str(folder / "big.gguf")).st_mtime_ns == mtime


# Import #####################################################################

def test_export_then_import_round_trip_into_a_second_store(tmp_path, make_gguf, home):
    h = home(make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    export(h, stick)
    other = tmp_path / "other-home"
    out = cli_json(["import", str(stick)], other)
    assert (out["imported"], out["skipped"], out["failed"]) == (3, 0, 0)
    assert all(m["verified"] == "sha256 verified against manifest.json" for m in out["models"])
    first = {m["id"]: m for m in offgrid.ModelStore(str(h / "models")).models()}
    second = {m["id"]: m for m in cli_json(["list"], other)}
    assert sorted(second) == ["alpha", "beta", "gamma"]
    for model_id, m in second.items():
        assert m["sha256"] == first[model_id]["sha256"]
        assert m["chat_format"] == first[model_id]["chat_format"]
        assert m["source"] == "import:" + str(stick / "offgrid" / (model_id + ".gguf"))
    # Importing again skips what is already installed.
    out = cli_json(["import", str(stick / "offgrid")], other)
    assert (out["imported"], out["skipped"], out["failed"]) == (0, 3, 0)
    assert {m["reason"] for m in out["models"]} == {"already installed as %s" % i for i in first}


def test_starter_model_round_trip_with_the_program_from_the_stick(tmp_path, model_store):
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    os.link(os.path.join(model_store, offgrid.GEMMA["file"]), str(models / offgrid.GEMMA["file"]))
    shutil.copy(os.path.join(model_store, STARTER_ID + offgrid.MANIFEST_SUFFIX), str(models))
    stick = tmp_path / "stick"
    stick.mkdir()
    export(tmp_path / "home", stick)
    program = stick / "offgrid" / "offgrid.py"
    new_home = tmp_path / "next-machine"
    new_home.mkdir()
    r = subprocess.run([sys.executable, str(program), "import", str(stick / "offgrid")],
                       env=free_env(new_home), capture_output=True, text=True, cwd=str(new_home), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 imported, 0 skipped, 0 failed" in r.stdout
    installed = new_home / "models" / offgrid.GEMMA["file"]
    assert sha256_of(installed) == offgrid.GEMMA["sha256"]
    listed = cli_json(["list"], new_home)
    assert [(m["id"], m["chat_format"], m["sha256"]) for m in listed] == [
        (STARTER_ID, "gemma", offgrid.GEMMA["sha256"])]


def test_flipped_byte_on_the_stick_is_refused_and_the_rest_imports(tmp_path, make_gguf, home):
    h = home(make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    export(h, stick)
    flip_byte(stick / "offgrid" / "beta.gguf", os.path.getsize(str(stick / "offgrid" / "beta.gguf")) - 10)
    other = tmp_path / "other"
    out = cli_json(["import", str(stick)], other, expect=1)
    assert (out["imported"], out["skipped"], out["failed"]) == (2, 0, 1)
    failed = [m for m in out["models"] if m["status"] == "failed"]
    assert failed[0]["file"] == os.path.join("offgrid", "beta.gguf")
    assert failed[0]["reason"].startswith("sha256 mismatch")
    assert sorted(m["id"] for m in cli_json(["list"], other)) == ["alpha", "gamma"]
    assert not [n for n in os.listdir(str(other / "models")) if n.startswith(".")]
    r = cli(["import", str(stick)], tmp_path / "third")
    assert r.returncode == 1
    assert "FAILED    offgrid/beta.gguf: sha256 mismatch" in r.stdout
    assert r.stdout.splitlines()[-1] == "2 imported, 0 skipped, 1 failed"


def test_sha256sums_alone_is_used_to_verify(tmp_path, make_gguf, home):
    h = home(make_gguf)
    stick = tmp_path / "stick"
    stick.mkdir()
    export(h, stick)
    os.unlink(str(stick / "offgrid" / "manifest.json"))
    flip_byte(stick / "offgrid" / "gamma.gguf", 200)
    out = cli_json(["import", str(stick)], tmp_path / "other", expect=1)
    status = {m["file"]: (m["status"], m.get("verified")) for m in out["models"]}
    assert status[os.path.join("offgrid", "alpha.gguf")] == ("imported", "sha256 verified against SHA256SUMS")
    assert status[os.path.join("offgrid", "gamma.gguf")][0] == "failed"


def large_gguf(make_gguf, name, mib=12):
    """A valid GGUF of about `mib` MiB with random tensor data: several of
    the blocks a copy moves and hashes at a time."""
    path = make_gguf(name, tensors=[("w", (mib * 256, 1024))])
    n = mib * 256 * 1024 * 4
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - n)
        for _ in range(mib):
            f.write(os.urandom(n // mib))
    return path


def test_import_refuses_a_large_file_with_one_byte_changed_in_the_middle(tmp_path, make_gguf):
    stick = tmp_path / "stick"
    stick.mkdir()
    src = large_gguf(make_gguf, "big.gguf")
    shutil.move(src, str(stick / "big.gguf"))
    (stick / "SHA256SUMS").write_text("%s  big.gguf\n" % sha256_of(stick / "big.gguf"))
    flip_byte(stick / "big.gguf", os.path.getsize(str(stick / "big.gguf")) // 2)
    out = cli_json(["import", str(stick)], tmp_path / "h", expect=1)
    assert [(m["status"], m["reason"].split(" (")[0]) for m in out["models"]] == [("failed", "sha256 mismatch")]
    assert os.listdir(str(tmp_path / "h" / "models")) == []  # no model, no manifest, no temporary file


def test_import_that_cannot_write_in_the_middle_loses_nothing(tmp_path, make_gguf):
    # The kernel refuses writes past 5 MiB (RLIMIT_FSIZE, as a full or
    # failing disk would): the copy breaks after its first blocks.
    import resource
    h = tmp_path / "h"
    src = large_gguf(make_gguf, "big.gguf")
    sha = sha256_of(src)
    before = cli_json(["import", make_gguf("small.gguf")], h)["models"][0]
    assert before["status"] == "imported"

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 << 20, 5 << 20))
    r = subprocess.run([sys.executable, OFFGRID, "import", src, "--json"], env=free_env(h), cwd=str(h),
                       capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    failed = json.loads(r.stdout)["models"]
    assert [(m["status"], m["reason"]) for m in failed] == [("failed", "cannot read or write: File too large")]
    # The store is as it was, the source untouched.
    assert [m["id"] for m in cli_json(["list"], h)] == ["small"]
    assert sorted(os.listdir(str(h / "models"))) == ["small.gguf", "small.manifest.json"]
    assert sha256_of(src) == sha
    out = cli_json(["import", src], h)
    assert (out["models"][0]["status"], out["models"][0]["sha256"]) == ("imported", sha)


def test_export_of_a_model_that_rotted_in_the_store_blames_the_store(tmp_path, make_gguf):
    h = tmp_path / "h"
    offgrid.ModelStore(str(h / "models")).install([large_gguf(make_gguf, "big.gguf")], "big", "test")
    flip_byte(h / "models" / "big.gguf", os.path.getsize(str(h / "models" / "big.gguf")) // 2)
    stick = tmp_path / "stick"
    stick.mkdir()
    r = cli(["export", "big", str(stick)], h)
    errors = [line for line in r.stderr.splitlines() if line.startswith("offgrid: error: ")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    line = errors[0]
    assert "big.gguf: the model in the store no longer matches its manifest" in line
    assert "offgrid verify" in line
    assert not (stick / "offgrid" / "big.gguf").exists()


@pytest.mark.parametrize("listing", ["manifest.json", "SHA256SUMS"])
def test_names_that_leave_the_stick_are_refused(tmp_path, make_gguf, listing):
    stick = tmp_path / "stick"
    (stick / "offgrid").mkdir(parents=True)
    outside = make_gguf("outside.gguf")  # sits in tmp_path, next to the stick
    sha = sha256_of(outside)
    names = ["../../outside.gguf", os.path.abspath(outside)]
    if listing == "manifest.json":
        body = json.dumps({"models": [{"id": "x%d" % i, "file": n, "sha256": sha} for i, n in enumerate(names)]})
    else:
        body = "".join("%s  %s\n" % (sha, n) for n in names)
    (stick / "offgrid" / listing).write_text(body)
    out = cli_json(["import", str(stick)], tmp_path / "other", expect=1)
    assert (out["imported"], out["failed"]) == (0, 2)
    reasons = sorted(m["reason"] for m in out["models"])
    assert "'../../outside.gguf', which leads outside" in reasons[0]
    assert "%r, an absolute path; refused" % os.path.abspath(outside) in reasons[1]
    assert not os.path.exists(str(tmp_path / "other" / "models" / "outside.gguf"))


def test_symbolic_links_on_the_stick_are_not_followed(tmp_path, make_gguf):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = make_gguf("secret.gguf")
    shutil.copy(target, str(elsewhere / "deep.gguf"))
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy(make_gguf("real.gguf", tensors=[("w", (8, 8))]), str(stick / "real.gguf"))
    os.symlink(target, str(stick / "link.gguf"))
    os.symlink(str(elsewhere), str(stick / "linked-folder"))
    out = cli_json(["import", str(stick)], tmp_path / "other")
    assert [(m["file"], m["status"]) for m in out["models"]] == [("real.gguf", "imported"),
                                                                 ("link.gguf", "skipped")]
    assert out["models"][1]["reason"] == "a symbolic link; not followed"
    # A manifest naming the link is refused outright.
    (stick / "manifest.json").write_text(json.dumps({"models": [{"id": "l", "file": "link.gguf"}]}))
    out = cli_json(["import", str(stick)], tmp_path / "third", expect=1)
    assert [(m["file"], m["status"]) for m in out["models"]] == [("link.gguf", "failed"),
                                                                 ("real.gguf", "imported")]
    assert "is a symbolic link; not followed" in out["models"][0]["reason"]
    assert [m["id"] for m in cli_json(["list"], tmp_path / "third")] == ["real"]


def test_import_checks_the_gguf_header_and_keeps_ids_apart(tmp_path, make_gguf):
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "broken.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    (stick / "text.gguf").write_bytes(b"not a model at all")
    shutil.copy(make_gguf("m.gguf", tensors=[("w", (8, 8))]), str(stick / "m.gguf"))
    other = tmp_path / "other"
    models = other / "models"
    models.mkdir(parents=True)
    shutil.copy(make_gguf("different.gguf", tensors=[("w", (4, 4))]), str(models / "m.gguf"))
    out = cli_json(["import", str(stick)], other, expect=1)
    by_file = {m["file"]: m for m in out["models"]}
    assert by_file["broken.gguf"]["status"] == "failed" and "truncated" in by_file["broken.gguf"]["reason"]
    assert by_file["text.gguf"]["status"] == "failed" and "not a GGUF" in by_file["text.gguf"]["reason"]
    assert by_file["m.gguf"]["status"] == "imported" and by_file["m.gguf"]["id"] == "m-2"
    assert sha256_of(models / "m.gguf") == sha256_of(make_gguf("different.gguf", tensors=[("w", (4, 4))]))


def test_import_one_file_and_report_missing_paths(tmp_path, make_gguf):
    src = make_gguf("Solo-Q4_K_M.gguf")
    out = cli_json(["import", src], tmp_path / "h")
    assert [(m["id"], m["status"]) for m in out["models"]] == [("solo-q4_k_m", "imported")]
    line = one_error_line(cli(["import", str(tmp_path / "nowhere")], tmp_path / "h"))
    assert "does not exist" in line
    (tmp_path / "empty").mkdir()
    line = one_error_line(cli(["import", str(tmp_path / "empty")], tmp_path / "h"))
    assert "no GGUF model files found" in line


# Verify #####################################################################

def test_verify_catches_a_rotted_byte_in_the_store(tmp_path, make_gguf, home):
    h = home(make_gguf)
    out = cli_json(["verify"], h)
    assert (out["ok"], out["rotted"]) == (3, 0)
    flip_byte(h / "models" / "beta.gguf", 300)
    out = cli_json(["verify"], h, expect=1)
    assert (out["ok"], out["rotted"]) == (2, 1)
    rotted = [m for m in out["models"] if m["status"] == "rotted"][0]
    assert rotted["id"] == "beta" and rotted["sha256"] != rotted["expected_sha256"]
    r = cli(["verify"], h)
    assert r.returncode == 1 and "ROTTED    beta:" in r.stdout
    assert cli_json(["verify", "alpha"], h)["models"][0]["status"] == "ok"
    assert "'nope' is not installed" in one_error_line(cli(["verify", "nope"], h))


def test_verify_records_a_missing_sha256_and_says_so(tmp_path, make_gguf):
    models = tmp_path / "h" / "models"
    models.mkdir(parents=True)
    shutil.copy(make_gguf("loose.gguf"), str(models))
    r = cli(["verify"], tmp_path / "h")
    assert r.returncode == 0, r.stderr
    assert "recorded  loose: had no sha256; recorded %s" % sha256_of(models / "loose.gguf") in r.stdout
    assert offgrid.ModelStore(str(models)).get("loose")["sha256"] == sha256_of(models / "loose.gguf")
    assert cli_json(["verify"], tmp_path / "h")["models"][0]["status"] == "ok"


# Remove #####################################################################

def test_remove_refuses_without_a_terminal_or_yes(tmp_path, make_gguf, home):
    h = home(make_gguf)
    line = one_error_line(cli(["remove", "beta"], h, input=""))
    assert "not removing beta without confirmation" in line and "-y" in line
    assert (h / "models" / "beta.gguf").exists()
    r = cli(["remove", "beta", "-y"], h)
    assert r.returncode == 0 and r.stdout.strip() == "removed beta"
    assert sorted(os.listdir(str(h / "models"))) == ["alpha.gguf", "alpha.manifest.json",
                                                     "gamma.gguf", "gamma.manifest.json"]
    assert "'beta' is not installed" in one_error_line(cli(["remove", "beta", "-y"], h))


def run_on_terminal(args, home, answer):
    """Run offgrid on a pseudo-terminal, answer its question, return
    (exit status, everything it printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, OFFGRID] + args, stdin=slave, stdout=slave, stderr=slave,
                            env=free_env(home), cwd=str(home))
    os.close(slave)
    out = b""
    deadline = time.time() + 30
    answered = False
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed: the program ended
                break
            if not chunk:
                break
            out += chunk
        if not answered and b"[y/N]" in out:
            os.write(master, answer)
            answered = True
    os.close(master)
    return proc.wait(10), out.decode()


def test_remove_asks_on_a_terminal(tmp_path, make_gguf, home):
    h = home(make_gguf)
    code, out = run_on_terminal(["remove", "alpha"], h, b"n\n")
    assert "Remove alpha (" in out and code == 1 and "kept alpha" in out
    assert (h / "models" / "alpha.gguf").exists()
    code, out = run_on_terminal(["remove", "alpha"], h, b"y\n")
    assert code == 0 and "removed alpha" in out
    assert not (h / "models" / "alpha.gguf").exists()
    assert not (h / "models" / "alpha.manifest.json").exists()


def test_delete_model_over_http_unloads_and_removes_it(tmp_path, make_gguf, model_store):
    need("llama_cpp", "unloading a loaded model")
    models = tmp_path / "models"
    models.mkdir()
    os.link(os.path.join(model_store, offgrid.GEMMA["file"]), str(models / offgrid.GEMMA["file"]))
    shutil.copy(os.path.join(model_store, STARTER_ID + offgrid.MANIFEST_SUFFIX), str(models))
    offgrid.ModelStore(str(models)).install([make_gguf("spare.gguf")], "spare", "test")
    srv = Server(tmp_path / "home", str(models), args=["--model", STARTER_ID])
    try:
        assert srv.get("/health")[1]["model"] == STARTER_ID
        status, body, _ = srv.request("DELETE", "/v1/models/" + STARTER_ID)
        assert status == 200, body
        assert body == {"id": STARTER_ID, "object": "model", "deleted": True}
        assert srv.get("/health")[1]["model"] is None
        assert [m["id"] for m in srv.get("/v1/models")[1]["data"]] == ["spare"]
        assert sorted(os.listdir(str(models))) == ["spare.gguf", "spare.manifest.json"]
        assert "model unloaded" in srv.output()
        status, body, _ = srv.request("DELETE", "/v1/models/" + STARTER_ID)
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body, _ = srv.request("DELETE", "/v1/models/spare")  # not loaded: just removed
        assert status == 200 and body["deleted"] is True
        assert srv.get("/v1/models")[1]["data"] == []
    finally:
        assert srv.stop() == 0
    # The session's starter model was only hard-linked, and is still whole.
    assert offgrid.sha256_file(os.path.join(model_store, offgrid.GEMMA["file"])) == offgrid.GEMMA["sha256"]


# Quantization guide #########################################################

def test_quantization_json_lists_the_guide_and_advice_for_this_machine(tmp_path):
    out = cli_json(["quantization"], tmp_path)
    names = [q["name"] for q in out["quantizations"]]
    assert names == ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]
    by_name = {q["name"]: q for q in out["quantizations"]}
    assert by_name["F16"]["size_vs_f16"] == 1.0 and by_name["Q8_0"]["bits_per_weight"] == 8.5
    bits = [q["bits_per_weight"] for q in out["quantizations"]]
    assert bits == sorted(bits)
    assert by_name["Q4_K_M"]["perplexity_increase"] == 0.1754
    meminfo = open("/proc/meminfo").read()
    total_kb = int(meminfo.split("MemTotal:")[1].split()[0])
    assert out["ram_total"] == total_kb * 1024 or abs(out["ram_total"] - total_kb * 1024) < (1 << 20)
    assert 0 < out["ram_available"] <= out["ram_total"]
    for advice in out["recommendations"]:
        if advice["quantization"]:
            assert advice["memory_bytes"] <= out["ram_available"]
    assert out["recommendation"]
    # The advice follows memory: little memory, small picks.
    assert offgrid.quantization_advice(3 << 30)[2]["quantization"] is None  # 8B does not fit in 3 GiB
    assert offgrid.quantization_advice(6 << 30)[2]["quantization"] == "Q4_K_M"
    r = cli(["quantization"], tmp_path)
    assert r.returncode == 0 and "Q4_K_M" in r.stdout and "Recommendation:" in r.stdout


# Import, export and verify over HTTP #########################################

def wait_job(srv, job, timeout=60):
    """Poll GET /v1/models/jobs/{job} until it ends; returns the job."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, job, _ = srv.get("/v1/models/jobs/" + job["job"])
        assert status == 200, job
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError("job did not end: %r" % job)


def test_http_export_import_verify_round_trip(start_server, tmp_path, make_gguf):
    models = tmp_path / "models-a"
    models.mkdir()
    shutil.copy(make_gguf("tiny.gguf", tensors=(("w", (256, 300)),)), str(models / "tiny.gguf"))
    stick = tmp_path / "stick"
    stick.mkdir()
    a = start_server(models_dir=str(models), wait_model=False)
    status, job, _ = a.post("/v1/models/export", {"path": str(stick)})
    assert status == 202 and job["kind"] == "export" and job["status"] in ("queued", "running", "done"), job
    assert job["models"] == ["tiny"] and job["path"] == str(stick / "offgrid")
    job = wait_job(a, job)
    assert job["status"] == "done" and job["error"] is None, job
    assert job["bytes_done"] == job["bytes_total"] == os.path.getsize(str(models / "tiny.gguf"))
    assert [r["status"] for r in job["results"]] == ["copied"]
    assert sha256_of(str(stick / "offgrid" / "tiny.gguf")) == sha256_of(str(models / "tiny.gguf"))
    assert "tiny.gguf" in (stick / "offgrid" / "SHA256SUMS").read_text()

    b = start_server(models_dir=str(tmp_path / "models-b"), wait_model=False)
    status, job, _ = b.post("/v1/models/import", {"path": str(stick)})
    assert status == 202 and job["kind"] == "import", job
    job = wait_job(b, job)
    assert job["status"] == "done", job
    [result] = job["results"]
    assert result["status"] == "imported" and result["id"] == "tiny", result
    assert result["verified"] == "sha256 verified against manifest.json"
    assert "tiny" in [m["id"] for m in b.get("/v1/models")[1]["data"]]
    # Imported again: already there, nothing copied.
    job = wait_job(b, b.post("/v1/models/import", {"path": str(stick)})[1])
    assert [r["status"] for r in job["results"]] == ["skipped"], job

    status, job, _ = b.post("/v1/models/tiny/verify", {})
    assert status == 202 and job["kind"] == "verify" and job["models"] == ["tiny"], job
    job = wait_job(b, job)
    assert job["status"] == "done" and job["results"][0]["status"] == "ok", job
    # One byte changed on disk: verify says so.
    path = str(tmp_path / "models-b" / "tiny.gguf")
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    job = wait_job(b, b.post("/v1/models/tiny/verify", {})[1])
    assert job["status"] == "done" and job["results"][0]["status"] == "rotted", job
    assert job["results"][0]["sha256"] != job["results"][0]["expected_sha256"]


def test_http_import_export_verify_refuse_bad_input_by_name(start_server, tmp_path, make_gguf):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(make_gguf("tiny.gguf"), str(models / "tiny.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = start_server(models_dir=str(models), wait_model=False)

    def refused(path, body, status, param, code):
        got, reply, _ = srv.post(path, body)
        assert got == status, (path, body, got, reply)
        assert reply["error"]["param"] == param and reply["error"]["code"] == code, (path, body, reply)
        assert reply["error"]["message"], reply
        return reply["error"]["message"]

    for route in ("/v1/models/import", "/v1/models/export"):
        refused(route, {}, 400, "path", "missing_parameter")
        refused(route, {"path": 7}, 400, "path", "invalid_type")
        assert "absolute" in refused(route, {"path": "media/usb"}, 400, "path", "invalid_value")
        assert "does not exist" in refused(route, {"path": str(tmp_path / "nope")}, 400, "path", "path_not_found")
        refused(route, {"path": str(empty), "force": True}, 400, "force", "unsupported_parameter")
    assert "no GGUF" in refused("/v1/models/import", {"path": str(empty)}, 400, "path", "no_models_found")
    assert "not a folder" in refused("/v1/models/export", {"path": str(models / "tiny.gguf")}, 400, "path",
                                     "invalid_value")
    assert "'nope' is not installed" in refused("/v1/models/export", {"path": str(empty), "models": ["tiny", "nope"]},
                                                404, "models[1]", "model_not_found")
    refused("/v1/models/export", {"path": str(empty), "models": "tiny"}, 400, "models", "invalid_type")
    refused("/v1/models/export", {"path": str(empty), "models": []}, 400, "models", "invalid_type")
    refused("/v1/models/nope/verify", {}, 404, "model", "model_not_found")
    status, reply, _ = srv.get("/v1/models/jobs/nope")
    assert status == 404 and reply["error"]["code"] == "job_not_found", reply
    # Nothing was written by the refusals.
    assert os.listdir(str(empty)) == []
