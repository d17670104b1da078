"""deploy/: the container image, its Kubernetes manifests, the Compose file
and the Grafana board.

- The amd64 image is built once per run by build/container.sh (the Debian
  base from mmdebstrap and the llama-cpp-python wheel are cached in the build
  cache) and run with podman: a stick folder holding SmolLM2 is imported into
  the /data volume with the documented one-liner, then a chat answers with
  the key (from a mounted secret file) and is refused without; the
  healthcheck turns healthy; `podman stop` ends it with exit 0 inside the
  grace period; the model is still there after a restart.
- `podman kube play` runs deploy/kubernetes/'s PVC and Deployment, the
  usb-import initContainer's command fills the claim from a stick folder,
  and the same chat works. podman 4.3 cannot pass a Secret to a pod, so the
  key file comes from a hostPath at the Secret's mount path.
- Every manifest is validated against the Kubernetes schemas that
  kubernetes-validate bundles; compose.yaml with podman-compose's parser.
- Every query of deploy/grafana/offgrid.json is valid PromQL and names only
  metrics a live server's GET /metrics exports; the board type-checks as
  Grafana's Dashboard (@grafana/schema's TypeScript types, with tsc).
- The linux/arm64 image is built under qemu-user (the aarch64 wheel and the
  arm64 base from the build cache) and its offgrid answers the golden
  prompt (tests/golden_model.py) exactly as this machine's does.

podman runs here with runc, cgroupfs and no default ulimits (a
containers.conf the tests write): this machine's hybrid cgroups and
rlimit rules need that; nothing of it is in the image or the docs.
Needs root, podman, runc, mmdebstrap and zstd (.ci/run installs them).
Measured on a 2-core machine shared with other work (load average 20): the
amd64 tests took 4.6 minutes with the build caches warm (the image rebuilt
after an offgrid.py change in 1 minute; the five chats of the 135M model
took most of the rest). From a cold cache add the base root file system
(mmdebstrap, 1.6 min) and the first full image build (1.4 min); the
x86_64 wheel is the one .ci/run builds anyway.
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import IN_CI, SMOL, cached_build, need, need_arm64_emulation, need_root_and, wait_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
KUBE = os.path.join(DEPLOY, "kubernetes")
KEY = "og-container-test-key"
UID = 10001  # the image's user
ARM64_TAG = "localhost/offgrid-test:arm64"  # the tests' own name, beside a developer's offgrid:VERSION-arm64

pytestmark = pytest.mark.slow


def need_container_tools():
    need_root_and(("podman", "runc", "mmdebstrap", "zstd"),
                  "the container tests need root (podman with runc, mmdebstrap)")


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    need_container_tools()
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    return env


def podman(env, *args, check=True, timeout=300):
    p = subprocess.run(["podman"] + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, "podman %s exited %s\n%s\n%s" % (" ".join(args), p.returncode, p.stdout[-3000:],
                                                                   p.stderr[-3000:])
    return p


def offgrid_lines(text):
    """Lines offgrid wrote, without podman's own complaints (it has no
    systemd here to run health checks on a timer)."""
    return [line for line in text.splitlines() if not line.startswith("time=")]


@pytest.fixture(scope="module")
def image(podman_env):
    started = time.monotonic()
    p = subprocess.run([os.path.join(ROOT, "build", "container.sh"), "amd64"], env=podman_env,
                       capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-6000:]
    sys.stderr.write("".join(line + "\n" for line in p.stderr.splitlines() if line.startswith("container.sh:")))
    sys.stderr.write("image build: %.1f s\n" % (time.monotonic() - started))
    return p.stdout.split()[-1]


@pytest.fixture(scope="module")
def stick(tmp_path_factory, smol_gguf):
    """A folder like a USB stick, holding SmolLM2, readable by the image's user."""
    folder = tmp_path_factory.mktemp("stick")
    os.chmod(str(folder), 0o755)
    shutil.copy(smol_gguf, str(folder / SMOL["file"]))
    os.chmod(str(folder / SMOL["file"]), 0o644)
    return str(folder)


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "api-key"
    path.write_text(KEY + "\n")
    os.chmod(str(path.parent), 0o755)
    os.chmod(str(path), 0o644)
    return str(path)


