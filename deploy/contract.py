"""The I/O contract of every model in the repository: names, dtypes, dims, in one place.

The config templates render their `input`/`output` sections from these specs, and the client
imports the names from here (this module needs nothing beyond the standard library).

`distserve` follows the de-facto LLM contract, so Triton's `generate` / `generate_stream`
endpoints and existing LLM tools work unchanged: top-level JSON keys map to inputs by name
and each output becomes a JSON field. All `distserve` inputs are optional; one of
`text_input`, `messages` or `input_ids` must be given. `distserve_colocated`, the colocated
baseline's front end, has the same contract. `distserve_batched` (served when a deployment sets
`batched_front_end`) is `distserve` with `max_batch_size: 1`: every input and output has a
leading batch dimension of 1 (`[1, 1]`, lists `[1, n]`), as TensorRT-LLM's ensemble clients
send; Triton checks shapes against the config, so one model cannot take both. The engine
models are internal (reached by the orchestrators' BLS calls): one JSON document in `request`,
one JSON document per `response`.

Each prefill and decode instance is its own Triton model, `prefill_0`, `prefill_1`, ...,
`decode_0`, ... (Triton round-robins over the instances of one model and cannot be told which
one to use, and it loads and unloads whole models): the orchestrator picks the instance, and a
dead one is reloaded alone. Everywhere else (control sockets, KV descriptors, metrics labels,
stats) an instance is named `prefill-0`, `decode-1`; `instance_model` / `model_instance` map
one to the other. The colocated baseline's instances share one model, `colocated` (Triton
balances over them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The models.
DISTSERVE = "distserve"
PREFILL = "prefill"
DECODE = "decode"
DISTSERVE_COLOCATED = "distserve_colocated"   # the colocated baseline, called like distserve
DISTSERVE_BATCHED = "distserve_batched"       # distserve with a leading batch dimension of 1
COLOCATED = "colocated"
INSTANCE_PHASES = (PREFILL, DECODE)           # a Triton model per instance of these phases


def instance_id(phase: str, index: int) -> str:
    """("decode", 1) -> "decode-1": the name an instance goes by outside Triton."""
    return f"{phase}-{index}"


def instance_model(instance: str) -> str:
    """The Triton model hosting instance `instance`: "decode-1" -> "decode_1";
    "colocated-1" -> "colocated" (one model for all its instances)."""
    phase, _, index = instance.rpartition("-")
    if not phase or not index.isdigit():
        raise ValueError(f"instance id {instance!r} is not <phase>-<index>")
    return f"{phase}_{int(index)}" if phase in INSTANCE_PHASES else phase


def model_instance(model: str) -> tuple[str, int]:
    """"decode_1" -> ("decode", 1): the phase and index of a per-instance engine model."""
    phase, _, index = model.rpartition("_")
    if phase not in INSTANCE_PHASES or not index.isdigit() or str(int(index)) != index:
        raise ValueError(f"model {model!r} is not an engine instance's model (one of "
                         f"{', '.join(p + '_<index>' for p in INSTANCE_PHASES)})")
    return phase, int(index)


def instance_models(phase: str, num_instances: int) -> tuple[str, ...]:
    """The Triton models of a phase's instances: ("prefill_0", "prefill_1", ...)."""
    if phase not in INSTANCE_PHASES:
        raise ValueError(f"{phase!r} instances are not models of their own")
    return tuple(instance_model(instance_id(phase, i)) for i in range(num_instances))

# distserve inputs.
TEXT_INPUT = "text_input"              # the prompt, UTF-8
MESSAGES = "messages"                  # JSON chat messages [{"role": ..., "content": ...}]
INPUT_IDS = "input_ids"                # a pre-tokenized prompt
MAX_TOKENS = "max_tokens"
STREAM = "stream"
TEMPERATURE = "temperature"
TOP_P = "top_p"
TOP_K = "top_k"
SEED = "seed"
STOP = "stop"                          # stop strings
IGNORE_EOS = "ignore_eos"
RETURN_TOKEN_IDS = "return_token_ids"
RETURN_TIMING = "return_timing"
SLO_TTFT = "slo_ttft_s"                # this request's SLOs (adaptive routing); default: the
SLO_TPOT = "slo_tpot_s"                # deployment's slo_ttft_s / slo_tpot_s
MIN_TOKENS = "min_tokens"              # EOS and stop tokens banned until this many are out
REPETITION_PENALTY = "repetition_penalty"
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
BAD_WORDS = "bad_words"                # strings whose token sequences are never generated

