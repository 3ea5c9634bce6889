// Decode attention straight over the paged KV cache, on CPU cores (and, paged_prefix_attention
// below, a few new tokens per sequence: verify rows and short chunks).
//
// One query token per sequence; per (sequence, KV head) task the G query heads that share the
// KV head read that head's K and V block by block from the cache (no gathered copy, no padding
// to the batch's longest context, no mask): scores in float, a softmax, then the weighted sum
// of V, written in the query's dtype. Tasks run under at::parallel_for (the instance's intra-op
// threads). Compiled on the host that runs it (-march=native, backends/core/attention/native.py);
// the inner loops are plain float loops the compiler vectorizes (bf16 -> float is a 16-bit shift).
// bf16 on a host with the chunk kernel and without AMX: both ops run on the chunk kernel
// instead (chunk_rows below).
//
// Shapes: q [B, H, hd]; k_cache, v_cache [num_blocks, KVH, block_size, hd] (q's dtype: float or
// bfloat16; dense within a block, blocks at any stride: the pool interleaves layers);
// block_tables [B, max_blocks] int64; context_lens [B] int32. Returns [B, H, hd].
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"
#include "paged.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DISTSERVE_AMX_ATTENTION 1
#include <cstdlib>
#include <type_traits>

#include "amx.h"
#endif

namespace {

using distserve::check_paged;
using distserve::load;

using distserve::prefetch_block;

// s[t] <- exp(s[t] - max s), in place; returns 1 / sum, the normalizer applied at the end.
inline float softmax_unnormalized(float* s, int64_t len) {
  float m = s[0];
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return 1.f / sum;
}

template <typename T>
void load_rows(const T* src, float* dst, int64_t n) {   // n contiguous values -> float
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src[i]);
}

// fn(t, row) for every row t < len of one head's blocks, each row widened to float; the block
// two ahead is prefetched, and after the last ones the first blocks of `then` (read next).
template <typename T, int HD, typename Fn>
inline void each_row(const T* head, const T* then, const int64_t* table, int64_t nblocks,
                     int64_t len, int64_t bs, int64_t block_stride, Fn&& fn) {
  for (int64_t n = 0; n < nblocks; ++n) {
    const T* block = head + table[n] * block_stride;
    if (n + 2 < nblocks) prefetch_block(head + table[n + 2] * block_stride, bs * HD);
    else if (then != nullptr && n + 2 - nblocks < nblocks)
      prefetch_block(then + table[n + 2 - nblocks] * block_stride, bs * HD);
    const int64_t rows = std::min(bs, len - n * bs);
    for (int64_t r = 0; r < rows; ++r) {
      float row[HD];
#pragma omp simd
      for (int i = 0; i < HD; ++i) row[i] = load(block[r * HD + i]);
      fn(n * bs + r, row);
    }
  }
}

// One (sequence, KV head) task with the head size and group size known at compile time: the
// compiler keeps a K/V row and the G accumulators in vector registers and unrolls every loop
// (the generic kernel below, with runtime sizes, runs 4-6x slower per token).
template <typename T, int HD, int G>
void attend_fixed(const T* q, const T* k_head, const T* v_head, const int64_t* table, int64_t len,
                  int64_t bs, int64_t block_stride, float scale, float* scores, T* out) {
  float qf[G][HD];
  for (int g = 0; g < G; ++g)
#pragma omp simd
    for (int i = 0; i < HD; ++i) qf[g][i] = load(q[g * HD + i]) * scale;
  const int64_t nblocks = (len + bs - 1) / bs;
  each_row<T, HD>(k_head, v_head, table, nblocks, len, bs, block_stride, [&](int64_t t, const float* k) {
    for (int g = 0; g < G; ++g) {                         // scores[g, t] = q_g . k_t
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < HD; ++i) s += qf[g][i] * k[i];
      scores[g * len + t] = s;
    }
  });
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = softmax_unnormalized(scores + g * len, len);
  float acc[G][HD] = {};
  each_row<T, HD>(v_head, nullptr, table, nblocks, len, bs, block_stride, [&](int64_t t, const float* v) {
    for (int g = 0; g < G; ++g) {                         // acc[g] = sum_t p[g, t] v_t
      const float p = scores[g * len + t];
#pragma omp simd
      for (int i = 0; i < HD; ++i) acc[g][i] += p * v[i];
    }
  });
  for (int g = 0; g < G; ++g)
