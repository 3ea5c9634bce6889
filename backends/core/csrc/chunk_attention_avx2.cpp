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

// One (sequence, KV head)'s context widened to float32: K as [padded / 8][HD][8], V as
// [padded][HD]; positions past the context are zeros.
template <int HD>
struct Packed {
  std::vector<float> k, v;

  void pack(const uint16_t* k_head, const uint16_t* v_head, const int64_t* table, int64_t len, int64_t bs,
            int64_t block_stride) {
    const int64_t padded = (len + kChunk - 1) / kChunk * kChunk;
    k.assign(padded * HD, 0.f);
    v.assign(padded * HD, 0.f);
    for (int64_t t = 0; t < len; ++t) {
      const int64_t at = table[t / bs] * block_stride + (t % bs) * HD;
      const uint16_t *kr = k_head + at, *vr = v_head + at;
      float* kd = k.data() + (t / 8) * HD * 8 + t % 8;
      float* vd = v.data() + t * HD;
      for (int d = 0; d < HD; ++d) {
        kd[d * 8] = widen(kr[d]);
        vd[d] = widen(vr[d]);
      }
    }
  }

  static float widen(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
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
      for (int d = 0; d < HD; ++d) q[r][d] = Packed<HD>::widen(qrows[r][d]);
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
    scores32<HD>(pk.k.data() + c0 * HD, q, rows);
    if (c0 + 32 < end) {
      for (int r = 0; r < kR; ++r) rows[r] = p[r] + 32;
      scores32<HD>(pk.k.data() + (c0 + 32) * HD, q, rows);
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
    const float* vc = pk.v.data() + c0 * HD;
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
    for (int r = 0; r < kR; ++r) {
      if (out[r] == nullptr) continue;
      const float inv = 1.f / l[r];
      for (int i = 0; i < HD; ++i) distserve::store(out[r] + i, o[r][i] * inv);
    }
  }
};

template <int HD>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
         const at::Tensor& context_lens, const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
  const int64_t S = block_tables.size(0), kvh = k_cache.size(1), bs = k_cache.size(2), H = q.size(1);
  const int64_t G = H / kvh, max_blocks = block_tables.size(1), block_stride = k_cache.stride(0);
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<c10::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<c10::BFloat16>());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, S * kvh, 1, [&](int64_t begin, int64_t stop) {
    Packed<HD> pk;
    std::vector<RowBlock<HD>> blocks(kGroup);
    for (int64_t task = begin; task < stop; ++task) {
      const int64_t s = task / kvh, h = task % kvh, nq = starts[s + 1] - starts[s], len = lens[s];
      pk.pack(kp + h * bs * HD, vp + h * bs * HD, tables + s * max_blocks, len, bs, block_stride);
      const int64_t rows = nq * G;                    // row i: token i / G, query head h * G + i % G
      for (int64_t g0 = 0; g0 < rows; g0 += kR * kGroup) {
        const int64_t n = std::min<int64_t>(kGroup, (rows - g0 + kR - 1) / kR);
        int64_t end = 0;
        for (int64_t b = 0; b < n; ++b) {
          RowBlock<HD>& blk = blocks[b];
          const uint16_t* qrows[kR];
          for (int r = 0; r < kR; ++r) {
            const int64_t row = g0 + b * kR + r, i = std::min<int64_t>(row, rows - 1), j = i / G;
            const int64_t at = (starts[s] + j) * H * HD + (h * G + i % G) * HD;
            qrows[r] = qp + at;
            blk.out[r] = row < rows ? op + at : nullptr;
            blk.lim[r] = len - nq + 1 + j;
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
  if (q.size(2) == 64) run<64>(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out);
  else run<128>(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("paged_chunk_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, Tensor query_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("paged_chunk_attention", &paged_chunk_attention);
}

#endif  // DISTSERVE_CHUNK_ATTENTION_AVX2
