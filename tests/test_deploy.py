"""deploy/: deployment validation and JSON, strict config rendering, pbtxt escaping, the
committed configs and the adapters' start-up helpers (the launcher's pieces are in
test_deploy_server.py; tests/integration/ runs the real server)."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from deploy import contract
from deploy.__main__ import main as deploy_main
from deploy.deployment import (DEFAULT_MODEL_PATH, ROOT, Deployment, PhaseSpec, colocated_deployment,
                               default_deployment)
from deploy.render import (ENGINE_ADAPTER, MODELS, TEMPLATES_DIR, check_no_placeholder, pbtxt_string,
                           render_config, render_configs, render_repository, render_text, served_models)
from deploy.runtime import deployment_from_config, instance_index, parse_instance_name


def two_core() -> Deployment:
    return default_deployment(DEFAULT_MODEL_PATH, num_cores=2)


def baseline(chunked: bool = False) -> Deployment:
    return colocated_deployment(DEFAULT_MODEL_PATH, num_cores=2, chunked_prefill=chunked)


def gpu_deployment() -> Deployment:
    gpu = PhaseSpec(device="gpu", num_instances=2, devices=[0, 1])
    return Deployment("m.gguf", prefill=gpu, decode=replace(gpu, devices=(2, 3)), check_host=False)


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


# ---- deployment ----

def test_default_deployment_two_cores():
    d = two_core()
    assert (d.prefill.cores(0), d.decode.cores(0)) == ((0,), (1,))
    assert (d.prefill.threads(0), d.decode.threads(0)) == (1, 1)
    assert d.kv_transport == "shm" and d.colocated is None


def test_default_deployment_one_core_shares_core_zero_with_a_warning():
    with pytest.warns(UserWarning, match="share cores"):
        d = default_deployment(num_cores=1)
    assert d.prefill.cores(0) == d.decode.cores(0) == (0,)


def test_default_deployment_splits_a_bigger_host():
    d = default_deployment(num_cores=5)
    assert (d.prefill.cores(0), d.decode.cores(0)) == ((0, 1, 2), (3, 4))
    assert d.prefill.threads(0) == 3


def test_colocated_baseline_on_the_same_two_cores():
    d, chunked = baseline(), baseline(chunked=True)
    assert d.systems == ("colocated",) and d.colocated.devices == ((0,), (1,))
    assert d.colocated.threads(1) == 1 and not d.colocated.chunked_prefill
    assert d.colocated.max_num_batched_tokens == d.prefill.max_num_batched_tokens
    assert chunked.colocated.chunked_prefill and chunked.colocated.max_num_batched_tokens == 512
    assert served_models(d) == ("distserve_colocated", "colocated")
    assert served_models(two_core()) == ("distserve", "prefill_0", "decode_0")


def test_json_round_trip(tmp_path):
    d = replace(two_core(), colocated=PhaseSpec(devices=[[0, 1]], num_threads=2),
                systems=("disaggregated", "colocated"))
    assert Deployment.from_json(d.to_json()) == d
    d.save(tmp_path / "d.json")
    assert Deployment.load(tmp_path / "d.json") == d
    assert json.loads(d.to_json())["prefill"]["devices"] == [[0]]


def _mutated(path: str, value) -> dict:
    data = json.loads(two_core().to_json())
    *parents, key = path.split(".")
    target = data
    for name in parents:
        target = target[name]
    target[key] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("dtype", "float16", "dtype"),
    ("kv_dtype", "fp8", "kv_dtype must be one of"),
    ("prefill.kv_dtype", "int8", "prefill.kv_dtype: the KV dtype is one top-level kv_dtype"),
    ("block_size", 0, "block_size"),
    ("model_path", "", "model_path"),
    ("lease_timeout_s", 0, "lease_timeout_s"),
    ("num_orchestrator_instances", 0, "num_orchestrator_instances"),
    ("default_max_tokens", 4096, "default_max_tokens"),
    ("kv_transport", "tcp", "kv_transport"),
    ("kv_transport", "cuda_ipc", "kv_transport: cuda_ipc needs both"),
    ("prefill.device", "tpu", "prefill.device"),
    ("prefill.num_kv_blocks", 0, "prefill.num_kv_blocks"),
    ("decode.num_kv_blocks", 100, "decode.num_kv_blocks: 100 blocks"),
    ("decode.max_num_seqs", -1, "decode.max_num_seqs"),
    ("prefill.max_num_batched_tokens", 1.5, "prefill.max_num_batched_tokens"),
    ("prefill.num_threads", 0, "prefill.num_threads"),
    ("prefill.num_instances", 2, "prefill.devices must list one entry per instance"),
    ("prefill.devices", [[]], "prefill.devices"),
    ("prefill.devices", [[0, 0]], "prefill.devices: core ids repeat"),
    ("decode.devices", [[999]], "decode.devices: core 999 does not exist"),
    ("prefill.bogus", 1, "prefill: unknown field"),
    ("bogus", 1, "deployment: unknown field"),
    ("prefill.chunked_prefill", True, "prefill.chunked_prefill: a prefill instance runs no decode"),
    ("systems", ["colocated"], "exactly when the colocated phase is set"),
    ("systems", [], "systems must be"),
    ("systems", ["vllm"], "systems must be"),
    ("share_weights", "yes", "share_weights must be true or false"),
    ("batched_front_end", 1, "batched_front_end must be true or false"),
])
def test_validation_names_the_field(path, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Deployment.from_dict(_mutated(path, value))


def test_kv_dtype_is_one_value_for_both_phases_and_reaches_their_engines():
    from backends.core.engine import KV_DTYPES, LLMEngine
    from backends.core.config import ModelConfig
    from backends.serving.host import _engine_config
    from deploy.deployment import KV_DTYPES as DEPLOY_KV_DTYPES
    assert DEPLOY_KV_DTYPES == KV_DTYPES and two_core().kv_dtype == "auto"
    d = replace(two_core(), kv_dtype="int8")
    assert Deployment.from_json(d.to_json()).kv_dtype == "int8"
    config = ModelConfig(arch="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=64)
    layouts = {role: LLMEngine.kv_layout(config, _engine_config(d, getattr(d, role), role, 0))
               for role in ("prefill", "decode")}
    assert layouts["prefill"] == replace(layouts["decode"], num_blocks=layouts["prefill"].num_blocks)
    assert layouts["prefill"].dtype == "int8"
    auto = _engine_config(two_core(), two_core().decode, "decode", 0)
    assert LLMEngine.kv_layout(config, auto).dtype == two_core().dtype


def test_colocated_validation():
    data = json.loads(baseline(chunked=True).to_json())
    data["colocated"]["max_num_batched_tokens"] = 8
    with pytest.raises(ValueError, match=r"colocated\.max_num_batched_tokens \(8\) must be >= max_num_seqs"):
        Deployment.from_dict(data)
    with pytest.raises(ValueError, match="exactly when"):
        replace(baseline(), systems=("disaggregated",))
    with pytest.raises(ValueError, match="batched_front_end .* needs 'disaggregated' in systems"):
        replace(baseline(), batched_front_end=True)


def test_missing_field_is_named():
    data = json.loads(two_core().to_json())
    del data["decode"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['decode'\]"):
        Deployment.from_dict(data)


def test_gpu_phase_needs_gpu_ids():
    with pytest.raises(ValueError, match="gpu ids"):
        PhaseSpec(device="gpu")                         # the default devices are core lists
    with pytest.raises(ValueError, match="distinct"):
        PhaseSpec(device="gpu", num_instances=2, devices=[0, 0])


def test_gpu_deployment_defaults_to_cuda_ipc():
    d = gpu_deployment()
    assert d.kv_transport == "cuda_ipc" and d.prefill.gpu(1) == 1 and d.decode.threads(0) == 1


def test_unknown_cores_allowed_when_rendering_for_another_host():
    data = _mutated("decode.devices", [[999]])
    assert Deployment.from_dict(data, check_host=False).decode.cores(0) == (999,)


def test_overlapping_phases_warn():
    with pytest.warns(UserWarning, match=r"share cores \[0\]"):
        Deployment.from_dict(_mutated("decode.devices", [[0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two_core()


def test_resolved_model_path(monkeypatch, tmp_path):
    d = two_core()
    monkeypatch.delenv("DISTSERVE_ROOT", raising=False)
    assert d.resolved_model_path() == ROOT / DEFAULT_MODEL_PATH
    monkeypatch.setenv("DISTSERVE_ROOT", str(tmp_path))
    assert d.resolved_model_path() == tmp_path / DEFAULT_MODEL_PATH
    assert d.with_model_path("/abs/m.gguf").resolved_model_path() == Path("/abs/m.gguf")


# ---- rendering ----

def test_committed_configs_equal_rendered_defaults():
    """Regenerate them with: python -m deploy render --out model_repository --num-cores 2"""
    for model, text in render_configs(two_core()).items():
        committed = ROOT / "model_repository" / model / "config.pbtxt"
        assert committed.read_text() == text, f"{committed} drifted from the default deployment"
    repo = ROOT / "model_repository"
    assert sorted(p.name for p in repo.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(served_models(two_core()))
    for model in ("prefill_0", "decode_0"):             # one adapter for every engine instance
        link = repo / model / "1" / "model.py"
        assert link.is_symlink() and link.resolve() == (repo / ENGINE_ADAPTER).resolve()


@pytest.mark.parametrize("deployment", [two_core(), gpu_deployment(), baseline(chunked=True),
                                        replace(two_core(), batched_front_end=True)],
                         ids=["cpu", "gpu", "colocated", "batched"])
def test_rendered_configs_match_the_contract(deployment):
    assert set(render_configs(deployment)) == set(served_models(deployment))
    for model in served_models(deployment):
        config = parse_config(render_config(deployment, model))
        spec = contract.model_spec(model)
        assert config.name == model and config.backend == "python"
        assert config.max_batch_size == spec.max_batch_size == (model == contract.DISTSERVE_BATCHED)
        assert config.model_transaction_policy.decoupled == spec.decoupled
        for tensors, specs in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in tensors] \
                == [(s.name, s.config_dtype, s.dims) for s in specs]
        assert [t.optional for t in config.input] == [s.optional for s in spec.inputs]
        carried = config.parameters["deployment"].string_value
        assert Deployment.from_json(carried, check_host=False) == deployment


def instance_groups(deployment: Deployment, model: str) -> list[tuple]:
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name
    return [(kind(g.kind), g.count, list(g.gpus))
            for g in parse_config(render_config(deployment, model)).instance_group]


def test_instance_groups():
    # a model per prefill / decode instance, with that one instance
    assert served_models(gpu_deployment()) == ("distserve", "prefill_0", "prefill_1", "decode_0", "decode_1")
    assert instance_groups(gpu_deployment(), "prefill_1") == [("KIND_GPU", 1, [1])]
    assert instance_groups(gpu_deployment(), "decode_0") == [("KIND_GPU", 1, [2])]
    assert instance_groups(gpu_deployment(), "distserve") == [("KIND_CPU", 1, [])]
    cpu = replace(two_core(), decode=PhaseSpec(num_instances=2, devices=[[1], [1]]))
    assert instance_groups(cpu, "decode_1") == [("KIND_CPU", 1, [])]
    assert parse_config(render_config(cpu, "decode_1")).name == "decode_1"
    assert instance_groups(baseline(), "colocated") == [("KIND_CPU", 2, [])]         # one per core
    assert instance_groups(baseline(), "distserve_colocated") == [("KIND_CPU", 1, [])]
    for model, match in (("colocated", "does not serve 'colocated'"), ("decode_1", "does not serve 'decode_1'"),
                         ("decode", "does not serve 'decode'"), ("decode_01", "unknown model"),
                         ("bogus", "unknown model")):
        with pytest.raises(ValueError, match=match):
            render_config(two_core(), model)


def test_no_placeholder_survives():
    for text in render_configs(two_core()).values():
        check_no_placeholder(text, "rendered")
        assert "{{" not in text and "{%" not in text and "${" not in text


def test_rendering_is_strict():
    with pytest.raises(jinja2.UndefinedError):
        render_text("name: {{ nope }}")
    template = (TEMPLATES_DIR / "prefill.pbtxt").read_text()
    with pytest.raises(jinja2.UndefinedError, match="deployment_json"):
        render_text(template, spec=contract.PREFILL_SPEC, kind="prefill", groups=[])
    with pytest.raises(ValueError, match=r"unrendered placeholder '\$\{' on line 2"):
        render_text("a\nb: ${x}")


@pytest.mark.parametrize("value", [
    "", "plain", 'quote " and backslash \\', "new\nline\r\ttab", "é 漢字 🚀", "\x00\x01\x7f",
    "{{ not a placeholder here }}", two_core().to_json(indent=2),
])
def test_pbtxt_string_round_trip(value):
    text = f'name: "x" parameters {{ key: "k" value {{ string_value: {pbtxt_string(value)} }} }}'
    assert parse_config(text).parameters["k"].string_value == value


def test_render_repository_copies_code(tmp_path):
    src = tmp_path / "src"
    for model in ("distserve", "distserve_colocated", "colocated"):
        (src / model / "1" / "__pycache__").mkdir(parents=True)
        (src / model / "1" / "model.py").write_text(f"# {model}\n")
        (src / model / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    (src / "shared.py").write_text("X = 1\n")
    with pytest.raises(FileNotFoundError, match=ENGINE_ADAPTER):
        render_repository(two_core(), tmp_path / "out", src_repo=src, require_code=True)
    (src / ENGINE_ADAPTER).write_text("# engine\n")
    (tmp_path / "out" / "decode_5" / "1").mkdir(parents=True)       # a stale instance's model
    two_decodes = replace(two_core(), decode=PhaseSpec(num_instances=2, devices=[[1], [1]]))
    out = render_repository(two_decodes, tmp_path / "out", src_repo=src, require_code=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(served_models(two_decodes))
    for model in served_models(two_decodes):
        expected = "# engine\n" if model != "distserve" else "# distserve\n"
        assert (out / model / "1" / "model.py").read_text() == expected
        assert not (out / model / "1" / "__pycache__").exists()
        assert (out / model / "config.pbtxt").read_text() == render_config(two_decodes, model)
    link = out / "decode_1" / "1" / "model.py"           # one adapter file, linked (relative)
    assert link.is_symlink() and str(link.readlink()) == f"../../{ENGINE_ADAPTER}"
    assert (out / "shared.py").exists()
    render_repository(baseline(), out, src_repo=src, require_code=True)      # the other system
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(served_models(baseline()))
    batched = replace(two_core(), batched_front_end=True)       # distserve's adapter, its own config
    render_repository(batched, out, src_repo=src, require_code=True)
    assert served_models(batched) == served_models(two_core()) + ("distserve_batched",)
    assert (out / "distserve_batched" / "1" / "model.py").read_text() == "# distserve\n"
    assert "max_batch_size: 1" in (out / "distserve_batched" / "config.pbtxt").read_text()
    render_repository(two_core(), out, src_repo=src, require_code=True)
    assert not (out / "distserve_batched").exists()


def test_render_into_the_source_repository_links_and_prunes_engine_models(tmp_path):
    """How the committed repository is made: configs and links only, stale instances removed."""
    src = tmp_path / "src"
    (src / "distserve" / "1").mkdir(parents=True)
    (src / "distserve" / "1" / "model.py").write_text("# distserve\n")
    (src / ENGINE_ADAPTER).write_text("# engine\n")
    two_decodes = replace(two_core(), decode=PhaseSpec(num_instances=2, devices=[[1], [1]]))
    render_repository(two_decodes, src, src_repo=src)
    assert (src / "decode_1" / "1" / "model.py").read_text() == "# engine\n"
    render_repository(two_core(), src, src_repo=src)
    assert sorted(p.name for p in src.iterdir() if p.is_dir()) == sorted(served_models(two_core()))
    assert (src / "distserve" / "1" / "model.py").read_text() == "# distserve\n"


def test_render_repository_tolerates_missing_code_until_launch(tmp_path):
    out = render_repository(two_core(), tmp_path / "out", src_repo=tmp_path / "empty")
    assert sorted(p.name for p in out.iterdir()) == sorted(served_models(two_core()))
    with pytest.raises(FileNotFoundError, match="model.py"):
        render_repository(two_core(), tmp_path / "out", src_repo=tmp_path / "empty", require_code=True)


def test_render_cli(tmp_path, capsys):
    assert deploy_main(["render", "--out", str(tmp_path / "r"), "--num-cores", "2"]) == 0
    assert (tmp_path / "r" / "decode_0" / "config.pbtxt").read_text() == render_config(two_core(), "decode_0")
    assert deploy_main(["show-default", "--num-cores", "2"]) == 0
    assert Deployment.from_json(capsys.readouterr().out.split("\n", 1)[1]) == two_core()
    (tmp_path / "bad.json").write_text(json.dumps(_mutated("dtype", "int8")))
    bad = ["render", "--out", str(tmp_path / "r2"), "--deployment", str(tmp_path / "bad.json")]
    assert deploy_main(bad) == 2
    assert "dtype" in capsys.readouterr().err
    assert deploy_main(["show-default", "--num-cores", "2", "--baseline", "chunked", "--token-budget", "256"]) == 0
    shown = Deployment.from_json(capsys.readouterr().out)
    assert shown == replace(baseline(chunked=True), colocated=replace(shown.colocated, max_num_batched_tokens=256))
    assert deploy_main(["render", "--out", str(tmp_path / "b"), "--num-cores", "2", "--baseline", "colocated"]) == 0
    assert (tmp_path / "b" / "colocated" / "config.pbtxt").read_text() == render_config(baseline(), "colocated")
    assert deploy_main(["render", "--out", str(tmp_path / "b"), "--baseline", "colocated",
                        "--deployment", str(tmp_path / "bad.json")]) == 2
    assert "not both" in capsys.readouterr().err


# ---- what a model.py reads ----

def test_deployment_from_model_config():
    d = two_core()
    config = {"name": "prefill", "parameters": {"deployment": {"string_value": d.to_json()}}}
    assert deployment_from_config(json.dumps(config)) == d
    with pytest.raises(ValueError, match="python -m deploy render"):
        deployment_from_config({"name": "prefill", "parameters": {}})


def test_instance_index():
    """The colocated baseline's instances share a model: the index is Triton's instance's."""
    cpu = PhaseSpec(num_instances=2, devices=[[0], [1]])
    assert parse_instance_name("prefill_0_1") == (0, 1)
    assert parse_instance_name("my_model_0_12") == (0, 12)
    assert instance_index({"model_instance_name": "colocated_0_1"}, cpu) == 1
    for bad in ("colocated", "colocated_0_x", "colocated_1_0", "colocated_0_2"):
        with pytest.raises(ValueError):
            instance_index({"model_instance_name": bad}, cpu)
    gpu = gpu_deployment().decode
    assert instance_index({"model_instance_name": "colocated_0_0", "model_instance_device_id": "3"}, gpu) == 1
    with pytest.raises(ValueError, match="gpu 7"):
        instance_index({"model_instance_device_id": "7"}, gpu)


