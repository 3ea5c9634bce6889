"""A deployment: which model, which devices each phase gets, and the engines' limits.

One `Deployment` renders the whole model repository (deploy/render.py) and travels, as JSON,
inside every model's config.pbtxt, so a model.py needs nothing else. On CPU hosts a "device"
is a set of cores: `devices` holds one core-id list per instance. On GPU hosts it holds one
GPU id per instance. `systems` says what the repository serves: our disaggregated system
(`distserve` over `prefill` + `decode`), the colocated baseline (`distserve_colocated` over
`colocated`, each instance running both phases), or both.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from backends.core.admission import AdmissionPolicy
from backends.core.limits import EngineLimits

DeviceKind = Literal["cpu", "gpu"]
DEVICE_KINDS = ("cpu", "gpu")
System = Literal["disaggregated", "colocated"]
SYSTEMS = ("disaggregated", "colocated")
SERVE_MODES = ("split", "adaptive", "colocated")
DTYPES = ("bfloat16", "float32")
# The KV cache's dtype (backends.core.engine.KV_DTYPES): "auto" = `dtype`; int8 holds ~1.9x the
# tokens per byte. One value for the whole deployment: the KV moves from prefill to decode.
KV_DTYPES = ("auto", "bfloat16", "float32", "int8")
WEIGHT_FORMATS = ("bf16", "int8", "int4", "auto")   # backends/core/weight_format.py (no torch here)
KV_TRANSPORTS = ("shm", "cuda_ipc")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CHUNKED_TOKEN_BUDGET = 512        # Sarathi-Serve's and vLLM's usual chunk budget
# The prefill instances' batch (L_m, DistServe section 4.1) on CPU cores: past the length where
# a prefill reaches 95% of its best rate (planner.latency.LatencyModel.saturation_length) a
# longer batch gains little and delays the prompts queued in it by every prompt that joins them.
# The shipped profile (docs/profile_cpu.json, an Intel core) puts it at 256, the AMD EPYC Zen 2
# host's at 80. Simulated on the Zen 2 profile (docs/goodput/prefill_batch), 2048 -> 256:
# adaptive's goodput on chatbot at a tight TPOT 0.51 -> 0.58 rps, on code 1.85 -> 1.91.
DEFAULT_PREFILL_BATCH_TOKENS = 256
DEFAULT_DECODE_STEP_TOKENS = 2048       # a decode step's tokens (with chunked prefill: its mixed steps)
SPECULATIVE_METHODS = ("ngram", "model")  # drafters: backends.core.spec_decode.DRAFTERS (no torch here)
MAX_SPECULATIVE_TOKENS = 16              # a verify row runs 1 + k tokens in one step


@dataclass(frozen=True)
class PhaseSpec:
    """Devices and engine limits of one phase (prefill, decode, or a colocated baseline)."""
    device: DeviceKind = "cpu"
    num_instances: int = 1
    devices: tuple = ((0,),)              # cpu: core ids per instance; gpu: a gpu id per instance
    # The engine's limits (backends/core/limits.py has the defaults and the checks).
    num_kv_blocks: int = EngineLimits.num_kv_blocks
    max_num_seqs: int = EngineLimits.max_num_seqs
    max_num_batched_tokens: int = EngineLimits.max_num_batched_tokens   # L_m; per step if chunked
    num_threads: int | None = None        # torch threads per instance; default len(cores), 1 on gpu
    chunked_prefill: bool = EngineLimits.chunked_prefill   # colocated only: chunks ride in decode steps
    # speculative decoding (decode, colocated): a drafter (SPECULATIVE_METHODS) proposes up to
    # num_speculative_tokens per decoding sequence; the instance adapts k to measured acceptance
    # and step cost (0 where it does not pay). null: off, and left out of the JSON.
    speculative: str | None = None
    num_speculative_tokens: int = 3
    # the drafter on its own cores (backends/draft/): per instance, the cores of a drafter process
    # that proposes asynchronously (the instance never waits for it). null: in the instance's own
    # process, and left out of the JSON. cpu phases only (a drafter on its own gpu is not built).
    draft_devices: tuple | None = None
    # speculative "model": the draft model's checkpoint (sharing the target's tokenizer; a relative
    # path is taken as model_path is). null otherwise, and left out of the JSON.
    draft_model: str | None = None
    # prefix caching (backends/core/prefix_cache.py): full KV blocks kept after their requests
    # and reused by prompts that start with the same tokens. On by default, then left out of the JSON.
    prefix_caching: bool = True
    # the n-gram drafter's corpus of finished requests (spec_decode.TokenCorpus): drafts from
    # other requests' text where a sequence's own has no long match. On by default, then left out.
    draft_corpus: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICE_KINDS:
            raise ValueError(f"device must be one of {DEVICE_KINDS}, got {self.device!r}")
        for flag in ("prefix_caching", "draft_corpus"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        _check_positive_int("num_instances", self.num_instances)
        self._check_speculative()
        if self.num_threads is not None:
            _check_positive_int("num_threads", self.num_threads)
        self.limits(EngineLimits.block_size)            # checks the limits
        object.__setattr__(self, "devices", _normalize_devices(self.device, self.devices))
        if len(self.devices) != self.num_instances:
            raise ValueError(f"devices must list one entry per instance: {self.num_instances} "
                             f"instances, {len(self.devices)} entries ({list(self.devices)})")

    def _check_speculative(self) -> None:
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be null or one of {SPECULATIVE_METHODS}, "
                             f"got {self.speculative!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, "
                             f"{MAX_SPECULATIVE_TOKENS}] (the most draft tokens per step), got {k!r}")
        if self.speculative is None and k != PhaseSpec.num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens ({k}) is set but speculative is null: name a "
                             f"drafter ({SPECULATIVE_METHODS}) or leave it out")
        if (self.speculative == "model") != (self.draft_model is not None):
            raise ValueError("speculative 'model' drafts with draft_model: name both or neither "
                             f"(speculative={self.speculative!r}, draft_model={self.draft_model!r})")
        if self.draft_model is not None and (not isinstance(self.draft_model, str) or not self.draft_model):
            raise ValueError(f"draft_model must be a checkpoint path, got {self.draft_model!r}")
        if self.draft_devices is not None:
            self._check_draft_devices()

    def _check_draft_devices(self) -> None:
        if self.speculative is None:
            raise ValueError("draft_devices is set but speculative is null: name a drafter "
                             f"({SPECULATIVE_METHODS}) or leave draft_devices out")
        if self.device != "cpu":
            raise ValueError("draft_devices on a gpu phase: a drafter on its own gpu is not built "
                             "(the remote drafter runs on cpu cores); leave draft_devices out")
        try:
            devices = _normalize_devices("cpu", self.draft_devices)
        except ValueError as exc:
            raise ValueError(f"draft_{exc}") from None
        if len(devices) != self.num_instances:
            raise ValueError(f"draft_devices must list one core set per instance: "
                             f"{self.num_instances} instances, {len(devices)} entries")
        object.__setattr__(self, "draft_devices", devices)

    def limits(self, block_size: int) -> EngineLimits:
        """This phase's engine limits (the block size is the deployment's, one for all phases)."""
        return EngineLimits(self.num_kv_blocks, self.max_num_seqs, self.max_num_batched_tokens,
                            block_size, self.chunked_prefill)

    def cores(self, index: int) -> tuple[int, ...]:
        """Core ids of CPU instance `index`."""
        if self.device != "cpu":
            raise ValueError(f"a {self.device} phase has no core sets")
        return self.devices[index]

    def gpu(self, index: int) -> int:
        if self.device != "gpu":
            raise ValueError(f"a {self.device} phase has no gpu ids")
        return self.devices[index]

    def threads(self, index: int) -> int:
        """Torch threads for instance `index`."""
        if self.num_threads is not None:
            return self.num_threads
        return len(self.cores(index)) if self.device == "cpu" else 1

    def all_devices(self) -> set[int]:
        if self.device == "gpu":
            return set(self.devices)
        return {core for cores in self.devices for core in cores}

    def draft_cores(self, index: int) -> tuple[int, ...] | None:
        """The cores of instance `index`'s drafter process (None: the drafter runs in-process)."""
        return None if self.draft_devices is None else self.draft_devices[index]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _normalize_devices(kind: str, devices: Any) -> tuple:
    if not isinstance(devices, (list, tuple)):
        raise ValueError(f"devices must be a list, got {devices!r}")
    if kind == "gpu":
        if not devices or not all(_is_id(d) for d in devices):
            raise ValueError(f"devices of a gpu phase must be gpu ids (ints >= 0), got {devices!r}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices of a gpu phase must be distinct gpu ids, got {devices!r}")
        return tuple(devices)
    out = []
    for cores in devices:
        if not isinstance(cores, (list, tuple)) or not cores or not all(_is_id(c) for c in cores):
            raise ValueError(f"devices of a cpu phase must be one non-empty list of core ids "
                             f"(ints >= 0) per instance, got {devices!r}")
        if len(set(cores)) != len(cores):
            raise ValueError(f"devices: core ids repeat within one instance: {list(cores)}")
        out.append(tuple(cores))
    return tuple(out)


