// Attention for chunks of many new tokens (a prompt's prefill, a prompt's tail after its cached
// prefix, a chunk of a chunked prefill), bf16, on CPU cores with AVX-512 BF16, straight from the
// paged KV cache (no gathered copy of the context, no mask tensor). On hosts without AMX it also
// serves bf16 decode and verify rows (paged_decode.cpp's ops call distserve::chunk_attention).
//
// Sequence s has query_lens[s] new tokens (rows of q, sequence after sequence) at the end of its
// context_lens[s] positions; token j attends to the first context_lens[s] - query_lens[s] + 1 + j
// (causal). torch's SDPA on this CPU (flash for causal, masked math after a cached prefix) runs
// at 18-67 GFLOP/s on one core; here the dot products are vdpbf16ps (16 lanes x 2 bf16 products,
// float32 sums), FlashAttention's online softmax over chunks of 64 positions:
//   - per (sequence, KV head), its context's K and V are packed into the instruction's pair
//     layout: K as [position / 16][dim pair][16 positions] (a score vector is 16 positions of one
//     query row), V as [position pair][dim] (an output vector is 16 dims of one row); with many
//     query rows (prefill) the whole context once, with few (decode, verify rows: up to 16 row
//     blocks) chunk by chunk into L1, each chunk serving every row before the next is packed, the
//     blocks four chunks ahead asked for (decode's working set is out of cache);
//   - a block of R query rows (a row: one token's query head; the G heads sharing the KV head and
//     consecutive tokens) computes 64 positions' scores, masks what it may not see, rescales its
//     running output when its running max grows, and adds P x V.
// Scores (bf16 products are exact in float32) and the softmax are float32. P is split into two
// bf16 parts, hi + lo (16 bits of mantissa), each multiplied by V: FlashAttention's P rounded to
// bf16 alone took a fifth less time here but differs from our other kernels (float P) enough to flip
// greedy tokens between a prompt prefilled whole and the same prompt's tail after its cached
// prefix (tests/test_layer_stack.py caught it). One core of the AMD EPYC host, 9 query and 3 KV
// heads of 64, one layer: 512 new tokens 3.0 ms against SDPA's 8.5, 1,500 24.6 against 45.7, 350
// after 1,000 cached 8.9 against 17.4 (SDPA with a mask; it also needs the context gathered).
// (The score accumulators must stay in registers: kept in an array indexed later at run time,
// GCC stored all 16 to the stack after every vdpbf16ps, 1.5x slower.)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "paged.h"

#ifdef DISTSERVE_CHUNK_ATTENTION

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kChunk = 64;          // positions per online-softmax step: 4 score vectors a row
constexpr int64_t kSub = kChunk / 16;
// a (sequence, KV head) with up to this many blocks of query rows runs chunk-major (each chunk
// packed once into L1 for all of them); more, the context is packed whole first
constexpr int64_t kFewBlocks = 16;
constexpr int64_t kAhead = 4;           // chunks whose K/V rows are asked for ahead (few rows)
// a masked score, finite (-ffast-math assumes no infinities): its e^(s - max) is 0, and a row's
// running max starts here, so its first correction factor is 0 too
constexpr float kMasked = -1e30f;

// e^x for x <= 0 (a score minus its row's max): 2^(x log2 e), the fraction's 2^f by its Taylor
// polynomial of degree 6 (relative error < 2e-7 on |f| <= 0.5), the integer part by vscalefps.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);               // ln2^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bcast_pair(const uint16_t* p) {     // two bf16 (p[0] low, p[1] high) in every lane
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(v)));
}

