// y = x @ W^T for int4 (or 8-bit) weights and few rows of x (decode steps, verify rows), on CPU
// cores with AVX-512 VNNI, or AVX2 (each vpdpwssd as vpmaddwd + vpaddd, below). torch's CPU int4 kernel dequantizes the weights again for every row of x (a
// step of 5 rows costs 2.5x a step of 1); here each unpacked weight serves every row.
//
// Weights (packed by backends/core/quant.py, `pack_int4_native`): W [N, K], N a multiple of 16
// and K of 32, in blocks of 32 inputs: w = q * s + o, q in [0, 16) (8-bit: [0, 256)), (s, o) per
// (output, block).
// Tiles of 16 outputs; for tile t and block b:
//   codes  uint8 [N/16, K/32, 256]: 8 chunks of 32 bytes; in chunk u, byte e is for output
//          16 t + e / 2: its low nibble holds the code of input 2 u + e % 2 of the block, its
//          high nibble that of input 16 + 2 u + e % 2;
//   8-bit codes (GGUF Q8_0, e.g. a tied head) take one byte each: uint8 [N/16, K/32, 512], 16
//          chunks of 32 bytes, chunk u for inputs 2 u, 2 u + 1 (byte e: output 16 t + e / 2);
//   so     float16 [N/16, K/32, 2, 16]: the 16 outputs' scales, then their offsets (GGUF Q4_0 /
//          Q4_1 keep these in fp16, so they are exact).
// Rows of x are quantized per block of 32 to int16 (d = max|x| / 32767: a bf16 row loses nothing
// of note), and
//   y[m, n] = sum_b s[n, b] d[m, b] sum_i q[n, i] xq[m, i]  +  o[n, b] sum_i x[m, i],
// the integer dot products by vpdpwssd with the 16 outputs of a tile in the 16 lanes (each
// instruction: 16 outputs x 2 inputs), the offset term on each block's exact float sum. Each row's
// result depends on that row alone (never on how many rows share the step). Tasks are tiles of
// outputs, under at::parallel_for.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define DISTSERVE_QL_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DISTSERVE_QL_AVX2 1     // the same kernel on 256-bit vectors: vpmaddwd + vpaddd for vpdpwssd
#endif

#if defined(DISTSERVE_QL_AVX512) || defined(DISTSERVE_QL_AVX2)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(DISTSERVE_QL_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define DISTSERVE_AMX 1
#include "amx.h"
#endif

#include "common.h"

namespace {

using distserve::load;
using distserve::store;

constexpr int64_t kBlock = 32;          // inputs per scale
constexpr int64_t kTile = 16;           // outputs per tile (the lanes)
template <int BITS>
constexpr int64_t kTileBytes = BITS * 64;   // codes of one tile x block: 512 codes
constexpr int kRowTile = 8;             // rows of x that share one unpacking of a block

struct QuantRows {                      // x, quantized per block of 32
  std::vector<int16_t> q;               // [M, K]
  std::vector<float> d;                 // [M, K / 32]: each block's scale
  std::vector<float> sum;               // [M, K / 32]: each block's exact sum
};

template <typename T>
QuantRows quantize_rows(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), xs = x.stride(0), nb = k / kBlock;
  QuantRows r{std::vector<int16_t>(m * k), std::vector<float>(m * nb), std::vector<float>(m * nb)};
  const T* xp = x.data_ptr<T>();
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t b = 0; b < nb; ++b) {
      float v[kBlock], amax = 0.f, sum = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) {
        v[i] = load(xp[row * xs + b * kBlock + i]);
        amax = std::max(amax, std::fabs(v[i]));
        sum += v[i];
      }
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      int16_t* q = r.q.data() + row * k + b * kBlock;
      for (int64_t i = 0; i < kBlock; ++i) q[i] = static_cast<int16_t>(std::nearbyint(v[i] * inv));
      r.d[row * nb + b] = amax / 32767.f;
      r.sum[row * nb + b] = sum;
    }
  }
  return r;
}

