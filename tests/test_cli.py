"""The command line, run as a user runs it: `offgrid.py ARGS` in a
subprocess with its own OFFGRID_HOME (conftest's run_cli). Errors the user
can act on are one line on stderr starting "offgrid: error:", never a
traceback."""

import importlib.metadata
import json
import os
import socket

import pytest

import offgrid
from conftest import need, run_cli

COMMANDS = ["serve", "list", "info", "config", "chat", "benchmark", "export", "import", "verify", "remove",
            "quantization", "version", "help"]
STARTER_ID = offgrid.GEMMA["id"]


def one_error_line(result):
    """The single stderr line of a failed command, checked for shape."""
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, "expected one line on stderr, got:\n" + result.stderr
    assert lines[0].startswith("offgrid: error:"), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def only_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Help #######################################################################

def test_help_lists_every_command(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout, command
    assert "examples:" in result.stdout
    assert result.stderr == ""


def test_no_arguments_prints_help(tmp_path):
    result = run_cli([], tmp_path)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(tmp_path, command):
    result = run_cli([command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout
    assert "usage: offgrid %s" % command in result.stdout


def test_help_serve_explains_serve(tmp_path):
    result = run_cli(["help", "serve"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: offgrid serve" in result.stdout
    assert "--port" in result.stdout
    assert "example" in result.stdout
    assert result.stdout == run_cli(["serve", "--help"], tmp_path).stdout


def test_help_of_unknown_command_is_one_error_line(tmp_path):
    result = run_cli(["help", "nosuch"], tmp_path)
    assert result.returncode == 2
    assert "nosuch" in one_error_line(result)


def test_version_prints_the_version(tmp_path):
    result = run_cli(["version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("offgrid %s (python " % offgrid.__version__)
    # Read from the .dist-info folder's name; importlib.metadata must agree.
    try:
        installed = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    assert "llama-cpp-python %s)" % installed in result.stdout
    flag = run_cli(["--version"], tmp_path)
    assert flag.returncode == 0
    assert flag.stdout.strip() == "offgrid " + offgrid.__version__


# list #######################################################################

def test_list_on_an_empty_store_says_how_to_get_a_model(tmp_path):
    result = run_cli(["list"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No models installed in %s" % os.path.join(str(tmp_path), "models") in result.stdout
    assert "Put a .gguf file there" in result.stdout
    assert offgrid.STARTER["pip"] in result.stdout
    assert result.stderr == ""


def test_list_json_on_an_empty_store_is_an_empty_list(tmp_path):
    assert only_json(run_cli(["list", "--json"], tmp_path)) == []


def test_list_json_returns_the_manifests(tmp_path, model_store):
    listed = only_json(run_cli(["list", "--json", "--models-dir", model_store], tmp_path))
    with open(os.path.join(model_store, STARTER_ID + offgrid.MANIFEST_SUFFIX)) as f:
        manifest = json.load(f)
    assert listed == [manifest]
    assert listed[0]["id"] == STARTER_ID
    assert listed[0]["sha256"] == offgrid.GEMMA["sha256"]


def test_list_table_shows_the_model(tmp_path, model_store):
    result = run_cli(["list", "--models-dir", model_store], tmp_path)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["ID", "SIZE", "PARAMS", "QUANT", "CTX", "ARCH", "BASE", "SOURCE"]
    assert row.split()[0] == STARTER_ID
    for cell in ("268.1M", "Q4_K_M", "32768", "gemma3", "pypi:" + offgrid.GEMMA["package"]):
        assert cell in row.split()


def test_models_dir_from_environment_is_used(tmp_path, model_store):
    listed = only_json(run_cli(["list", "--json"], tmp_path, env={"OFFGRID_MODELS_DIR": model_store}))
    assert [m["id"] for m in listed] == [STARTER_ID]


# info #######################################################################

def test_info_json_describes_the_system(tmp_path):
    info = only_json(run_cli(["info", "--json"], tmp_path))
    for key in ("python", "cpu", "ram_total", "llama_cpp_python"):
        assert key in info, key
    assert info["offgrid"] == offgrid.__version__
    assert isinstance(info["ram_total"], int) and info["ram_total"] > 0
    assert info["models_dir"] == os.path.join(str(tmp_path), "models")
    assert info["config_file"] is None


def test_info_text_describes_the_system(tmp_path):
    result = run_cli(["info"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("offgrid:")
    assert "llama_cpp_python:" in result.stdout


def test_info_of_a_model_gives_its_gguf_figures(tmp_path, model_store):
    info = only_json(run_cli(["info", STARTER_ID, "--json", "--models-dir", model_store], tmp_path))
    assert info["id"] == STARTER_ID
    assert info["architecture"] == "gemma3"
    assert info["quantization"] == "Q4_K_M"
    assert info["parameters"] == 268098176
    assert info["context_length"] == 32768
    assert info["chat_template"] is None
    assert info["gguf_version"] == 3
    assert info["chat_format"] == "gemma"
    assert info["sha256"] == offgrid.GEMMA["sha256"]
    assert info["path"] == os.path.join(model_store, offgrid.GEMMA["file"])
    assert info["size"] == os.path.getsize(info["path"])


def test_info_of_a_model_as_text(tmp_path, model_store):
    result = run_cli(["info", STARTER_ID, "--models-dir", model_store], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["architecture:"] == "gemma3"
    assert lines["parameters:"] == "268.1M (268098176)"
    assert lines["chat_template:"] == "none"


def test_info_of_a_gguf_path(tmp_path, make_gguf):
    path = make_gguf("loose-Q5_K_M.gguf", metadata={"general.name": "Loose"})
    info = only_json(run_cli(["info", path, "--json"], tmp_path))
    assert info["id"] is None
    assert info["path"] == path
    assert info["name"] == "Loose"
    assert info["quantization"] == "F32"  # general.file_type 0 beats the name


def test_info_of_an_unknown_model_is_one_error_line(tmp_path):
    result = run_cli(["info", "nosuch"], tmp_path)
    line = one_error_line(result)
    assert "'nosuch'" in line
    assert "not installed" in line
    assert result.stdout == ""


def test_info_of_a_broken_gguf_is_one_error_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_text("not a model at all, only some text in a file\n")
    line = one_error_line(run_cli(["info", str(bad)], tmp_path))
    assert "not a GGUF" in line


# config #####################################################################

def test_config_init_writes_the_starter_file_and_refuses_to_overwrite(tmp_path):
    path = os.path.join(str(tmp_path), "config.json")
    first = run_cli(["config", "init"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert path in first.stdout
    with open(path) as f:
        assert f.read() == offgrid.starter_config_text()

    with open(path, "w") as f:
        f.write('{"port": 1234}\n')
    second = run_cli(["config", "init"], tmp_path)
    line = one_error_line(second)
    assert path in line and "--force" in line
    with open(path) as f:
        assert f.read() == '{"port": 1234}\n', "a refused init must not touch the file"

    forced = run_cli(["config", "init", "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    with open(path) as f:
        assert f.read() == offgrid.starter_config_text()
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]


def test_config_init_then_show_reports_every_key_from_the_file(tmp_path):
    assert run_cli(["config", "init"], tmp_path).returncode == 0
    shown = only_json(run_cli(["config", "show", "--json"], tmp_path))
    path = os.path.join(str(tmp_path), "config.json")
    assert shown["config_file"] == path
    assert list(shown["values"]) == list(offgrid.CONFIG_KEYS)
    for key, spec in offgrid.CONFIG_KEYS.items():
        assert shown["values"][key] == {"value": spec[1], "source": path}


def test_config_show_reports_each_source(tmp_path):
    path = os.path.join(str(tmp_path), "config.json")
    with open(path, "w") as f:
        f.write('// mine\n{"ctx": 2048, "port": 8080}\n')
    shown = only_json(run_cli(["config", "show", "--json", "--models-dir", str(tmp_path / "m")], tmp_path,
                              env={"OFFGRID_PORT": "12345"}))
    values = shown["values"]
    assert shown["config_file"] == path
    assert values["port"] == {"value": 12345, "source": "environment OFFGRID_PORT"}
    assert values["ctx"] == {"value": 2048, "source": path}
    assert values["models_dir"] == {"value": str(tmp_path / "m"), "source": "flag --models-dir"}
    assert values["host"] == {"value": "127.0.0.1", "source": "default"}


def test_config_show_table(tmp_path):
    result = run_cli(["config", "show"], tmp_path, env={"OFFGRID_BATCH": "64"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "config file: none (defaults)"
    assert lines[1].split() == ["KEY", "VALUE", "SOURCE"]
    batch = [line for line in lines if line.startswith("batch ")]
    assert batch and batch[0].split() == ["batch", "64", "environment", "OFFGRID_BATCH"]


def test_config_show_with_explicit_config_flag(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"threads": 3}')
    shown = only_json(run_cli(["config", "show", "--json", "--config", str(other)], tmp_path))
    assert shown["config_file"] == str(other)
    assert shown["values"]["threads"] == {"value": 3, "source": str(other)}


@pytest.mark.parametrize("args", [["config", "show"], ["list"], ["info"], ["serve", "--port", "0"]])
@pytest.mark.parametrize("content,key", [('{"port": 70000}', "port"), ('{"prot": 1}', "'prot'"),
                                         ('{"mmap": "maybe"}', "mmap")])
def test_bad_config_file_exits_2_with_one_line_naming_key_and_file(tmp_path, args, content, key):
    home = tmp_path / "home"
    home.mkdir()
    path = home / "config.json"
    path.write_text(content)
    result = run_cli(args, home, timeout=60)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result).replace(str(path), "<file>")
    assert "<file>" in line, "the message names the file: " + line
    assert key in line


def test_unknown_offgrid_environment_variable_exits_2(tmp_path):
    result = run_cli(["config", "show"], tmp_path, env={"OFFGRID_FOO": "1"})
    assert result.returncode == 2
    assert "OFFGRID_FOO" in one_error_line(result)


def test_bad_port_flag_exits_2_naming_the_flag(tmp_path):
    result = run_cli(["serve", "--port", "70000"], tmp_path, timeout=60)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "flag --port" in line and "70000" in line


# serve ######################################################################

def test_serve_on_a_port_in_use_is_one_error_line(tmp_path, model_store):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli(["serve", "--port", str(port), "--models-dir", model_store], tmp_path, timeout=60)
    finally:
        taken.close()
    assert result.returncode != 0
    line = one_error_line(result)
    assert "already in use" in line
    assert str(port) in line


def test_serve_with_a_model_that_is_not_installed_is_one_error_line(tmp_path, model_store):
    result = run_cli(["serve", "--port", "0", "--model", "nosuch", "--models-dir", model_store], tmp_path,
                     timeout=60)
    line = one_error_line(result)
    assert "'nosuch'" in line and STARTER_ID in line


# chat and benchmark (load the real model) ###################################

@pytest.mark.slow
@pytest.mark.model
def test_chat_with_piped_stdin_prints_a_reply(tmp_path, model_store):
    need("llama_cpp", "chat")
    # one thread: on a small shared machine a second OpenMP thread that has
    # to wait for a core makes every token slow
    result = run_cli(["chat", "--models-dir", model_store, "--max-tokens", "8", "--temperature", "0",
                      "--threads", "1"], tmp_path, input="Once upon a time")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "chat printed nothing:\n" + result.stderr
    assert result.stdout.endswith("\n")
    assert "Traceback" not in result.stderr


@pytest.mark.model
def test_chat_with_empty_stdin_is_one_error_line(tmp_path, model_store):
    need("llama_cpp", "chat")
    result = run_cli(["chat", "--models-dir", model_store], tmp_path, input="")
    assert "stdin was empty" in one_error_line(result)


@pytest.mark.model
def test_chat_with_unknown_model_is_one_error_line(tmp_path, model_store):
    result = run_cli(["chat", "nosuch", "--models-dir", model_store], tmp_path, input="hello")
    assert "'nosuch'" in one_error_line(result)


@pytest.mark.model
def test_chat_with_out_of_range_temperature_is_one_error_line(tmp_path, model_store):
    need("llama_cpp", "chat")
    result = run_cli(["chat", "--models-dir", model_store, "--temperature", "9"], tmp_path, input="hello")
    assert "temperature" in one_error_line(result)


@pytest.mark.slow
@pytest.mark.model
def test_benchmark_json_reports_speeds_and_memory(tmp_path, model_store):
    need("llama_cpp", "benchmark")
    result = run_cli(["benchmark", "--json", "--runs", "1", "--tokens", "16", "--prompt-chars", "200",
                      "--threads", "1", "--models-dir", model_store], tmp_path)
    bench = only_json(result)
    assert bench["model"] == STARTER_ID
    assert bench["threads"] == 1
    assert bench["runs"] == 1
    assert bench["load_s"] > 0
    assert bench["prompt_tokens"] > 10
    assert bench["prompt_tokens_per_s"] > 0
    assert bench["generated_tokens"] == 16
    assert bench["generation_tokens_per_s"] > 0
    assert bench["ttft_s"] > 0
    assert bench["peak_rss_bytes"] > bench["rss_before_load_bytes"] > 0


@pytest.mark.model
def test_benchmark_with_zero_tokens_is_one_error_line(tmp_path, model_store):
    need("llama_cpp", "benchmark")
    result = run_cli(["benchmark", "--tokens", "0", "--runs", "1", "--models-dir", model_store], tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert "offgrid: error:" in result.stderr and result.returncode != 0


@pytest.mark.model
def test_benchmark_with_zero_runs_is_one_error_line(tmp_path, model_store):
    need("llama_cpp", "benchmark")
    result = run_cli(["benchmark", "--runs", "0", "--tokens", "2", "--models-dir", model_store], tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert "offgrid: error:" in result.stderr and result.returncode != 0
