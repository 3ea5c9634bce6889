// paged_chunk_attention on CPUs with AVX2 and FMA but without AVX-512 BF16 (chunk_attention.cpp
// is that op where they have it): attention for runs of many new tokens (a prompt's prefill, a
// prompt's tail after its cached prefix, a chunk of a chunked prefill), bf16 queries and K/V,
// straight from the paged KV cache, float32 arithmetic. torch's SDPA on such a host (an AMD EPYC
// Zen 2 core) runs bf16 at 29 GFLOP/s for a 512-token prompt and 48 at 2,048, and after a cached
// prefix it needs the context gathered and a mask tensor (its masked math path).
//
// Sequence s has query_lens[s] new tokens (rows of q, sequence after sequence) at the end of its
// context_lens[s] positions; token j attends to the first context_lens[s] - query_lens[s] + 1 + j
// (causal). Per (sequence, KV head) the context's K and V are widened to float32 once, K as
// [8 positions][HD][8] (a score vector: 8 positions of one query row), V as [position][HD].
// Blocks of R query rows (a row: one token's query head; the G heads sharing the KV head and
// consecutive tokens) then sweep it in chunks of 64 positions with FlashAttention's online
// softmax: scores (R x 4 accumulators, 32 positions at a time), the mask, the running max and
// sum, and P x V (R x 4 accumulators, 32 output dims at a time). bf16 products are exact in
// float32, so the scores differ from chunk_attention.cpp's only in the order of their sums, and P
// stays float32 here (that kernel splits it into two bf16 parts to the same effect).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "paged.h"

#ifdef DISTSERVE_CHUNK_ATTENTION_AVX2

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kChunk = 64;          // positions per online-softmax step
constexpr int kR = 3;                   // query rows a block: R x 4 accumulators + R broadcasts + 1
constexpr int64_t kGroup = 16;          // blocks of rows that sweep the context together
constexpr float kMasked = -1e30f;       // finite (-ffast-math): a masked score; e^(it - max) is 0

// e^x for x <= 0: 2^(x log2 e), the fraction's 2^f by its Taylor polynomial of degree 6 (relative
// error < 2e-7 on |f| <= 0.5), the integer part n >= -126 put into the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530393381609e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 x 8 floats: r[i] (row i) -> r[i] = column i
inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x20);
    t[4 + i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

inline __m256 widen8(const uint16_t* p) {           // 8 bf16 -> 8 floats (exact)
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}

inline __m256 widen8(const int8_t* p) {             // 8 int8 -> 8 floats (integers)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float bf16_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One (sequence, KV head)'s context widened to float32: K as [padded / 8][HD][8], V as
// [padded][HD]; positions past the context are zeros. E: the cache's element, uint16_t (bf16) or
// int8_t (int8 KV, kv_cache.quantize_kv: a bf16 scale per position and head, ks/vs). An int8 value
// times its bf16 scale has at most 16 significant bits, so the dequantized K/V are exact in
// float32; the scores then differ from chunk_attention.cpp's (scale applied to the sum) in
// rounding only. Vector code, 8 positions at a time (K through 8 x 8 transposes): a decode step
// packs its whole context for a few rows, and scalar packing cost several times the attention.
template <int HD>
struct Packed {
  float *k = nullptr, *v = nullptr;     // 64-byte aligned in kbuf, vbuf: a 32-byte load on a 16-byte
  std::vector<float> kbuf, vbuf;        // boundary splits a cache line every other time (malloc
                                        // gives 16; runs then varied 5.4-7.1 ms for the same layer)

  static float* aligned(std::vector<float>& buf, int64_t n) {
    buf.resize(n + 16);
    const auto at = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<float*>((at + 63) & ~static_cast<uintptr_t>(63));
  }

  template <typename E>
  void pack(const E* k_head, const E* v_head, const uint16_t* ks_head, const uint16_t* vs_head,
            const int64_t* table, int64_t len, int64_t bs, int64_t block_stride, int64_t scale_stride) {
    alignas(32) static constexpr E zeros[HD] = {};
    const int64_t padded = (len + kChunk - 1) / kChunk * kChunk;
    k = aligned(kbuf, padded * HD);
    v = aligned(vbuf, padded * HD);
    for (int64_t t0 = 0; t0 < padded; t0 += 8) {
      const E *kr[8], *vr[8];
      __m256 kscale[8], vscale[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t t = t0 + i;
        if (t < len) {
          const int64_t at = table[t / bs] * block_stride + (t % bs) * HD;
          kr[i] = k_head + at;
          vr[i] = v_head + at;
        } else {
          kr[i] = vr[i] = zeros;
        }
        if constexpr (std::is_same_v<E, int8_t>) {
          const int64_t sat = t < len ? table[t / bs] * scale_stride + t % bs : 0;
          kscale[i] = _mm256_set1_ps(t < len ? bf16_float(ks_head[sat]) : 0.f);
          vscale[i] = _mm256_set1_ps(t < len ? bf16_float(vs_head[sat]) : 0.f);
        }
      }
      float* kd = k + t0 * HD;                 // [HD][8] for these 8 positions
      for (int d0 = 0; d0 < HD; d0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          r[i] = widen8(kr[i] + d0);
          if constexpr (std::is_same_v<E, int8_t>) r[i] = _mm256_mul_ps(r[i], kscale[i]);
          __m256 w = widen8(vr[i] + d0);
          if constexpr (std::is_same_v<E, int8_t>) w = _mm256_mul_ps(w, vscale[i]);
          _mm256_storeu_ps(v + (t0 + i) * HD + d0, w);
        }
        transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(kd + (d0 + j) * 8, r[j]);
      }
    }
  }
};

// sc[r][0, 32) = rows q[0..R)'s scores (unscaled) against 32 positions of K packed at kc.
template <int HD>
__attribute__((always_inline)) inline void scores32(const float* kc, const float (*q)[HD], float* const* sc) {
  __m256 s[kR][4];
#pragma GCC unroll 4
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) s[r][u] = _mm256_setzero_ps();
  for (int d = 0; d < HD; ++d) {
    __m256 qb[kR];
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) qb[r] = _mm256_broadcast_ss(q[r] + d);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m256 kv = _mm256_loadu_ps(kc + (u * HD + d) * 8);
#pragma GCC unroll 4
      for (int r = 0; r < kR; ++r) s[r][u] = _mm256_fmadd_ps(qb[r], kv, s[r][u]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) _mm256_storeu_ps(sc[r] + 8 * u, s[r][u]);
}