#pragma omp simd
    for (int i = 0; i < HD; ++i) out[g * HD + i] = static_cast<T>(acc[g][i] * inv[g]);
}

// Several new tokens of one sequence (speculative verify rows, short chunks), for one KV head:
// token j of nq attends to the first len - nq + 1 + j positions (causal). K and V are read once
// for all nq x G queries, instead of once per token.
constexpr int64_t kMaxQuery = 8;

template <typename T, int HD, int G>
void attend_multi(const T* q, int64_t q_stride, int64_t nq, const T* k_head, const T* v_head,
                  const int64_t* table, int64_t len, int64_t bs, int64_t block_stride, float scale,
                  float* scores, T* out) {
  float qf[kMaxQuery * G][HD];
  for (int64_t j = 0; j < nq; ++j)
    for (int g = 0; g < G; ++g)
#pragma omp simd
      for (int i = 0; i < HD; ++i) qf[j * G + g][i] = load(q[j * q_stride + g * HD + i]) * scale;
  const int64_t first = len - nq + 1;                     // token 0's length
  const int64_t nblocks = (len + bs - 1) / bs;
  each_row<T, HD>(k_head, v_head, table, nblocks, len, bs, block_stride, [&](int64_t t, const float* k) {
    for (int64_t j = std::max<int64_t>(0, t - first + 1); j < nq; ++j)   // the tokens that see t
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < HD; ++i) s += qf[j * G + g][i] * k[i];
        scores[(j * G + g) * len + t] = s;
      }
  });
  float inv[kMaxQuery * G];
  for (int64_t j = 0; j < nq; ++j)
    for (int g = 0; g < G; ++g) inv[j * G + g] = softmax_unnormalized(scores + (j * G + g) * len, first + j);
  float acc[kMaxQuery * G][HD];
  for (int64_t r = 0; r < nq * G; ++r)
#pragma omp simd
    for (int i = 0; i < HD; ++i) acc[r][i] = 0.f;
  each_row<T, HD>(v_head, nullptr, table, nblocks, len, bs, block_stride, [&](int64_t t, const float* v) {
    for (int64_t j = std::max<int64_t>(0, t - first + 1); j < nq; ++j)
      for (int g = 0; g < G; ++g) {
        const float p = scores[(j * G + g) * len + t];
#pragma omp simd
        for (int i = 0; i < HD; ++i) acc[j * G + g][i] += p * v[i];
      }
  });
  for (int64_t j = 0; j < nq; ++j)
    for (int g = 0; g < G; ++g)
#pragma omp simd
      for (int i = 0; i < HD; ++i) out[j * q_stride + g * HD + i] = static_cast<T>(acc[j * G + g][i] * inv[j * G + g]);
}

#ifdef DISTSERVE_AMX_ATTENTION
// bf16 attention on the AMX tiles, for one (sequence, KV head) task of up to 16 query rows
// (the G heads of one token: a decode row; or of nq tokens: verify rows, short chunks). The
// scalar kernels above spend a horizontal sum on every (query, position); here
//   scores^T [16 positions x 16 rows] = K [16 positions x 32 dims] . Q^T [32 dims x 16 rows]
// is one tile multiply per 32 dims, K loaded straight from its block (rows are positions), Q^T
// packed once per task. The softmax runs across the 16 rows in the lanes (a position's scores
// are one vector). Then P (bf16, as FlashAttention keeps it) is transposed 32 positions at a
// time into the A tile of
//   out [16 rows x 16 dims] += P [16 rows x 32 positions] . V [32 positions x 16 dims],
// V packed pairwise (positions 2i, 2i + 1 interleaved per dim) into the B tile. K/V blocks are
// read once for every row; the cost hardly depends on the number of rows.
// Needs: a block size that is a multiple of 16 (a score tile never crosses a block), head size
// 64 or 128. Positions past the context inside its last block are read but masked (their V as
// zeros: a pool block's tail may hold anything).
constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxMinContext = 64;  // a single decode token over fewer positions: the scalar kernel
constexpr float kMasked = -1e30f;        // finite: the kernels are built with -ffast-math

bool amx_attention_enabled() {           // DISTSERVE_AMX_ATTENTION=0 turns it off (A/B runs)
  const char* env = std::getenv("DISTSERVE_AMX_ATTENTION");
  return distserve::amx_permitted() && !(env != nullptr && env[0] == '0');
}