#ifdef DISTSERVE_QL_AVX512
__attribute__((always_inline)) inline __m512i pair(const int16_t* p) {   // inputs p[0], p[1] in every lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// One tile x block's codes as int16: w[p] holds input pair p (inputs 2p, 2p + 1 of the block) of
// the 16 outputs, element e = output e / 2, input 2p + e % 2.
template <int BITS>
__attribute__((always_inline)) inline void unpack(const uint8_t* c, __m512i* w) {
  const __m512i low = _mm512_set1_epi16(0x0F);
  for (int u = 0; u < 8; ++u) {
    if constexpr (BITS == 4) {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * u)));
      w[u] = _mm512_and_si512(bytes, low);
      w[8 + u] = _mm512_srli_epi16(bytes, 4);
    } else {                           // 8-bit: chunk u, then chunk 8 + u, one code a byte
      w[u] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * u)));
      w[8 + u] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * (8 + u))));
    }
  }
}

#else  // DISTSERVE_QL_AVX2: one tile as two halves of 8 outputs, a vpmaddwd + vpaddd per vpdpwssd

__attribute__((always_inline)) inline __m256i pair(const int16_t* p) {   // inputs p[0], p[1] in every lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// As the AVX-512 unpack, each 32-element vector split in two: w[2 p + h] holds input pair p of
// outputs 8 h .. 8 h + 7 (the first and second 16 bytes of each 32-byte chunk).
template <int BITS>
__attribute__((always_inline)) inline void unpack(const uint8_t* c, __m256i* w) {
  const __m256i low = _mm256_set1_epi16(0x0F);
  for (int u = 0; u < 8; ++u) {
    for (int h = 0; h < 2; ++h) {
      const __m128i* lo = reinterpret_cast<const __m128i*>(c + 32 * u + 16 * h);
      if constexpr (BITS == 4) {
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(lo));
        w[2 * u + h] = _mm256_and_si256(bytes, low);
        w[2 * (8 + u) + h] = _mm256_srli_epi16(bytes, 4);
      } else {
        const __m128i* hi = reinterpret_cast<const __m128i*>(c + 32 * (8 + u) + 16 * h);
        w[2 * u + h] = _mm256_cvtepu8_epi16(_mm_loadu_si128(lo));
        w[2 * (8 + u) + h] = _mm256_cvtepu8_epi16(_mm_loadu_si128(hi));
      }
    }
  }
}

#endif

// The codes and scales of the tile x block kPrefetch ahead, asked for before they are needed: a
// weight that does not fit in cache (the tied 8-bit head, 28 MB for SmolLM2) streams from memory
// while several rows' dot products run, where with the hardware prefetcher alone the two took
// turns. One AMD EPYC core (no AMX), the head, medians, without / with, two rounds alternated:
// 8 rows 4.9, 4.8 / 2.8, 2.9 ms; 16 rows 10.8, 9.0 / 5.7, 5.7; 1 row 1.5, 1.3 / 1.2, 1.3.
// Layers whose codes sit in cache gain nothing. Prefetching past the end is harmless.
constexpr int64_t kPrefetch = 8;
template <int BITS>
__attribute__((always_inline)) inline void prefetch(const uint8_t* c, const uint16_t* sb) {
  for (int64_t line = 0; line < kTileBytes<BITS>; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(c + line), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(sb), _MM_HINT_T0);
}

