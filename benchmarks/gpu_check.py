"""./build.sh gpu-check: the GPU paths, end to end, on a host with an NVIDIA GPU.

    python -m benchmarks.gpu_check [--model PATH] [--device cuda:0] [--out results/gpu_check.json]
                                   [--steps engine,kv,serve,speed]

Steps, each printed as PASS / FAIL / SKIP with its reason and time:
  engine  the engine on the GPU vs on the CPU (float32, same weights): last-position logits of a
          few prompts within a tolerance, and greedy tokens
  kv      KV blocks from one process to another over CUDA IPC (kvtransfer's cuda_ipc)
  serve   a KIND_GPU deployment (prefill and decode on the GPU) served by tritonserver, one request
  speed   bf16 on the GPU: prefill tok/s at 512 tokens, decode tok/s at batch 1 and 32
Runs with whatever torch is importable (a GPU host may have no network: nothing is installed).
Without a CUDA build of torch or without a GPU it says so, skips every step and exits 0. Exit 1
when a step fails. Writes a JSON summary to --out.
"""
from __future__ import annotations
from backends.core.limits import EngineLimits

import argparse
import datetime
import json
import multiprocessing as mp
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
STEPS = ("engine", "kv", "serve", "speed")
SERVER_READY_S = 240.0


@dataclass
class StepResult:
    name: str
    status: str                 # PASS | FAIL | SKIP
    reason: str
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"[{self.status}] {self.name}: {self.reason} ({self.seconds:.1f} s)"


class Skip(Exception):
    """A step that cannot run here (its reason is the message)."""


def cuda_status() -> tuple[bool, str]:
    """(usable, why): whether this torch build sees a GPU, said in words either way."""
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({exc}): the GPU checks need a CUDA build of torch"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build: the GPU checks need a CUDA build of torch"
    if not torch.cuda.is_available():
        return False, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
                       f"({driver_status()})")
    gpus = f"{torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name(0)}"
    return True, f"{gpus}; torch {torch.__version__}, CUDA {torch.version.cuda}"


def driver_status() -> str:
    try:
        from cuda.bindings import runtime as cudart
        err, count = cudart.cudaGetDeviceCount()
        return f"cudaGetDeviceCount: {getattr(err, 'name', err)} ({int(err)}), {count} device(s)"
    except Exception as exc:    # cuda-python missing or the driver library absent
        return f"cuda-python: {type(exc).__name__}: {exc}"


def run_step(name: str, fn: Callable[[], tuple[str, dict]]) -> StepResult:
    t0 = time.perf_counter()
    try:
        reason, details = fn()
        status = "PASS"
    except Skip as exc:
        status, reason, details = "SKIP", str(exc), {}
    except Exception as exc:
        status, reason = "FAIL", f"{type(exc).__name__}: {exc}"
        details = {"traceback": traceback.format_exc(limit=8)}
    result = StepResult(name, status, reason, time.perf_counter() - t0, details)
    print(result.line(), flush=True)
    return result


# ---- engine: GPU vs CPU ----------------------------------------------------------------------

def _engine(model: Path, device: str, dtype: str, num_kv_blocks: int = 256, **kw):
    from backends.core.engine import EngineConfig, LLMEngine
    config = EngineConfig(dtype=dtype, device=device, limits=EngineLimits(num_kv_blocks=num_kv_blocks), **kw)
    return LLMEngine.from_path(str(model), config)


def last_logits(engine, prompt_ids: list[int]):
    """Next-token logits [V] (float32, on CPU) after `prompt_ids`, through the prefill path."""
    from backends.core.sampling import SamplingParams
    engine.add_request("gpu-check-probe", prompt_ids, SamplingParams(max_tokens=1, temperature=0))
    try:
        return engine.runner.forward_logits(engine.scheduler.schedule())[0]
    finally:
        engine.abort("gpu-check-probe")