struct AmxScratch {
  std::vector<float> scores;             // [positions, 16]: scores^T, then P^T
  std::vector<uint16_t> p;               // [positions / 32, 16, 32]: P (bf16), A tiles
};

// nq tokens of G heads each: query row j * G + g at q + j * q_stride + g * HD (out likewise);
// token j sees the first len - nq + 1 + j positions.
template <int HD, typename T>
void attend_amx(const T* q, int64_t q_stride, int64_t nq, int64_t G, const T* k_head, const T* v_head,
                const int64_t* table, int64_t len, int64_t bs, int64_t block_stride, float scale,
                AmxScratch& buf, T* out) {
  static_assert(HD % 64 == 0, "head size 64 or 128");
  static_assert(std::is_same_v<T, c10::BFloat16>, "bf16 only");
  constexpr int kChunks = HD / 32;                  // 32 dims a tile multiply
  const int64_t M = nq * G;
  const auto offset = [&](int64_t r) { return (r / G) * q_stride + (r % G) * HD; };   // of row r in q, out
  // Q^T, packed: qt[c][i][r] = dims 32 c + 2 i, + 1 of row r (0 for padding rows)
  alignas(64) uint32_t qt[kChunks][16][kAmxRows];
  for (int c = 0; c < kChunks; ++c)
    for (int i = 0; i < 16; ++i)
      for (int64_t r = 0; r < kAmxRows; ++r) {
        uint32_t v = 0;
        if (r < M) std::memcpy(&v, q + offset(r) + 32 * c + 2 * i, sizeof v);
        qt[c][i][r] = v;
      }
  const int64_t npos = (len + 15) / 16 * 16, nblocks = (len + bs - 1) / bs;
  buf.scores.resize(npos * kAmxRows);
  buf.p.resize((npos + 31) / 32 * kAmxRows * 32);
  float* sc = buf.scores.data();
  _tile_loadd(4, qt[0], 64);                        // B: Q^T, 32 dims a tile
  _tile_loadd(5, qt[1], 64);
  if constexpr (kChunks == 4) {
    _tile_loadd(6, qt[2 % kChunks], 64);
    _tile_loadd(7, qt[3 % kChunks], 64);
  }
  // scores^T, 16 positions a tile
  for (int64_t n = 0; n < nblocks; ++n) {
    const c10::BFloat16* kb = k_head + table[n] * block_stride;
    if (n + 2 < nblocks) prefetch_block(k_head + table[n + 2] * block_stride, bs * HD);
    else if (n + 2 - nblocks < nblocks) prefetch_block(v_head + table[n + 2 - nblocks] * block_stride, bs * HD);
    for (int64_t t0 = n * bs; t0 < std::min(len, (n + 1) * bs); t0 += 16) {
      _tile_zero(0);
      const c10::BFloat16* k16 = kb + (t0 - n * bs) * HD;
      if constexpr (kChunks >= 1) { _tile_loadd(1, k16, HD * 2); _tile_dpbf16ps(0, 1, 4); }
      if constexpr (kChunks >= 2) { _tile_loadd(1, k16 + 32, HD * 2); _tile_dpbf16ps(0, 1, 5); }
      if constexpr (kChunks >= 3) { _tile_loadd(1, k16 + 64, HD * 2); _tile_dpbf16ps(0, 1, 6); }
      if constexpr (kChunks >= 4) { _tile_loadd(1, k16 + 96, HD * 2); _tile_dpbf16ps(0, 1, 7); }
      _tile_stored(0, sc + t0 * kAmxRows, 64);
    }
  }
  // mask: past the context, and each token's future (the last nq - 1 positions)
  const int64_t first = len - nq + 1;
  for (int64_t t = first; t < npos; ++t)
    for (int64_t r = 0; r < kAmxRows; ++r)
      if (t >= len || (r < M && t >= first + r / G)) sc[t * kAmxRows + r] = kMasked;
  // softmax over positions: each row's max with the rows in the lanes (one vector a position),
  // then 32 positions at a time transposed to rows, exponentiated (the M real rows only) and
  // written as bf16 into P's A tiles
  alignas(64) float mx[kAmxRows], sum[kAmxRows];
  for (int64_t r = 0; r < kAmxRows; ++r) mx[r] = kMasked, sum[r] = 0.f;
  for (int64_t t = 0; t < npos; ++t)
#pragma omp simd
    for (int64_t r = 0; r < kAmxRows; ++r) mx[r] = std::max(mx[r], sc[t * kAmxRows + r]);
  uint16_t* pa = buf.p.data();
  const __m512 masked = _mm512_set1_ps(kMasked);
  for (int64_t t0 = 0; t0 < npos; t0 += 32) {
    __m512 lo[16], hi[16];
    for (int i = 0; i < 16; ++i) {
      lo[i] = _mm512_loadu_ps(sc + (t0 + i) * kAmxRows);
      hi[i] = t0 + 16 + i < npos ? _mm512_loadu_ps(sc + (t0 + 16 + i) * kAmxRows) : masked;
    }
    distserve::transpose16(lo);
    distserve::transpose16(hi);
    for (int64_t r = 0; r < kAmxRows; ++r) {
      __m512i bf = _mm512_setzero_si512();
      if (r < M) {
        alignas(64) float e[32];
        _mm512_store_ps(e, lo[r]);
        _mm512_store_ps(e + 16, hi[r]);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < 32; ++i) {
          e[i] = std::exp((e[i] - mx[r]) * scale);
          s += e[i];
        }
        sum[r] += s;
        bf = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(e + 16), _mm512_load_ps(e));
      }
      _mm512_storeu_si512(pa + (t0 / 32 * kAmxRows + r) * 32, bf);
    }
  }
  // out = P V, 64 dims (4 result tiles) a pass
  // word 2 i of a B row: dim i of position 2 i's row (a), word 2 i + 1: of the next (b)
  const __m512i lo_pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_pairs = _mm512_add_epi16(lo_pairs, _mm512_set1_epi16(16));     // dims 16-31
  alignas(64) uint16_t vb[4][16][32];
  alignas(64) float cbuf[kAmxRows][16];
  for (int pass = 0; pass < HD / 64; ++pass) {
    _tile_zero(0);                                  // tile ids are immediates: unrolled
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t t0 = 0; t0 < npos; t0 += 32) {
      for (int i = 0; i < 16; ++i) {                // positions t0 + 2 i, + 1: this pass's 64 dims
        const int64_t t = t0 + 2 * i;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
        if (t < len) {
          const c10::BFloat16* v = v_head + table[t / bs] * block_stride + (t % bs) * HD + pass * 64;
          a0 = _mm512_loadu_si512(v);
          a1 = _mm512_loadu_si512(v + 32);
          if (t + 1 < len) {
            b0 = _mm512_loadu_si512(v + HD);
            b1 = _mm512_loadu_si512(v + HD + 32);
          }
        }
        _mm512_store_si512(vb[0][i], _mm512_permutex2var_epi16(a0, lo_pairs, b0));
        _mm512_store_si512(vb[1][i], _mm512_permutex2var_epi16(a0, hi_pairs, b0));
        _mm512_store_si512(vb[2][i], _mm512_permutex2var_epi16(a1, lo_pairs, b1));
        _mm512_store_si512(vb[3][i], _mm512_permutex2var_epi16(a1, hi_pairs, b1));
      }
      _tile_loadd(4, pa + t0 / 32 * kAmxRows * 32, 64);
      _tile_loadd(5, vb[0], 64); _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, vb[1], 64); _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, vb[2], 64); _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, vb[3], 64); _tile_dpbf16ps(3, 4, 5);
    }
    for (int d = 0; d < 4; ++d) {
      switch (d) {
        case 0: _tile_stored(0, cbuf, 64); break;
        case 1: _tile_stored(1, cbuf, 64); break;
        case 2: _tile_stored(2, cbuf, 64); break;
        default: _tile_stored(3, cbuf, 64); break;
      }
      for (int64_t r = 0; r < M; ++r) {
        c10::BFloat16* o = out + offset(r) + pass * 64 + d * 16;
        const float inv = 1.f / sum[r];
        for (int i = 0; i < 16; ++i) distserve::store(o + i, cbuf[r][i] * inv);
      }
    }
  }
}
#endif  // DISTSERVE_AMX_ATTENTION