#ifdef DISTSERVE_QL_AVX512
// rows [m0, m0 + R) of y, output tiles [t0, t1)
template <int BITS, int R, typename T>
void tile(const QuantRows& xq, int64_t k, int64_t m0, int64_t t0, int64_t t1, const uint8_t* codes,
          const uint16_t* so, T* y, int64_t ys) {
  const int64_t nb = k / kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* c = codes + (t * nb + b) * kTileBytes<BITS>;
      const uint16_t* sb = so + (t * nb + b) * 2 * kTile;
      prefetch<BITS>(c + kPrefetch * kTileBytes<BITS>, sb + kPrefetch * 2 * kTile);
      __m512i w[16];
      unpack<BITS>(c, w);
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
      const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kTile)));
      for (int r = 0; r < R; ++r) {
        const int64_t row = m0 + r;
        const int16_t* xr = xq.q.data() + row * k + b * kBlock;
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();   // two chains
        for (int u = 0; u < 8; ++u) {
          lo = _mm512_dpwssd_epi32(lo, w[u], pair(xr + 2 * u));
          hi = _mm512_dpwssd_epi32(hi, w[8 + u], pair(xr + 16 + 2 * u));
        }
        const __m512i dot = _mm512_add_epi32(lo, hi);
        const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(xq.d[row * nb + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
        acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xq.sum[row * nb + b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float out[kTile];
      _mm512_store_ps(out, acc[r]);
      T* yr = y + (m0 + r) * ys + t * kTile;
      for (int64_t i = 0; i < kTile; ++i) store(yr + i, out[i]);
    }
  }
}

#else
// rows [m0, m0 + R) of y, output tiles [t0, t1); the integer dot products are the AVX-512
// kernel's exactly, and so is each lane's float arithmetic
template <int BITS, int R, typename T>
void tile(const QuantRows& xq, int64_t k, int64_t m0, int64_t t0, int64_t t1, const uint8_t* codes,
          const uint16_t* so, T* y, int64_t ys) {
  const int64_t nb = k / kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* c = codes + (t * nb + b) * kTileBytes<BITS>;
      const uint16_t* sb = so + (t * nb + b) * 2 * kTile;
      prefetch<BITS>(c + kPrefetch * kTileBytes<BITS>, sb + kPrefetch * 2 * kTile);
      __m256i w[32];
      unpack<BITS>(c, w);
      __m256 s[2], o[2];
      for (int h = 0; h < 2; ++h) {
        s[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 8 * h)));
        o[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + kTile + 8 * h)));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t row = m0 + r;
        const int16_t* xr = xq.q.data() + row * k + b * kBlock;
        __m256i lo[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, hi[2] = {lo[0], lo[1]};
        for (int u = 0; u < 8; ++u) {
          const __m256i xl = pair(xr + 2 * u), xh = pair(xr + 16 + 2 * u);
          for (int h = 0; h < 2; ++h) {
            lo[h] = _mm256_add_epi32(lo[h], _mm256_madd_epi16(w[2 * u + h], xl));
            hi[h] = _mm256_add_epi32(hi[h], _mm256_madd_epi16(w[2 * (8 + u) + h], xh));
          }
        }
        const __m256 d = _mm256_set1_ps(xq.d[row * nb + b]), sum = _mm256_set1_ps(xq.sum[row * nb + b]);
        for (int h = 0; h < 2; ++h) {
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(lo[h], hi[h]));
          acc[r][h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s[h], d), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(o[h], sum, acc[r][h]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float out[kTile];
      _mm256_store_ps(out, acc[r][0]);
      _mm256_store_ps(out + 8, acc[r][1]);
      T* yr = y + (m0 + r) * ys + t * kTile;
      for (int64_t i = 0; i < kTile; ++i) store(yr + i, out[i]);
    }
  }
}
#endif

template <int BITS, typename T>
void rows_tile(int rows, const QuantRows& xq, int64_t k, int64_t m0, int64_t t0, int64_t t1,
               const uint8_t* codes, const uint16_t* so, T* y, int64_t ys) {
  switch (rows) {
    case 1: tile<BITS, 1>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 2: tile<BITS, 2>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 3: tile<BITS, 3>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 4: tile<BITS, 4>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 5: tile<BITS, 5>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 6: tile<BITS, 6>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 7: tile<BITS, 7>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    default: tile<BITS, 8>(xq, k, m0, t0, t1, codes, so, y, ys); break;
  }
}

template <int BITS, typename T>
void quant_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& so, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1), n = y.size(1);
  const QuantRows xq = quantize_rows<T>(x);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(so.data_ptr<at::Half>());
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, n / kTile, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < m; m0 += kRowTile)
      rows_tile<BITS, T>(static_cast<int>(std::min<int64_t>(kRowTile, m - m0)), xq, k, m0, t0, t1, cp, sp, yp, n);
  });
}

