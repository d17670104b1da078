#!/usr/bin/env python3
"""The golden test model: a tiny llama whose greedy answer is the same string
on every build of offgrid (venv, zipapp, native binary, aarch64, appliance).

    python tests/golden_model.py OUT.gguf            # write the model (17 MB, a few seconds)
    python tests/golden_model.py OUT.gguf --golden   # and print the golden answer
    python tests/golden_model.py OUT.gguf --dtype f16 --n-embd 256   # an F16 model to quantize

The golden answer is for the F32 model of the default width. `--dtype f16`
stores the weight matrices as F16 (norms stay F32, as converters do), and a
width of 256 lets llama.cpp's K-quants (blocks of 256 values per row) apply
to every matrix: the quantization tests start from those.

The vocabulary comes from a vocab-only GGUF that llama-cpp-python's sdist
ships (vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf); two transformer
layers of random weights from a fixed seed are added with the gguf-py library
from the same sdist. No model is downloaded: the sdist is the one pip fetches
for the installed llama-cpp-python version, kept in the build cache
(${OFFGRID_BUILD_CACHE:-~/.cache/offgrid-build}/sdist/). The generated file is
never committed.

The golden answer is what offgrid gives for REQUEST, asked over HTTP from a
real `offgrid.py serve` run by this Python (`golden_text`). Every other build
must answer the same REQUEST with the same string. `Serve` starts any offgrid
command (`python3 offgrid.pyz`, `./offgrid-0.1.0-x86_64`) the same way.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFGRID = os.path.join(ROOT, "offgrid.py")

# The sdist that supplies the vocabulary and gguf-py when llama-cpp-python is
# not importable (the generator needs numpy, which llama-cpp-python brings).
DEFAULT_LLAMA_CPP_VERSION = "0.3.36"
VOCAB = "ggml-vocab-llama-spm.gguf"

# The model: llama architecture, 2 layers, n_embd 64, F32 weights drawn from
# numpy's legacy RandomState (its stream is frozen across numpy versions).
# At this scale the best token leads the second by at least 0.07 in logit at
# each of the 8 steps, far above the rounding differences between SIMD
# kernels (x86 AVX2 vs ARM NEON), so greedy decoding picks the same tokens.
WEIGHT_SEED = 20261124
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
CONTEXT_LENGTH = 512
WEIGHT_SCALE = 1.0

# The golden request. The file has no chat template, so offgrid picks the
# chat format for the llama architecture (CHAT_FORMAT_BY_ARCH in offgrid.py).
MODEL_FILE = "golden-tiny.gguf"
MODEL_ID = "golden-tiny"
CHAT_FORMAT = "llama-2"
PROMPT = "Once upon a time"
TEMPERATURE = 0
SEED = 1
MAX_TOKENS = 8
REQUEST = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": PROMPT}],
    "temperature": TEMPERATURE,
    "seed": SEED,
    "max_tokens": MAX_TOKENS,
}


def build_cache():
    """The build cache shared with build/wheels.sh and the appliance scripts."""
    return os.environ.get("OFFGRID_BUILD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "offgrid-build")


def llama_cpp_version():
    """The installed llama-cpp-python's version, without loading its library."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return DEFAULT_LLAMA_CPP_VERSION