# distserve inputs under TensorRT-LLM's ensemble names (docs/api.md): aliases of ours, and
# inputs accepted at their default only (anything else is refused, naming the input).
STOP_WORDS = "stop_words"              # = stop
RANDOM_SEED = "random_seed"            # = seed (UINT64; folded into [0, 2**63))
MIN_LENGTH = "min_length"              # = min_tokens
END_ID = "end_id"                      # stop on this token id instead of the model's EOS
PAD_ID = "pad_id"                      # accepted, no effect
EXCLUDE_INPUT_IN_OUTPUT = "exclude_input_in_output"   # false: a non-streamed output starts
                                                      # with the prompt text
BEAM_WIDTH = "beam_width"              # 1 only
LENGTH_PENALTY = "length_penalty"      # 1.0 only
NUM_RETURN_SEQUENCES = "num_return_sequences"   # 1 only
RETURN_LOG_PROBS = "return_log_probs"  # false only (no cum_log_probs / output_log_probs)
RETURN_CONTEXT_LOGITS = "return_context_logits"         # false only
RETURN_GENERATION_LOGITS = "return_generation_logits"   # false only
RETURN_PERF_METRICS = "return_perf_metrics"             # false only (see return_timing)
TRTLLM_INPUTS = (STOP_WORDS, RANDOM_SEED, MIN_LENGTH, END_ID, PAD_ID, EXCLUDE_INPUT_IN_OUTPUT,
                 BEAM_WIDTH, LENGTH_PENALTY, NUM_RETURN_SEQUENCES, RETURN_LOG_PROBS,
                 RETURN_CONTEXT_LOGITS, RETURN_GENERATION_LOGITS, RETURN_PERF_METRICS)

# distserve outputs.
TEXT_OUTPUT = "text_output"
TOKEN_IDS = "token_ids"
FINISH_REASON = "finish_reason"        # one of FINISH_REASONS, on the last response only
TIMING = "timing"                      # JSON, when return_timing is set

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Timing:
    """What the server measured for one request (the `timing` output, with return_timing).

    Seconds unless named otherwise; `*_at` are time.monotonic() stamps on the server host
    (comparable between its models, not with a client's clock). A field the request's path
    did not measure is None (a colocated request has no KV transfer)."""
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None                # request in -> first token out (orchestrator)
    tpot_s: float | None = None                # first token -> last, per further token
    e2e_s: float | None = None
    prefill_queue_s: float | None = None       # waiting for a prefill batch
    prefill_s: float | None = None             # the prefill step(s)
    first_token_at: float | None = None
    kv_bytes: int | None = None                # the KV hand-off (disaggregated only)
    kv_transfer_s: float | None = None
    decode_admitted_at: float | None = None    # the KV was in on the decode instance
    route: dict[str, Any] | None = None        # adaptive: the router's choice, options, reasons

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timing:
        """Strict about the types of known fields; unknown keys (a newer server) are ignored."""
        if not isinstance(d, dict):
            raise ValueError("timing must be a JSON object")
        out = cls()
        for f in fields(cls):
            v = d.get(f.name)
            if v is None:
                continue
            if f.name == "route":
                if not isinstance(v, dict):
                    raise ValueError(f"timing field 'route' must be a JSON object, got {v!r}")
                out.route = v
                continue
            want = int if f.type.startswith("int") else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
                raise ValueError(f"timing field {f.name!r} must be a number, got {v!r}")
            setattr(out, f.name, want(v))
        return out

# prefill / decode: a JSON document each way.
REQUEST = "request"
RESPONSE = "response"

