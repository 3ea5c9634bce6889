"""Install the benchmark's peers into their own venvs (see benchmarks.peers).

    python -m benchmarks.peers.install [vllm] [llamacpp] [--peers-dir DIR] [--force]

Each peer: a fresh venv from the base interpreter of the running Python, then its pip steps,
each logged in full to `<dir>/<name>/install.log` while progress lines go to the console; then an
import check; then `installed.json` (commands, durations, pip freeze). A peer already installed
is left alone unless --force.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers import PEERS, Peer, peers_dir

_NINJA = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def log(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


class Progress:
    """Which of pip's output lines are worth a console line: outcomes, errors, a count of the
    packages resolved so far, and every tenth of a source build's compile steps."""

    _QUIET = ("WARNING: Location", "Looking in", "Requirement already", "Downloading", "Using cached",
              "Obtaining", "Preparing", "Getting requirements", "Installing build", "Created wheel",
              "Stored in", "Found existing", "Uninstalling", "Attempting")

    def __init__(self) -> None:
        self.num_collected = 0
        self.last_tenth = -1

    def line(self, line: str) -> str | None:
        m = _NINJA.match(line)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            if done * 10 // total != self.last_tenth or done == total:
                self.last_tenth = done * 10 // total
                return f"compiling {done}/{total}"
            return None
        if line.startswith(("Collecting ", "Processing ")):
            self.num_collected += 1
            return f"resolving: {self.num_collected} packages so far" if self.num_collected % 25 == 0 else None
        if line[:1] in (" ", "\t", "\n", "") or line.startswith(self._QUIET):
            return None
        return line.rstrip()[:200]


def _run_logged(cmd: list[str], env: dict[str, str], log_file, label: str) -> None:
    """Run cmd, copying its output to log_file and a few progress lines to the console."""
    log_file.write(f"$ {' '.join(cmd)}\n")
    log_file.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env}, bufsize=1)
    progress = Progress()
    for line in proc.stdout:
        log_file.write(line)
        shown = progress.line(line)
        if shown:
            log(f"{label}: {shown}")
    if proc.wait() != 0:
        raise RuntimeError(f"{label}: `{' '.join(cmd)}` failed with exit code {proc.returncode} "
                           f"(full output in {log_file.name})")


def install(peer: Peer, root_dir: Path, force: bool = False) -> dict:
    """Install `peer` under root_dir; return what installed.json records."""
    if peer.is_installed(root_dir) and not force:
        log(f"{peer.name}: already installed in {peer.root(root_dir)}")
        return json.loads((peer.root(root_dir) / "installed.json").read_text())
    root = peer.root(root_dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    python = str(peer.python(root_dir))
    record = {"peer": peer.name, "base_python": _base_python(), "steps": [],
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(root / "install.log", "w") as log_file:
        log(f"{peer.name}: creating venv {root / 'venv'} (log: {log_file.name})")
        subprocess.run([_base_python(), "-m", "venv", str(root / "venv")], check=True)
        for i, step in enumerate(peer.steps, 1):
            cmd = [python, "-m", "pip", *step.args]
            shown = " ".join(f"{k}={v}" for k, v in step.env.items()) + " pip " + " ".join(step.args)
            log(f"{peer.name}: step {i}/{len(peer.steps)}: {shown.strip()}")
            t0 = time.monotonic()
            _run_logged(cmd, step.env, log_file, peer.name)
            record["steps"].append({"command": shown.strip(), "seconds": round(time.monotonic() - t0, 1)})
        check = subprocess.run([python, "-c", peer.check], capture_output=True, text=True, cwd=root)
        if check.returncode != 0:
            raise RuntimeError(f"{peer.name}: installed, but the import check failed:\n{check.stderr[-2000:]}")
        record["check"] = check.stdout.strip()
        freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
        record["pip_freeze"] = freeze.stdout.split()
    record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (root / "installed.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"{peer.name}: installed ({record['check']})")
    return record


def install_all(names: list[str], root_dir: Path, force: bool = False) -> dict[str, dict | str]:
    """Install each named peer; a failure is reported and returned as its error, not raised."""
    results: dict[str, dict | str] = {}
    for name in names:
        try:
            results[name] = install(PEERS[name], root_dir, force)
        except Exception as e:          # one peer failing must not stop the others
            log(f"{name}: FAILED: {e}")
            results[name] = f"{type(e).__name__}: {e}"
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("peers", nargs="*", help=f"which peers (default: all of {', '.join(PEERS)})")
    p.add_argument("--peers-dir", default=None, help="default: $DISTSERVE_PEERS_DIR or /work/peers")
    p.add_argument("--force", action="store_true", help="reinstall peers already installed")
    args = p.parse_args(argv)
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    results = install_all(args.peers or list(PEERS), peers_dir(args.peers_dir), args.force)
    sys.exit(1 if any(isinstance(r, str) for r in results.values()) else 0)


if __name__ == "__main__":
    main()
