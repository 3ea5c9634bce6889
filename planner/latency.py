"""Latency model of one engine instance (DistServe's Appendix A form), its least-squares fit,
and the JSON files that hold coefficients per (model, device kind, tp, pp).

    prefill batch over prompt lengths l_i:   T = a + b * sum(l_i) + c * sum(l_i^2)
    decode step over B sequences of ctx_i:   T = a + b * sum(ctx_i) + c * B
                                             (one (a, b, c) below the batch-size threshold,
                                              another at or above it)
    KV transfer of n bytes over a link:      T = latency + n / bandwidth

Pipeline degree pp, when the coefficients were measured at pp = 1 (the published A100 files):
prefill T / pp + pp * pp_overhead_s (1 ms per stage in the artifact's formula), decode T / pp.
These are the time one pipeline stage spends on a batch: the simulator keeps up to pp batches
in flight (one per virtual engine) and a batch is done after pp stage times, so pp raises
throughput, not a batch's latency. Coefficients measured at the pp itself are used as they are
(as stage times). Everything here is in seconds; the published files are in milliseconds and
are converted when loaded.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ANCHORS_DIR = Path(os.environ.get("DISTSERVE_ANCHORS", ROOT.parent / "shared" / "anchors"))
FORMAT = "distserve-planner/latency-v1"
Coeffs = tuple[float, float, float]

# fp16 KV bytes per token: 2 (K, V) * layers * hidden * 2 bytes (OPT configs).
KV_BYTES_PER_TOKEN = {"opt-13b": 2 * 40 * 5120 * 2, "opt-66b": 2 * 64 * 9216 * 2,
                      "opt-175b": 2 * 96 * 12288 * 2}


def model_key(name: str) -> str:
    """'facebook/opt-13b' and 'OPT-13B' name the same model."""
    return name.strip().lower().rsplit("/", 1)[-1]


def anchor_path(name: str) -> Path:
    """A file under the anchors folder ($DISTSERVE_ANCHORS, default ../shared/anchors)."""
    return ANCHORS_DIR / name


def _coeffs(value: Sequence[float], what: str) -> Coeffs:
    if len(value) != 3 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value):
        raise ValueError(f"{what} must be three finite numbers [a, b, c], got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


SATURATION_SHARE = 0.95         # L_m: the prompt length at this share of the best prefill rate


@dataclass(frozen=True)
class LatencyModel:
    """Step times of one instance of `model` on `tp` x `pp` devices of kind `device`."""
    model: str
    device: str
    tp: int
    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    decode_threshold: int = 95
    pp: int = 1
    measured_pp: int = 1            # the pp the coefficients were fitted at
    pp_overhead_s: float = 0.001

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "measured_pp", "decode_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefill", "decode_small", "decode_large"):
            object.__setattr__(self, name, _coeffs(getattr(self, name), name))
        if self.pp != self.measured_pp and self.measured_pp != 1:
            raise ValueError(f"cannot derive pp={self.pp} from coefficients measured at "
                             f"pp={self.measured_pp} (only from pp=1)")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    @property
    def _derived(self) -> bool:
        return self.pp != self.measured_pp

    def with_pp(self, pp: int) -> LatencyModel:
        return replace(self, pp=pp)

    def prefill_time(self, prompt_lens: Iterable[int], prefixes: Iterable[int] | None = None) -> float:
        """Seconds for one prefill batch; `prompt_lens` are the tokens computed per sequence,
        `prefixes` the tokens each has in the cache before them (a chunk after a cached prefix
        or after its own earlier chunks), which its attention also runs over: the quadratic
        term prices (p + n)^2 - p^2 for n tokens after p (a chunk of 130 tokens after 800 on
        the AMD host: 284 ms predicted, 340-358 measured; priced cold, 188)."""
        s1 = s2 = 0
        for n, p in zip(prompt_lens, itertools.repeat(0) if prefixes is None else prefixes):
            s1 += n
            s2 += n * n + 2 * p * n
        a, b, c = self.prefill
        t = a + b * s1 + c * s2
        return t / self.pp + self.pp * self.pp_overhead_s if self._derived else t

    def saturation_length(self, share: float = SATURATION_SHARE, limit: int = 2048,
                          step: int = 16) -> int:
        """L_m (DistServe section 4.1): the shortest prompt, a multiple of `step` up to `limit`,
        whose prefill runs at `share` of the best rate (tokens a second) of any such length. A
        prefill batch longer than that gains at most 1 / `share` - 1 in throughput, and every prompt
        in it waits for the whole batch: a prompt that arrives while the instance is busy delays
        the first token of those queued before it by its own prefill."""
        if not 0 < share <= 1 or step < 1 or limit < step:
            raise ValueError(f"bad share {share}, step {step} or limit {limit}")
        times = [(n, self.prefill_time([n])) for n in range(step, limit + 1, step)]
        rates = [(n, n / t) for n, t in times if t > 0]     # a fit's intercept may be <= 0
        if not rates:
            raise ValueError("the prefill model predicts no positive time up to the limit")
        best = max(r for _, r in rates)
        return next(n for n, r in rates if r >= share * best)

    def decode_coeffs(self, batch_size: int) -> Coeffs:
        """The (a, b, c) of a decode step of `batch_size` sequences at this pp."""
        coeffs = self.decode_small if batch_size < self.decode_threshold else self.decode_large
        return tuple(v / self.pp for v in coeffs) if self._derived else coeffs

    def decode_time(self, batch_size: int, total_ctx: int, marginal: bool = False) -> float:
        """Seconds for one decode step of `batch_size` sequences with `total_ctx` context tokens
        (`marginal`: without the constant term)."""
        a, b, c = self.decode_coeffs(batch_size)
        return (0.0 if marginal else a) + b * total_ctx + c * batch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pp"] = d.pop("measured_pp")          # a derived pp is saved as its base
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class Link:
    """A KV path between a prefill and a decode instance."""
    bandwidth_Bps: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_Bps > 0 or self.latency_s < 0:
            raise ValueError(f"bandwidth must be > 0 and latency >= 0, got {self}")

    def transfer_time(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_Bps


NVLINK_A100 = Link(300e9, 10e-6)           # intra-node, per direction (NVLink 3, 12 links)
ETHERNET_25G = Link(25e9 / 8, 50e-6)       # the paper's testbed between nodes
PCIE4 = Link(25e9, 10e-6)


# ---- fitting ------------------------------------------------------------------------------

def _lstsq(features: np.ndarray, times: np.ndarray) -> Coeffs:
    """Least squares with column scaling (sum(l^2) is ~1e6x the constant column)."""
    if len(times) < features.shape[1]:
        raise ValueError(f"need at least {features.shape[1]} samples to fit, got {len(times)}")
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    sol, *_ = np.linalg.lstsq(features / scale, times, rcond=None)
    return _coeffs((sol / scale).tolist(), "fit")


def fit_prefill(samples: Iterable[tuple[Sequence[int], float]]) -> Coeffs:
    """(a, b, c) from (prompt lengths of one batch, seconds) samples."""
    rows, times = [], []
    for lens, t in samples:
        lens = np.asarray(lens, dtype=float)
        rows.append((1.0, lens.sum(), (lens * lens).sum()))
        times.append(t)
    return _lstsq(np.asarray(rows), np.asarray(times))


def fit_decode(samples: Iterable[tuple[int, int, float]], threshold: int = 95) -> tuple[Coeffs, Coeffs]:
    """(small, large) (a, b, c) from (batch size, total context, seconds) samples. A side with
    too few samples gets the other side's coefficients."""
    rows = np.asarray([(1.0, ctx, bs, t) for bs, ctx, t in samples], dtype=float)
    if len(rows) == 0:
        raise ValueError("no decode samples to fit")
    fits = []
    for mask in (rows[:, 2] < threshold, rows[:, 2] >= threshold):
        part = rows[mask]
        fits.append(_lstsq(part[:, :3], part[:, 3]) if len(part) >= 3 else None)
    if fits[0] is None and fits[1] is None:
        raise ValueError("need at least 3 decode samples on one side of the threshold")
    small = fits[0] or fits[1]
    return small, fits[1] or small


