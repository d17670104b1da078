"""GPU offload: the gpu_layers setting, the devices llama.cpp sees, where a
model's layers go and what each memory pool is charged. These run on a
CPU-only machine: `auto` must come to 0 there, and a positive value must
be ignored with one warning while inference goes on. The placement rule is
checked against llama.cpp's own split (measured with two RPC workers: see
the layer_split test)."""

import json
import os

import pytest

import golden_model
import offgrid
from conftest import need, run_cli


def load(env=None, overrides=None, tmp_path=None, files=None):
    env = dict(env or {})
    env["OFFGRID_HOME"] = str(tmp_path)
    return offgrid.Config.load(overrides or {}, env=env)


# The setting ##################################################################

def test_gpu_layers_defaults_to_auto_and_parses_from_each_source(tmp_path):
    assert load(tmp_path=tmp_path)["gpu_layers"] == "auto"
    (tmp_path / "config.json").write_text('{"gpu_layers": 7}')
    config = load(tmp_path=tmp_path)
    assert config["gpu_layers"] == 7 and config.sources["gpu_layers"].endswith("config.json")
    config = load({"OFFGRID_GPU_LAYERS": " 12 "}, tmp_path=tmp_path)
    assert config["gpu_layers"] == 12 and config.sources["gpu_layers"] == "environment OFFGRID_GPU_LAYERS"
    config = load({"OFFGRID_GPU_LAYERS": "12"}, {"gpu_layers": "AUTO"}, tmp_path=tmp_path)
    assert config["gpu_layers"] == "auto" and config.sources["gpu_layers"] == "flag --gpu-layers"
    (tmp_path / "config.json").write_text('{"gpu_layers": "0"}')
    assert load(tmp_path=tmp_path)["gpu_layers"] == 0


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "", "all", "100001"])
def test_bad_gpu_layers_in_the_environment_names_the_variable(tmp_path, value):
    with pytest.raises(offgrid.ConfigError) as e:
        load({"OFFGRID_GPU_LAYERS": value}, tmp_path=tmp_path)
    assert "environment OFFGRID_GPU_LAYERS: gpu_layers must be auto or a whole number" in str(e.value)


@pytest.mark.parametrize("value", ["true", "-3", "2.0", "null", "[1]"])
def test_bad_gpu_layers_in_the_file_names_the_file(tmp_path, value):
    (tmp_path / "config.json").write_text('{"gpu_layers": %s}' % value)
    with pytest.raises(offgrid.ConfigError) as e:
        load(tmp_path=tmp_path)
    assert "config.json: gpu_layers must be auto or a whole number" in str(e.value)


def test_bad_serve_flag_is_one_error_line(tmp_path):
    p = run_cli(["serve", "--gpu-layers", "lots"], tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        'offgrid: error: flag --gpu-layers: gpu_layers must be auto or a whole number of layers '
        'from 0 to 100000, got "lots"']


def test_config_show_and_init_carry_gpu_layers(tmp_path):
    p = run_cli(["config", "show", "--json"], tmp_path, env={"OFFGRID_GPU_LAYERS": "3"})
    assert json.loads(p.stdout)["values"]["gpu_layers"] == {"value": 3, "source": "environment OFFGRID_GPU_LAYERS"}
    assert '"gpu_layers": "auto"' in offgrid.starter_config_text()


# Placement ####################################################################

def fake_device(name, kind="gpu", free=8 << 30, backend="CUDA", pool=None):
    """A device entry as devices() gives one, for llama.cpp's split rule."""
    return {"name": name, "description": name, "type": kind, "backend": backend, "memory_total": free,
            "memory_free": free, "pool": pool or (offgrid.RAM_POOL if kind != "gpu" else name)}


def test_layer_split_matches_llama_cpp_with_two_rpc_workers():
    # Measured (shared/research/rpc.md): Gemma 3 270M (18 layers) with
    # n_gpu_layers=99 on two RPC workers of equal free memory put layers
    # 0-9 on the first and 10-17 plus the output layer on the second.
    workers = [fake_device("RPC0", backend="RPC"), fake_device("RPC1", backend="RPC")]
    split = offgrid.layer_split(18, 99, workers)
    assert split == ["RPC0"] * 10 + ["RPC1"] * 9
    # A partial offload keeps the first layers on the CPU: the last N go.
    split = offgrid.layer_split(18, 5, workers[:1])
    assert split == ["CPU"] * 14 + ["RPC0"] * 5
    assert offgrid.layer_split(18, 0, workers) == ["CPU"] * 19
    # The split follows free memory: a device with 3x the room takes 3x the layers.
    split = offgrid.layer_split(7, 8, [fake_device("CUDA0", free=1 << 30), fake_device("CUDA1", free=3 << 30)])
    assert split.count("CUDA0") == 2 and split.count("CUDA1") == 6


