// Fused element-wise steps of a Llama layer, on CPU cores: each one pass over its inputs in
// float, rounded once to the output dtype (the torch ops they replace round after every op and
// allocate an intermediate each). Tasks are rows, under at::parallel_for.
//
// - silu_and_mul(x [N, 2I]) -> [N, I]: silu(x[:, :I]) * x[:, I:]
// - add_rms_norm(x [N, D], delta [N, D], weight [D], eps) -> (x + delta, rms_norm(x + delta) * weight)
// - rope(x [N, heads, hd] (rows may be strided), cos [N, hd], signed_sin [N, hd])
//     -> x * cos + roll(x, hd / 2) * signed_sin, contiguous (signed_sin = [-sin_1, sin_2])
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "common.h"

namespace {

using distserve::load;
using distserve::store;

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": a 2-D tensor with dense rows");
}

template <typename T>
void silu_and_mul_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t n = x.size(0), inter = out.size(1), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = xp + r * xs;
      const T* up = gate + inter;
      T* o = op + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float g = load(gate[i]);
        store(o + i, g / (1.f + std::exp(-g)) * load(up[i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: an even number of columns (gate, up)");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (x.scalar_type() == at::kBFloat16) silu_and_mul_impl<c10::BFloat16>(x, out);
  else silu_and_mul_impl<float>(x, out);
  return out;
}

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                       double eps, at::Tensor& sum, at::Tensor& normed) {
  const int64_t n = x.size(0), d = x.size(1), xs = x.stride(0), ds = delta.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* dp = delta.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* sp = sum.data_ptr<T>();
  T* np_ = normed.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* s = sp + r * d;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        store(s + i, load(xp[r * xs + i]) + load(dp[r * ds + i]));
        const float v = load(s[i]);      // the residual as stored (rounded), as the torch ops norm it
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
      T* o = np_ + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) store(o + i, load(s[i]) * inv * load(wp[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm");
  check_rows(delta, "add_rms_norm");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(),
              "add_rms_norm: x and delta differ in shape or dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: weight must be [D], contiguous, x's dtype");
  at::Tensor sum = at::empty(x.sizes(), x.options()), normed = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16) add_rms_norm_impl<c10::BFloat16>(x, delta, weight, eps, sum, normed);
  else add_rms_norm_impl<float>(x, delta, weight, eps, sum, normed);
  return {sum, normed};
}

template <typename T>
void rope_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t n = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cp + r * hd;
      const T* s = sp + r * hd;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xi = xp + r * xs0 + h * xs1;
        T* o = op + (r * heads + h) * hd;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          store(o + i, load(xi[i]) * load(c[i]) + load(xi[i + half]) * load(s[i]));
          store(o + i + half, load(xi[i + half]) * load(c[i + half]) + load(xi[i]) * load(s[i + half]));
        }
      }
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rope: x must be [N, heads, hd] on CPU with dense, even-sized heads");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rope: float32 or bfloat16, got ", x.scalar_type());
  for (const at::Tensor* t : {&cos, &signed_sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2) &&
                    t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                "rope: cos and signed_sin must be [N, hd], contiguous, x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16) rope_impl<c10::BFloat16>(x, cos, signed_sin, out);
  else rope_impl<float>(x, cos, signed_sin, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope", &rope);
}