#ifdef DISTSERVE_AMX_ATTENTION
// The dtype and head sizes attend_amx is built for.
template <typename T, int HD>
constexpr bool kAmxShape = std::is_same_v<T, c10::BFloat16> && HD % 64 == 0;

// Runs fn(task, scratch) for tasks [0, n) on the AMX tiles where the CPU (and the switch) and the
// block size allow (true), else nothing (false: the caller runs its own kernel).
template <typename Fn>
bool amx_tasks(int64_t n, int64_t bs, Fn&& fn) {
  if (bs % 16 != 0 || !amx_attention_enabled()) return false;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    distserve::load_square_tiles();
    AmxScratch scratch;
    for (int64_t task = begin; task < end; ++task) fn(task, scratch);
    _tile_release();
  });
  return true;
}
#endif

// The op's tensors as raw pointers and sizes (checked by paged_decode_attention).
template <typename T>
struct Views {
  Views(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& t_,
        const at::Tensor& l_, at::Tensor& o_)
      : B(q_.size(0)), kvh(k_.size(1)), bs(k_.size(2)), max_blocks(t_.size(1)), block_stride(k_.stride(0)),
        q(q_.data_ptr<T>()), k(k_.data_ptr<T>()), v(v_.data_ptr<T>()), tables(t_.data_ptr<int64_t>()),
        lens(l_.data_ptr<int32_t>()), out(o_.data_ptr<T>()) {}
  int64_t B, kvh, bs, max_blocks, block_stride;
  const T *q, *k, *v;
  const int64_t* tables;
  const int32_t* lens;
  T* out;
};