def test_offload_devices_are_chosen_as_llama_cpp_chooses_them():
    cpu = fake_device("CPU", "cpu", backend="CPU")
    igpu = fake_device("CUDA0", "igpu")
    gpu = fake_device("Vulkan0", "gpu", backend="Vulkan")
    rpc = fake_device("RPC0", backend="RPC")
    assert offgrid.offload_devices([cpu]) == []
    assert offgrid.offload_devices([cpu, igpu]) == [igpu]
    assert offgrid.offload_devices([cpu, igpu, gpu]) == [gpu]      # an iGPU only when there is no GPU
    assert offgrid.offload_devices([cpu, gpu, rpc]) == [rpc, gpu]  # RPC servers first
    assert offgrid.offload_devices([cpu, igpu, rpc]) == [rpc, igpu]


def manifest_of(path, **extra):
    m = {"id": "m", "file": os.path.basename(path), "size": os.path.getsize(path)}
    m.update(extra)
    return m


def test_auto_resolves_to_zero_layers_without_a_gpu_backend(tmp_path, starter_gguf):
    need("llama_cpp", "reading llama.cpp's devices")
    devs = offgrid.devices()
    assert devs[0]["name"] == "CPU" and devs[0]["type"] == "cpu" and devs[0]["pool"] == "ram"
    assert devs[0]["memory_total"] > devs[0]["memory_free"] > 0
    assert offgrid.offload_devices(devs) == [], "this test is for a machine without a GPU backend: %s" % devs
    info = offgrid.read_gguf(starter_gguf)
    config = load(tmp_path=tmp_path)
    kwargs, plan = offgrid.model_load_params(config, manifest_of(starter_gguf), info, devs)
    assert kwargs == {"n_gpu_layers": 0}
    assert plan["gpu_layers"] == "auto" and plan["gpu_layers_used"] == 0 and not plan["ignored"]
    assert plan["layers"] == ["CPU"] * 19  # 18 repeating layers and the output layer
    kwargs, plan = offgrid.model_load_params(load({"OFFGRID_GPU_LAYERS": "8"}, tmp_path=tmp_path),
                                             manifest_of(starter_gguf), info, devs)
    assert kwargs == {"n_gpu_layers": 0} and plan["ignored"] and plan["gpu_layers"] == 8


def test_manifest_gpu_layers_wins_over_the_config(tmp_path, starter_gguf):
    info = offgrid.read_gguf(starter_gguf)
    devs = [fake_device("CPU", "cpu", backend="CPU"), fake_device("CUDA0")]
    config = load({"OFFGRID_GPU_LAYERS": "2"}, tmp_path=tmp_path)
    kwargs, plan = offgrid.model_load_params(config, manifest_of(starter_gguf, gpu_layers=5), info, devs)
    assert kwargs == {"n_gpu_layers": 5} and plan["source"] == "manifest"
    assert plan["layers"] == ["CPU"] * 14 + ["CUDA0"] * 5
    kwargs, plan = offgrid.model_load_params(config, manifest_of(starter_gguf), info, devs)
    assert kwargs == {"n_gpu_layers": 2} and plan["source"] == "environment OFFGRID_GPU_LAYERS"
    kwargs, plan = offgrid.model_load_params(load(tmp_path=tmp_path), manifest_of(starter_gguf), info, devs)
    assert plan["gpu_layers_used"] == 19 and plan["layers"] == ["CUDA0"] * 19
    with pytest.raises(offgrid.StoreError) as e:
        offgrid.model_load_params(config, manifest_of(starter_gguf, gpu_layers="half"), info, devs)
    assert str(e.value) == ('model m: gpu_layers in its manifest must be auto or a whole number of layers '
                            'from 0 to 100000, got "half"')


def test_offloaded_bytes_are_charged_to_the_gpu_and_shared_memory_once(tmp_path, starter_gguf):
    info = offgrid.read_gguf(starter_gguf)
    size = os.path.getsize(starter_gguf)
    kv = offgrid.kv_cache_bytes(info["metadata"], 1024)
    tensors = info["tensor_bytes"]
    assert len(tensors["layers"]) == 18 and all(n > 0 for n in tensors["layers"])
    assert tensors["tied_output"]  # Gemma's output layer reuses the token embeddings
    assert sum(tensors["layers"]) + tensors["output"] + tensors["other"] < size
    config = load(tmp_path=tmp_path)
    cpu = fake_device("CPU", "cpu", backend="CPU")

    def placed(devs):
        _, plan = offgrid.model_load_params(config, manifest_of(starter_gguf), info, devs)
        return offgrid.placement_memory(info, plan, size, kv, devs)

    # CPU only: the whole file and KV cache in RAM, as before offload existed.
    where, memory = placed([cpu])
    assert memory == {"ram": size + kv} and where == [{"device": "CPU", "layers": 19, "bytes": size + kv}]
    # A discrete GPU holds the layers and their KV cache (and a copy of the
    # tied embeddings for the output layer); RAM keeps the input layer.
    where, memory = placed([cpu, fake_device("CUDA0")])
    assert set(memory) == {"ram", "CUDA0"}
    assert memory["CUDA0"] == sum(tensors["layers"]) + tensors["output"] + tensors["other"] + kv
    assert memory["ram"] == size - sum(tensors["layers"]) - tensors["output"]
    assert [(d["device"], d["layers"]) for d in where] == [("CPU", 0), ("CUDA0", 19)]
    # A Jetson's GPU uses the same RAM: one pool, the file and cache counted once.
    where, memory = placed([cpu, fake_device("CUDA0", "igpu")])
    assert memory == {"ram": size + kv + tensors["other"]}
    budgets = offgrid.memory_budgets(config, [cpu, fake_device("CUDA0", free=10 << 30)])
    assert budgets["CUDA0"] == 9 << 30 and budgets["ram"] == offgrid.ram_budget(config)
    assert set(offgrid.memory_budgets(config, [cpu, fake_device("CUDA0", "igpu")])) == {"ram"}


