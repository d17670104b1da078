"""The docs match the code: every setting, route and command is documented,
and the README's quick start is the two commands it promises."""

import os
import re

import offgrid
from conftest import ROOT


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
