"""Soak: the default disaggregated deployment under ShareGPT load, with client cancellations and
one SIGKILL of the decode instance's python-backend stub half-way; nothing may hang or leak.

    ./build.sh soak                                # 1,000 requests, ~12 min -> docs/soak.{json,md,png}
    ./build.sh soak --short                        # 40 requests, ~1.5 min -> results/soak-short.*
    python -m benchmarks.soak [--requests N] [--rate RPS] [--short] [--out PREFIX]

The run:
- renders the default deployment (deploy.deployment.default_deployment) and starts tritonserver
  on free loopback ports (tests/integration/conftest.py's start_server, which stops it);
- replays N ShareGPT requests (the workload and length caps of the goodput measurement named
  by --goodput-file, default docs/goodput/chatbot-history-abs-slo-new-engine.json) open loop at
  Poisson arrivals, by default RATE_FACTOR (1.5) x that file's DistServe goodput; each request
  streams over gRPC (client.grpc_stream.GrpcChannel, the benchmark's client) and asks for exactly
  its output length;
- the client cancels 10% of the requests (seeded): half at a random moment within
  --cancel-within seconds of sending (aimed before the first token), half right after a random
  number of tokens (mid-stream); leaving the stream cancels the RPC, which Triton turns into a
  cancellation of the request. Where it really happened (tokens received) is recorded;
- at the arrival of request N * --kill-at, SIGKILLs the decode stub (its pid from the instance's
  control-socket stats, checked against the server's children: benchmarks.fault_tools), then
  probes with one small HTTP request a second until the server answers again;
- samples VmRSS of tritonserver and of each stub every --sample-s seconds (a stub restarted by
  the reload is a new process: each pid is reported on its own);
- once every request ended (or passed its --deadline, then counted hung), waits until the
  instances are idle and reads what they hold (KV blocks, prefill leases), stops the server and
  looks for shared-memory segments with the server's prefix and for the KV pools its instances
  created (kvtransfer logs each name in the server's run dir).
Every request is counted once: completed (all its tokens), failed (an error, by class: killed
instance / server unreachable / cancelled / overload or other), cancelled by the client, or hung.

Exit status 1 if a request hung, a request is unaccounted for, KV blocks or leases were held at
the end, a segment or a server process was left after stop, a server process died (other than
the killed stub), or the server did not answer again after the kill. One death is reported but
not failed: when the kill made Triton's python backend abort tritonserver itself (the stub died
holding its IPC mutex: deploy.server.IPC_MUTEX_ABORT in the old log, docs/faults.md) and the
supervisor restarted it, the processes of that server are gone by Triton's defect, not ours;
the report says so, with the restart's time, and every other check still applies.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import report as report_files
from benchmarks import soak_report
from benchmarks.fault_tools import RECOVER_S, segments, serves_again, stub_pid, wait_idle
from client.bench.endpoints import chunk_event, triton_inputs
from client.bench.pools import Request
from client.bench.workloads import LengthCaps, WorkloadSpec, arrival_times, load_workload
from client.grpc_stream import GrpcChannel
from client.results import DistServeError
from deploy.contract import DISTSERVE, instance_model
from deploy.deployment import DEFAULT_MODEL_PATH, default_deployment
from deploy.render import render_repository
from deploy.server import ServerError
from tests.integration.conftest import instance_stats, start_server

ROOT = Path(__file__).resolve().parents[1]
GOODPUT_FILE = ROOT / "docs" / "goodput" / "chatbot-history-abs-slo-new-engine.json"
RATE_FACTOR = 1.5                        # x the measured goodput: past it, on purpose
KILL_INSTANCE = "decode-0"
KILL_MODEL = instance_model(KILL_INSTANCE)      # its Triton model, "decode_0"
# Error classes, by the message: an instance that died (the orchestrator's "decode-0 is dead",
# Triton's "Stub process ... is not healthy", a model being reloaded), a cancellation, the rest.
KILLED = re.compile(r"is dead|is stuck|not healthy|stub process|unknown model|not ready|"
                    r"not found|unavailable", re.I)
CANCELLED = re.compile(r"cancel", re.I)
# The connection to Triton lost: tritonserver itself went (Triton's python backend aborts on a
# stub killed holding its IPC mutex, docs/faults.md) and the supervisor is restarting it.
UNREACHABLE = re.compile(r"cannot reach Triton|socket closed|stream removed|connection refused|"
                         r"failed to connect", re.I)
ERROR_CLASSES = ("killed instance", "server unreachable", "cancelled", "overload/other")
STATUSES = ("completed", "failed", "cancelled", "hung")


@dataclass(frozen=True)
class Settings:
    num_requests: int = 1000
    rate: float | None = None            # requests/s; None: RATE_FACTOR x the goodput file's
    goodput_file: str = str(GOODPUT_FILE)
    cancel_fraction: float = 0.1
    cancel_within_s: float = 0.5         # a "before the first token" cancel: uniform in [0, this)
    kill_at: float = 0.5                 # the kill comes at the arrival of request N * kill_at
    deadline_s: float = 300.0            # a request not ended this long after its send is hung
    seed: int = 0
    warmup: int = 2
    sample_s: float = 2.0
    progress_s: float = 15.0
    idle_timeout_s: float = 60.0
    recover_s: float = RECOVER_S

    def __post_init__(self) -> None:
        if self.num_requests < 2:
            raise ValueError(f"num_requests must be >= 2, got {self.num_requests}")
        if not 0 <= self.cancel_fraction <= 1 or not 0 < self.kill_at < 1:
            raise ValueError("cancel_fraction must be in [0, 1] and kill_at in (0, 1)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")


# A run that fits CI (tests/integration/test_soak.py): the kill early enough that the reload
# (15-21 s measured) is over before the last arrivals, so some requests sent after it are served.
SHORT = {"num_requests": 40, "kill_at": 0.2, "progress_s": 5.0}


@dataclass(frozen=True)
class CancelPlan:
    moment: str                          # "before_first_token" | "mid_stream"
    after_s: float | None = None         # cancel this long after the send ...
    after_tokens: int | None = None      # ... or once this many tokens arrived


@dataclass
class Outcome:
    index: int
    prompt_len: int
    output_len: int
    arrival_s: float
    cancel_plan: str | None = None
    send_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None           # None: hung (never ended)
    num_tokens: int = 0
    status: str = "pending"              # completed | failed | cancelled | hung
    error: str | None = None
    cancelled_at_tokens: int | None = None

    @property
    def error_class(self) -> str | None:
        return None if self.status != "failed" else error_class(self.error or "")


def error_class(message: str) -> str:
    if UNREACHABLE.search(message):
        return "server unreachable"
    if KILLED.search(message):
        return "killed instance"
    return "cancelled" if CANCELLED.search(message) else "overload/other"


def goodput_reference(path: str | Path) -> dict[str, Any]:
    """The DistServe goodput measurement the default rate is a multiple of: rate, workload, SLO."""
    doc = json.loads(Path(path).read_text())
    system = next(s for s in doc["systems"] if s["system"]["name"] == "disaggregated")
    return {"file": os.path.relpath(path, ROOT), "goodput_rps": system["goodput_rps"],
            "slo": system["slo"], "workload": doc["workload"], "command": doc["command"]}


def cancel_plans(requests: list[Request], fraction: float, within_s: float, seed: int) -> dict[int, CancelPlan]:
    """round(fraction * n) requests, seeded: half cancelled within `within_s` of the send, half
    after 1..output_len-1 tokens (a one-token request can only be cancelled by time)."""
    rng = np.random.default_rng([seed, 11])
    picks = rng.choice(len(requests), size=round(fraction * len(requests)), replace=False)
    plans = {}
    for i in sorted(int(p) for p in picks):
        output_len = requests[i].output_len
        if output_len >= 2 and rng.random() < 0.5:
            plans[i] = CancelPlan("mid_stream", after_tokens=int(rng.integers(1, output_len)))
        else:
            plans[i] = CancelPlan("before_first_token", after_s=float(rng.uniform(0.0, within_s)))
    return plans


async def run_request(channel: GrpcChannel, req: Request, out: Outcome, plan: CancelPlan | None,
                      clock: Callable[[], float], deadline_s: float) -> None:
    """Send `req` now, read its stream; fill `out` with how it ended."""
    out.send_s = clock()

    async def read() -> bool:
        """True if the client left mid-stream (its plan)."""
        async with contextlib.aclosing(channel.stream(DISTSERVE, triton_inputs(req))) as chunks:
            async for chunk in chunks:
                n = chunk_event(chunk).num_tokens
                if n and out.first_token_s is None:
                    out.first_token_s = clock()
                out.num_tokens += n
                if plan is not None and plan.after_tokens is not None \
                        and plan.after_tokens <= out.num_tokens < out.output_len:
                    return True                     # leaving the stream cancels the RPC
        return False

    by_time = plan is not None and plan.after_s is not None and plan.after_s < deadline_s
    task = asyncio.ensure_future(read())
    done, _ = await asyncio.wait({task}, timeout=plan.after_s if by_time else deadline_s)
    if not done:
        task.cancel()                               # cancels the RPC
        await asyncio.gather(task, return_exceptions=True)
        out.status = "cancelled" if by_time else "hung"
    elif task.exception() is not None:
        e = task.exception()
        out.status, out.error = "failed", (e.message if isinstance(e, DistServeError)
                                           else f"{type(e).__name__}: {e}")
    elif task.result():
        out.status = "cancelled"
    elif out.num_tokens == out.output_len:
        out.status = "completed"
    else:
        out.status, out.error = "failed", f"the stream ended after {out.num_tokens} of {out.output_len} tokens"
    if out.status == "cancelled":
        out.cancelled_at_tokens = out.num_tokens
    if out.status != "hung":
        out.end_s = clock()


class RssSampler(threading.Thread):
    """VmRSS of the server and of its children (the python-backend stubs), per pid."""

    def __init__(self, server_pid: int, period_s: float, clock: Callable[[], float]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.server_pid, self.period_s, self.clock = server_pid, period_s, clock
        self.processes: dict[int, dict[str, Any]] = {}
        self.last_t = 0.0                           # the last sample's time
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.period_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()                               # the end state, once idle

    def sample(self) -> None:
        t = self.last_t = round(self.clock(), 2)
        for pid in [self.server_pid, *children(self.server_pid)]:
            kb = memory_kb(pid)
            if kb is None:
                continue
            entry = self.processes.setdefault(pid, {"pid": pid, "process": process_label(pid, self.server_pid),
                                                    "samples": []})
            entry["samples"].append([t, *kb])
        for entry in self.processes.values():       # gone since the last sample: how it ended
            if "gone_s" not in entry and memory_kb(entry["pid"]) is None:
                entry["gone_s"], entry["exit"] = t, exit_status(entry["pid"])

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for p in self.processes.values():
            rss = [sample[1] for sample in p["samples"]]
            anon = [sample[2] for sample in p["samples"]]
            out.append({"pid": p["pid"], "process": p["process"], "first_s": p["samples"][0][0],
                        "last_s": p["samples"][-1][0], "start_mb": rss[0] / 1024, "end_mb": rss[-1] / 1024,
                        "max_mb": max(rss) / 1024, "growth_mb": (rss[-1] - rss[0]) / 1024,
                        # the second half of its life: warm-up (allocator caches) is over by then
                        "growth_second_half_mb": (rss[-1] - rss[len(rss) // 2]) / 1024,
                        # private memory only: RSS also counts the KV pool's shared pages as they are touched
                        "anon_growth_mb": (anon[-1] - anon[0]) / 1024,
                        "anon_growth_second_half_mb": (anon[-1] - anon[len(anon) // 2]) / 1024,
                        "num_samples": len(rss), "alive_at_end": "gone_s" not in p,
                        "gone_s": p.get("gone_s"), "exit": p.get("exit")})
        return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssShmem")     # a sample: [t, *these in kB]


def memory_kb(pid: int) -> list[int] | None:
    """VmRSS, RssAnon, RssShmem of `pid` in kB (/proc/PID/status); None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            values = dict(line.split(":", 1) for line in f if ":" in line)
        return [int(values[name].split()[0]) for name in MEMORY_FIELDS]
    except (OSError, ValueError, KeyError):
        return None