def fetch_sdist(version, cache=None):
    """Path of llama-cpp-python's sdist in the cache, fetched with pip once."""
    folder = os.path.join(cache or build_cache(), "sdist")
    path = os.path.join(folder, "llama_cpp_python-%s.tar.gz" % version)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=folder)
    try:
        print("golden_model: fetching the llama-cpp-python %s sdist with pip" % version, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", tmp, "llama-cpp-python==%s" % version], check=True,
                       stdout=sys.stderr)
        got = [n for n in os.listdir(tmp) if n.endswith(".tar.gz")]
        if len(got) != 1:
            raise RuntimeError("pip download left %s in %s, expected one .tar.gz" % (got, tmp))
        os.replace(os.path.join(tmp, got[0]), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def unpack_sdist_parts(version, cache=None):
    """(vocab GGUF path, gguf-py folder) unpacked from the sdist into the cache."""
    top = "llama_cpp_python-%s" % version
    dest = os.path.join(cache or build_cache(), "sdist", top)
    vocab = os.path.join(dest, "vendor", "llama.cpp", "models", VOCAB)
    gguf_py = os.path.join(dest, "vendor", "llama.cpp", "gguf-py")
    if os.path.isfile(vocab) and os.path.isfile(os.path.join(gguf_py, "gguf", "__init__.py")):
        return vocab, gguf_py
    sdist = fetch_sdist(version, cache)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.dirname(dest))
    try:
        wanted = (top + "/vendor/llama.cpp/models/" + VOCAB, top + "/vendor/llama.cpp/gguf-py/")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if (m.isfile() or m.isdir()) and (m.name == wanted[0] or m.name.startswith(wanted[1]))]
            tar.extractall(tmp, members=members)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(os.path.join(tmp, top), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return vocab, gguf_py


DTYPES = {"f32": 0, "f16": 1}  # dtype -> general.file_type (llama_ftype)


def write_model(out, version=None, cache=None, dtype="f32", n_embd=N_EMBD):
    """Write the golden model to `out` (temporary name, fsync, rename):
    weight matrices in `dtype` (f32 or f16), `n_embd` wide (the feed-forward
    layer twice that)."""
    if dtype not in DTYPES:
        raise ValueError("dtype must be one of %s, not %r" % (", ".join(DTYPES), dtype))
    n_ff = N_FF if n_embd == N_EMBD else 2 * n_embd
    vocab_path, gguf_py = unpack_sdist_parts(version or llama_cpp_version(), cache)
    sys.path.insert(0, gguf_py)
    try:
        import gguf
        import numpy as np
    finally:
        sys.path.remove(gguf_py)

    vocab = gguf.GGUFReader(vocab_path)
    out = os.path.abspath(out)
    tmp = out + ".tmp"
    writer = gguf.GGUFWriter(tmp, "llama")
    hyper = {
        "llama.block_count": N_LAYER, "llama.context_length": CONTEXT_LENGTH,
        "llama.embedding_length": n_embd, "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": N_HEAD, "llama.attention.head_count_kv": N_HEAD,
        "llama.rope.dimension_count": n_embd // N_HEAD,
    }
    n_vocab = None
    for key, field in vocab.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.name":
            value = "offgrid golden tiny llama"
        elif key == "general.file_type":
            value = DTYPES[dtype]
        elif key in hyper:
            value = hyper.pop(key)
        elif key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    for key, value in hyper.items():
        writer.add_uint32(key, value)

    rng = np.random.RandomState(WEIGHT_SEED)

    def weights(*shape):  # numpy shape is ggml's ne reversed
        w = (rng.standard_normal(shape) * WEIGHT_SCALE / np.sqrt(shape[-1])).astype(np.float32)
        return w.astype(np.float16) if dtype == "f16" else w

    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    for i in range(N_LAYER):
        blk = "blk.%d." % i
        writer.add_tensor(blk + "attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(blk + name + ".weight", weights(n_embd, n_embd))
        writer.add_tensor(blk + "ffn_norm.weight", ones)
        writer.add_tensor(blk + "ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_down.weight", weights(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weights(n_vocab, n_embd))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class Serve:
    """An offgrid `serve` started from any command line on a free port of
    127.0.0.1, with its own OFFGRID_HOME and the golden model as its only
    model. `cmd` is what runs offgrid: [python, offgrid.py], [python3, x.pyz]
    or [binary]. Use as a context manager; `stop()` returns the exit code."""

    def __init__(self, cmd, home, model_path, env=None, timeout=180):
        self.home = str(home)
        self.models = os.path.join(self.home, "models")
        os.makedirs(self.models, exist_ok=True)
        shutil.copyfile(model_path, os.path.join(self.models, MODEL_FILE))
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFGRID_", "SHIV_"))}
        child_env.update(OFFGRID_HOME=self.home, PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        self.log_path = os.path.join(self.home, "serve.log")
        self.err_path = os.path.join(self.home, "serve.err")
        self._out, self._err = open(self.log_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(list(cmd) + ["serve", "--port", "0", "--models-dir", self.models],
                                     stdout=self._out, stderr=self._err, env=child_env, cwd=self.home)
        self.url = None
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                found = re.search(r"offgrid listening url=(http://[0-9.]+:\d+)", self.output())
                if found:
                    self.url = found.group(1)
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError("%s exited %s before listening:\n%s" % (
                        " ".join(cmd), self.proc.returncode, self.output()[-4000:]))
                time.sleep(0.1)
            else:
                raise RuntimeError("%s did not listen within %d s:\n%s" % (
                    " ".join(cmd), timeout, self.output()[-4000:]))
        except BaseException:
            self.stop()
            raise

    def output(self):
        """stdout and stderr so far."""
        with open(self.log_path) as f, open(self.err_path) as g:
            return f.read() + g.read()

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def request(self, method, path, body=None, timeout=300):
        """(status, parsed JSON body) of one request."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw

    def chat(self, timeout=300):
        """The golden request's answer text; raises with the server's reply otherwise."""
        status, body = self.request("POST", "/v1/chat/completions", REQUEST, timeout=timeout)
        if status != 200:
            raise RuntimeError("chat completion answered %s: %s\n%s" % (status, body, self.output()[-4000:]))
        return body["choices"][0]["message"]["content"]

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def golden_text(model_path, python=None):
    """The golden answer: REQUEST asked of `offgrid.py serve` run by `python`
    (this interpreter by default, i.e. the venv's llama-cpp-python)."""
    home = tempfile.mkdtemp(prefix="offgrid-golden-")
    try:
        with Serve([python or sys.executable, OFFGRID], home, model_path) as srv:
            return srv.chat()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The sdist is fetched once into %s/sdist." % build_cache())
    parser.add_argument("out", help="where to write the model, e.g. /tmp/golden-tiny.gguf")
    parser.add_argument("--llama-cpp-version", help="take the vocab and gguf-py from this sdist version "
                        "(default: the installed llama-cpp-python, else %s)" % DEFAULT_LLAMA_CPP_VERSION)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                        help="type of the weight matrices (default f32; the golden answer is for f32)")
    parser.add_argument("--n-embd", type=int, default=N_EMBD, metavar="N",
                        help="model width (default %d; 256 lets K-quants apply to every matrix)" % N_EMBD)
    parser.add_argument("--golden", action="store_true",
                        help="then print the golden answer from `offgrid.py serve` run by this Python")
    parser.add_argument("--json", action="store_true", help="print the path, request and answer as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    path = write_model(args.out, args.llama_cpp_version, dtype=args.dtype, n_embd=args.n_embd)
    print("golden_model: wrote %s (%.1f MB) in %.1f s" % (
        path, os.path.getsize(path) / 1e6, time.monotonic() - started), file=sys.stderr)
    text = golden_text(path) if args.golden else None
    if args.json:
        print(json.dumps({"model": path, "request": REQUEST, "golden": text}))
    elif args.golden:
        print(json.dumps(text))
    else:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