# Triton wire dtype -> config.pbtxt data_type.
_CONFIG_DTYPES = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL", "INT32": "TYPE_INT32",
                  "INT64": "TYPE_INT64", "UINT64": "TYPE_UINT64", "FP32": "TYPE_FP32"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                  # Triton wire dtype (what tritonclient's InferInput takes)
    dims: tuple[int, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _CONFIG_DTYPES:
            raise ValueError(f"dtype of {self.name!r} must be one of {sorted(_CONFIG_DTYPES)}, "
                             f"got {self.dtype!r}")

    @property
    def config_dtype(self) -> str:
        return _CONFIG_DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    decoupled: bool
    max_batch_size: int = 0     # > 0: every tensor has a leading batch dimension beyond its dims

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, f"{self.name} input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, f"{self.name} output")


def _find(specs: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no {what} named {name!r}; have {[s.name for s in specs]}")


def _opt(name: str, dtype: str, dims: tuple[int, ...] = (1,)) -> TensorSpec:
    return TensorSpec(name, dtype, dims, optional=True)


DISTSERVE_SPEC = ModelSpec(
    DISTSERVE,
    inputs=(
        _opt(TEXT_INPUT, "BYTES"), _opt(MESSAGES, "BYTES"), _opt(INPUT_IDS, "INT32", (-1,)),
        _opt(MAX_TOKENS, "INT32"), _opt(STREAM, "BOOL"), _opt(TEMPERATURE, "FP32"),
        _opt(TOP_P, "FP32"), _opt(TOP_K, "INT32"), _opt(SEED, "INT64"),
        _opt(STOP, "BYTES", (-1,)), _opt(IGNORE_EOS, "BOOL"), _opt(RETURN_TOKEN_IDS, "BOOL"),
        _opt(RETURN_TIMING, "BOOL"), _opt(SLO_TTFT, "FP32"), _opt(SLO_TPOT, "FP32"),
        _opt(MIN_TOKENS, "INT32"), _opt(REPETITION_PENALTY, "FP32"), _opt(PRESENCE_PENALTY, "FP32"),
        _opt(FREQUENCY_PENALTY, "FP32"), _opt(BAD_WORDS, "BYTES", (-1,)),
        # TensorRT-LLM's names, dtypes as in its ensemble
        _opt(STOP_WORDS, "BYTES", (-1,)), _opt(RANDOM_SEED, "UINT64"), _opt(MIN_LENGTH, "INT32"),
        _opt(END_ID, "INT32"), _opt(PAD_ID, "INT32"), _opt(EXCLUDE_INPUT_IN_OUTPUT, "BOOL"),
        _opt(BEAM_WIDTH, "INT32"), _opt(LENGTH_PENALTY, "FP32"), _opt(NUM_RETURN_SEQUENCES, "INT32"),
        _opt(RETURN_LOG_PROBS, "BOOL"), _opt(RETURN_CONTEXT_LOGITS, "BOOL"),
        _opt(RETURN_GENERATION_LOGITS, "BOOL"), _opt(RETURN_PERF_METRICS, "BOOL"),
    ),
    outputs=(
        TensorSpec(TEXT_OUTPUT, "BYTES", (-1,)), TensorSpec(TOKEN_IDS, "INT32", (-1,)),
        TensorSpec(FINISH_REASON, "BYTES", (1,)), TensorSpec(TIMING, "BYTES", (1,)),
    ),
    decoupled=True,
)

# request: {"req_id", "prompt_token_ids", "sampling": {...}}
# response: {"req_id", "first_token_id", "kv": <KV descriptor>, "timing": {...}}
PREFILL_SPEC = ModelSpec(
    PREFILL,
    inputs=(TensorSpec(REQUEST, "BYTES", (1,)),),
    outputs=(TensorSpec(RESPONSE, "BYTES", (1,)),),
    decoupled=False,
)

# request: {"req_id", "prompt_token_ids", "first_token_id", "sampling": {...}, "kv": {...}}
# response, one per step: {"req_id", "new_token_ids", "finished", "finish_reason"}
DECODE_SPEC = ModelSpec(
    DECODE,
    inputs=(TensorSpec(REQUEST, "BYTES", (1,)),),
    outputs=(TensorSpec(RESPONSE, "BYTES", (1,)),),
    decoupled=True,
)

# request: {"req_id", "prompt_ids", "params": {...}}
# response, one per step: as decode's; the first token's carries "queue_s" and "prefill_s"
COLOCATED_SPEC = replace(DECODE_SPEC, name=COLOCATED)
DISTSERVE_COLOCATED_SPEC = replace(DISTSERVE_SPEC, name=DISTSERVE_COLOCATED)
DISTSERVE_BATCHED_SPEC = replace(DISTSERVE_SPEC, name=DISTSERVE_BATCHED, max_batch_size=1)

# Keyed by model kind: a per-instance model (`decode_1`) has its phase's spec (`model_spec`).
MODEL_SPECS: dict[str, ModelSpec] = {s.name: s for s in (DISTSERVE_SPEC, PREFILL_SPEC, DECODE_SPEC,
                                                         DISTSERVE_COLOCATED_SPEC, COLOCATED_SPEC,
                                                         DISTSERVE_BATCHED_SPEC)}


def model_spec(model: str) -> ModelSpec:
    """The contract of `model`: one of MODEL_SPECS, or a per-instance engine model's (named
    after it)."""
    if model in MODEL_SPECS and model not in INSTANCE_PHASES:
        return MODEL_SPECS[model]
    return replace(MODEL_SPECS[model_instance(model)[0]], name=model)