template <typename T, int HD, int G>
bool run_fixed(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
               at::Tensor& out) {
  const Views<T> a(q, k_cache, v_cache, block_tables, context_lens, out);
  const int64_t kvh = a.kvh, bs = a.bs, max_blocks = a.max_blocks, block_stride = a.block_stride;
  const T *qp = a.q, *kp = a.k, *vp = a.v;
  const int64_t* tables = a.tables;
  const int32_t* lens = a.lens;
  T* op = a.out;
#ifdef DISTSERVE_AMX_ATTENTION
  if constexpr (kAmxShape<T, HD>)
    if (amx_tasks(a.B * kvh, bs, [&](int64_t task, AmxScratch& scratch) {
        const int64_t b = task / kvh, h = task % kvh, head = (b * kvh + h) * G * HD;
        if (lens[b] < kAmxMinContext) {                 // too short to pay for the packing
          scratch.scores.resize(G * static_cast<int64_t>(lens[b]));
          attend_fixed<T, HD, G>(qp + head, kp + h * bs * HD, vp + h * bs * HD, tables + b * max_blocks,
                                 lens[b], bs, block_stride, static_cast<float>(scale), scratch.scores.data(),
                                 op + head);
          return;
        }
        attend_amx<HD>(qp + head, 0, 1, G, kp + h * bs * HD, vp + h * bs * HD, tables + b * max_blocks, lens[b],
                       bs, block_stride, static_cast<float>(scale), scratch, op + head);
      }))
    return true;
#endif
  at::parallel_for(0, a.B * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kvh, h = task % kvh;
      scores.resize(G * static_cast<int64_t>(lens[b]));
      const int64_t head = (b * kvh + h) * G * HD;       // q and out: [B, KVH * G, HD]
      attend_fixed<T, HD, G>(qp + head, kp + h * bs * HD, vp + h * bs * HD, tables + b * max_blocks,
                             lens[b], bs, block_stride, static_cast<float>(scale), scores.data(),
                             op + head);
    }
  });
  return true;
}

// The shapes of the models we serve (head size 64 or 128, 1-8 query heads per KV head): Op<T, HD,
// G>::run(args...) for the one that matches, false for any other.
template <template <typename, int, int> class Op, typename T, typename... Args>
bool dispatch_shape(int64_t hd, int64_t G, Args&&... args) {
#define DISTSERVE_CASE(HD_, G_) \
  if (hd == HD_ && G == G_) return Op<T, HD_, G_>::run(std::forward<Args>(args)...);
#define DISTSERVE_GROUPS(HD_) \
  DISTSERVE_CASE(HD_, 1) DISTSERVE_CASE(HD_, 2) DISTSERVE_CASE(HD_, 3) DISTSERVE_CASE(HD_, 4) \
  DISTSERVE_CASE(HD_, 5) DISTSERVE_CASE(HD_, 6) DISTSERVE_CASE(HD_, 7) DISTSERVE_CASE(HD_, 8)
  DISTSERVE_GROUPS(64)
  DISTSERVE_GROUPS(128)
#undef DISTSERVE_GROUPS
#undef DISTSERVE_CASE
  return false;
}