def test_instance_index_of_a_per_instance_model():
    """A prefill / decode instance's index is in its model's name, checked against the
    deployment and Triton's instance."""
    cpu = PhaseSpec(num_instances=2, devices=[[0], [1]])
    assert instance_index({"model_name": "decode_1", "model_instance_name": "decode_1_0_0"}, cpu, "decode") == 1
    for model, instance, match in (
            ("decode_2", "decode_2_0_0", "deployment has 2 decode instance"),
            ("prefill_1", "prefill_1_0_0", "is a prefill instance's, not a decode"),
            ("decode", "decode_0_0", "not an engine instance's model"),     # an old repository
            ("decode_1", "decode_1_0_1", "has one instance")):
        with pytest.raises(ValueError, match=match):
            instance_index({"model_name": model, "model_instance_name": instance}, cpu, "decode")
    gpu = gpu_deployment().decode                       # gpus 2, 3
    args = {"model_name": "decode_1", "model_instance_name": "decode_1_0_0", "model_instance_device_id": "3"}
    assert instance_index(args, gpu, "decode") == 1
    with pytest.raises(ValueError, match="on gpu 2, but the deployment puts decode instance 1 on gpu 3"):
        instance_index({**args, "model_instance_device_id": "2"}, gpu, "decode")


def test_instance_ids_and_models_map_one_to_one():
    assert contract.instance_model("decode-1") == "decode_1" and contract.instance_model("prefill-0") == "prefill_0"
    assert contract.instance_model("colocated-1") == "colocated"          # one model for all
    assert contract.model_instance("decode_12") == ("decode", 12)
    assert contract.instance_models("prefill", 2) == ("prefill_0", "prefill_1")
    for phase, index in (("prefill", 0), ("decode", 3)):
        model = contract.instance_model(contract.instance_id(phase, index))
        assert contract.model_instance(model) == (phase, index)
    for bad in ("decode", "decode_x", "decode_01", "colocated_0", "distserve"):
        with pytest.raises(ValueError):
            contract.model_instance(bad)
    with pytest.raises(ValueError):
        contract.instance_model("decode")
    assert contract.model_spec("decode_3").name == "decode_3"
    assert contract.model_spec("decode_3").inputs == contract.DECODE_SPEC.inputs


def test_share_weights_is_on_by_default_and_round_trips():
    d = two_core()
    assert d.share_weights is True
    off = replace(d, share_weights=False)
    assert Deployment.from_json(off.to_json()).share_weights is False
    data = json.loads(d.to_json())
    del data["share_weights"]                   # configs rendered before the field: default on
    assert Deployment.from_dict(data).share_weights is True


def test_committed_repository_has_no_model_without_a_config():
    """Triton loads every folder of a repository: a config-less one would fail the server."""
    from deploy.render import SRC_REPO
    folders = [p for p in SRC_REPO.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    assert folders and all((p / "config.pbtxt").is_file() for p in folders), folders
