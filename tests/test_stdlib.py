"""offgrid.py with nothing but the standard library: in a fresh venv with no
packages, and on the oldest Python we support (3.9)."""

import ast
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import IN_CI, OFFGRID, ROOT, Server, run_cli


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv with no packages at all: not pip, not llama-cpp-python."""
    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    out = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('llama_cpp'), "
                                        "u.find_spec('psutil'))"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]
    return python


def test_top_level_imports_are_standard_library_only():
    tree = ast.parse(open(OFFGRID, encoding="utf-8").read())
    stdlib = set(sys.stdlib_module_names)
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] in stdlib, "line %d imports %s at module level" % (node.lineno, name)


def test_vermin_says_python_3_9_is_enough():
    vermin = shutil.which("vermin", path=os.path.dirname(sys.executable))
    if not vermin:
        if IN_CI:
            pytest.fail("vermin is not installed (pip install -e '.[test]')")
        pytest.skip("vermin is not installed")
    out = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.9-", "--eval-annotations",
                          "--backport", "argparse", OFFGRID], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("args", [["--help"], ["list"], ["info"], ["config", "show"], ["version"],
                                  ["help", "serve"]])
def test_commands_work_without_packages(bare_python, tmp_path, args):
    r = run_cli(args, tmp_path, python=bare_python)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "Traceback" not in r.stderr


def test_info_says_what_to_install(bare_python, tmp_path):
    r = run_cli(["info"], tmp_path, python=bare_python)
    assert "llama-cpp-python" in r.stdout and "not installed" in r.stdout
    assert "pip install" in r.stdout


def test_serve_without_llama_cpp_answers_health_and_503(bare_python, tmp_path, make_gguf):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(make_gguf("tiny.gguf"), str(models))
    srv = Server(tmp_path / "home", str(models), python=bare_python, wait_model=False)
    try:
        status, health, _ = srv.get("/health")
        assert status == 200 and health["status"] == "ok"
        assert health["inference"].startswith("unavailable")
        assert health["system"]["ram_total"] > 0 and health["system"]["source"] == "proc"
        status, models_list, _ = srv.get("/v1/models")
        assert [m["id"] for m in models_list["data"]] == ["tiny"]
        status, body, _ = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503
        assert body["error"]["code"] == "llama_cpp_missing"
        assert "pip install" in body["error"]["message"] and "llama-cpp-python" in body["error"]["message"]
        assert "inference disabled" in srv.output()
    finally:
        assert srv.stop() == 0


def python39():
    """A Python 3.9 interpreter if this machine has one (PATH or pyenv)."""
    import glob
    candidates = [shutil.which("python3.9")] + sorted(glob.glob(
        os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for path in filter(None, candidates):
        out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == "(3, 9)":
            return path
    return None


def test_runs_on_python_3_9(tmp_path, make_gguf):
    python = python39()
    if not python:
        pytest.skip("no python3.9 on this machine (vermin covers the syntax check)")
    r = run_cli(["--help"], tmp_path, python=python)
    assert r.returncode == 0, r.stderr
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(make_gguf("tiny.gguf"), str(models))
    r = run_cli(["list", "--json", "--models-dir", str(models)], tmp_path, python=python)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["id"] == "tiny"
    r = run_cli(["info", "tiny", "--json", "--models-dir", str(models)], tmp_path, python=python)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["context_length"] == 256
    srv = Server(tmp_path / "home", str(models), python=python, wait_model=False)
    try:
        assert srv.get("/health")[1]["status"] == "ok"
    finally:
        assert srv.stop() == 0