#ifdef DISTSERVE_AMX
// Steps of kAmxMinRows or more bf16 rows run on the AMX tiles, up to 16 rows a pass: each tile x
// block's codes become bf16 integers once (exact: q < 256), one tile multiply gives every row's
// sum_i x[m, i] q[n, i] over the block in float32 (bf16 products are exact in float32), and
//   y[m, n] += s[n, b] * that + o[n, b] * sum_i x[m, i],
// as above but on x itself (no int16 rounding). Two result tiles take alternate blocks, so one
// block's multiply runs while the previous one's result is scaled. Up to 4 rows (one unpacking
// of each block serves them all) the int16 path costs less: one core, a SmolLM2 gate_up
// (576 -> 3072), 3 rows 62 us against 100 on the tiles, 4 rows 80 against 110, 5 rows 122
// against 111 (it unpacks again for the fifth); a batch-1 step verifying 2-3 draft tokens
// 9-12% faster.
constexpr int64_t kAmxMinRows = 5;
constexpr int64_t kAmxRows = 16;

using distserve::amx_permitted;
using distserve::TileConfig;

// w[p] (int16 codes) -> bf16 of the same integers, in the tile's layout (row p: pair p)
template <int BITS>
inline void codes_bf16(const __m512i* w, uint16_t* out) {
  for (int p = 0; p < 16; ++p) {
    __m512i v;
    if constexpr (BITS == 4) {         // a table of bf16(0..15): one permute
      const __m512i table = _mm512_set_epi16(
          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
          0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
          0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
      v = _mm512_permutexvar_epi16(w[p], table);
    } else {
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w[p])));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w[p], 1)));
      v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    _mm512_store_si512(out + 32 * p, v);
  }
}

// rows [m0, m0 + m) (m <= 16) of y for output tiles [t0, t1); xsum: [M, K / 32] block sums
template <int BITS>
void amx_rows(const c10::BFloat16* x, const float* xsum, int64_t m, int64_t k, int64_t m0, int64_t t0,
              int64_t t1, const uint8_t* codes, const uint16_t* so, c10::BFloat16* y, int64_t ys) {
  const int64_t nb = k / kBlock;
  TileConfig cfg;
  for (int i = 0; i < 2; ++i) {
    cfg.rows[i] = cfg.rows[2 + i] = static_cast<uint8_t>(m);  // C0, C1: m x 16 fp32; A0, A1: m x 32 bf16
    cfg.colsb[i] = cfg.colsb[2 + i] = 64;
    cfg.rows[4 + i] = 16;                                      // B0, B1: 16 pairs x (16 outputs x 2)
    cfg.colsb[4 + i] = 64;
  }
  distserve::load_config(cfg);
  alignas(64) uint16_t wbuf[2][16 * 32];
  alignas(64) float cbuf[kAmxRows * kTile];
  const c10::BFloat16* xr = x + m0 * k;
  const float* xs = xsum + m0 * nb;
  const int64_t stride = k * static_cast<int64_t>(sizeof(c10::BFloat16));
  __m512 acc[kAmxRows];
  // the previous block's result: scaled into acc while the next block multiplies
  auto scale_block = [&](int64_t t, int64_t b) {
    const uint16_t* sb = so + (t * nb + b) * 2 * kTile;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
    const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kTile)));
    for (int64_t r = 0; r < m; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_load_ps(cbuf + r * kTile), s, acc[r]);
      acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[r * nb + b]), acc[r]);
    }
  };
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t r = 0; r < m; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512i w[16];
      unpack<BITS>(codes + (t * nb + b) * kTileBytes<BITS>, w);
      codes_bf16<BITS>(w, wbuf[b & 1]);
      if (b & 1) {
        _tile_zero(1);
        _tile_loadd(3, xr + b * kBlock, stride);
        _tile_loadd(5, wbuf[1], 64);
        _tile_dpbf16ps(1, 3, 5);
      } else {
        _tile_zero(0);
        _tile_loadd(2, xr + b * kBlock, stride);
        _tile_loadd(4, wbuf[0], 64);
        _tile_dpbf16ps(0, 2, 4);
      }
      if (b > 0) {
        if (b & 1) _tile_stored(0, cbuf, 64);
        else _tile_stored(1, cbuf, 64);
        scale_block(t, b - 1);
      }
    }
    if ((nb - 1) & 1) _tile_stored(1, cbuf, 64);
    else _tile_stored(0, cbuf, 64);
    scale_block(t, nb - 1);
    for (int64_t r = 0; r < m; ++r) {
      alignas(64) float out[kTile];
      _mm512_store_ps(out, acc[r]);
      for (int64_t i = 0; i < kTile; ++i) store(y + (m0 + r) * ys + t * kTile + i, out[i]);
    }
  }
  _tile_release();
}

