// Checks of a paged-KV attention op's inputs, shared by our attention kernels
// (paged_decode.cpp, chunk_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512BF16__)
#define DISTSERVE_CHUNK_ATTENTION 1     // chunk_attention.cpp is built (else its op is not registered)
#elif defined(__AVX2__) && defined(__FMA__)
#define DISTSERVE_CHUNK_ATTENTION_AVX2 1   // chunk_attention_avx2.cpp registers paged_chunk_attention
#endif

namespace distserve {

// The schemas of the chunk kernel's ops, defined by whichever of chunk_attention.cpp (AVX-512
// BF16) and chunk_attention_avx2.cpp (AVX2) this host builds.
constexpr const char* kChunkAttentionSchema =
    "paged_chunk_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor context_lens, Tensor query_lens, float scale) -> Tensor";
constexpr const char* kAttentionInt8Schema =
    "paged_attention_int8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
    "Tensor block_tables, Tensor context_lens, Tensor query_lens, float scale) -> Tensor";

// Blocks are scattered over the pool, so the hardware prefetcher cannot see the next one
// coming: ask for it while the current one is computed (Locality 3: into L1; 2: into L2).
template <int Locality = 3, typename T>
inline void prefetch_block(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, Locality);
}

#if defined(__AVX512F__)
// 16 x 16 floats (or any 32-bit lanes): r[i] (row i) -> r[i] = column i
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}
#endif

#ifdef DISTSERVE_CHUNK_ATTENTION
// The chunk kernel (chunk_attention.cpp) for q's rows; starts as query_starts gives them (each
// sequence's rows end at its context's end). False where it does not run: dtype other than
// bfloat16, head size other than 64 / 128.
bool chunk_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                     const std::vector<int64_t>& starts, double scale, at::Tensor& out);

// Attention for q's rows (bf16) over int8 K/V with their bf16 scales (kv_cache.quantize_kv:
// one per position and KV head), any number of new tokens a sequence, on the chunk kernel.
at::Tensor paged_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& k_scale, const at::Tensor& v_scale,
                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                const at::Tensor& query_lens, double scale);

// Whether decode and short (verify) rows take the chunk kernel too: unless
// DISTSERVE_CHUNK_ATTENTION=0 (A/B runs, and tests of the other kernels; read at every call).
inline bool chunk_attention_enabled() {
  const char* env = std::getenv("DISTSERVE_CHUNK_ATTENTION");
  return !(env != nullptr && env[0] == '0');
}
#endif

// Shapes, dtypes, layout, and that every context length fits its
// block table and every block id it reaches is inside the cache (nothing outside is ever read).
// With k_scale and v_scale: int8 K/V and their bfloat16 scales [blocks, KVH, block_size].
inline void check_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        const at::Tensor* k_scale = nullptr, const at::Tensor* v_scale = nullptr) {
  TORCH_CHECK(q.device().is_cpu(), "paged attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [B, H, hd] and K/V caches [blocks, KVH, block_size, hd]");
  if (k_scale != nullptr || v_scale != nullptr) {
    TORCH_CHECK(k_scale != nullptr && v_scale != nullptr, "int8 KV needs both K and V scales");
    TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar,
                "int8 KV: the K/V caches must be int8");
    const auto dense_scales = [&](const at::Tensor& s) {
      return s.scalar_type() == at::kBFloat16 && s.dim() == 3 && s.size(0) == k_cache.size(0) &&
             s.size(1) == k_cache.size(1) && s.size(2) == k_cache.size(2) && s.stride(2) == 1 &&
             s.stride(1) == s.size(2);
    };
    TORCH_CHECK(dense_scales(*k_scale) && dense_scales(*v_scale) && k_scale->stride(0) == v_scale->stride(0),
                "int8 KV: scales must be bfloat16 [blocks, KVH, block_size], dense within a block");
  } else {
    TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
                "q and the KV cache must have one dtype");
  }
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "paged attention supports float32 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(1) == 0,
              "head_dim differs, or the query heads are not a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kInt,
              "block_tables must be int64 and context_lens int32");
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.numel() == block_tables.size(0),
              "one block table row and one context length per sequence");
  // the KV pool interleaves layers, so a layer's blocks are strided; within a block, dense
  const auto dense_block = [](const at::Tensor& c) {
    return c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) == c.size(2) * c.size(3);
  };
  TORCH_CHECK(q.is_contiguous() && block_tables.is_contiguous() && context_lens.is_contiguous() &&
                  dense_block(k_cache) && dense_block(v_cache) && k_cache.stride(0) == v_cache.stride(0),
              "q, block_tables and context_lens must be contiguous, and each KV block dense");
  const int64_t bs = k_cache.size(2), num_blocks = k_cache.size(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < block_tables.size(0); ++b) {
    TORCH_CHECK(lens[b] > 0 && (lens[b] + bs - 1) / bs <= block_tables.size(1),
                "context length ", lens[b], " of sequence ", b, " does not fit its block table");
    for (int64_t n = 0; n < (lens[b] + bs - 1) / bs; ++n) {
      const int64_t blk = tables[b * block_tables.size(1) + n];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id ", blk, " out of [0, ", num_blocks, ")");
    }
  }
}