// R query rows of one (sequence, KV head): their queries widened (q), each seeing lim[r]
// positions; out[r] gets the attention output (nullptr: a padding row).
template <int HD>
struct RowBlock {
  alignas(32) float q[kR][HD];
  alignas(32) float o[kR][HD];
  alignas(32) float p[kR][kChunk];
  float m[kR], l[kR];
  int64_t lim[kR];
  c10::BFloat16* out[kR];
  int64_t end, low;                     // the most and the fewest positions a row sees

  void start(const uint16_t* const* qrows) {
    for (int r = 0; r < kR; ++r) {
      for (int d = 0; d < HD; ++d) q[r][d] = bf16_float(qrows[r][d]);
      std::fill(o[r], o[r] + HD, 0.f);
      m[r] = kMasked;
      l[r] = 0.f;
    }
    end = *std::max_element(lim, lim + kR);
    low = *std::min_element(lim, lim + kR);
  }

  // positions [c0, c0 + kChunk), c0 < end, of the packed context
  void step(const Packed<HD>& pk, int64_t c0, float scale) {
    float* rows[kR];
    for (int r = 0; r < kR; ++r) rows[r] = p[r];
    scores32<HD>(pk.k + c0 * HD, q, rows);
    if (c0 + 32 < end) {
      for (int r = 0; r < kR; ++r) rows[r] = p[r] + 32;
      scores32<HD>(pk.k + (c0 + 32) * HD, q, rows);
    }
    const int64_t width = std::min<int64_t>(end - c0, kChunk);
    const int nvec = static_cast<int>((width + 7) / 8);
    const bool masked = c0 + kChunk > low;
    const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(kMasked);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int r = 0; r < kR; ++r) {
      __m256 keep[kChunk / 8];
      __m256 s[kChunk / 8], mx = ninf;
      for (int u = 0; u < nvec; ++u) {
        const int64_t seen = std::clamp<int64_t>(lim[r] - (c0 + 8 * u), 0, 8);
        keep[u] = masked ? _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(seen)), lane))
                         : _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        s[u] = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(p[r] + 8 * u), vscale), keep[u]);
        mx = _mm256_max_ps(mx, s[u]);
      }
      const float m_new = std::max(m[r], hmax(mx));
      const float corr = std::exp(m[r] - m_new);
      const __m256 vm = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int u = 0; u < nvec; ++u) {
        const __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(s[u], vm)), keep[u]);
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(p[r] + 8 * u, e);
      }
      l[r] = l[r] * corr + hsum(sum);
      m[r] = m_new;
      if (corr != 1.f)
        for (int i = 0; i < HD; i += 8)
          _mm256_store_ps(o[r] + i, _mm256_mul_ps(_mm256_load_ps(o[r] + i), _mm256_set1_ps(corr)));
    }
    // o[r] += P[r] V, 32 output dims at a time
    const float* vc = pk.v + c0 * HD;
    for (int c0d = 0; c0d < HD; c0d += 32) {
      __m256 acc[kR][4];
#pragma GCC unroll 4
      for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_load_ps(o[r] + c0d + 8 * c);
      for (int64_t t = 0; t < width; ++t) {
        __m256 pb[kR];
#pragma GCC unroll 4
        for (int r = 0; r < kR; ++r) pb[r] = _mm256_broadcast_ss(p[r] + t);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m256 vv = _mm256_loadu_ps(vc + t * HD + c0d + 8 * c);
#pragma GCC unroll 4
          for (int r = 0; r < kR; ++r) acc[r][c] = _mm256_fmadd_ps(pb[r], vv, acc[r][c]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) _mm256_store_ps(o[r] + c0d + 8 * c, acc[r][c]);
    }
  }

  void finish() {
    for (int r = 0; r < kR; ++r)
      if (out[r] != nullptr) distserve::store_normalized(out[r], o[r], l[r], HD);
  }
};