constexpr int64_t kAmxWideRows = 64;

// rows [0, m) of x, y (16 < m <= kAmxWideRows) for output tiles [t0, t1) in one pass, where
// scaling each row's block result (above) would cost more than the multiply: each block's codes
// become bf16 weights, w = bf16(q s + o) (the precision of the dense bf16 weights), so the result
// tiles accumulate every block with no per-row work, 16 rows a result tile (C tiles 0-3; B in
// tiles 4 and 7 for alternate blocks; A in tile 5, or 6 for the last, shorter chunk). One core,
// a SmolLM2 gate_up (576 -> 3072): 17 rows 243 us against 306 us by two 16-row passes, 32 rows
// 271 against 358, 64 rows 425 against 618.
// (tile numbers must be literals) C tile `C` += A (rows of chunk C) . B tile `B`
#define DISTSERVE_DQ_PRODUCT(C, B, LAST, A, STRIDE) \
  do {                                                \
    if (LAST) {                                       \
      _tile_loadd(6, A, STRIDE);                      \
      _tile_dpbf16ps(C, 6, B);                        \
    } else {                                          \
      _tile_loadd(5, A, STRIDE);                      \
      _tile_dpbf16ps(C, 5, B);                        \
    }                                                 \
  } while (0)
#define DISTSERVE_DQ_PRODUCTS(B, A, STEP, STRIDE, CHUNKS)                                     \
  do {                                                                                          \
    DISTSERVE_DQ_PRODUCT(0, B, (CHUNKS) == 1, A, STRIDE);                                       \
    if ((CHUNKS) > 1) DISTSERVE_DQ_PRODUCT(1, B, (CHUNKS) == 2, (A) + (STEP), STRIDE);          \
    if ((CHUNKS) > 2) DISTSERVE_DQ_PRODUCT(2, B, (CHUNKS) == 3, (A) + 2 * (STEP), STRIDE);      \
    if ((CHUNKS) > 3) DISTSERVE_DQ_PRODUCT(3, B, true, (A) + 3 * (STEP), STRIDE);               \
  } while (0)

template <int BITS>
void amx_dequant(const c10::BFloat16* x, int64_t m, int64_t k, int64_t t0, int64_t t1,
                 const uint8_t* codes, const uint16_t* so, c10::BFloat16* y, int64_t ys) {
  const int64_t nb = k / kBlock, chunks = (m + kAmxRows - 1) / kAmxRows;
  const int64_t last = m - (chunks - 1) * kAmxRows;
  TileConfig cfg;
  for (int64_t c = 0; c < chunks; ++c) cfg.rows[c] = static_cast<uint8_t>(c + 1 < chunks ? kAmxRows : last);
  cfg.rows[4] = cfg.rows[5] = cfg.rows[7] = 16;
  cfg.rows[6] = static_cast<uint8_t>(last);
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = cfg.rows[i] ? 64 : 0;
  distserve::load_config(cfg);
  alignas(64) uint16_t wbuf[2][16 * 32];
  alignas(64) float cbuf[kAmxWideRows * kTile];
  const int64_t stride = k * static_cast<int64_t>(sizeof(c10::BFloat16)), step = kAmxRows * k;
  // element e of a tile row is output e / 2: each output's scale and offset, twice
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  for (int64_t t = t0; t < t1; ++t) {
    _tile_zero(0);
    if (chunks > 1) _tile_zero(1);
    if (chunks > 2) _tile_zero(2);
    if (chunks > 3) _tile_zero(3);
    for (int64_t b = 0; b < nb; ++b) {
      __m512i w[16];
      unpack<BITS>(codes + (t * nb + b) * kTileBytes<BITS>, w);
      const uint16_t* sb = so + (t * nb + b) * 2 * kTile;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
      const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kTile)));
      const __m512 s_lo = _mm512_permutexvar_ps(lo_idx, s), s_hi = _mm512_permutexvar_ps(hi_idx, s);
      const __m512 o_lo = _mm512_permutexvar_ps(lo_idx, o), o_hi = _mm512_permutexvar_ps(hi_idx, o);
      uint16_t* wb = wbuf[b & 1];
      for (int p = 0; p < 16; ++p) {
        const __m512 lo = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w[p]))), s_lo, o_lo);
        const __m512 hi = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w[p], 1))), s_hi, o_hi);
        _mm512_store_si512(wb + 32 * p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      const c10::BFloat16* a = x + b * kBlock;
      if (b & 1) {
        _tile_loadd(7, wb, 64);
        DISTSERVE_DQ_PRODUCTS(7, a, step, stride, chunks);
      } else {
        _tile_loadd(4, wb, 64);
        DISTSERVE_DQ_PRODUCTS(4, a, step, stride, chunks);
      }
    }
    _tile_stored(0, cbuf, 64);
    if (chunks > 1) _tile_stored(1, cbuf + kAmxRows * kTile, 64);
    if (chunks > 2) _tile_stored(2, cbuf + 2 * kAmxRows * kTile, 64);
    if (chunks > 3) _tile_stored(3, cbuf + 3 * kAmxRows * kTile, 64);
    for (int64_t r = 0; r < m; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ys + t * kTile),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(cbuf + r * kTile)));
  }
  _tile_release();
}

