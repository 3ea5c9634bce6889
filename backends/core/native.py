"""Our native CPU kernels (csrc/), compiled on the host that runs them.

    python -m backends.core.native [--build]

`./build.sh setup` builds them once (torch.utils.cpp_extension, -O3 -march=native: the
instructions of this host's CPU) into build/native-<torch>-<host>/, so that serving never
compiles. An instance loads the library if it is there (`available()`); otherwise attention
runs the torch ops (backends/core/attention/torch_backend.py), the same results more slowly,
and says so once in its log. The build directory is keyed by torch's version and this host's
CPU (model and flags), so a checkout carried to another machine never loads a library built
for different instructions.

Ops (registered as torch.ops.distserve.*):
- paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale): decode
  attention read straight from the paged cache (csrc/paged_decode.cpp).
- paged_prefix_attention(..., query_lens, scale): a few new tokens per sequence (verify rows,
  short chunks), each to its causal length, K/V read once per sequence (same file).
- silu_and_mul, add_rms_norm, rope: a layer's element-wise steps, fused (csrc/fused.cpp;
  backends/core/model.py calls them).
- quant_linear(x, codes, scales_offsets): int4 weights x few rows (csrc/quant_linear.cpp; used by
  backends/core/quant.Int4Linear). Built on CPUs with AVX-512 VNNI, or AVX2 with FMA and F16C
  (the same integer dot products on 256-bit vectors; `has("quant_linear")`).
- paged_chunk_attention(..., query_lens, scale): long chunks of new tokens (prefill, a prompt's
  tail after its cached prefix), bf16, AVX-512 BF16 dot products with an online softmax
  (csrc/chunk_attention.cpp). Where it is built and the AMX tiles are not used, the two ops
  above run bf16 on it too (few rows a sequence: chunk by chunk, K/V packed into L1);
  DISTSERVE_CHUNK_ATTENTION=0 keeps them on their own kernels. On CPUs with AVX2 and FMA but
  not AVX-512 BF16, csrc/chunk_attention_avx2.cpp is this op (float32 FMAs over K/V widened
  once per sequence and KV head; long rows only: the two ops above keep their own kernels).
- paged_attention_int8(q, k, v, k_scale, v_scale, ..., query_lens, scale): the same kernel over
  int8 KV (any rows: decode, verify, prefill), its values unpacked to bf16 integers and its
  scales applied to the scores and the probabilities (AVX2: K/V dequantized to float32 as they
  are widened). Built with paged_chunk_attention.
- decode_layers(x, weights, ...): a decode step's whole layer stack, calling the ops above from
  C++ (csrc/layer_stack.cpp; backends/core/layer_stack.py); it needs quant_linear at run time,
  and paged_attention_int8 for int8 KV.
DISTSERVE_NATIVE=0 turns them all off (the torch ops run), for comparisons.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import logging
import platform
import shutil
import sys
import time
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("paged_decode.cpp", "fused.cpp", "quant_linear.cpp", "layer_stack.cpp",
                             "chunk_attention.cpp", "chunk_attention_avx2.cpp"))
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("common.h", "amx.h", "paged.h"))
NAME = "distserve_native"
# -ffast-math lets exp vectorize (glibc's libmvec). It assumes no inf/NaN: the kernels' inputs
# are finite activations and K/V (a NaN in them would give a wrong finite value, not a NaN).
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffast-math")
OPS = ("paged_decode_attention", "paged_prefix_attention", "silu_and_mul", "add_rms_norm", "rope",
       "decode_layers")
OPTIONAL_OPS = ("quant_linear", "paged_chunk_attention", "paged_attention_int8")   # built only where the CPU has their
# instructions (AVX-512 VNNI or AVX2; AVX-512 BF16 or AVX2 for the other two)
STALE_LOCK_S = 600
log = logging.getLogger(__name__)


CPU_LINES = ("model name", "flags", "Features", "CPU implementer", "CPU part")   # x86, aarch64


def cpu_flags() -> set[str]:
    """This host's CPU feature flags (/proc/cpuinfo, x86 names: "amx_bf16"); none without it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {f for ln in lines if ln.startswith("flags") for f in ln.split(":", 1)[1].split()}


def cpu_has(*flags: str) -> bool:
    """This host's CPU lists every one of `flags`."""
    return set(flags) <= cpu_flags()


def _key() -> str:
    """A hash of this host's CPU (model, instruction-set flags), the sources and the flags."""
    text = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(CPU_LINES)}))
    except OSError:
        pass
    text += " ".join(CFLAGS) + "".join(src.read_text() for src in (*SOURCES, *HEADERS))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_dir() -> Path:
    """build/native-<torch>-<key>: a changed source, flag, CPU or torch builds anew, so a stale
    library is never loaded."""
    version = torch.__version__.replace("+", "_")
    return ROOT / "build" / f"native-{version}-{_key()}"


def library_path() -> Path:
    return build_dir() / f"{NAME}.so"


def build(verbose: bool = False) -> Path:
    """Compile (or bring up to date) and load the library; its path. Raises on a failed build."""
    from torch.utils import cpp_extension
    # the ninja that cpp_extension runs: the one installed beside this interpreter (pyproject)
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "lock"            # cpp_extension's baton, waited on forever if a build was killed
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    cpp_extension.load(NAME, [str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                       build_directory=str(out), is_python_module=False, verbose=verbose)
    for old in out.parent.glob("native-*"):          # earlier sources', flags' or torch's builds
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return library_path()


def enabled() -> bool:
    """Not turned off by DISTSERVE_NATIVE=0 (to compare against the torch ops)."""
    return os.environ.get("DISTSERVE_NATIVE", "1") != "0"


@cache
def available() -> bool:
    """Load the built library into this process (once); False, with the reason logged once,
    where it has not been built or does not load."""
    path = library_path()
    if not path.is_file():
        log.warning("native CPU kernels not built (%s missing: ./build.sh setup builds them); "
                    "attention runs on torch ops, slower", path)
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("native CPU kernels did not load (%s); attention runs on torch ops, slower", e)
        return False
    missing = [op for op in OPS if not hasattr(torch.ops.distserve, op)]
    if missing:
        log.warning("native CPU kernels at %s lack %s; the engine runs on torch ops, slower", path, missing)
        return False
    return True


def has(op: str) -> bool:
    """Whether the loaded library has `op` (an OPTIONAL_OPS one may be left out of a build),
    and the native kernels are on."""
    return enabled() and available() and hasattr(torch.ops.distserve, op)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.core.native",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="compile for this host (a no-op if built)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.build:
        try:
            print(f"native kernels: {build(args.verbose)}")
        except Exception as e:          # a missing compiler, headers...: serving still works
            print(f"native kernels: build failed ({e}); attention will run on torch ops",
                  file=sys.stderr)
            return 1
        return 0
    ok = available()
    print(f"native kernels: {'loaded from ' + str(library_path()) if ok else 'not available'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