def exit_status(pid: int) -> str | None:
    """How a zombie child ended ("signal 11 (SIGSEGV)", "exit 0"), from /proc/PID/stat's exit_code;
    None once it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] != "Z" or len(fields) < 50:
        return None
    code = int(fields[49])                          # field 52 of stat: the waitpid status
    if code & 0x7F:
        return f"signal {code & 0x7F} ({signal.Signals(code & 0x7F).name})"
    return f"exit {code >> 8}"


def process_label(pid: int, server_pid: int) -> str:
    if pid == server_pid:
        return "tritonserver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    model = next((m.group(1) for a in args if (m := re.search(r"/([^/]+)/\d+/model\.py$", a))), None)
    return f"{model} stub" if model else Path(args[0]).name


async def kill_decode(server: Any, at_s: float, clock: Callable[[], float], recover_s: float) -> dict[str, Any]:
    """At `at_s`, SIGKILL the decode stub; then wait until the server answers again."""
    await asyncio.sleep(max(0.0, at_s - clock()))
    reported = (await asyncio.to_thread(instance_stats, server, KILL_INSTANCE))["pid"]
    pid = stub_pid(server, KILL_MODEL)
    if reported != pid:
        raise RuntimeError(f"{KILL_INSTANCE} reports pid {reported}, the server's {KILL_MODEL} stub is {pid}")
    os.kill(pid, signal.SIGKILL)
    killed, at = time.monotonic(), clock()
    log(f"t={at:.1f} s: SIGKILL {KILL_INSTANCE} (pid {pid})")
    try:
        answering = await asyncio.to_thread(serves_again, server, killed, recover_s, "http")
        log(f"t={clock():.1f} s: the server answers again, {answering:.1f} s after the kill")
    except AssertionError:
        answering = None
        log(f"the server did not answer within {recover_s:g} s of the kill")
    return {"instance": KILL_INSTANCE, "pid": pid, "at_s": at, "server_answering_after_s": answering}


async def report_progress(outcomes: list[Outcome], clock: Callable[[], float], period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        log(progress_line(outcomes, clock()))


def progress_line(outcomes: list[Outcome], now: float) -> str:
    sent = sum(o.send_s is not None for o in outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    in_flight = sum(o.status == "pending" for o in outcomes) - (len(outcomes) - sent)
    return (f"t={now:6.1f} s  sent {sent}/{len(outcomes)}  in flight {in_flight}  " +
            "  ".join(f"{s} {n}" for s, n in counts.items()))


async def soak(server: Any, requests: list[Request], warmup: list[Request], arrivals: list[float],
               plans: dict[int, CancelPlan], s: Settings, sampler_factory: Callable[..., RssSampler]
               ) -> tuple[list[Outcome], dict[str, Any], RssSampler, float]:
    """Warm up, then replay with the kill; (outcomes, the kill, the running sampler, t0)."""
    deadline = s.deadline_s
    async with GrpcChannel(server.grpc_url) as channel:
        for req in warmup:                                   # one at a time, not recorded
            await run_request(channel, req, Outcome(-1, req.prompt_len, req.output_len, 0.0),
                              None, time.monotonic, deadline)
        t0 = time.monotonic()
        clock = lambda: time.monotonic() - t0               # noqa: E731
        sampler = sampler_factory(clock)
        sampler.start()
        outcomes = [Outcome(i, r.prompt_len, r.output_len, arrivals[i],
                            plans[i].moment if i in plans else None) for i, r in enumerate(requests)]

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, arrivals[i] - clock()))
            await run_request(channel, requests[i], outcomes[i], plans.get(i), clock, deadline)

        kill_at = arrivals[min(len(arrivals) - 1, int(len(arrivals) * s.kill_at))]
        kill = asyncio.ensure_future(kill_decode(server, kill_at, clock, s.recover_s))
        progress = asyncio.ensure_future(report_progress(outcomes, clock, s.progress_s))
        try:
            await asyncio.gather(*(one(i) for i in range(len(requests))))
            kill_info = await kill
        finally:
            progress.cancel()
            kill.cancel()
        log(progress_line(outcomes, clock()))
    return outcomes, kill_info, sampler, t0


def run(model: str, s: Settings, command: str) -> dict[str, Any]:
    ref = goodput_reference(s.goodput_file)
    rate = s.rate if s.rate is not None else RATE_FACTOR * ref["goodput_rps"]
    w = ref["workload"]
    workload = load_workload(WorkloadSpec(w["name"], s.num_requests, s.seed, LengthCaps(**w["caps"]),
                                          w["paper_filter"]))
    requests = list(workload.requests)
    arrivals = arrival_times(len(requests), rate, seed=s.seed)
    plans = cancel_plans(requests, s.cancel_fraction, s.cancel_within_s, s.seed)
    deployment = default_deployment(model)
    load_start = os.getloadavg()
    log(f"{len(requests)} {w['name']} requests at {rate:.3g} rps (~{arrivals[-1]:.0f} s), "
        f"{len(plans)} cancelled by the client, {KILL_INSTANCE} killed at request "
        f"{int(len(requests) * s.kill_at)}; load average {load_start[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        repo = render_repository(deployment, Path(tmp) / "model_repository", require_code=True)
        server_left: list[int] | str = []
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(start_server(repo, run_dir=Path(tmp) / "run"))
            prefix, server_pid = server.shm_prefix, server.process.pid
            outcomes, kill, sampler, t0 = asyncio.run(soak(
                server, requests, list(workload.requests[:s.warmup]), arrivals, plans, s,
                lambda clock: RssSampler(server_pid, s.sample_s, clock)))
            instance_ids = tuple(f"{phase}-{i}" for phase, spec in
                                 (("prefill", deployment.prefill), ("decode", deployment.decode))
                                 for i in range(spec.num_instances))
            end_state, idle_after = wait_idle(server, instance_ids, s.idle_timeout_s)
            sampler.stop()
            kv_log = server.control_dir / "kv-segments" if server.control_dir else None
            kv_pools = kv_log.read_text().split() if kv_log and kv_log.exists() else []
            try:
                stack.close()                               # stop the server
            except ServerError as e:
                server_left = str(e)
            log_errors = server.error_lines(limit=30)
            restarts = {"count": len(server.restarts), "took_s": list(server.restarts),
                        "cause": server.restart_cause()}
        stopped_s = time.monotonic() - t0
    load_end = os.getloadavg()
    left = {"segments_with_server_prefix": sorted(segments(prefix)),
            "kv_pools": sorted(n for n in kv_pools if Path("/dev/shm", n).exists()),
            "server_processes": server_left}
    return soak_report.build_report(
        command=command, settings=s, rate=rate, ref=ref, workload=workload.describe(),
        deployment=deployment.to_dict(), outcomes=outcomes, kill=kill, end_state=end_state,
        idle_after_s=idle_after, left=left, memory=sampler, restarts=restarts, loadavg=(load_start, load_end),
        server_log_errors=log_errors, stopped_s=stopped_s)


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL_PATH, help="the checkpoint the deployment serves")
    p.add_argument("--short", action="store_true",
                   help=f"a CI-sized run: {SHORT['num_requests']} requests, the kill at request {int(SHORT['num_requests'] * SHORT['kill_at'])}")
    p.add_argument("--requests", type=int, help="requests to send (default: 1000, --short: 40)")
    p.add_argument("--rate", type=float,
                   help=f"requests/s (default: {RATE_FACTOR:g} x the goodput file's DistServe goodput)")
    p.add_argument("--goodput-file", default=str(GOODPUT_FILE), help="the goodput measurement: rate, workload, caps")
    p.add_argument("--cancel-fraction", type=float, default=0.1, help="cancelled by the client (default 0.1)")
    p.add_argument("--cancel-within", type=float, default=0.5,
                   help="s: a cancel aimed before the first token comes uniformly within this of the send")
    p.add_argument("--kill-at", type=float, help="fraction of the requests sent before the kill (default 0.5)")
    p.add_argument("--deadline", type=float, default=300.0, help="per request, s: later counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period, s")
    p.add_argument("--out", type=Path, help="output prefix (default: docs/soak, --short: results/soak-short)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = replace(Settings(), **SHORT) if args.short else Settings()
    given = {"num_requests": args.requests, "rate": args.rate, "kill_at": args.kill_at}
    return replace(s, goodput_file=args.goodput_file, cancel_fraction=args.cancel_fraction,
                   cancel_within_s=args.cancel_within, deadline_s=args.deadline, seed=args.seed,
                   sample_s=args.sample_s,
                   **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    s = settings_from(args)
    out = args.out or (ROOT / ("results/soak-short" if args.short else "docs/soak"))
    shown = [os.path.relpath(a, ROOT) if a.startswith(str(ROOT) + os.sep) else a for a in argv]
    report = run(args.model, s, shlex.join(["python", "-m", "benchmarks.soak", *shown]))
    report_files.write_outputs(report, out, soak_report.markdown, soak_report.plot, indent=1)
    c = report["counts"]
    log(f"{c['sent']} sent: {c['completed']} completed, {c['failed']} failed {report['failed_by_class']}, "
        f"{c['cancelled']} cancelled by the client, {c['hung']} hung; KV held {report['end_state']['kv_blocks_used']}, "
        f"leases {report['end_state']['leases']}; {'OK' if report['ok'] else 'FAIL: ' + '; '.join(report['problems'])}"
        f" -> {out}.json/.md/.png")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
