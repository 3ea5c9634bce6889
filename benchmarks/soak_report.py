"""The soak's report (benchmarks/soak.py runs it): counts, the kill's recovery, what was left
held, memory per process; as a JSON document, a markdown page and a plot."""
from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import soak
from deploy.server import IPC_MUTEX_ABORT

if TYPE_CHECKING:
    from benchmarks.soak import Outcome, RssSampler, Settings

def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def timeline(outcomes: list[Outcome], end: float, step: float) -> dict[str, list[float]]:
    """Requests in flight (sent, not ended; a hung one stays in flight), and cumulative failed
    and client-cancelled requests, every `step` seconds."""
    ts = np.arange(0.0, end + step, step)
    sent = np.array([o.send_s if o.send_s is not None else np.inf for o in outcomes])
    ended = np.array([o.end_s if o.end_s is not None else np.inf for o in outcomes])
    failed = np.sort([o.end_s for o in outcomes if o.status == "failed"])
    cancelled = np.sort([o.end_s for o in outcomes if o.status == "cancelled"])
    return {"t_s": [round(float(t), 2) for t in ts],
            "in_flight": [int(((sent <= t) & (ended > t)).sum()) for t in ts],
            "failed": np.searchsorted(failed, ts, side="right").tolist(),
            "cancelled": np.searchsorted(cancelled, ts, side="right").tolist()}


def kill_summary(outcomes: list[Outcome], kill: dict[str, Any]) -> dict[str, Any]:
    """What the kill did: the requests in flight then, how fast they ended; recovery times."""
    at = kill["at_s"]
    in_flight = [o for o in outcomes if o.send_s is not None and o.send_s <= at
                 and (o.end_s is None or o.end_s > at)]
    after = [o for o in outcomes if o.send_s is not None and o.send_s > at]
    # a one-token request never reaches decode: it says nothing about recovery
    first_ok = min((o for o in after if o.status == "completed" and o.output_len > 1),
                   key=lambda o: o.end_s, default=None)
    return {**kill,
            "in_flight": len(in_flight),
            "in_flight_by_status": {s: sum(o.status == s for o in in_flight) for s in soak.STATUSES},
            "in_flight_failed_within_s": max((o.end_s - at for o in in_flight if o.status == "failed"),
                                             default=None),
            "first_sent_after_kill_completed": None if first_ok is None else {
                "index": first_ok.index, "sent_after_kill_s": first_ok.send_s - at,
                "completed_after_kill_s": first_ok.end_s - at},
            "failed_sent_after_kill": sum(o.status == "failed" for o in after)}