@dataclass(frozen=True)
class Deployment:
    """The whole deployment. `check_host=False` skips the checks against this machine (to
    render for another host); it is not part of the JSON."""
    model_path: str
    prefill: PhaseSpec
    decode: PhaseSpec
    dtype: str = "bfloat16"
    kv_dtype: str = "auto"               # KV_DTYPES, shared by every phase
    block_size: int = 16
    kv_transport: str | None = None       # default: cuda_ipc when both phases are on gpu, else shm
    lease_timeout_s: float = 30.0         # an unclaimed prefill KV lease expires after this
    num_orchestrator_instances: int = 1
    # also serve `distserve_batched`: distserve with max_batch_size 1, for clients that send a
    # leading batch dimension (TensorRT-LLM's); its own orchestrator instances (disaggregated only)
    batched_front_end: bool = False
    default_max_tokens: int = 128
    max_model_len: int = 2048
    colocated: PhaseSpec | None = None    # the colocated baseline: each instance runs both phases
    systems: tuple = ("disaggregated",)   # what the repository serves (SYSTEMS); one at a time
    share_weights: bool = True            # instances on one host map one copy of the weights
    weights: str = "auto"                 # WEIGHT_FORMATS: bf16 | int8 | int4 | auto (per phase)
    # SLOs (seconds): the defaults are the chatbot SLOs of the headline benchmark on this CPU
    slo_ttft_s: float = 4.0
    slo_tpot_s: float = 0.1
    # early rejection: a request whose predicted time to first token on the instance that would
    # prefill it exceeds overload_factor x slo_ttft_s is refused at once ("overloaded", Triton
    # UNAVAILABLE / HTTP 503); null turns that off. max_queued_requests bounds each such
    # instance's requests waiting for prefill either way.
    overload_factor: float | None = 3.0
    max_queued_requests: int = 1024
    # how requests are placed (SERVE_MODES): "split" (DistServe: every prompt on a prefill
    # instance, then decode), "adaptive" (the router decides per request, from the instances'
    # published state and latency_profile, between split and prefilling on a decode instance
    # inside its decode steps: needs decode.chunked_prefill), "colocated" (the baseline's
    # systems). None: split, or colocated for the colocated system.
    mode: str | None = None
    latency_profile: str = "docs/profile_cpu.json"   # the router's step-time model (adaptive)
    check_host: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"model_path must be a non-empty string, got {self.model_path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r} (one "
                             "value for every phase: decode reads the KV prefill wrote)")
        for name in ("block_size", "num_orchestrator_instances", "default_max_tokens", "max_model_len",
                     "max_queued_requests"):
            _check_positive_int(name, getattr(self, name))
        for name in ("lease_timeout_s", "slo_ttft_s", "slo_tpot_s", "overload_factor"):
            value = getattr(self, name)
            if name == "overload_factor" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.default_max_tokens >= self.max_model_len:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be < max_model_len "
                             f"({self.max_model_len})")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        for name in ("share_weights", "batched_front_end"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_systems()
        if self.batched_front_end and "disaggregated" not in self.systems:
            raise ValueError("batched_front_end serves distserve_batched beside distserve: it needs "
                             f"'disaggregated' in systems, got {list(self.systems)}")
        self._check_mode()
        for name, phase in self.phases().items():
            self._check_phase(name, phase)
        object.__setattr__(self, "kv_transport", self._resolve_transport())
        self._warn_overlap()

    def phases(self) -> dict[str, PhaseSpec]:
        out = {"prefill": self.prefill, "decode": self.decode}
        if self.colocated is not None:
            out["colocated"] = self.colocated
        return out

    def _check_systems(self) -> None:
        systems = self.systems
        if not isinstance(systems, (list, tuple)) or not systems or len(set(systems)) != len(systems) \
                or any(s not in SYSTEMS for s in systems):
            raise ValueError(f"systems must be distinct names from {SYSTEMS}, got {systems!r}")
        object.__setattr__(self, "systems", tuple(systems))
        if ("colocated" in systems) != (self.colocated is not None):
            raise ValueError("systems lists 'colocated' exactly when the colocated phase is set "
                             f"(systems {list(systems)}, colocated {'set' if self.colocated else 'unset'})")

    @property
    def serving_mode(self) -> str:
        """`mode`, or the default of the systems served (split; colocated for the baseline)."""
        if self.mode is not None:
            return self.mode
        return "colocated" if self.systems == ("colocated",) else "split"

    def _check_mode(self) -> None:
        colocated = self.systems == ("colocated",)
        mode = self.serving_mode
        if mode not in SERVE_MODES:
            raise ValueError(f"mode must be one of {SERVE_MODES}, got {mode!r}")
        if (mode == "colocated") != colocated:
            raise ValueError(f"mode {mode!r} does not serve systems {list(self.systems)} "
                             "(colocated is the colocated system's mode, and only its)")
        if mode == "adaptive" and not self.decode.chunked_prefill:
            raise ValueError("mode 'adaptive' prefills on decode instances inside their decode "
                             "steps: set decode.chunked_prefill (its max_num_batched_tokens is "
                             "the step's token budget)")

    def _check_phase(self, name: str, phase: PhaseSpec) -> None:
        if not isinstance(phase, PhaseSpec):
            raise ValueError(f"{name} must be a PhaseSpec, got {type(phase).__name__}")
        if phase.chunked_prefill and name == "prefill":
            raise ValueError("prefill.chunked_prefill: a prefill instance runs no decode steps to "
                             "mix chunks into (set it on decode for local prefill)")
        if phase.speculative is not None and name == "prefill":
            raise ValueError("prefill.speculative: a prefill instance emits one token per request; "
                             "speculation runs in the decode steps (set it on decode or colocated)")
        capacity = phase.num_kv_blocks * self.block_size
        if capacity < self.max_model_len:
            raise ValueError(f"{name}.num_kv_blocks: {phase.num_kv_blocks} blocks x {self.block_size} "
                             f"tokens cannot hold one max_model_len ({self.max_model_len}) sequence")
        num_cores = os.cpu_count() or 1
        if self.check_host and phase.device == "cpu" and max(phase.all_devices()) >= num_cores:
            raise ValueError(f"{name}.devices: core {max(phase.all_devices())} does not exist on this "
                             f"{num_cores}-core host (use check_host=False to render for another host)")
        draft = {c for cores in phase.draft_devices or () for c in cores}
        if self.check_host and draft and max(draft) >= num_cores:
            raise ValueError(f"{name}.draft_devices: core {max(draft)} does not exist on this "
                             f"{num_cores}-core host (use check_host=False to render for another host)")

    def _resolve_transport(self) -> str:
        on_gpu = self.prefill.device == "gpu" and self.decode.device == "gpu"
        transport = self.kv_transport or ("cuda_ipc" if on_gpu else "shm")
        if transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {transport!r}")
        if transport == "cuda_ipc" and not on_gpu:
            raise ValueError("kv_transport: cuda_ipc needs both prefill and decode on gpu")
        return transport

    def _warn_overlap(self) -> None:
        if self.prefill.device != self.decode.device or "disaggregated" not in self.systems:
            return
        shared = self.prefill.all_devices() & self.decode.all_devices()
        if shared:
            what = "cores" if self.prefill.device == "cpu" else "gpus"
            warnings.warn(f"prefill and decode share {what} {sorted(shared)}: the phases will interfere",
                          stacklevel=3)

    def admission(self) -> AdmissionPolicy:
        """The early-rejection policy of each instance that prefills."""
        max_wait = None if self.overload_factor is None else self.overload_factor * self.slo_ttft_s
        return AdmissionPolicy(max_wait, self.max_queued_requests)

    def resolved_latency_profile(self, root: str | Path | None = None) -> Path:
        path = Path(self.latency_profile)
        return path if path.is_absolute() else Path(root or os.environ.get("DISTSERVE_ROOT") or ROOT) / path

    def resolved_model_path(self, root: str | Path | None = None, model_path: str | None = None) -> Path:
        """model_path (or another checkpoint's, e.g. a draft_model); a relative one is taken
        from `root`, $DISTSERVE_ROOT, or the repo root."""
        path = Path(self.model_path if model_path is None else model_path)
        if path.is_absolute():
            return path
        return Path(root or os.environ.get("DISTSERVE_ROOT") or ROOT) / path

    def with_model_path(self, model_path: str | Path) -> Deployment:
        return replace(self, model_path=str(model_path))

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("check_host")
        for phase in (data["prefill"], data["decode"], data["colocated"]):
            if phase and phase["speculative"] is None:       # off: the JSON as it was before
                del phase["speculative"], phase["num_speculative_tokens"]
            for key in ("draft_devices", "draft_model"):      # in-process, or not a model: likewise
                if phase and phase[key] is None:
                    del phase[key]
            for flag in ("prefix_caching", "draft_corpus"):
                if phase and phase[flag]:                     # the default: likewise
                    del phase[flag]
        return data

    def to_json(self, indent: int | None = None) -> str:
        separators = None if indent else (",", ":")
        return json.dumps(self.to_dict(), indent=indent, separators=separators)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], check_host: bool = True) -> Deployment:
        if not isinstance(data, dict):
            raise ValueError(f"a deployment must be a JSON object, got {type(data).__name__}")
        _check_keys("deployment", data, cls)
        kw = dict(data)
        for name in ("prefill", "decode", "colocated"):
            if kw.get(name) is not None:
                kw[name] = _phase_from_dict(name, kw[name])
        return cls(**kw, check_host=check_host)

    @classmethod
    def from_json(cls, text: str, check_host: bool = True) -> Deployment:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"deployment is not valid JSON: {exc}") from exc
        return cls.from_dict(data, check_host=check_host)

    @classmethod
    def load(cls, path: str | Path, check_host: bool = True) -> Deployment:
        return cls.from_json(Path(path).read_text(), check_host=check_host)