template <int BITS>
void amx_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& so, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1), n = y.size(1), nb = k / kBlock;
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  // block sums, for the passes of at most 16 rows (the one pass of a short step, or a long step's tail)
  const int64_t tail = m % kAmxWideRows;
  const bool sums = m <= kAmxRows || (tail > 0 && tail <= kAmxRows);
  std::vector<float> xsum(sums ? m * nb : 0);
  for (int64_t r = 0; r < (sums ? m : 0); ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float sum = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) sum += load(xp[r * k + b * kBlock + i]);
      xsum[r * nb + b] = sum;
    }
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(so.data_ptr<at::Half>());
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n / kTile, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < m; m0 += kAmxWideRows) {
      const int64_t rows = std::min(kAmxWideRows, m - m0);
      if (rows <= kAmxRows) amx_rows<BITS>(xp, xsum.data(), rows, k, m0, t0, t1, cp, sp, yp, n);
      else amx_dequant<BITS>(xp + m0 * k, rows, k, t0, t1, cp, sp, yp + m0 * n, n);
    }
  });
}
#endif  // DISTSERVE_AMX

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& so) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && so.device().is_cpu(), "quant_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quant_linear: x must be 2-D with dense rows");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kBlock == 0, "quant_linear: the inputs (", k, ") must be a multiple of 32");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3 &&
                  codes.size(1) == k / kBlock && (codes.size(2) == kTileBytes<4> || codes.size(2) == kTileBytes<8>),
              "quant_linear: codes must be a contiguous uint8 [N / 16, K / 32, 256 (4-bit) or 512 (8-bit)] (K = ", k, ")");
  const bool eight = codes.size(2) == kTileBytes<8>;
  const int64_t tiles = codes.size(0);
  TORCH_CHECK(so.scalar_type() == at::kHalf && so.is_contiguous() && so.dim() == 4 && so.size(0) == tiles &&
                  so.size(1) == k / kBlock && so.size(2) == 2 && so.size(3) == kTile,
              "quant_linear: scales/offsets must be a contiguous float16 [N / 16, K / 32, 2, 16]");
  at::Tensor y = at::empty({x.size(0), tiles * kTile}, x.options());
  if (x.size(0) == 0) return y;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
#ifdef DISTSERVE_AMX
  if (bf16 && x.size(0) >= kAmxMinRows && x.is_contiguous() && amx_permitted()) {
    if (eight) amx_linear<8>(x, codes, so, y);
    else amx_linear<4>(x, codes, so, y);
    return y;
  }
#endif
  if (eight && bf16) quant_linear_impl<8, c10::BFloat16>(x, codes, so, y);
  else if (eight) quant_linear_impl<8, float>(x, codes, so, y);
  else if (bf16) quant_linear_impl<4, c10::BFloat16>(x, codes, so, y);
  else quant_linear_impl<4, float>(x, codes, so, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("quant_linear(Tensor x, Tensor codes, Tensor scales_offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("quant_linear", &quant_linear);
}

#endif  // AVX-512 VNNI or AVX2 + FMA: on other CPUs the op is not registered and int4 layers use torch's kernel
