// Decode attention straight over the paged KV cache, on CPU cores.
//
// One query token per sequence; per (sequence, KV head) task the G query heads that share the
// KV head read that head's K and V block by block from the cache (no gathered copy, no padding
// to the batch's longest context, no mask): scores in float, a softmax, then the weighted sum
// of V, written in the query's dtype. Tasks run under at::parallel_for (the instance's intra-op
// threads). Compiled on the host that runs it (-march=native, backends/core/attention/native.py);
// the inner loops are plain float loops the compiler vectorizes (bf16 -> float is a 16-bit shift).
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
#include <vector>

#include "common.h"

namespace {

using distserve::load;

// Blocks are scattered over the pool, so the hardware prefetcher cannot see the next one
// coming: ask for it while the current one is computed.
template <typename T>
inline void prefetch_block(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off);
}

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

// The shapes of the models we serve (head size 64 or 128, 1-8 query heads per KV head).
template <typename T>
bool dispatch_fixed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& t,
                    const at::Tensor& l, double scale, at::Tensor& out) {
  const int64_t hd = q.size(2), G = q.size(1) / k.size(1);
#define DISTSERVE_CASE(HD_, G_) \
  if (hd == HD_ && G == G_) return run_fixed<T, HD_, G_>(q, k, v, t, l, scale, out);
#define DISTSERVE_GROUPS(HD_) \
  DISTSERVE_CASE(HD_, 1) DISTSERVE_CASE(HD_, 2) DISTSERVE_CASE(HD_, 3) DISTSERVE_CASE(HD_, 4) \
  DISTSERVE_CASE(HD_, 5) DISTSERVE_CASE(HD_, 6) DISTSERVE_CASE(HD_, 7) DISTSERVE_CASE(HD_, 8)
  DISTSERVE_GROUPS(64)
  DISTSERVE_GROUPS(128)
#undef DISTSERVE_GROUPS
#undef DISTSERVE_CASE
  return false;
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

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q [B, H, hd] and K/V caches [blocks, KVH, block_size, hd]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the KV cache must have one dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(1) == 0,
              "head_dim differs, or the query heads are not a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kInt,
              "block_tables must be int64 and context_lens int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  context_lens.numel() == q.size(0),
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
  for (int64_t b = 0; b < q.size(0); ++b) {          // never read outside the cache
    TORCH_CHECK(lens[b] > 0 && (lens[b] + bs - 1) / bs <= block_tables.size(1),
                "context length ", lens[b], " of sequence ", b, " does not fit its block table");
    for (int64_t n = 0; n < (lens[b] + bs - 1) / bs; ++n) {
      const int64_t blk = tables[b * block_tables.size(1) + n];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id ", blk, " out of [0, ", num_blocks, ")");
    }
  }
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) {
    if (!dispatch_fixed<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out))
      decode_kernel<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else if (q.scalar_type() == at::kFloat) {
    if (!dispatch_fixed<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out))
      decode_kernel<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(distserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