template <int HD, typename E>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor* k_scale,
         const at::Tensor* v_scale, const at::Tensor& block_tables, const at::Tensor& context_lens,
         const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
  const int64_t S = block_tables.size(0), kvh = k_cache.size(1), bs = k_cache.size(2), H = q.size(1);
  const int64_t G = H / kvh, max_blocks = block_tables.size(1), block_stride = k_cache.stride(0);
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  const auto* kp = static_cast<const E*>(k_cache.data_ptr());
  const auto* vp = static_cast<const E*>(v_cache.data_ptr());
  const uint16_t* ksp = k_scale ? static_cast<const uint16_t*>(k_scale->data_ptr()) : nullptr;
  const uint16_t* vsp = v_scale ? static_cast<const uint16_t*>(v_scale->data_ptr()) : nullptr;
  const int64_t scale_stride = k_scale ? k_scale->stride(0) : 0;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, S * kvh, 1, [&](int64_t begin, int64_t stop) {
    Packed<HD> pk;
    std::vector<RowBlock<HD>> blocks(kGroup);
    for (int64_t task = begin; task < stop; ++task) {
      const int64_t s = task / kvh, h = task % kvh, nq = starts[s + 1] - starts[s], len = lens[s];
      pk.pack(kp + h * bs * HD, vp + h * bs * HD, ksp ? ksp + h * bs : nullptr, vsp ? vsp + h * bs : nullptr,
              tables + s * max_blocks, len, bs, block_stride, scale_stride);
      const int64_t rows = nq * G;                    // row i: token i / G, query head h * G + i % G
      for (int64_t g0 = 0; g0 < rows; g0 += kR * kGroup) {
        const int64_t n = std::min<int64_t>(kGroup, (rows - g0 + kR - 1) / kR);
        int64_t end = 0;
        for (int64_t b = 0; b < n; ++b) {
          RowBlock<HD>& blk = blocks[b];
          const uint16_t* qrows[kR];
          for (int r = 0; r < kR; ++r) {
            const distserve::ChunkRow row =
                distserve::chunk_row(g0 + b * kR + r, rows, G, h, starts[s], nq, len, H, HD);
            qrows[r] = qp + row.at;
            blk.out[r] = row.real ? op + row.at : nullptr;
            blk.lim[r] = row.lim;
          }
          blk.start(qrows);
          end = std::max(end, blk.end);
        }
        // chunk-major: a chunk's K/V (32 KB at HD 64) serves every block of the group from L1/L2
        // before the next; block-major, a long context streamed from L3 once per block of rows
        for (int64_t c0 = 0; c0 < end; c0 += kChunk)
          for (int64_t b = 0; b < n; ++b)
            if (c0 < blocks[b].end) blocks[b].step(pk, c0, static_cast<float>(scale));
        for (int64_t b = 0; b < n; ++b) blocks[b].finish();
      }
    }
  });
}

at::Tensor paged_chunk_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens,
                                 const at::Tensor& query_lens, double scale) {
  const std::vector<int64_t> starts =
      distserve::check_chunk_op(q, k_cache, v_cache, block_tables, context_lens, query_lens);
  at::Tensor out = at::empty_like(q);
  if (q.size(2) == 64) run<64, uint16_t>(q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, starts, scale, out);
  else run<128, uint16_t>(q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, starts, scale, out);
  return out;
}

// int8 KV (any rows a sequence: decode, verify, prefill), as chunk_attention.cpp's op of that name
at::Tensor paged_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& k_scale, const at::Tensor& v_scale,
                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                const at::Tensor& query_lens, double scale) {
  const std::vector<int64_t> starts = distserve::check_int8_op(q, k_cache, v_cache, k_scale, v_scale, block_tables,
                                                               context_lens, query_lens);
  at::Tensor out = at::empty_like(q);
  if (q.size(2) == 64) run<64, int8_t>(q, k_cache, v_cache, &k_scale, &v_scale, block_tables, context_lens, starts, scale, out);
  else run<128, int8_t>(q, k_cache, v_cache, &k_scale, &v_scale, block_tables, context_lens, starts, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def(distserve::kChunkAttentionSchema);
  m.def(distserve::kAttentionInt8Schema);
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("paged_chunk_attention", &paged_chunk_attention);
  m.impl("paged_attention_int8", &paged_attention_int8);
}

#endif  // DISTSERVE_CHUNK_ATTENTION_AVX2
