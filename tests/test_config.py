"""Config: defaults < config file < OFFGRID_* environment < flags, each value's
source reported, and bad values refused with a message naming key and source.

Every test passes its own `env` dict to Config.load, so the real environment
(and ~/.offgrid) never leaks in."""

import importlib.util
import json
import os
import re
import sys

import pytest

import offgrid
from offgrid import Config, ConfigError


def env_for(home, **variables):
    env = {"OFFGRID_HOME": str(home)}
    env.update({k: str(v) for k, v in variables.items()})
    return env


def said(error, path):
    """The error message with the file's path taken out, so that a word in
    the path (pytest puts the test name there) cannot satisfy a check."""
    message = str(error)
    assert str(path) in message, "the message names the file: %s" % message
    return message.replace(str(path), "<path>")


def write(path, text):
    with open(str(path), "w") as f:
        f.write(text)
    return str(path)


DEFAULTS = {key: spec[1] for key, spec in offgrid.CONFIG_KEYS.items()}


# Precedence and sources #####################################################

def test_defaults_apply_when_nothing_is_set(tmp_path):
    config = Config.load(env=env_for(tmp_path))
    assert config.values == DEFAULTS
    assert set(config.sources.values()) == {"default"}
    assert config.path is None
    assert config.home == str(tmp_path)
    assert config["port"] == offgrid.DEFAULT_PORT
    assert config.models_dir == os.path.join(str(tmp_path), "models")


def test_config_file_in_home_overrides_defaults_and_is_named_as_source(tmp_path):
    path = write(tmp_path / "config.json", json.dumps({"port": 8080, "ctx": 2048, "mmap": False}))
    config = Config.load(env=env_for(tmp_path))
    assert config.path == path
    assert (config["port"], config["ctx"], config["mmap"]) == (8080, 2048, False)
    assert config.sources["port"] == config.sources["ctx"] == config.sources["mmap"] == path
    assert config.sources["host"] == "default"
    assert config["host"] == "127.0.0.1"


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    path = write(tmp_path / "config.json", json.dumps({"port": 8080, "ctx": 2048, "threads": 3}))
    env = env_for(tmp_path, OFFGRID_PORT="9090", OFFGRID_CTX="1024", OFFGRID_MMAP="off")
    config = Config.load(overrides={"port": 7070}, env=env)
    # flag beats environment beats file beats default
    assert config["port"] == 7070
    assert config.sources["port"] == "flag --port"
    assert config["ctx"] == 1024
    assert config.sources["ctx"] == "environment OFFGRID_CTX"
    assert config["threads"] == 3
    assert config.sources["threads"] == path
    assert config["mmap"] is False
    assert config.sources["mmap"] == "environment OFFGRID_MMAP"
    assert config["batch"] == DEFAULTS["batch"]
    assert config.sources["batch"] == "default"


def test_flag_source_uses_the_dashed_flag_name_and_none_overrides_are_ignored(tmp_path):
    config = Config.load(overrides={"models_dir": str(tmp_path / "m"), "port": None},
                         env=env_for(tmp_path, OFFGRID_PORT="1234"))
    assert config.sources["models_dir"] == "flag --models-dir"
    assert config.models_dir == str(tmp_path / "m")
    # None means "flag not given": the environment value stays
    assert config["port"] == 1234
    assert config.sources["port"] == "environment OFFGRID_PORT"


def test_environment_strings_are_parsed_to_the_key_type(tmp_path):
    env = env_for(tmp_path, OFFGRID_FLASH_ATTN="no", OFFGRID_LOG_REQUESTS="yes", OFFGRID_QUEUE_SIZE=" 3 ",
                  OFFGRID_HOST="0.0.0.0", OFFGRID_MODELS_DIR=str(tmp_path / "store"))
    config = Config.load(env=env)
    assert config["flash_attn"] is False
    assert config["log_requests"] is True
    assert config["queue_size"] == 3
    assert config["host"] == "0.0.0.0"
    assert config.models_dir == str(tmp_path / "store")
    assert config.sources["models_dir"] == "environment OFFGRID_MODELS_DIR"