def fit_model(prefill_samples: Iterable[tuple[Sequence[int], float]],
              decode_samples: Iterable[tuple[int, int, float]], *, model: str, device: str,
              tp: int = 1, pp: int = 1, threshold: int = 95) -> LatencyModel:
    small, large = fit_decode(decode_samples, threshold)
    return LatencyModel(model_key(model), device, tp, fit_prefill(prefill_samples), small, large,
                        threshold, pp=pp, measured_pp=pp)


# ---- files --------------------------------------------------------------------------------

class LatencyTable:
    """Latency models by (model, device, tp, pp); pp > 1 is derived from pp = 1 if not measured."""

    def __init__(self, models: Iterable[LatencyModel] = ()) -> None:
        self._models: dict[tuple[str, str, int, int], LatencyModel] = {}
        for m in models:
            self.add(m)

    def add(self, m: LatencyModel) -> None:
        self._models[(model_key(m.model), m.device, m.tp, m.measured_pp)] = m

    def __len__(self) -> int:
        return len(self._models)

    def tps(self, model: str, device: str) -> list[int]:
        return sorted({k[2] for k in self._models if k[:2] == (model_key(model), device)})

    def devices(self, model: str) -> list[str]:
        return sorted({k[1] for k in self._models if k[0] == model_key(model)})

    def get(self, model: str, device: str, tp: int, pp: int = 1) -> LatencyModel:
        key = (model_key(model), device)
        if (*key, tp, pp) in self._models:
            return self._models[(*key, tp, pp)]
        if (*key, tp, 1) in self._models:
            return self._models[(*key, tp, 1)].with_pp(pp)
        have = sorted(k for k in self._models)
        raise KeyError(f"no latency model for {model} on {device} with tp={tp}; have {have}")

    def to_json(self) -> str:
        entries = [m.to_dict() for m in self._models.values()]
        return json.dumps({"format": FORMAT, "unit": "s", "entries": entries}, indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def from_distserve_profile(data: dict, device: str = "a100-80gb", unit_s: float = 1e-3) -> LatencyTable:
    """The DistServe artifact's format: {model: {tp: {prefill, decoding_smallbs, ...}}} in ms."""
    table = LatencyTable()
    for model, by_tp in data.items():
        for tp, e in by_tp.items():
            coeffs = [tuple(v * unit_s for v in _coeffs(e[k], f"{model} tp{tp} {k}"))
                      for k in ("prefill", "decoding_smallbs", "decoding_largebs")]
            table.add(LatencyModel(model_key(model), device, int(tp), *coeffs,
                                   decode_threshold=int(e.get("decoding_large_small_bs_threshold", 95)),
                                   pp_overhead_s=1.0 * unit_s))
    return table


def load_profile(path: str | Path, device: str = "a100-80gb") -> LatencyTable:
    """Our JSON format, or the DistServe artifact's (then `device` names the device kind)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a latency profile must be a JSON object")
    if data.get("format") != FORMAT:
        return from_distserve_profile(data, device)
    return LatencyTable(LatencyModel(**{**e, "measured_pp": e.get("pp", 1)}) for e in data["entries"])


def load_kv_capacity(path: str | Path) -> dict[tuple[str, int, int], int]:
    """KV capacity in tokens per (model, tp, pp) from a CSV: model,tp,pp,max_num_tokens."""
    with open(path, newline="") as f:
        return {(model_key(r["model"]), int(r["tp"]), int(r["pp"])): int(r["max_num_tokens"])
                for r in csv.DictReader(f)}