def greedy(engine, prompt_ids: list[int], num_tokens: int) -> list[int]:
    from backends.core.sampling import SamplingParams
    engine.add_request("gpu-check-greedy", prompt_ids,
                       SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished():
        for step in engine.step():
            out += step.new_token_ids
    return out


def check_engine(model: Path, device: str) -> tuple[str, dict]:
    from backends.core.tokenizer import Tokenizer
    tok = Tokenizer.load(model)
    prompts = [tok.encode(p) for p in PROMPTS]
    gpu, cpu = _engine(model, device, "float32"), _engine(model, "cpu", "float32")
    worst, details = 0.0, {"prompts": []}
    for ids in prompts:
        a, b = last_logits(gpu, ids), last_logits(cpu, ids)
        diff = float((a - b).abs().max())
        tol = 2e-2 + 1e-3 * float(b.abs().max())
        worst = max(worst, diff / tol)
        g_gpu, g_cpu = greedy(gpu, ids, 16), greedy(cpu, ids, 16)
        same = next((i for i, (x, y) in enumerate(zip(g_gpu, g_cpu)) if x != y), len(g_gpu))
        details["prompts"].append({"max_abs_diff": diff, "tolerance": tol, "argmax_equal":
                                   int(a.argmax()) == int(b.argmax()), "greedy_same_prefix": same})
    bad = [p for p in details["prompts"] if p["max_abs_diff"] > p["tolerance"] or not p["argmax_equal"]]
    if bad:
        raise AssertionError(f"{device} logits differ from the CPU engine's beyond tolerance: {bad}")
    same = [p["greedy_same_prefix"] for p in details["prompts"]]
    return (f"{device} vs cpu (float32): logits within tolerance on {len(prompts)} prompts "
            f"(worst {worst:.2f} of it), greedy tokens equal for {same} of 16"), details


# ---- kv: CUDA IPC between two processes ------------------------------------------------------

def _kv_layout():
    from backends.core.kv_cache import KVLayout
    return KVLayout(num_blocks=16, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8)


def _kv_child(desc_json: str, device: str, conn) -> None:
    """The decode side: import blocks 1, 2 of the exporter's pool into our blocks 3, 4."""
    from backends.core.kv_cache import KVPool
    from kvtransfer import KVDescriptor, make_importer
    pool = KVPool(_kv_layout(), device=device)
    try:
        with make_importer("cuda_ipc", pool) as imp:
            imp.fetch(KVDescriptor.from_json(desc_json), [3, 4])
            conn.send(("ok", pool.data[[3, 4]].cpu()))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def check_kv(device: str) -> tuple[str, dict]:
    import torch

    from kvtransfer import make_exporter
    index = torch.device(device).index or 0
    with make_exporter("cuda_ipc", _kv_layout(), "gpu-check-prefill", device=index) as ex:
        ex.pool.data.normal_()
        desc = ex.grant([1, 2], 5)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_kv_child, args=(desc.to_json(), device, child))
        proc.start()
        child.close()
        if not parent.poll(120):
            proc.kill()
            raise TimeoutError("the importing process sent nothing in 120 s")
        status, got = parent.recv()
        proc.join(30)
        if status != "ok":
            raise RuntimeError(f"the importing process failed: {got}")
        if not torch.equal(got, ex.pool.data[[1, 2]].cpu()):
            raise AssertionError("the imported blocks differ from the exported ones")
        released = ex.collect_released()
    return f"2 blocks over CUDA IPC into another process, bit-exact; lease released {released}", {}


# ---- serve: a KIND_GPU deployment end to end -------------------------------------------------

def gpu_deployment(model: Path, gpu: int):
    from deploy.deployment import Deployment, PhaseSpec
    phase = PhaseSpec(device="gpu", devices=(gpu,))
    with warnings.catch_warnings():              # prefill and decode share the GPU, on purpose
        warnings.simplefilter("ignore")
        return Deployment(model_path=str(model.resolve()), prefill=phase, decode=phase)


def check_serve(model: Path, device: str) -> tuple[str, dict]:
    import importlib.util
    if importlib.util.find_spec("pytriton") is None:
        raise Skip("nvidia-pytriton (it ships tritonserver) is not installed")
    from deploy.render import render_repository
    from deploy.server import TritonServer, free_ports
    import torch
    deployment = gpu_deployment(model, torch.device(device).index or 0)
    run_dir = Path(tempfile.mkdtemp(prefix="gpu-check-serve-"))
    repo = render_repository(deployment, run_dir / "model_repository", require_code=True)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, run_dir=run_dir, http_port=http, grpc_port=grpc, metrics_port=metrics)
    try:
        server.start().wait_ready(SERVER_READY_S)
        reply, latency = generate(server.http_url, PROMPTS[0], 16)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n--- server log tail ---\n{server.log_tail(20)}") from exc
    finally:
        server.stop()
    text = reply.get("text_output")
    if not isinstance(text, str) or not text:
        raise AssertionError(f"no text_output in the reply: {reply}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return (f"KIND_GPU prefill + decode on {device}, kv_transport {deployment.kv_transport}: "
            f"{PROMPTS[0]!r} -> {text!r} in {latency:.2f} s"), {"reply": reply}