def test_offgrid_home_and_offgrid_config_are_not_settings(tmp_path):
    other = write(tmp_path / "elsewhere.json", json.dumps({"batch": 64}))
    config = Config.load(env=env_for(tmp_path, OFFGRID_CONFIG=other))
    assert config.path == other
    assert config["batch"] == 64
    assert config.sources["batch"] == other


def test_explicit_path_beats_the_file_in_home(tmp_path):
    write(tmp_path / "config.json", json.dumps({"batch": 64}))
    chosen = write(tmp_path / "chosen.json", json.dumps({"batch": 128}))
    config = Config.load(path=chosen, env=env_for(tmp_path))
    assert config.path == chosen
    assert config["batch"] == 128


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        Config.load(path=str(tmp_path / "nope.json"), env=env_for(tmp_path))
    assert "nope.json" in str(e.value)
    assert "does not exist" in str(e.value)


def test_api_key_file_is_read_like_offgrid_api_key(tmp_path):
    secret = write(tmp_path / "secret", "og-from-a-file\n")
    config = Config.load(env=env_for(tmp_path, OFFGRID_API_KEY_FILE=secret))
    assert (config.env_api_key, config.env_api_key_name) == ("og-from-a-file", "OFFGRID_API_KEY_FILE")
    config = Config.load(env=env_for(tmp_path, OFFGRID_API_KEY="og-from-env"))
    assert (config.env_api_key, config.env_api_key_name) == ("og-from-env", "OFFGRID_API_KEY")


@pytest.mark.parametrize("content, wanted", [(None, "cannot read"), ("", "must hold one API key"),
                                             ("two words", "must hold one API key")])
def test_bad_api_key_file_is_an_error_naming_the_file(tmp_path, content, wanted):
    path = tmp_path / "secret"
    if content is not None:
        write(path, content)
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path, OFFGRID_API_KEY_FILE=str(path)))
    assert "OFFGRID_API_KEY_FILE" in str(e.value) and wanted in said(e.value, path)


def test_api_key_and_api_key_file_together_are_refused(tmp_path):
    secret = write(tmp_path / "secret", "og-a")
    with pytest.raises(ConfigError, match="not both"):
        Config.load(env=env_for(tmp_path, OFFGRID_API_KEY="og-b", OFFGRID_API_KEY_FILE=secret))


# File formats ###############################################################

def test_json_config_may_have_comment_lines(tmp_path):
    path = write(tmp_path / "config.json", "\n".join([
        "// a comment before the object",
        "{",
        "  // the port",
        '  "port": 8181,',
        "    // an indented comment",
        '  "host": "0.0.0.0"',
        "}",
        "// and one after",
    ]))
    assert offgrid.read_config_file(path) == {"port": 8181, "host": "0.0.0.0"}
    config = Config.load(env=env_for(tmp_path))
    assert config["port"] == 8181
    assert config.sources["host"] == path


def test_json_config_of_only_comments_is_empty(tmp_path):
    path = write(tmp_path / "config.json", "// nothing set yet\n\n// still nothing\n")
    assert offgrid.read_config_file(path) == {}
    assert Config.load(env=env_for(tmp_path)).values == DEFAULTS


def test_invalid_json_names_the_file(tmp_path):
    path = write(tmp_path / "config.json", '{"port": 8080,,}')
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path))
    assert "not valid json" in said(e.value, path)


def test_config_file_that_is_not_a_table_is_refused(tmp_path):
    path = write(tmp_path / "config.json", "[1, 2]")
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path))
    assert path in str(e.value)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TOML config needs tomllib (Python 3.11+)")
def test_toml_config_is_read(tmp_path):
    path = write(tmp_path / "config.toml", "\n".join([
        "# offgrid settings",
        'host = "0.0.0.0"',
        "port = 8282",
        "mmap = false",
        'models_dir = "%s"' % (tmp_path / "tm"),
    ]))
    config = Config.load(env=env_for(tmp_path))
    assert config.path == path
    assert (config["host"], config["port"], config["mmap"]) == ("0.0.0.0", 8282, False)
    assert config.models_dir == str(tmp_path / "tm")
    assert config.sources["port"] == path
    assert config.sources["ctx"] == "default"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TOML config needs tomllib (Python 3.11+)")