def _check_keys(what: str, data: dict, cls: type) -> None:
    known = [f for f in fields(cls) if f.name != "check_host"]
    names = {f.name for f in known}
    required = {f.name for f in known if f.default is MISSING and f.default_factory is MISSING}
    unknown = sorted(set(data) - names)
    missing = sorted(n for n in required if n not in data)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known: {sorted(names)}")
    if missing:
        raise ValueError(f"{what}: missing field(s) {missing}")


def _phase_from_dict(name: str, data: Any) -> PhaseSpec:
    if not isinstance(data, dict):
        raise ValueError(f"{name} must be a JSON object, got {data!r}")
    if "kv_dtype" in data:
        raise ValueError(f"{name}.kv_dtype: the KV dtype is one top-level kv_dtype for the whole "
                         "deployment (decode reads the KV prefill wrote), not a per-phase setting")
    _check_keys(name, data, PhaseSpec)
    try:
        return PhaseSpec(**data)
    except ValueError as exc:
        raise ValueError(f"{name}.{exc}") from None


def split_cores(num_cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prefill gets the first half of the cores (rounded up), decode the rest."""
    if num_cores < 2:
        return (0,), (0,)
    half = (num_cores + 1) // 2
    return tuple(range(half)), tuple(range(half, num_cores))


def default_deployment(model_path: str | Path = DEFAULT_MODEL_PATH,
                       num_cores: int | None = None) -> Deployment:
    """One prefill and one decode instance on disjoint cores of a `num_cores`-core host.

    On 2 cores: prefill on core 0, decode on core 1. On 1 core both share core 0 (with a
    warning). `num_cores` defaults to this machine's; another count renders for another host.
    """
    host_cores = os.cpu_count() or 1
    num_cores = host_cores if num_cores is None else num_cores
    _check_positive_int("num_cores", num_cores)
    prefill_cores, decode_cores = split_cores(num_cores)
    return Deployment(
        model_path=str(model_path),
        prefill=PhaseSpec(device="cpu", devices=(prefill_cores,), num_kv_blocks=512, max_num_seqs=16,
                          max_num_batched_tokens=DEFAULT_PREFILL_BATCH_TOKENS),
        decode=PhaseSpec(device="cpu", devices=(decode_cores,), num_kv_blocks=1024,
                         max_num_seqs=32, max_num_batched_tokens=DEFAULT_DECODE_STEP_TOKENS),
        check_host=num_cores <= host_cores,
    )


def colocated_deployment(model_path: str | Path = DEFAULT_MODEL_PATH, num_cores: int | None = None,
                         chunked_prefill: bool = False,
                         token_budget: int = DEFAULT_CHUNKED_TOKEN_BUDGET) -> Deployment:
    """The baseline DistServe is measured against, on the same devices as `default_deployment`:
    one colocated instance on the prefill instance's cores and one on the decode instance's
    (on 2 cores: [[0], [1]]), each running both phases with our decode instance's limits;
    Triton takes turns over them. Without chunked prefill a prompt batch takes a whole step (up
    to our prefill's L_m, DEFAULT_PREFILL_BATCH_TOKENS; a longer prompt runs alone); with it
    every step carries the running decodes plus prompt chunks, `token_budget` tokens in all.
    Serves only the baseline."""
    with warnings.catch_warnings():         # prefill and decode sharing a core: they are not served
        warnings.simplefilter("ignore")
        base = default_deployment(model_path, num_cores)
    core_sets = tuple(dict.fromkeys(base.prefill.devices + base.decode.devices))   # 1 on 1 core
    budget = token_budget if chunked_prefill else base.prefill.max_num_batched_tokens
    colocated = PhaseSpec(device="cpu", num_instances=len(core_sets), devices=core_sets,
                          num_kv_blocks=1024, max_num_seqs=32, max_num_batched_tokens=budget,
                          chunked_prefill=chunked_prefill)
    return replace(base, colocated=colocated, systems=("colocated",))