def request(port, path, body=None, key=None, timeout=120):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (urllib.error.URLError, ConnectionError, OSError):
        return None, None


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy_http(port, timeout=180):
    return wait_for("the container's /health on port %d" % port,
                    lambda: request(port, "/health")[0] == 200, timeout=timeout, every=0.5)


CHAT = {"messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8, "temperature": 0}


def installed(port):
    status, body = request(port, "/v1/models", key=KEY)
    assert status == 200, (status, body)
    return [m["id"] for m in body["data"]]


def assert_chat_needs_the_key(port):
    """The model imported from the stick answers with the key, and without
    one or with a wrong one the API says 401."""
    models = installed(port)
    assert len(models) == 1 and "smollm2" in models[0], models
    chat = dict(CHAT, model=models[0])
    status, body = request(port, "/v1/chat/completions", chat)
    assert status == 401 and body["error"]["code"] == "missing_api_key", (status, body)
    status, body = request(port, "/v1/chat/completions", chat, key="og-wrong")
    assert status == 401, (status, body)
    status, body = request(port, "/v1/chat/completions", chat, key=KEY, timeout=300)
    assert status == 200, (status, body)
    assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] > 0, body


def test_container_script_passes_shellcheck_and_rejects_bad_options():
    if shutil.which("shellcheck") is None:
        if IN_CI:
            pytest.fail("shellcheck is missing (see .ci/run's package list)")
        pytest.skip("shellcheck is missing")
    script = os.path.join(ROOT, "build", "container.sh")
    p = subprocess.run(["shellcheck", "-x", "-P", os.path.dirname(script), script], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
    p = subprocess.run([script, "riscv64"], capture_output=True, text=True)
    assert p.returncode != 0 and "unknown argument 'riscv64'" in p.stderr and len(p.stderr.splitlines()) == 1


# podman run ###################################################################

def test_image_refuses_to_serve_without_a_key_in_one_line(podman_env, image):
    p = podman(podman_env, "run", "--rm", image, check=False, timeout=120)
    lines = offgrid_lines(p.stderr)
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert lines[0].startswith("offgrid: error: refusing to serve on 0.0.0.0 without an API key"), lines
    assert "OFFGRID_API_KEY" in lines[0] and "--insecure" in lines[0]


def test_image_runs_as_non_root_with_data_as_home(podman_env, image):
    p = podman(podman_env, "run", "--rm", "--entrypoint", "sh", image, "-c",
               'id -u; echo "$OFFGRID_HOME"; offgrid version; python3 -c "import llama_cpp, psutil"')
    out = p.stdout.split("\n")
    assert out[0] == str(UID) and out[1] == "/data" and "llama-cpp-python 0.3.36" in out[2], p.stdout
    info = json.loads(podman(podman_env, "image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["ExposedPorts"] == {"11611/tcp": {}} and "/data" in config["Volumes"], config
    # A Docker-format image: OCI images have no HEALTHCHECK.
    assert "/health" in " ".join(info["Healthcheck"]["Test"]), info


def test_insecure_serves_without_a_key_with_a_warning(podman_env, image):
    port = free_port()
    name = "offgrid-test-insecure"
    podman(podman_env, "rm", "-f", name, check=False)
    podman(podman_env, "run", "-d", "--name", name, "-p", "127.0.0.1:%d:11611" % port, image, "serve", "--insecure")
    try:
        wait_healthy_http(port)
        assert request(port, "/v1/models")[0] == 200
        assert "NO API KEY" in podman(podman_env, "logs", name).stderr
    finally:
        podman(podman_env, "rm", "-f", "-t", "0", name, check=False)


@pytest.fixture(scope="module")
def volume(podman_env, image, stick):
    """The data volume with SmolLM2 imported from the stick, by the
    one-liner of docs/deploy.md."""
    name = "offgrid-test-data"
    podman(podman_env, "volume", "rm", "-f", name, check=False)
    podman(podman_env, "volume", "create", name)
    p = podman(podman_env, "run", "--rm", "-v", name + ":/data", "-v", stick + ":/stick:ro", image,
               "import", "/stick")
    assert "1 imported, 0 skipped, 0 failed" in p.stdout, p.stdout
    yield name
    podman(podman_env, "volume", "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def container(podman_env, image, volume, secret):
    """offgrid serving from the volume, the key from a mounted secret file."""
    name = "offgrid-test"
    port = free_port()
    podman(podman_env, "rm", "-f", name, check=False)
    podman(podman_env, "run", "-d", "--name", name, "-p", "127.0.0.1:%d:11611" % port,
           "-v", volume + ":/data", "-v", secret + ":/run/secrets/offgrid_api_key:ro",
           "-e", "OFFGRID_API_KEY_FILE=/run/secrets/offgrid_api_key", "--stop-timeout", "30", image)
    try:
        wait_healthy_http(port)
        yield name, port
    finally:
        sys.stderr.write("\n".join(offgrid_lines(podman(podman_env, "logs", name, check=False).stderr)[-20:]))
        podman(podman_env, "rm", "-f", "-t", "0", name, check=False)


def test_chat_answers_with_the_key_and_is_refused_without(container):
    assert_chat_needs_the_key(container[1])


def test_healthcheck_turns_healthy(podman_env, container):
    name = container[0]
    # No systemd here to run the check on its timer, so it is run by hand,
    # as the timer would.
    wait_for("a passing health check", lambda: podman(podman_env, "healthcheck", "run", name,
                                                       check=False).returncode == 0, timeout=120, every=1)
    state = json.loads(podman(podman_env, "inspect", name).stdout)[0]["State"]
    health = state.get("Health") or state.get("Healthcheck")
    assert health["Status"] == "healthy", state


def test_stop_is_clean_and_the_volume_keeps_the_model_across_a_restart(podman_env, container):
    name, port = container
    podman(podman_env, "stop", "-t", "30", name, timeout=120)
    state = json.loads(podman(podman_env, "inspect", name).stdout)[0]["State"]
    # 0, not 137: offgrid finished on SIGTERM before the grace period ran out.
    assert state["ExitCode"] == 0, state
    assert "stopped" in offgrid_lines(podman(podman_env, "logs", name).stderr)[-1]
    podman(podman_env, "start", name)
    wait_healthy_http(port)
    assert_chat_needs_the_key(port)


# arm64 ########################################################################

@pytest.fixture(scope="module")
def arm64_image(podman_env):
    """The linux/arm64 image, built under qemu-user by build/container.sh
    from the cross-built aarch64 wheel and the arm64 Debian base, both from
    the build cache (outside CI a missing one skips; CI makes them)."""
    need_arm64_emulation()
    started = time.monotonic()
    out = cached_build([os.path.join(ROOT, "build", "container.sh"), "arm64", "--tag", ARM64_TAG], env=podman_env)
    sys.stderr.write("arm64 image build: %.1f s\n" % (time.monotonic() - started))
    return out.split()[-1]


def test_arm64_image_answers_the_golden_prompt(podman_env, arm64_image, tmp_path):
    need("llama_cpp", "the golden answer")
    info = json.loads(podman(podman_env, "image", "inspect", arm64_image).stdout)[0]
    assert (info["Os"], info["Architecture"]) == ("linux", "arm64"), (info["Os"], info["Architecture"])
    p = podman(podman_env, "run", "--rm", "--entrypoint", "sh", arm64_image, "-c", "uname -m; offgrid version",
               timeout=300)
    import llama_cpp
    assert p.stdout.split("\n")[0] == "aarch64", p.stdout
    assert "llama-cpp-python %s" % llama_cpp.__version__ in p.stdout, p.stdout
    # The golden model, in a models folder the image's user owns.
    models = tmp_path / "models"
    models.mkdir()
    path = golden_model.write_model(str(models / golden_model.MODEL_FILE))
    golden = golden_model.golden_text(path)
    for f in (models, models / golden_model.MODEL_FILE):
        os.chown(str(f), UID, UID)
    name, port = "offgrid-test-arm64", free_port()
    podman(podman_env, "rm", "-f", name, check=False)
    podman(podman_env, "run", "-d", "--name", name, "-p", "127.0.0.1:%d:11611" % port,
           "-v", "%s:/data/models" % models, "-e", "OFFGRID_API_KEY=" + KEY, arm64_image)
    try:
        wait_healthy_http(port, timeout=300)
        status, body = request(port, "/v1/chat/completions", golden_model.REQUEST)
        assert status == 401, (status, body)
        status, body = request(port, "/v1/chat/completions", golden_model.REQUEST, key=KEY, timeout=600)
        assert status == 200, (status, body)
        assert body["choices"][0]["message"]["content"] == golden
        podman(podman_env, "stop", "-t", "30", name, timeout=120)
        state = json.loads(podman(podman_env, "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
    finally:
        sys.stderr.write("\n".join(offgrid_lines(podman(podman_env, "logs", name, check=False).stderr)[-10:]) + "\n")
        podman(podman_env, "rm", "-f", "-t", "0", name, check=False)


# Kubernetes ###################################################################

def load_yaml_docs(path):
    import yaml
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kube_documents():
    """The base manifests, and the Deployment with the usb-import
    component's patch merged in (what kustomize makes of it)."""
    import yaml
    with open(os.path.join(KUBE, "kustomization.yaml")) as f:
        resources = yaml.safe_load(f)["resources"]
    docs = {}
    for name in resources:
        for doc in load_yaml_docs(os.path.join(KUBE, name)):
            docs[doc["kind"]] = doc
    with open(os.path.join(KUBE, "usb-import", "kustomization.yaml")) as f:
        overlay = yaml.safe_load(f)
    assert overlay["kind"] == "Component"
    patch = load_yaml_docs(os.path.join(KUBE, "usb-import", overlay["patches"][0]["path"]))[0]
    merged = copy.deepcopy(docs["Deployment"])
    spec, extra = merged["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
    assert patch["metadata"]["name"] == merged["metadata"]["name"]
    spec["initContainers"] = extra["initContainers"]
    spec["volumes"] = spec["volumes"] + extra["volumes"]
    return docs, merged


def test_manifests_validate_against_the_kubernetes_schemas():
    need("kubernetes_validate", "the Kubernetes schema check")
    import kubernetes_validate
    docs, merged = kube_documents()
    assert sorted(docs) == ["Deployment", "PersistentVolumeClaim", "Secret", "Service"]
    for doc in list(docs.values()) + [merged]:
        for version in ("1.29.0", "1.33.0"):
            kubernetes_validate.validate(doc, version, strict=True)
    bad = copy.deepcopy(merged)
    bad["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True  # belongs in securityContext
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33.0", strict=True)


def test_deployment_is_non_root_read_only_and_probed_on_health():
    docs, merged = kube_documents()
    pod = merged["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
    main = pod["containers"][0]
    assert main["readinessProbe"]["httpGet"]["path"] == "/health" == main["livenessProbe"]["httpGet"]["path"]
    env = {e["name"]: e["value"] for e in main["env"]}
    limit = main["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and int(env["OFFGRID_MAX_LOADED_BYTES"]) == (int(limit[:-2]) << 30) - (512 << 20)
    assert docs["Secret"]["stringData"]["api-key"] == ""  # fails closed until a key is put in


def test_kube_play_runs_the_deployment_and_chat_works(podman_env, image, stick, tmp_path):
    import yaml
    docs, _ = kube_documents()
    deployment = copy.deepcopy(docs["Deployment"])
    spec = deployment["spec"]["template"]["spec"]
    # podman 4.3's kube play cannot hand a Secret to a pod: a secret volume
    # crashes it (nil pointer in VolumeFromSecret) and a secretKeyRef fails
    # to parse the secret it made from the Secret document. So the key file
    # comes from a hostPath at the same mount path; the rest is as written.
    key_dir = tmp_path / "secret"
    key_dir.mkdir()
    (key_dir / "api-key").write_text(KEY + "\n")
    os.chmod(str(key_dir), 0o755)
    os.chmod(str(key_dir / "api-key"), 0o644)
    key_volume = next(v for v in spec["volumes"] if v["name"] == "api-key")
    assert key_volume.pop("secret")["secretName"] == docs["Secret"]["metadata"]["name"]
    key_volume["hostPath"] = {"path": str(key_dir), "type": "Directory"}
    spec["containers"][0]["image"] = image
    port = free_port()
    spec["containers"][0]["ports"][0]["hostPort"] = port  # what kube play publishes
    spec["containers"][0]["ports"][0]["hostIP"] = "127.0.0.1"
    claim = tmp_path / "pvc.yaml"
    claim.write_text(yaml.safe_dump(docs["PersistentVolumeClaim"]))
    play = tmp_path / "deployment.yaml"
    play.write_text(yaml.safe_dump(deployment))
    volume = docs["PersistentVolumeClaim"]["metadata"]["name"]
    podman(podman_env, "kube", "down", str(play), check=False)
    podman(podman_env, "volume", "rm", "-f", volume, check=False)
    try:
        podman(podman_env, "kube", "play", str(claim))
        # The usb-import initContainer's command, run on its own: podman 4.3
        # tries to remove an init container while it still runs.
        init = kube_documents()[1]["spec"]["template"]["spec"]["initContainers"][0]
        p = podman(podman_env, "run", "--rm", "--read-only", "-v", volume + ":/data", "-v", stick + ":/stick:ro",
                   image, *init["args"])
        assert "1 imported" in p.stdout, p.stdout
        podman(podman_env, "kube", "play", str(play), timeout=600)
        wait_healthy_http(port)
        assert_chat_needs_the_key(port)
        inspect = json.loads(podman(podman_env, "inspect", "offgrid-pod-0-offgrid").stdout)[0]
        assert inspect["Config"]["User"] == "10001:10001" and inspect["HostConfig"]["ReadonlyRootfs"], inspect["Config"]
    finally:
        podman(podman_env, "kube", "down", str(play), check=False)
        podman(podman_env, "volume", "rm", "-f", volume, check=False)


# Compose ######################################################################

def test_compose_file_is_valid_for_podman_compose(tmp_path):
    need("podman_compose", "the Compose check")
    key = os.path.join(DEPLOY, "api-key")
    made = not os.path.exists(key)
    if made:
        with open(key, "w") as f:
            f.write(KEY + "\n")
    try:
        p = subprocess.run([sys.executable, "-m", "podman_compose", "-f", os.path.join(DEPLOY, "compose.yaml"),
                            "--profile", "monitoring", "config"], capture_output=True, text=True, timeout=120,
                           cwd=DEPLOY)
    finally:
        if made:
            os.unlink(key)
    assert p.returncode == 0, p.stderr
    import yaml
    config = yaml.safe_load(p.stdout)
    assert sorted(config["services"]) == ["grafana", "offgrid", "prometheus"], config["services"]
    offgrid = config["services"]["offgrid"]
    assert offgrid["restart"] == "unless-stopped" and "/health" in " ".join(offgrid["healthcheck"]["test"])
    assert offgrid["environment"]["OFFGRID_API_KEY_FILE"] == "/run/secrets/offgrid_api_key"
    assert offgrid["secrets"] == ["offgrid_api_key"] and "offgrid-data:/data" in offgrid["volumes"]
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        scrape = yaml.safe_load(f)["scrape_configs"][0]
    assert scrape["authorization"]["credentials_file"] == "/run/secrets/offgrid_api_key"
    assert scrape["static_configs"][0]["targets"] == ["offgrid:11611"]


def test_compose_up_serves_the_chat_with_the_key_from_its_secret(podman_env, image, stick):
    need("podman_compose", "running compose.yaml")
    key = os.path.join(DEPLOY, "api-key")
    assert not os.path.exists(key) or open(key).read().strip() == KEY, "deploy/api-key is someone's real key"
    with open(key, "w") as f:
        f.write(KEY + "\n")
    os.chmod(key, 0o644)
    port = free_port()
    env = dict(podman_env, OFFGRID_PUBLISH="127.0.0.1:%d" % port)
    compose = [sys.executable, "-m", "podman_compose", "-p", "offgrid-test", "-f", os.path.join(DEPLOY, "compose.yaml")]

    def run(*args):
        p = subprocess.run(compose + list(args), env=env, capture_output=True, text=True, timeout=600, cwd=DEPLOY)
        assert p.returncode == 0, "%s\n%s" % (p.stdout[-3000:], p.stderr[-3000:])
        return p
    try:
        run("up", "-d")
        wait_healthy_http(port)
        p = run("run", "--rm", "-v", stick + ":/stick:ro", "offgrid", "import", "/stick")
        assert "1 imported" in p.stdout, p.stdout
        assert_chat_needs_the_key(port)
    finally:
        subprocess.run(compose + ["down", "-v"], env=env, capture_output=True, timeout=300, cwd=DEPLOY)
        os.unlink(key)


# Grafana ######################################################################

def board():
    with open(os.path.join(DEPLOY, "grafana", "offgrid.json")) as f:
        return json.load(f)


def board_queries(b):
    out = []
    for panel in b["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_grafana_board_is_well_formed():
    b = board()
    assert b["uid"] and b["title"] and isinstance(b["schemaVersion"], int)
    ids = [p["id"] for p in b["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in b["templating"]["list"]}
    for p in b["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= variables, (p["title"], used)
    # Every area the board promises has a panel.
    titles = " ".join(p["title"].lower() for p in b["panels"])
    for word in ("route", "tokens per second", "time to first token", "queue", "slots", "loaded models",
                 "memory", "progress", "transfer"):
        assert word in titles, word
    # The provisioning files name the board's folder and the data source type.
    with open(os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yaml")) as f:
        assert "type: prometheus" in f.read()


NODE_MODULES = os.environ.get("OFFGRID_NODE_MODULES") or os.path.join(ROOT, ".ci", "node", "node_modules")


def test_grafana_board_checks_against_grafanas_dashboard_schema(tmp_path):
    # Grafana publishes its dashboard JSON model as TypeScript types
    # (@grafana/schema, generated from its CUE schema); the TypeScript
    # compiler checks the board as a literal of type Dashboard: every field
    # known, of the right type, required ones present.
    schema = os.path.join(NODE_MODULES, "@grafana", "schema", "dist", "types", "index")
    tsc = os.path.join(NODE_MODULES, "typescript", "bin", "tsc")
    missing = [p for p in (schema + ".d.ts", tsc) if not os.path.exists(p)]
    if shutil.which("node") is None or missing:
        why = "node, @grafana/schema and typescript are needed in %s (.ci/run installs them)" % NODE_MODULES
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    good = board()
    bad = copy.deepcopy(good)
    bad["panels"][1]["gridPos"]["w"] = "wide"
    bad["refresh"] = 30
    del bad["panels"][2]["type"]
    for name, b in (("board", good), ("broken", bad)):
        source = "import type { Dashboard } from %s;\nexport const board: Dashboard = %s;\n"
        (tmp_path / (name + ".ts")).write_text(source % (json.dumps(schema), json.dumps(b, indent=1)))
    p = subprocess.run(["node", tsc, "--noEmit", "--strict", "--skipLibCheck", "--target", "es2020", "--module",
                        "esnext", "--moduleResolution", "bundler", "board.ts", "broken.ts"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    errors = [line for line in p.stdout.splitlines() if ": error TS" in line]
    assert not [e for e in errors if e.startswith("board.ts")], p.stdout
    # The check is real: each of the three faults is reported.
    broken = [e for e in errors if e.startswith("broken.ts")]
    assert len(broken) == 3, p.stdout + p.stderr


def test_every_grafana_query_is_promql_naming_exported_metrics(start_server, smol_store):
    need("promql_parser", "the PromQL check of the Grafana board")
    need("prometheus_client", "parsing GET /metrics")
    import promql_parser
    from prometheus_client.parser import text_string_to_metric_families
    srv = start_server(models_dir=smol_store)
    assert srv.post("/v1/chat/completions", dict(CHAT, model=SMOL["id"], max_tokens=2))[0] == 200
    with urllib.request.urlopen(srv.url + "/metrics", timeout=60) as r:
        text = r.read().decode("utf-8")
    exported = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
    # Families offgrid prints whatever the state (counters get _total).
    assert {"offgrid_requests_total", "offgrid_transfer_bytes", "offgrid_slots"} <= exported, sorted(exported)
    queries = board_queries(board())
    assert len(queries) >= 20
    missing = []
    for title, expr in queries:
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        promql_parser.parse(concrete)  # raises on invalid PromQL
        names = set(re.findall(r"\boffgrid_[a-z0-9_]+", expr))
        assert names, (title, expr)
        missing += ["%s: %s" % (title, n) for n in sorted(names - exported)]
    assert not missing, missing