inline __m512 dp(__m512 acc, __m512 a, __m512 b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// One (sequence, KV head)'s context (K/V rows in the paged cache) and its chunks in the pair
// layouts: K as [16 positions][HD / 2][16] (4 of them a chunk), V as [position pair][HD]
// (32 a chunk); positions past the context are zeros. Vector code: packing was scalar and cost
// more than the attention itself for a few query rows (a verify step's).
// E: the cache's element, uint16_t (bf16) or int8_t (int8 KV: a bf16 scale per position and
// head, kv_cache.quantize_kv). int8 values become bf16 integers when packed (exact: |v| <= 127),
// so the dot products are the bf16 path's; K's scales multiply the scores and V's the
// probabilities (after the softmax's sum), as attention/int8.py applies them. A decode step
// at long contexts reads its K/V at the core's memory bandwidth, so int8 halves that time.
template <int HD, typename E>
struct Context {
  static constexpr bool kQuant = std::is_same_v<E, int8_t>;
  const E *k_head, *v_head;
  const uint16_t *ks_head, *vs_head;   // int8: the head's scales ([block][position]), else null
  const int64_t* table;
  int64_t len, bs, block_stride, scale_stride;

  alignas(64) static constexpr E zeros[HD] = {};    // the rows past the context

  const E* row(const E* head, int64_t t) const {
    return t < len ? head + table[t / bs] * block_stride + (t % bs) * HD : zeros;
  }

  // asks for positions [c0, c0 + kChunk)'s K/V rows (blocks are scattered over the pool: the
  // hardware prefetcher cannot see the next one coming)
  void prefetch(int64_t c0) const {
    for (int64_t t = c0; t < std::min(c0 + kChunk, len); t += bs - t % bs) {
      const int64_t n = std::min({bs - t % bs, c0 + kChunk - t, len - t});
      distserve::prefetch_block<2>(row(k_head, t), n * HD);
      distserve::prefetch_block<2>(row(v_head, t), n * HD);
      if constexpr (kQuant) {
        const int64_t at = table[t / bs] * scale_stride + t % bs;
        distserve::prefetch_block<2>(ks_head + at, n);
        distserve::prefetch_block<2>(vs_head + at, n);
      }
    }
  }

  // positions [c0, c0 + kChunk)'s K and V rows: one division for the chunk, a block's rows being
  // consecutive (`row` divides by the block size twice a position; one AMD core, batch 16 at 800
  // positions: a decode step 1-3% shorter, within the noise of two runs)
  void rows_of(int64_t c0, const E** kr, const E** vr) const {
    int64_t b = c0 / bs, o = c0 % bs;
    for (int64_t i = 0; i < kChunk; ++i) {
      if (c0 + i < len) {
        const int64_t at = table[b] * block_stride + o * HD;
        kr[i] = k_head + at;
        vr[i] = v_head + at;
      } else {
        kr[i] = vr[i] = zeros;
      }
      if (++o == bs) {
        o = 0;
        ++b;
      }
    }
  }

  // int8: positions [c0, c0 + kChunk)'s K and V scales as floats (0 past the context). A walk of
  // its own: folded into rows_of's, the decode step (batch 16 at 1,000 positions, one AMD core)
  // took 80.2 ms against 74.7
  void scales_of(int64_t c0, float* ks, float* vs) const {
    int64_t b = c0 / bs, o = c0 % bs;
    for (int64_t i = 0; i < kChunk; ++i) {
      if (c0 + i < len) {
        const int64_t at = table[b] * scale_stride + o;
        ks[i] = bf16_to_float(ks_head[at]);
        vs[i] = bf16_to_float(vs_head[at]);
      } else {
        ks[i] = vs[i] = 0.f;
      }
      if (++o == bs) {
        o = 0;
        ++b;
      }
    }
  }

  // positions [c0, c0 + kChunk) -> kd (kChunk * HD / 2) and vd (kChunk / 2 * HD)
  void pack_chunk(int64_t c0, uint32_t* kd, uint32_t* vd) const {
    const E *krows[kChunk], *vrows[kChunk];
    rows_of(c0, krows, vrows);
    if constexpr (kQuant) {
      // V: 16 dims of positions 2p and 2p + 1 as floats; an integer's float has 16 zero low bits,
      // so its bf16 is the high half: (a >> 16) | b is the pair
      for (int64_t t = 0; t < kChunk; t += 2) {
        uint32_t* vr = vd + (t / 2) * HD;
        for (int i = 0; i < HD; i += 16) {
          const __m512i a = _mm512_castps_si512(int8_floats(vrows[t] + i));
          const __m512i b = _mm512_castps_si512(int8_floats(vrows[t + 1] + i));
          _mm512_storeu_si512(vr + i, _mm512_or_si512(_mm512_srli_epi32(a, 16), b));
        }
      }
    } else {
      // V: positions 2p and 2p + 1 interleaved per dim (their bf16 pair is one uint32)
      alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
      const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
      for (int64_t t = 0; t < kChunk; t += 2) {
        const uint16_t *a = vrows[t], *b = vrows[t + 1];
        uint32_t* vr = vd + (t / 2) * HD;
        for (int i = 0; i < HD; i += 32) {
          const __m512i x = _mm512_loadu_si512(a + i), y = _mm512_loadu_si512(b + i);
          _mm512_storeu_si512(vr + i, _mm512_permutex2var_epi16(x, ilo, y));
          _mm512_storeu_si512(vr + i + 16, _mm512_permutex2var_epi16(x, ihi, y));
        }
      }
    }
    // K: 16 positions x 16 dim pairs at a time, transposed to [dim pair][16 positions]
    for (int64_t t0 = 0; t0 < kChunk; t0 += 16) {
      const E* const* rows = krows + t0;
      uint32_t* kr = kd + (t0 / 16) * (HD / 2) * 16;
      for (int j = 0; j < HD / 32; ++j) {
        __m512 r[16];                   // 32-bit lanes: a pair of bf16 each
        for (int p = 0; p < 16; ++p) {
          if constexpr (kQuant) r[p] = int8_pairs(rows[p] + 32 * j);
          else r[p] = _mm512_loadu_ps(rows[p] + 32 * j);
        }
        distserve::transpose16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kr + (16 * j + i) * 16, r[i]);
      }
    }
  }

  static float bf16_to_float(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }

  // 16 int8 -> 16 floats (integers)
  static __m512 int8_floats(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }

  // 32 int8 (16 dim pairs) -> 16 lanes of (bf16 of the even dim, bf16 of the odd dim above it)
  static __m512 int8_pairs(const int8_t* p) {
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i even = _mm512_srai_epi32(_mm512_slli_epi32(w, 16), 16), odd = _mm512_srai_epi32(w, 16);
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(even)), 16);
    return _mm512_castsi512_ps(_mm512_or_si512(lo, _mm512_castps_si512(_mm512_cvtepi32_ps(odd))));
  }
};