def generate(http_url: str, prompt: str, max_tokens: int) -> tuple[dict, float]:
    """(reply, seconds) of one `generate` request to the distserve model."""
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"http://{http_url}/v2/models/distserve/generate", data=body,
                                     method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))    # loopback: no proxy
    t0 = time.perf_counter()
    with opener.open(request, timeout=120) as response:
        return json.loads(response.read()), time.perf_counter() - t0


# ---- speed -------------------------------------------------------------------------------------

def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prefill_tok_s(engine, length: int, vocab: int, repeats: int = 3) -> float:
    from backends.core.sampling import SamplingParams
    import torch
    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    times = []
    for i in range(repeats + 1):                 # the first is a warm-up
        engine.add_request(f"prefill-{i}", ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        times.append(_timed(engine.step))        # one step = the whole prompt (sync: logits to CPU)
        engine.abort(f"prefill-{i}")
    return length / statistics.median(times[1:])


def decode_tok_s(engine, batch: int, vocab: int, steps: int = 32, prompt_len: int = 32) -> float:
    from backends.core.sampling import SamplingParams
    import torch
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    req_ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for req_id in req_ids:
        engine.add_request(req_id, torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
    try:
        while engine.scheduler.waiting:
            engine.step()
        engine.step()                            # warm-up decode step
        elapsed = _timed(lambda: [engine.step() for _ in range(steps)])
    finally:
        for req_id in req_ids:
            engine.abort(req_id)
    return batch * steps / elapsed


def check_speed(model: Path, device: str) -> tuple[str, dict]:
    engine = _engine(model, device, "bfloat16", num_kv_blocks=512, max_num_seqs=32,
                     max_num_batched_tokens=2048)
    vocab = engine.model_config.vocab_size
    details = {"prefill_512_tok_s": prefill_tok_s(engine, 512, vocab),
               "decode_b1_tok_s": decode_tok_s(engine, 1, vocab),
               "decode_b32_tok_s": decode_tok_s(engine, 32, vocab)}
    return ("bf16 on {0}: prefill 512 tokens {1:.0f} tok/s; decode batch 1 {2:.1f} tok/s, batch 32 "
            "{3:.1f} tok/s").format(device, *details.values()), details


# ---- the run ------------------------------------------------------------------------------------

def plan(args: argparse.Namespace) -> dict[str, Callable[[], tuple[str, dict]]]:
    model, device = Path(args.model), args.device

    def needs_model(fn: Callable[[Path, str], tuple[str, dict]]) -> Callable[[], tuple[str, dict]]:
        def step() -> tuple[str, dict]:
            if not model.exists():
                raise Skip(f"model {model} not found (./build.sh setup fetches it; needs network)")
            return fn(model, device)
        return step
    steps = {"engine": needs_model(check_engine), "kv": lambda: check_kv(device),
             "serve": needs_model(check_serve), "speed": needs_model(check_speed)}
    return {name: steps[name] for name in args.steps}


def parse_steps(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"steps are some of {','.join(STEPS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--steps", type=parse_steps, default=list(STEPS))
    p.add_argument("--out", default=str(ROOT / "results" / "gpu_check.json"))
    args = p.parse_args(argv)
    usable, why = cuda_status()
    print(f"gpu-check: {why}", flush=True)
    if usable:
        results = [run_step(name, fn) for name, fn in plan(args).items()]
    else:
        results = [StepResult(name, "SKIP", "no usable GPU (see above)") for name in args.steps]
        for r in results:
            print(r.line(), flush=True)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    summary = (f"gpu-check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
               + ("" if usable else " (no GPU checks ran on this host)"))
    report = {"command": shlex.join(["python", "-m", "benchmarks.gpu_check", *argv]),
              "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
              "cuda_usable": usable, "cuda": why, "summary": summary,
              "steps": [asdict(r) for r in results]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{summary}; summary in {out}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
