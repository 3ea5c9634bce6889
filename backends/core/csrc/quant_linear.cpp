// y = x @ W^T for int4 (or 8-bit) weights and few rows of x (decode steps, verify rows), on CPU cores with
// AVX-512 VNNI. torch's CPU int4 kernel dequantizes the weights again for every row of x (a
// step of 5 rows costs 2.5x a step of 1); here each unpacked weight serves every row.
//
// Weights (packed by backends/core/quant.py, `pack_int4_native`): W [N, K], N a multiple of 16
// and K of 32, in blocks of 32 inputs: w = q * s + o, q in [0, 16), (s, o) per (output, block).
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
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using distserve::load;
using distserve::store;

constexpr int64_t kBlock = 32;          // inputs per scale
constexpr int64_t kTile = 16;           // outputs per tile (the lanes)
template <int BITS>
constexpr int64_t kTileBytes = BITS * 64;   // codes of one tile x block: 512 codes
constexpr int kRowTile = 4;             // rows of x that share one unpacking of a block

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

inline __m512i pair(const int16_t* p) {   // inputs p[0], p[1] in every lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// rows [m0, m0 + R) of y, output tiles [t0, t1)
template <int BITS, int R, typename T>
void tile(const QuantRows& xq, int64_t k, int64_t m0, int64_t t0, int64_t t1, const uint8_t* codes,
          const uint16_t* so, T* y, int64_t ys) {
  const int64_t nb = k / kBlock;
  const __m512i low = _mm512_set1_epi16(0x0F);
  for (int64_t t = t0; t < t1; ++t) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* c = codes + (t * nb + b) * kTileBytes<BITS>;
      const uint16_t* sb = so + (t * nb + b) * 2 * kTile;
      __m512i w[16];                       // w[u]: inputs 2u, 2u+1; w[8 + u]: 16 + 2u, 17 + 2u
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

template <int BITS, typename T>
void rows_tile(int rows, const QuantRows& xq, int64_t k, int64_t m0, int64_t t0, int64_t t1,
               const uint8_t* codes, const uint16_t* so, T* y, int64_t ys) {
  switch (rows) {
    case 1: tile<BITS, 1>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 2: tile<BITS, 2>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    case 3: tile<BITS, 3>(xq, k, m0, t0, t1, codes, so, y, ys); break;
    default: tile<BITS, 4>(xq, k, m0, t0, t1, codes, so, y, ys); break;
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

#endif  // AVX-512 VNNI: on other CPUs the op is not registered and int4 layers use torch's kernel