template <typename T, int HD, int G>
struct FixedOp {
  template <typename... Args>
  static bool run(Args&&... args) { return run_fixed<T, HD, G>(std::forward<Args>(args)...); }
};

template <typename T>
bool dispatch_fixed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& t,
                    const at::Tensor& l, double scale, at::Tensor& out) {
  return dispatch_shape<FixedOp, T>(q.size(2), q.size(1) / k.size(1), q, k, v, t, l, scale, out);
}

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                   at::Tensor& out) {
  const Views<T> a(q, k_cache, v_cache, block_tables, context_lens, out);
  const int64_t B = a.B, H = q.size(1), hd = q.size(2), kvh = a.kvh, bs = a.bs;
  const int64_t G = H / kvh, max_blocks = a.max_blocks;
  const T *qp = a.q, *kp = a.k, *vp = a.v;
  const int64_t* tables = a.tables;
  const int32_t* lens = a.lens;
  T* op = a.out;
  const int64_t block_stride = a.block_stride, head_stride = bs * hd;   // blocks may be strided

  at::parallel_for(0, B * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * hd), kv(bs * hd), scores, acc(G * hd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kvh, h = task % kvh;
      const int64_t T_ = lens[b];
      scores.resize(G * T_);
      for (int64_t g = 0; g < G; ++g) {
        const T* src = qp + (b * H + h * G + g) * hd;
        float* dst = qf.data() + g * hd;
#pragma omp simd
        for (int64_t i = 0; i < hd; ++i) dst[i] = load(src[i]) * static_cast<float>(scale);
      }
      const int64_t nblocks = (T_ + bs - 1) / bs;
      // scores[g, t] = q_g . k_t
      const int64_t* table = tables + b * max_blocks;
      for (int64_t n = 0; n < nblocks; ++n) {
        const int64_t blk = table[n];
        const int64_t rows = std::min(bs, T_ - n * bs);
        if (n + 2 < nblocks) prefetch_block(kp + table[n + 2] * block_stride + h * head_stride, bs * hd);
        else prefetch_block(vp + table[0] * block_stride + h * head_stride, bs * hd);
        load_rows(kp + blk * block_stride + h * head_stride, kv.data(), rows * hd);
        for (int64_t r = 0; r < rows; ++r) {
          const float* krow = kv.data() + r * hd;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * hd;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < hd; ++i) s += qg[i] * krow[i];
            scores[g * T_ + n * bs + r] = s;
          }
        }
      }
      // softmax over t, per query head
      std::vector<float> inv(G);
      for (int64_t g = 0; g < G; ++g) inv[g] = softmax_unnormalized(scores.data() + g * T_, T_);
      // acc[g] = sum_t p[g, t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t n = 0; n < nblocks; ++n) {
        const int64_t blk = table[n];
        const int64_t rows = std::min(bs, T_ - n * bs);
        if (n + 2 < nblocks) prefetch_block(vp + table[n + 2] * block_stride + h * head_stride, bs * hd);
        load_rows(vp + blk * block_stride + h * head_stride, kv.data(), rows * hd);
        for (int64_t r = 0; r < rows; ++r) {
          const float* vrow = kv.data() + r * hd;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * T_ + n * bs + r];
            float* a = acc.data() + g * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; ++i) a[i] += p * vrow[i];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst = op + (b * H + h * G + g) * hd;
        const float* a = acc.data() + g * hd;
        for (int64_t i = 0; i < hd; ++i) dst[i] = static_cast<T>(a[i] * inv[g]);
      }
    }
  });
}

template <typename T, int HD, int G>
bool run_multi(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& block_tables, const at::Tensor& context_lens,
               const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
  const int64_t S = block_tables.size(0), kvh = k_cache.size(1), bs = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1), block_stride = k_cache.stride(0), H = q.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
#ifdef DISTSERVE_AMX_ATTENTION
  // a sequence's nq tokens x G heads in one AMX task where they fit its 16 rows
  bool fits = true;
  for (int64_t s = 0; s < S; ++s) fits = fits && (starts[s + 1] - starts[s]) * G <= kAmxRows;
  if constexpr (kAmxShape<T, HD>)
    if (fits && amx_tasks(S * kvh, bs, [&](int64_t task, AmxScratch& scratch) {
        const int64_t s = task / kvh, h = task % kvh, nq = starts[s + 1] - starts[s];
        const int64_t head = starts[s] * H * HD + h * G * HD;
        attend_amx<HD>(qp + head, H * HD, nq, G, kp + h * bs * HD, vp + h * bs * HD, tables + s * max_blocks,
                       lens[s], bs, block_stride, static_cast<float>(scale), scratch, op + head);
      }))
    return true;