// Each sequence's first row in q (and the total after the last), from query_lens: its new
// tokens, 1 to max_query and within its context; they must add up to q's rows.
inline std::vector<int64_t> query_starts(const at::Tensor& q, const at::Tensor& block_tables,
                                         const at::Tensor& context_lens, const at::Tensor& query_lens,
                                         int64_t max_query) {
  TORCH_CHECK(query_lens.scalar_type() == at::kInt && query_lens.is_contiguous() &&
                  query_lens.numel() == block_tables.size(0),
              "query_lens must be int32, one per sequence");
  const int32_t* ql = query_lens.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  std::vector<int64_t> starts(query_lens.numel() + 1, 0);
  for (int64_t s = 0; s < query_lens.numel(); ++s) {
    TORCH_CHECK(ql[s] >= 1 && ql[s] <= max_query && ql[s] <= cl[s], "sequence ", s, ": ", ql[s],
                " new tokens over a context of ", cl[s], " (1 to ", max_query, ", within the context)");
    starts[s + 1] = starts[s] + ql[s];
  }
  TORCH_CHECK(starts.back() == q.size(0), "q has ", q.size(0), " rows, query_lens sum to ", starts.back());
  return starts;
}

// Row `row` of a (sequence, KV head) task in the chunk kernels (either file): token row / G, query
// head h * G + row % G, of a sequence whose nq new tokens start at q row `start` and end its `len`
// positions. `at`: the row's offset in q and out ([tokens, H, HD]); `lim`: the positions it sees
// (causal); `real`: false for a block's padding rows past `rows`, which read the last row and
// write nothing.
struct ChunkRow {
  int64_t at, lim;
  bool real;
};

inline ChunkRow chunk_row(int64_t row, int64_t rows, int64_t G, int64_t h, int64_t start, int64_t nq, int64_t len,
                          int64_t H, int64_t HD) {
  const int64_t i = std::min(row, rows - 1), j = i / G;
  return {(start + j) * H * HD + (h * G + i % G) * HD, len - nq + 1 + j, row < rows};
}

// paged_chunk_attention's inputs (either kernel: chunk_attention.cpp, chunk_attention_avx2.cpp):
// bf16, head size 64 or 128; each sequence's first row in q, as query_starts gives them.
inline std::vector<int64_t> check_chunk_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                                           const at::Tensor& query_lens) {
  check_paged(q, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_chunk_attention: bfloat16 only, got ", q.scalar_type());
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "paged_chunk_attention: head size 64 or 128, got ", q.size(2));
  return query_starts(q, block_tables, context_lens, query_lens, std::numeric_limits<int32_t>::max());
}

// paged_attention_int8's inputs (either kernel): bf16 queries, head size 64 or 128, int8 K/V and
// their scales; each sequence's first row in q.
inline std::vector<int64_t> check_int8_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                          const at::Tensor& k_scale, const at::Tensor& v_scale,
                                          const at::Tensor& block_tables, const at::Tensor& context_lens,
                                          const at::Tensor& query_lens) {
  check_paged(q, k_cache, v_cache, block_tables, context_lens, &k_scale, &v_scale);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_attention_int8: bfloat16 queries only, got ", q.scalar_type());
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "paged_attention_int8: head size 64 or 128, got ", q.size(2));
  return query_starts(q, block_tables, context_lens, query_lens, std::numeric_limits<int32_t>::max());
}

}  // namespace distserve
