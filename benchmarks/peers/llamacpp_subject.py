"""llama.cpp (llama-cpp-python's bindings, built with GGML_NATIVE=ON) as a benchmark subject.

Runs inside the llama.cpp peer venv (see benchmarks.peers). Loads the same GGUF file through
the C API (llama_cpp.llama_cpp), one thread for generation and for batches, otherwise llama.cpp's
own context defaults (n_batch 2048, n_ubatch 512, flash attention auto, f16 KV). One context with
`max_batch` sequences, each its own KV stream (kv_unified off, llama.cpp's advice for sequences
that share no prefix); the context is sized so every stream holds the longest prefill.

Prefill: clear the KV, llama_decode the prompt in n_batch chunks (logits for its last token),
argmax. Decode: prefill the batch's prompts (untimed; all sequences in n_batch chunks), then per
step one llama_decode of one token per sequence and an argmax per row. Timed: llama_decode and
reading the logits; filling the ctypes batch is not (a C++ server pays nothing for it).

Extra buffer types (use_extra_bufts) are off by default: with them on, a GGML_NATIVE build on an
AMX CPU repacks the Q4_1 weights for AMX and the first llama_decode segfaults in
ggml_backend_amx_mul_mat (llama-cpp-python 0.3.36, seen here on 1 thread). Off, the weights stay
Q4_1 in plain CPU buffers (AVX-512/VNNI kernels; llama.cpp's CPU repack has no Q4_1 layout).
"""
from __future__ import annotations

import time

import numpy as np


class LlamaCpp:
    def __init__(self, spec: dict) -> None:
        import llama_cpp

        self.ll = ll = llama_cpp.llama_cpp
        self.version = llama_cpp.__version__
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.use_extra_bufts = self.extra_bufts = spec.get("llamacpp_extra_bufts", False)
        self.model = ll.llama_model_load_from_file(spec["model"].encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['model']}")
        self.vocab_size = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.num_seqs = spec["max_batch"]
        per_seq = -(-max(spec["max_prefill_len"], spec["max_seq_len"]) // 256) * 256
        p = ll.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.kv_unified = per_seq * self.num_seqs, self.num_seqs, False
        p.n_threads = p.n_threads_batch = 1
        self.ctx = ll.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = p.n_batch
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.params = {"n_ctx": p.n_ctx, "n_batch": p.n_batch, "n_ubatch": p.n_ubatch, "n_seq_max": p.n_seq_max,
                       "kv_unified": False, "flash_attn_type": p.flash_attn_type, "n_threads": 1}

    def info(self) -> dict:
        ll = self.ll
        desc = ctypes_string(lambda buf, n: ll.llama_model_desc(self.model, buf, n))
        return {"llama_cpp_python": self.version, "model_desc": desc, "context": self.params,
                "use_extra_bufts": self.extra_bufts,
                "weight_bytes": int(ll.llama_model_size(self.model)),
                "system_info": ll.llama_print_system_info().decode(errors="replace")}

    def _clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, pos, seq_id, wants_logits), at most n_batch of them."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)

    def _decode(self) -> None:
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, num_rows: int) -> np.ndarray:
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(num_rows, self.vocab_size))
        return logits.argmax(axis=1)

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> tuple[float, np.ndarray]:
        """llama_decode `entries` in n_batch chunks; (seconds spent in llama.cpp, argmax of the last chunk)."""
        seconds, tokens = 0.0, np.empty(0, dtype=np.int64)
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            self._fill(chunk)
            t0 = time.perf_counter()
            self._decode()
            tokens = self._argmax(sum(e[3] for e in chunk)) if any(e[3] for e in chunk) else tokens
            seconds += time.perf_counter() - t0
        return seconds, tokens

    def prefill(self, ids: list[int]) -> float:
        self._clear()
        n = len(ids)
        seconds, _ = self._run([(tok, pos, 0, pos == n - 1) for pos, tok in enumerate(ids)])
        return seconds

    def decode(self, prompts: list[list[int]], steps: int) -> list[float]:
        if len(prompts) > self.num_seqs:
            raise ValueError(f"batch {len(prompts)} > the context's {self.num_seqs} sequences")
        self._clear()
        entries = [(tok, pos, seq, pos == len(ids) - 1) for seq, ids in enumerate(prompts) for pos, tok in enumerate(ids)]
        last_rows = []                                  # the prompts' next tokens, in sequence order
        for start in range(0, len(entries), self.n_batch):
            _, toks = self._run(entries[start:start + self.n_batch])
            last_rows += toks.tolist()
        next_ids, positions = last_rows, [len(ids) for ids in prompts]
        times = []
        for _ in range(steps):
            seconds, toks = self._run([(tok, pos, seq, True) for seq, (tok, pos) in enumerate(zip(next_ids, positions))])
            times.append(seconds)
            next_ids, positions = toks.tolist(), [p + 1 for p in positions]
        return times


def ctypes_string(fill) -> str:
    import ctypes

    buf = ctypes.create_string_buffer(256)
    fill(buf, len(buf))
    return buf.value.decode(errors="replace")