#endif
  at::parallel_for(0, S * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, h = task % kvh, nq = starts[s + 1] - starts[s];
      scores.resize(nq * G * static_cast<int64_t>(lens[s]));
      const int64_t head = starts[s] * H * HD + h * G * HD;   // q and out: [N, KVH * G, HD]
      attend_multi<T, HD, G>(qp + head, H * HD, nq, kp + h * bs * HD, vp + h * bs * HD,
                             tables + s * max_blocks, lens[s], bs, block_stride,
                             static_cast<float>(scale), scores.data(), op + head);
    }
  });
  return true;
}

template <typename T, int HD, int G>
struct MultiOp {
  template <typename... Args>
  static bool run(Args&&... args) { return run_multi<T, HD, G>(std::forward<Args>(args)...); }
};

template <typename T>
bool dispatch_multi(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& t,
                    const at::Tensor& l, const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
  return dispatch_shape<MultiOp, T>(q.size(2), q.size(1) / k.size(1), q, k, v, t, l, starts, scale, out);
}

// bf16 rows on the chunk kernel (chunk_attention.cpp: vdpbf16ps; few rows a (sequence, KV head)
// run chunk-major, each 64-position chunk of K/V packed into L1 once for all of them) where it is
// built and the AMX tiles are not used. One core of the AMD EPYC host (no AMX), SmolLM2's 9
// query / 3 KV heads, one layer, against this file's kernels:
//   - 5 new tokens (a verify row) over 2,000 positions: 266 us against 655; eight such
//     sequences 3.36 against 5.89 ms (attend_multi's cost grows with the rows);
//   - decode over 2,000 positions: 102 us against 124; over 300: 17 against 21, eight
//     sequences 127 against 145; eight over 1,000 399-460 against 479-750. Eight over 2,000
//     (out of cache) swung between runs: 0.98-1.23 ms against 1.07-1.84.
bool chunk_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& context_lens,
                const std::vector<int64_t>& starts, double scale, at::Tensor& out) {
#ifdef DISTSERVE_CHUNK_ATTENTION
#ifdef DISTSERVE_AMX_ATTENTION
  if (amx_attention_enabled()) return false;
#endif
  return distserve::chunk_attention_enabled() &&
         distserve::chunk_attention(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out);
#else
  return false;
#endif
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  check_paged(q, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(block_tables.size(0) == q.size(0), "one block table row and one context length per sequence");
  at::Tensor out = at::empty_like(q);
  std::vector<int64_t> starts(q.size(0) + 1);
  for (int64_t b = 0; b <= q.size(0); ++b) starts[b] = b;
  if (chunk_rows(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out)) return out;
  if (q.scalar_type() == at::kBFloat16) {
    if (!dispatch_fixed<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out))
      decode_kernel<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else {
    if (!dispatch_fixed<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out))
      decode_kernel<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  }
  return out;
}

// Sequence s has query_lens[s] new tokens (rows of q, sequence after sequence; at most
// kMaxQuery each) and context_lens[s] positions including them; token j of s attends to the first
// context_lens[s] - query_lens[s] + 1 + j. Head sizes 64 / 128 with 1-8 query heads per KV head
// only (false otherwise: the caller runs its other path).
at::Tensor paged_prefix_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, const at::Tensor& query_lens,
                                  double scale) {
  check_paged(q, k_cache, v_cache, block_tables, context_lens);
  const std::vector<int64_t> starts = distserve::query_starts(q, block_tables, context_lens, query_lens, kMaxQuery);
  at::Tensor out = at::empty_like(q);
  if (chunk_rows(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out)) return out;
  const bool done = q.scalar_type() == at::kBFloat16
      ? dispatch_multi<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out)
      : dispatch_multi<float>(q, k_cache, v_cache, block_tables, context_lens, starts, scale, out);
  TORCH_CHECK(done, "paged_prefix_attention: head size ", q.size(2), " with ", q.size(1) / k_cache.size(1),
              " query heads per KV head is not built (64 or 128, 1-8)");
  return out;
}

}  // namespace

TORCH_LIBRARY(distserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("paged_prefix_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, Tensor query_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_prefix_attention", &paged_prefix_attention);
}