def unexplained_deaths(processes: list[dict[str, Any]], kill: dict[str, Any],
                       restarts: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The server processes that died during the run, other than the killed stub, and whether
    the kill made Triton's python backend abort tritonserver (restarted since: docs/faults.md).
    After that abort the old server's processes went with it, up to the moment it answered
    again; they are not counted, and a death after that moment still is."""
    deaths = [p for p in processes if not p["alive_at_end"] and p["pid"] != kill["pid"]]
    triton_abort = bool(restarts["count"]) and restarts["cause"] == IPC_MUTEX_ABORT
    if triton_abort and kill["server_answering_after_s"] is not None:
        recovered_by = kill["at_s"] + kill["server_answering_after_s"]
        deaths = [p for p in deaths if p["gone_s"] > recovered_by]
    return deaths, triton_abort


def build_report(*, command: str, settings: Settings, rate: float, ref: dict[str, Any],
                 workload: dict[str, Any], deployment: dict[str, Any], outcomes: list[Outcome],
                 kill: dict[str, Any], end_state: dict[str, dict], idle_after_s: float,
                 left: dict[str, Any], memory: RssSampler, restarts: dict[str, Any], loadavg: tuple,
                 server_log_errors: list[str], stopped_s: float) -> dict[str, Any]:
    counts = {s: sum(o.status == s for o in outcomes) for s in soak.STATUSES}
    counts["sent"] = sum(o.send_s is not None for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    messages: dict[str, int] = {}
    for o in failed:
        key = (o.error or "")[:160]
        messages[key] = messages.get(key, 0) + 1
    cancelled = [o for o in outcomes if o.status == "cancelled"]
    planned = [o for o in outcomes if o.cancel_plan]
    completed = [o for o in outcomes if o.status == "completed"]
    kv_held = sum(st.get("kv_blocks_used", 0) for st in end_state.values())
    leases = sum(st.get("leases", 0) for st in end_state.values())
    ends = [o.end_s for o in outcomes if o.end_s is not None]
    k = kill_summary(outcomes, kill)
    commit, changes = git_commit()
    processes = memory.summary()
    deaths, triton_abort = unexplained_deaths(processes, k, restarts)
    problems = [p for p, bad in (
        ("a server process died during the run: " + ", ".join(
            f"{p['process']} (pid {p['pid']}) gone at t = {p['gone_s']:.0f} s, {p['exit'] or 'exit unknown'}"
            for p in deaths), deaths),
        (f"{counts['hung']} request(s) hung", counts["hung"]),
        ("requests unaccounted for", sum(counts[s] for s in soak.STATUSES) != len(outcomes)
         or counts["sent"] != len(outcomes)),
        (f"{kv_held} KV block(s) held at the end", kv_held),
        (f"{leases} prefill lease(s) held at the end", leases),
        ("an instance did not answer at the end", any("error" in st for st in end_state.values())),
        ("shared-memory segments left after stop", left["segments_with_server_prefix"] or left["kv_pools"]),
        ("server processes left after stop", left["server_processes"]),
        ("the server did not answer again after the kill", k["server_answering_after_s"] is None),
        (f"tritonserver was restarted ({restarts['cause'] or 'no crash in its log'})",
         restarts["count"] and not triton_abort),
    ) if bad]
    return {
        "kind": "soak",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_changes": changes,
        "command": command,
        "machine": {"cpu_model": cpu_model(), "num_cores": os.cpu_count(),
                    "loadavg_start": list(loadavg[0]), "loadavg_end": list(loadavg[1])},
        "settings": dataclasses.asdict(settings) | {"goodput_file": ref["file"]},
        "rate": {"rps": rate, "goodput_rps": ref["goodput_rps"],
                 "source": (f"{soak.RATE_FACTOR:g} x the DistServe goodput in {ref['file']}" if settings.rate is None
                            else "--rate"), "goodput_slo": ref["slo"]},
        "workload": workload,
        "deployment": deployment,
        "ok": not problems,
        "problems": problems,
        "counts": counts,
        "failed_by_class": {c: sum(o.error_class == c for o in failed) for c in soak.ERROR_CLASSES},
        "error_messages": dict(sorted(messages.items(), key=lambda kv: -kv[1])),
        "client_cancels": {
            "planned": len(planned),
            "planned_before_first_token": sum(o.cancel_plan == "before_first_token" for o in planned),
            "planned_mid_stream": sum(o.cancel_plan == "mid_stream" for o in planned),
            "cancelled_before_first_token": sum(o.cancelled_at_tokens == 0 for o in cancelled),
            "cancelled_mid_stream": sum((o.cancelled_at_tokens or 0) > 0 for o in cancelled),
            "planned_but_ended_first": {s: sum(o.status == s for o in planned) for s in ("completed", "failed")}},
        "kill": k,
        "server_restarts": restarts | {"triton_ipc_mutex_abort": triton_abort},
        "end_state": {"idle_after_s": idle_after_s, "kv_blocks_used": kv_held, "leases": leases,
                      "instances": end_state},
        "left_after_stop": left,
        "memory": processes,
        "latency_completed": {"ttft_s": percentiles([o.first_token_s - o.send_s for o in completed]),
                              "e2e_s": percentiles([o.end_s - o.send_s for o in completed]),
                              "send_lag_s": percentiles([o.send_s - o.arrival_s for o in outcomes
                                                         if o.send_s is not None])},
        "duration_s": {"arrivals": outcomes[-1].arrival_s, "last_end": max(ends, default=None),
                       "server_stopped": stopped_s},
        "server_log_errors": server_log_errors,
        "not_completed": [dataclasses.asdict(o) for o in outcomes if o.status != "completed"],
        "timeline": timeline(outcomes, max(ends + [o.send_s + settings.deadline_s for o in outcomes
                                                   if o.status == "hung"], default=0.0), 1.0),
        "memory_samples": {str(pid): p for pid, p in memory.processes.items()},
    }


def git_commit() -> tuple[str | None, list[str]]:
    """The commit the server ran ("+dirty" with local changes) and the tracked files that differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=soak.ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, []
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=soak.ROOT,
                           capture_output=True, text=True).stdout.splitlines()
    return head + ("+dirty" if dirty else ""), [line.strip() for line in dirty]


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def _s(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def restart_sentence(restarts: dict[str, Any] | None) -> str:
    if not restarts or not restarts["count"]:
        return ""
    took = ", ".join(f"{t:.1f} s" for t in restarts["took_s"])
    if restarts["triton_ipc_mutex_abort"]:
        return (f"The kill made tritonserver itself abort (`{IPC_MUTEX_ABORT}` in Triton's python "
                f"backend: the stub died holding its IPC mutex, docs/faults.md); the supervisor "
                f"restarted it ({took}). ")
    return f"tritonserver was restarted {restarts['count']} time(s) ({took}): {str(restarts['cause']).rstrip('.')}. "


def markdown(r: dict[str, Any]) -> str:
    c, k, e, m = r["counts"], r["kill"], r["end_state"], r["machine"]
    w = r["workload"]
    cc = r["client_cancels"]
    first = k["first_sent_after_kill_completed"]
    out = (f"# Soak: {c['sent']} ShareGPT requests, client cancellations, one decode kill\n\n"
           f"{'**PASS**' if r['ok'] else '**FAIL**: ' + '; '.join(r['problems'])}. "
           + restart_sentence(r.get("server_restarts"))
           + f"Command: `{r['command']}`; commit {r['git_commit']}"
           + (f" (local changes: {', '.join(r['git_changes'][:10])})" if r.get("git_changes") else "")
           + f", {r['created']}. "
           f"{m['cpu_model']}, {m['num_cores']} cores, load average {m['loadavg_start'][0]:.2f} at the start, "
           f"{m['loadavg_end'][0]:.2f} at the end (a shared machine: latencies depend on it, the counts of "
           "hung requests and leaks below do not).\n\n"
           f"Default disaggregated deployment (prefill core 0, decode core 1, {r['deployment']['dtype']}). "
           f"Workload: {w['name']} (ShareGPT), caps {w['caps']}, seed {w['seed']}; prompts "
           f"{w['lengths']['prompt']['mean']:.0f} tokens on average, outputs {w['lengths']['output']['mean']:.0f}. "
           f"Poisson arrivals at {r['rate']['rps']:.3g} rps ({r['rate']['source']}: "
           f"{r['rate']['goodput_rps']:g} rps at TTFT {r['rate']['goodput_slo']['ttft_s']:g} s / TPOT "
           f"{r['rate']['goodput_slo']['tpot_s']:g} s), {r['duration_s']['arrivals']:.0f} s of arrivals. "
           f"A request not ended {r['settings']['deadline_s']:g} s after its send counts as hung.\n\n"
           "## Requests\n\n" + _row("sent", "completed", "failed", "cancelled by the client", "hung")
           + "|---" * 5 + "|\n" + _row(c["sent"], c["completed"], c["failed"], c["cancelled"], f"**{c['hung']}**")
           + "\nFailed, by class: " + ", ".join(f"{n} {cls}" for cls, n in r["failed_by_class"].items())
           + ". Messages: " + ("; ".join(f"{n} x \"{msg}\"" for msg, n in r["error_messages"].items()) or "none")
           + f".\n\nClient cancellations: {cc['planned']} planned ({cc['planned_before_first_token']} within "
           f"{r['settings']['cancel_within_s']:g} s of the send, {cc['planned_mid_stream']} after a random number of "
           f"tokens); {cc['cancelled_before_first_token']} cancelled before their first token, "
           f"{cc['cancelled_mid_stream']} mid-stream; ended before the client cancelled: "
           f"{cc['planned_but_ended_first']}.\n\n"
           f"Completed requests: TTFT p50 {_s(_get(r, 'latency_completed', 'ttft_s', 'p50'), '.2f')} s, "
           f"p99 {_s(_get(r, 'latency_completed', 'ttft_s', 'p99'), '.2f')} s; E2E p50 "
           f"{_s(_get(r, 'latency_completed', 'e2e_s', 'p50'), '.2f')} s, max "
           f"{_s(_get(r, 'latency_completed', 'e2e_s', 'max'), '.2f')} s; client send lag max "
           f"{_s(_get(r, 'latency_completed', 'send_lag_s', 'max'), '.3f')} s.\n\n"
           f"## The kill\n\nSIGKILL of {k['instance']}'s stub (pid {k['pid']}) at t = {k['at_s']:.1f} s, "
           f"{k['in_flight']} requests in flight: {k['in_flight_by_status']}; the failed ones ended within "
           f"{_s(k['in_flight_failed_within_s'])} s of the kill. "
           f"{k['failed_sent_after_kill']} requests sent after the kill failed.\n\n"
           + _row("recovery", "seconds after the kill") + "|---|---|\n"
           + _row("the server answers again (a small HTTP request a second)", _s(k["server_answering_after_s"]))
           + _row("the first request sent after the kill (and needing decode: 2+ tokens) completes"
                  + ("" if first is None
                     else f" (request {first['index']}, sent at +{first['sent_after_kill_s']:.1f} s)"),
                  _s(None if first is None else first["completed_after_kill_s"]))
           + "\n## Left at the end\n\n"
           + _row("what", "found") + "|---|---|\n"
           + _row(f"KV blocks in use, once idle (after {e['idle_after_s']:.1f} s)",
                  ", ".join(f"{i}: {st.get('kv_blocks_used', st.get('error'))}" for i, st in e["instances"].items()))
           + _row("prefill leases held", ", ".join(f"{i}: {st.get('leases', st.get('error'))}"
                                                  for i, st in e["instances"].items()))
           + _row("shm segments with the server's prefix, after stop",
                  len(r["left_after_stop"]["segments_with_server_prefix"]))
           + _row("KV pools the instances created, after stop", len(r["left_after_stop"]["kv_pools"]))
           + _row("server processes after stop", r["left_after_stop"]["server_processes"] or 0)
           + "\n## Memory (VmRSS, MiB)\n\nSampled every "
           f"{r['settings']['sample_s']:g} s from the start of the replay to the idle end; a stub killed and "
           "restarted is a new process. VmRSS counts the pages of an instance's shared-memory KV pool as "
           "they are first touched; RssAnon is private memory only.\n\n"
           + _row("process", "pid", "seen (s)", "start", "end", "max", "growth", "growth, 2nd half",
                  "private (RssAnon) growth", "its 2nd half")
           + "|---" * 10 + "|\n"
           + "".join(_row(p["process"], p["pid"], f"{p['first_s']:.0f}-{p['last_s']:.0f}"
                          + ("" if p["alive_at_end"] else f" (gone: {p.get('exit') or '?'})"), f"{p['start_mb']:.0f}",
                          f"{p['end_mb']:.0f}", f"{p['max_mb']:.0f}", f"{p['growth_mb']:+.0f}",
                          _s(p.get("growth_second_half_mb"), "+.0f"), _s(p.get("anon_growth_mb"), "+.0f"),
                          _s(p.get("anon_growth_second_half_mb"), "+.0f")) for p in r["memory"])
           + "\nThe plot (`soak.png`): requests in flight and cumulative failed / client-cancelled requests "
           "over time, the kill as a vertical line; below, RSS per process.\n")
    if r["server_log_errors"]:
        out += (f"\nTriton's error lines ({len(r['server_log_errors'])}, first 30; full text in the JSON): "
                + "; ".join(f"`{ln[:140]}`" for ln in r["server_log_errors"][:5]) + "\n")
    return out


def _get(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or d.get(key) is None:
            return None
        d = d[key]
    return d


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tl = r["timeline"]
    fig, (ax, mem) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 2))
    ax.plot(tl["t_s"], tl["in_flight"], lw=1, label="in flight")
    ax.plot(tl["t_s"], tl["failed"], lw=1.5, label="failed (cumulative)")
    ax.plot(tl["t_s"], tl["cancelled"], lw=1, ls="--", label="cancelled by the client (cumulative)")
    for a in (ax, mem):
        a.axvline(r["kill"]["at_s"], color="red", lw=1)
    ax.text(r["kill"]["at_s"], 0.02, f" SIGKILL {r['kill']['instance']}", color="red", fontsize=8,
            transform=ax.get_xaxis_transform())
    ax.set_ylabel("requests")
    ax.legend(fontsize=8, loc="best")
    c = r["counts"]
    ax.set_title(f"Soak: {c['sent']} requests at {r['rate']['rps']:.3g} rps: {c['completed']} completed, "
                 f"{c['failed']} failed, {c['cancelled']} cancelled, {c['hung']} hung", fontsize=9)
    for p in r["memory_samples"].values():
        t, kb = [s[0] for s in p["samples"]], [s[1] for s in p["samples"]]
        mem.plot(t, [x / 1024 for x in kb], lw=1, label=f"{p['process']} ({p['pid']})")
    mem.set_ylabel("RSS (MiB)")
    mem.set_xlabel("time since the first arrival (s)")
    mem.set_ylim(bottom=0)
    mem.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