def test_toml_config_with_bad_value_names_key_and_file(tmp_path):
    path = write(tmp_path / "config.toml", 'port = "high"\n')
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path))
    assert re.search(r"\bport\b", said(e.value, path))


def test_json_file_wins_over_toml_in_the_same_home(tmp_path):
    json_path = write(tmp_path / "config.json", json.dumps({"port": 1111}))
    write(tmp_path / "config.toml", "port = 2222\n")
    config = Config.load(env=env_for(tmp_path))
    assert config.path == json_path
    assert config["port"] == 1111


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="PyYAML is not installed")
def test_yaml_config_is_read(tmp_path):
    path = write(tmp_path / "config.yaml", "port: 8383\nflash_attn: false\nhost: 0.0.0.0\n")
    config = Config.load(env=env_for(tmp_path))
    assert config.path == path
    assert (config["port"], config["flash_attn"], config["host"]) == (8383, False, "0.0.0.0")
    assert config.sources["port"] == path


# Bad values #################################################################

def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path / "config.json", json.dumps({"prot": 8080}))
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path))
    message = said(e.value, path)
    assert "'prot'" in message
    assert "unknown key" in message


@pytest.mark.parametrize("key,value", [
    ("port", "eighty"),
    ("port", True),
    ("ctx", 4096.5),
    ("mmap", "maybe"),
    ("flash_attn", 1),
    ("host", 127),
    ("model", ["a"]),
])
def test_wrong_type_in_file_names_key_and_file(tmp_path, key, value):
    path = write(tmp_path / "config.json", json.dumps({key: value}))
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path))
    assert re.search(r"\b%s\b" % key, said(e.value, path))


def test_port_out_of_range_in_file_names_key_file_and_range(tmp_path):
    path = write(tmp_path / "config.json", json.dumps({"port": 70000}))
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path))
    message = said(e.value, path)
    assert re.search(r"\bport\b", message)
    assert "70000" in message
    assert "65535" in message


def test_port_out_of_range_in_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path, OFFGRID_PORT="70000"))
    message = str(e.value)
    assert "environment OFFGRID_PORT" in message
    assert "70000" in message


def test_wrong_type_in_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path, OFFGRID_MMAP="sometimes"))
    assert "environment OFFGRID_MMAP" in str(e.value)
    assert "mmap" in str(e.value)


def test_unknown_offgrid_environment_variable_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path, OFFGRID_FOO="1"))
    message = str(e.value)
    assert "OFFGRID_FOO" in message
    assert "environment" in message


def test_other_environment_variables_are_ignored(tmp_path):
    config = Config.load(env=env_for(tmp_path, PORT="1", HOME="/nowhere", offgrid_port="5"))
    assert config.values == DEFAULTS


def test_bad_flag_value_names_the_flag(tmp_path):
    with pytest.raises(ConfigError) as e:
        Config.load(overrides={"port": -1}, env=env_for(tmp_path))
    assert "flag --port" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Config.load(overrides={"ctx": 10}, env=env_for(tmp_path))
    assert "flag --ctx" in str(e.value)


def test_bad_file_value_is_reported_even_when_env_would_override_it(tmp_path):
    path = write(tmp_path / "config.json", json.dumps({"port": 70000}))
    with pytest.raises(ConfigError) as e:
        Config.load(env=env_for(tmp_path, OFFGRID_PORT="8080"))
    assert re.search(r"\bport\b", said(e.value, path))


# The starter file ###########################################################

def test_starter_config_text_round_trips_to_the_defaults(tmp_path):
    text = offgrid.starter_config_text()
    assert text.startswith("//")
    for key, (kind, default, help_text) in offgrid.CONFIG_KEYS.items():
        assert help_text in text, "the starter file explains %s" % key
    path = write(tmp_path / "config.json", text)
    assert offgrid.read_config_file(path) == DEFAULTS
    assert list(offgrid.read_config_file(path)) == list(offgrid.CONFIG_KEYS)
    config = Config.load(env=env_for(tmp_path))
    assert config.values == DEFAULTS
    assert set(config.sources.values()) == {path}