# On a running server ##########################################################

@pytest.fixture(scope="module")
def golden_gguf(tmp_path_factory):
    return golden_model.write_model(str(tmp_path_factory.mktemp("golden") / golden_model.MODEL_FILE))


def test_positive_gpu_layers_on_a_cpu_build_warns_once_and_serves_the_golden_answer(tmp_path, golden_gguf):
    need("llama_cpp", "inference")
    golden = golden_model.golden_text(golden_gguf)
    with golden_model.Serve([__import__("sys").executable, golden_model.OFFGRID], tmp_path / "home", golden_gguf,
                            env={"OFFGRID_GPU_LAYERS": "12", "OFFGRID_KEEP_ALIVE": "0"}) as srv:
        # keep_alive 0 unloads after each request, so each one loads the model again.
        assert srv.chat() == golden
        assert srv.chat() == golden
        status, health = srv.request("GET", "/health")
        assert status == 200 and health["gpu_layers"] == 12
        assert [d["name"] for d in health["devices"]] == ["CPU"] and health["devices"][0]["memory_free"] > 0
        assert health["memory_budgets"] == {"ram": health["max_loaded_bytes"]}
        warnings = [line for line in srv.output().splitlines() if "gpu_layers ignored" in line]
        assert len(warnings) == 1, srv.output()
        assert "this llama.cpp has no GPU backend" in warnings[0] and "gpu_layers=12" in warnings[0]
        assert srv.output().count("model loaded") >= 2


def test_health_metrics_and_info_show_devices_and_layers(tmp_path, golden_gguf):
    need("llama_cpp", "inference")
    need("prometheus_client", "the /metrics parser")
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    with golden_model.Serve([__import__("sys").executable, golden_model.OFFGRID], tmp_path / "home",
                            golden_gguf) as srv:
        srv.chat()
        status, health = srv.request("GET", "/health")
        [model] = health["loaded"]
        assert health["gpu_layers"] == "auto"
        assert model["gpu_layers"] == 0 and model["memory"] == {"ram": model["bytes"]}
        assert model["devices"] == [{"device": "CPU", "layers": golden_model.N_LAYER + 1, "bytes": model["bytes"]}]
        status, ps = srv.request("GET", "/api/ps")
        assert ps["models"][0]["size_vram"] == 0 and ps["models"][0]["size"] == model["bytes"]
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            samples = [s for f in text_string_to_metric_families(r.read().decode()) for s in f.samples]
        layers = [(s.labels, s.value) for s in samples if s.name == "offgrid_model_layers"]
        assert layers == [({"model": golden_model.MODEL_ID, "mode": "generate", "device": "CPU"}, 3.0)]
        free = {s.labels["device"]: s.value for s in samples if s.name == "offgrid_device_memory_free_bytes"}
        total = {s.labels["device"]: s.value for s in samples if s.name == "offgrid_device_memory_total_bytes"}
        assert list(free) == ["CPU"] and 0 < free["CPU"] < total["CPU"]
        budgets = {s.labels["pool"]: s.value for s in samples if s.name == "offgrid_memory_budget_bytes"}
        assert budgets == {"ram": health["max_loaded_bytes"]}
    p = run_cli(["info", "--json"], tmp_path)
    info = json.loads(p.stdout)
    assert [d["name"] for d in info["devices"]] == ["CPU"] and info["gpu_layers"] == "auto"
    assert info["gpu_offload"] == "0: this llama.cpp has no GPU backend"
    p = run_cli(["info"], tmp_path, env={"OFFGRID_GPU_LAYERS": "4"})
    assert "gpu_offload:       0: 4 ignored, this llama.cpp has no GPU backend" in p.stdout
    assert any(line.startswith("devices:           CPU (cpu, ") for line in p.stdout.splitlines()), p.stdout


# The CUDA build ###############################################################

def test_cuda_wheel_build_stops_with_one_line_without_a_cuda_compiler(tmp_path):
    import subprocess
    from conftest import ROOT
    env = dict(os.environ, CUDACXX=str(tmp_path / "no-nvcc"), OFFGRID_BUILD_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([os.path.join(ROOT, "build", "wheels.sh"), "cuda"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.splitlines() == [
        "wheels.sh: error: cuda: no CUDA compiler (nvcc on PATH, /usr/local/cuda/bin/nvcc or CUDACXX); "
        "install the CUDA toolkit (on a Jetson: apt-get install nvidia-jetpack)"]