// The whole context packed, for many query rows (each sweeps it chunk by chunk).
template <int HD, typename E>
struct Packed {
  std::vector<uint32_t> k;              // [padded / 16][HD / 2][16]
  std::vector<uint32_t> v;              // [padded / 2][HD]
  std::vector<float> ks, vs;            // int8: [padded] scales

  void pack(const Context<HD, E>& ctx) {
    const int64_t padded = (ctx.len + kChunk - 1) / kChunk * kChunk;
    k.resize(padded * HD / 2);
    v.resize(padded / 2 * HD);
    if constexpr (Context<HD, E>::kQuant) {
      ks.resize(padded);
      vs.resize(padded);
    }
    for (int64_t c0 = 0; c0 < padded; c0 += kChunk) {
      ctx.pack_chunk(c0, k.data() + c0 * (HD / 2), v.data() + (c0 / 2) * HD);
      if constexpr (Context<HD, E>::kQuant) ctx.scales_of(c0, ks.data() + c0, vs.data() + c0);
    }
  }

  const float* k_scales(int64_t c0) const { return ks.empty() ? nullptr : ks.data() + c0; }
  const float* v_scales(int64_t c0) const { return vs.empty() ? nullptr : vs.data() + c0; }
};

// sc[r][0, 64) = the scores (unscaled) of rows q[0..R) against the chunk's 64 positions, packed
// K at kc. The R x 4 accumulators stay in registers (the loops unrolled) and are stored once.
template <int HD, int R>
__attribute__((always_inline)) inline void scores(const uint32_t* kc, const uint16_t* const* q,
                                                  float (*sc)[kChunk]) {
  __m512 s[R][kSub];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < kSub; ++u) s[r][u] = _mm512_setzero_ps();
  for (int d = 0; d < HD / 2; ++d) {
    __m512 kv[kSub];
#pragma GCC unroll 4
    for (int u = 0; u < kSub; ++u) kv[u] = _mm512_loadu_ps(reinterpret_cast<const float*>(kc + (u * (HD / 2) + d) * 16));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 qb = bcast_pair(q[r] + 2 * d);
#pragma GCC unroll 4
      for (int u = 0; u < kSub; ++u) s[r][u] = dp(s[r][u], qb, kv[u]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < kSub; ++u) _mm512_store_ps(sc[r] + 16 * u, s[r][u]);
}

// R query rows of one (sequence, KV head): q[r] (HD bf16), each seeing lim[r] positions; out[r]
// gets the attention output (nullptr: a padding row). The running output, max and sum of the
// online softmax, advanced one chunk of packed K/V at a time.
template <int HD, int R>
struct RowBlock {
  static constexpr int kOut = HD / 16;                // output vectors a row
  alignas(64) float o[R][HD];
  float m[R], l[R];
  const uint16_t* q[R];
  int64_t lim[R];
  c10::BFloat16* out[R];
  int64_t end, low;                                   // the most and the fewest positions a row sees

  void start() {
    for (int r = 0; r < R; ++r) {
      m[r] = kMasked;
      l[r] = 0.f;
      std::fill(o[r], o[r] + HD, 0.f);
    }
    end = *std::max_element(lim, lim + R);
    low = *std::min_element(lim, lim + R);
  }

  // positions [c0, c0 + kChunk), c0 < end: K packed at kc, V at vc; int8 KV: the positions'
  // K scales ks (on the scores) and V scales vs (on the probabilities), else null
  void step(const uint32_t* kc, const uint32_t* vc, int64_t c0, float scale, const float* ks = nullptr,
            const float* vs = nullptr) {
    alignas(64) uint16_t pbuf[R][2][kChunk];          // P as bf16 hi + lo parts (below)
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(kMasked);
    // scores: s[r][u] = 16 positions c0 + 16u + lane of row r
    alignas(64) float sc[R][kChunk];
    scores<HD, R>(kc, q, sc);
    const bool masked = c0 + kChunk > low;
    for (int r = 0; r < R; ++r) {
      __mmask16 keep[kSub];
      __m512 s[kSub], mx = ninf;
      for (int u = 0; u < kSub; ++u) {
        const int64_t seen = std::clamp<int64_t>(lim[r] - (c0 + 16 * u), 0, 16);
        keep[u] = masked ? static_cast<__mmask16>((1u << seen) - 1u) : static_cast<__mmask16>(0xFFFF);
        const __m512 mul = ks ? _mm512_mul_ps(_mm512_loadu_ps(ks + 16 * u), vscale) : vscale;
        s[u] = _mm512_mask_mul_ps(ninf, keep[u], _mm512_load_ps(sc[r] + 16 * u), mul);
        mx = _mm512_max_ps(mx, s[u]);
      }
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float corr = std::exp(m[r] - m_new);
      __m512 sum = _mm512_setzero_ps();
      const __m512 vm = _mm512_set1_ps(m_new);
      for (int u = 0; u < kSub; ++u) {
        __m512 p = _mm512_maskz_mov_ps(keep[u], exp_nonpositive(_mm512_sub_ps(s[u], vm)));
        sum = _mm512_add_ps(sum, p);
        if (vs) p = _mm512_mul_ps(p, _mm512_loadu_ps(vs + 16 * u));
        const __m256i hi = (__m256i)_mm512_cvtneps_pbh(p);
        const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        _mm256_store_si256(reinterpret_cast<__m256i*>(pbuf[r][0] + 16 * u), hi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(pbuf[r][1] + 16 * u),
                           (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(p, hi_f)));
      }
      l[r] = l[r] * corr + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
      if (corr != 1.f)
        for (int i = 0; i < HD; i += 16)
          _mm512_store_ps(o[r] + i, _mm512_mul_ps(_mm512_load_ps(o[r] + i), _mm512_set1_ps(corr)));
    }
    // o[r] += P[r] V over the chunk's position pairs
    __m512 acc[R][kOut];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kOut; ++c) acc[r][c] = _mm512_load_ps(o[r] + 16 * c);
    const int64_t pairs = (std::min(end - c0, kChunk) + 1) / 2;
    for (int64_t pp = 0; pp < pairs; ++pp) {
      __m512 vv[kOut];
#pragma GCC unroll 8
      for (int c = 0; c < kOut; ++c) vv[c] = _mm512_loadu_ps(reinterpret_cast<const float*>(vc + pp * HD + 16 * c));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 hi = bcast_pair(pbuf[r][0] + 2 * pp), lo = bcast_pair(pbuf[r][1] + 2 * pp);
#pragma GCC unroll 8
        for (int c = 0; c < kOut; ++c) acc[r][c] = dp(dp(acc[r][c], hi, vv[c]), lo, vv[c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kOut; ++c) _mm512_store_ps(o[r] + 16 * c, acc[r][c]);
  }

  void finish() {
    for (int r = 0; r < R; ++r)
      if (out[r] != nullptr) distserve::store_normalized(out[r], o[r], l[r], HD);
  }
};

template <int HD, typename E>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor* k_scale,
         const at::Tensor* v_scale, const at::Tensor& block_tables, const at::Tensor& context_lens,
         const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
  constexpr int R = HD == 64 ? 4 : 2;                 // rows a block: R x 4 score and R x HD/16 output registers
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
  at::parallel_for(0, S * kvh, 1, [&](int64_t begin, int64_t end) {
    Packed<HD, E> pk;
    RowBlock<HD, R> blocks[kFewBlocks];
    alignas(64) uint32_t kbuf[kChunk * HD / 2], vbuf[kChunk / 2 * HD];
    alignas(64) float ksbuf[kChunk], vsbuf[kChunk];
    const float* kss = Context<HD, E>::kQuant ? ksbuf : nullptr;
    const float* vss = Context<HD, E>::kQuant ? vsbuf : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, h = task % kvh, nq = starts[s + 1] - starts[s], len = lens[s];
      const Context<HD, E> ctx{kp + h * bs * HD, vp + h * bs * HD, ksp ? ksp + h * bs : nullptr,
                               vsp ? vsp + h * bs : nullptr, tables + s * max_blocks, len, bs, block_stride,
                               scale_stride};
      const int64_t rows = nq * G;                    // row i: token i / G, query head h * G + i % G
      const auto fill = [&](RowBlock<HD, R>& blk, int64_t r0) {
        for (int r = 0; r < R; ++r) {
          const distserve::ChunkRow row = distserve::chunk_row(r0 + r, rows, G, h, starts[s], nq, len, H, HD);
          blk.q[r] = qp + row.at;
          blk.out[r] = row.real ? op + row.at : nullptr;
          blk.lim[r] = row.lim;
        }
        blk.start();
      };
      if (rows <= kFewBlocks * R) {
        // few rows (decode, verify): chunk by chunk, each packed into L1 once for every row
        const int64_t n = (rows + R - 1) / R;
        for (int64_t b = 0; b < n; ++b) fill(blocks[b], b * R);
        for (int64_t c = 1; c < kAhead; ++c) ctx.prefetch(c * kChunk);
        for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
          ctx.pack_chunk(c0, kbuf, vbuf);
          if constexpr (Context<HD, E>::kQuant) ctx.scales_of(c0, ksbuf, vsbuf);
          ctx.prefetch(c0 + kAhead * kChunk);
          for (int64_t b = 0; b < n; ++b)
            if (c0 < blocks[b].end) blocks[b].step(kbuf, vbuf, c0, static_cast<float>(scale), kss, vss);
        }
        for (int64_t b = 0; b < n; ++b) blocks[b].finish();
        continue;
      }
      // many rows (prefill): the context packed once, each block of rows sweeping it
      pk.pack(ctx);
      for (int64_t r0 = 0; r0 < rows; r0 += R) {
        RowBlock<HD, R>& blk = blocks[0];
        fill(blk, r0);
        for (int64_t c0 = 0; c0 < blk.end; c0 += kChunk)
          blk.step(pk.k.data() + c0 * (HD / 2), pk.v.data() + (c0 / 2) * HD, c0, static_cast<float>(scale),
                   pk.k_scales(c0), pk.v_scales(c0));
        blk.finish();
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
  distserve::chunk_attention(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out);
  return out;
}

}  // namespace

bool distserve::chunk_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
  if (q.scalar_type() != at::kBFloat16) return false;
  if (q.size(2) == 64) run<64, uint16_t>(q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, starts, scale, out);
  else if (q.size(2) == 128) run<128, uint16_t>(q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, starts, scale, out);
  else return false;
  return true;
}

at::Tensor distserve::paged_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
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

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def(distserve::kChunkAttentionSchema);
  m.def(distserve::kAttentionInt8Schema);
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("paged_chunk_attention", &paged_chunk_attention);
  m.impl("paged_attention_int8", &distserve::paged_attention_int8);
}

#endif  // DISTSERVE_CHUNK_ATTENTION (AVX-512 BF16): elsewhere the op is not registered and long chunks run on torch's SDPA
