// A decode step's whole layer stack in one call: for each Llama layer, the norms, the int4
// projections, RoPE, the K/V store and paged attention, run from C++ through the dispatcher
// (the ops registered by the other files here), so a step pays no Python per op. On one core
// a batch-1 step of SmolLM2 spent about 8 of its 22 ms in Python and torch's Python dispatch
// (docs/profile_step.md); its kernels are unchanged, and so is every rounding: the same ops run
// in the same order on the same tensors as backends/core/model.py's DecoderLayer.forward.
//
// decode_layers(x [N, D], weights (11 per layer, below), cos, signed_sin [N, hd], k_caches, v_caches (one per layer), block_tables, seq_lens, slot_blocks,
//               slot_offsets [N], query_lens (None: one new token per sequence, paged decode;
//               else each sequence's new tokens, paged prefix attention), heads, kv_heads,
//               eps, scale, num_decodes) -> (x, delta): the residual stream before the last
//               layer's MLP output `delta` is added (the caller's final norm adds it).
// num_decodes > 0 with query_lens: a mixed step of short rows (a speculative step where some
// sequences carry a draft): its first num_decodes sequences decode one token each (paged
// decode), query_lens gives the rest's new tokens (paged prefix attention), as the Python
// loop splits a mixed step.
// Per layer: input_norm [D], post_norm [D], qkv codes, qkv scales/offsets, qkv bias (an empty
// tensor where there is none), o codes, o s/o, gate_up codes, gate_up s/o, down codes, down s/o.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
constexpr int64_t kPerLayer = 11;

using Linear = Tensor(const Tensor&, const Tensor&, const Tensor&);
using AddNorm = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double);
using Rope = Tensor(const Tensor&, const Tensor&, const Tensor&);
using Unary = Tensor(const Tensor&);
using Decode = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double);
using Prefix = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, double);
using Int8 = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    const Tensor&, const Tensor&, const Tensor&, double);

struct Ops {
  c10::TypedOperatorHandle<Linear> quant_linear;
  c10::TypedOperatorHandle<AddNorm> add_rms_norm;
  c10::TypedOperatorHandle<Rope> rope;
  c10::TypedOperatorHandle<Unary> silu_and_mul;
  c10::TypedOperatorHandle<Decode> decode;
  c10::TypedOperatorHandle<Prefix> prefix;
};

const Ops& ops() {            // looked up once; quant_linear throws here where it is not built
  static const Ops o = [] {
    auto& d = c10::Dispatcher::singleton();
    return Ops{d.findSchemaOrThrow("distserve::quant_linear", "").typed<Linear>(),
               d.findSchemaOrThrow("distserve::add_rms_norm", "").typed<AddNorm>(),
               d.findSchemaOrThrow("distserve::rope", "").typed<Rope>(),
               d.findSchemaOrThrow("distserve::silu_and_mul", "").typed<Unary>(),
               d.findSchemaOrThrow("distserve::paged_decode_attention", "").typed<Decode>(),
               d.findSchemaOrThrow("distserve::paged_prefix_attention", "").typed<Prefix>()};
  }();
  return o;
}

// int8 KV's op (chunk_attention.cpp, or chunk_attention_avx2.cpp), looked up where a step needs it:
// it is built only on hosts with AVX-512 BF16 or AVX2
const c10::TypedOperatorHandle<Int8>& int8_op() {
  static const auto o = c10::Dispatcher::singleton().findSchemaOrThrow("distserve::paged_attention_int8", "").typed<Int8>();
  return o;
}

// rows [N, heads, hd] (bf16; rows strided, heads dense) -> int8 values at cache[blocks[i], :,
// offsets[i]] and bf16 scales at scales[blocks[i], :, offsets[i]], as kv_cache.quantize_kv
// rounds them: scale = absmax / 127 rounded up to bf16; value = x / scale rounded half to even
void store_rows_int8(const Tensor& rows, const Tensor& cache, const Tensor& scales, const int64_t* blocks,
                     const int64_t* offsets) {
  const int64_t n = rows.size(0), heads = rows.size(1), hd = rows.size(2);
  const auto* src = static_cast<const c10::BFloat16*>(rows.data_ptr());
  auto* dst = static_cast<int8_t*>(cache.data_ptr());
  auto* sdst = static_cast<c10::BFloat16*>(scales.data_ptr());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const c10::BFloat16* x = src + i * rows.stride(0) + h * rows.stride(1);
      float amax = 0.f;
      for (int64_t j = 0; j < hd; ++j) amax = std::max(amax, std::fabs(static_cast<float>(x[j])));
      uint32_t bits;
      const float ratio = amax / 127.f;
      std::memcpy(&bits, &ratio, sizeof bits);
      bits = (bits + 0xFFFFu) & 0xFFFF0000u;            // the smallest bf16 >= ratio
      float scale;
      std::memcpy(&scale, &bits, sizeof scale);
      const float inv = 1.f / std::max(scale, std::numeric_limits<float>::min());
      sdst[blocks[i] * scales.stride(0) + h * scales.stride(1) + offsets[i]] = c10::BFloat16(scale);
      int8_t* out = dst + blocks[i] * cache.stride(0) + h * cache.stride(1) + offsets[i] * cache.stride(2);
      for (int64_t j = 0; j < hd; ++j) out[j] = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[j]) * inv));
    }
}

// rows [N, heads, hd] (rows strided, heads dense) -> cache[blocks[i], :, offsets[i]]
void store_rows(const Tensor& rows, const Tensor& cache, const int64_t* blocks, const int64_t* offsets) {
  const int64_t n = rows.size(0), heads = rows.size(1), hd = rows.size(2);
  const int64_t bytes = hd * rows.element_size();
  const auto* src = static_cast<const char*>(rows.data_ptr());
  auto* dst = static_cast<char*>(cache.data_ptr());
  const int64_t es = rows.element_size();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(dst + (blocks[i] * cache.stride(0) + h * cache.stride(1) + offsets[i] * cache.stride(2)) * es,
                  src + (i * rows.stride(0) + h * rows.stride(1)) * es, bytes);
}

Tensor linear(const Ops& op, const Tensor& x, const Tensor& codes, const Tensor& so, const Tensor& bias) {
  Tensor y = op.quant_linear.call(x, codes, so);
  return bias.defined() && bias.numel() ? y.add_(bias) : y;
}

// One layer's attention: paged decode, paged prefix attention, or both (a mixed step).
Tensor attention(const Ops& op, const Tensor& q, const Tensor& kc, const Tensor& vc,
                 const Tensor& block_tables, const Tensor& seq_lens,
                 const std::optional<Tensor>& query_lens, int64_t d, double scale) {
  if (!query_lens.has_value()) return op.decode.call(q, kc, vc, block_tables, seq_lens, scale);
  if (d == 0) return op.prefix.call(q, kc, vc, block_tables, seq_lens, *query_lens, scale);
  const int64_t s = seq_lens.size(0), n = q.size(0);
  return at::cat({op.decode.call(q.narrow(0, 0, d), kc, vc, block_tables.narrow(0, 0, d),
                                 seq_lens.narrow(0, 0, d), scale),
                  op.prefix.call(q.narrow(0, d, n - d), kc, vc, block_tables.narrow(0, d, s - d),
                                 seq_lens.narrow(0, d, s - d), *query_lens, scale)});
}

std::tuple<Tensor, Tensor> decode_layers(
    const Tensor& x_in, at::TensorList weights, const Tensor& cos, const Tensor& signed_sin,
    at::TensorList k_caches, at::TensorList v_caches, const Tensor& block_tables,
    const Tensor& seq_lens, const Tensor& slot_blocks, const Tensor& slot_offsets,
    const std::optional<Tensor>& query_lens, int64_t heads, int64_t kv_heads, double eps,
    double scale, int64_t num_decodes, at::TensorList k_scales, at::TensorList v_scales) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(v_caches.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == layers * kPerLayer,
              "decode_layers: ", kPerLayer, " weights and one K and one V cache per layer");
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous(), "decode_layers: x must be a contiguous [N, D]");
  const int64_t n = x_in.size(0), hd = cos.size(1);
  TORCH_CHECK(n > 0 && cos.size(0) == n && signed_sin.sizes() == cos.sizes(), "decode_layers: one cos/sin row per token");
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong &&
                  slot_blocks.is_contiguous() && slot_offsets.is_contiguous() &&
                  slot_blocks.numel() == n && slot_offsets.numel() == n,
              "decode_layers: one int64 slot (block, offset) per token");
  TORCH_CHECK(num_decodes >= 0 && num_decodes <= n && num_decodes <= seq_lens.size(0) &&
                  block_tables.size(0) == seq_lens.size(0) &&
                  (num_decodes == 0 || (query_lens.has_value() && query_lens->dim() == 1 &&
                                        query_lens->size(0) == seq_lens.size(0) - num_decodes &&
                                        num_decodes < n)),
              "decode_layers: num_decodes needs query_lens for the other sequences (got ", num_decodes,
              " of ", seq_lens.size(0), " sequences, ", n, " tokens)");
  const int64_t* blocks = slot_blocks.data_ptr<int64_t>();
  const int64_t* offsets = slot_offsets.data_ptr<int64_t>();
  const bool quantized = !k_scales.empty();
  TORCH_CHECK(!quantized || (static_cast<int64_t>(k_scales.size()) == layers &&
                             static_cast<int64_t>(v_scales.size()) == layers && x_in.scalar_type() == at::kBFloat16),
              "decode_layers: int8 KV needs bf16 rows and one K and one V scale tensor per layer");
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor& kc = k_caches[l];
    const Tensor& vc = v_caches[l];
    const auto dtype = quantized ? at::kChar : x_in.scalar_type();
    TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes() && kc.strides() == vc.strides() &&
                    kc.scalar_type() == dtype && vc.scalar_type() == dtype &&
                    kc.size(1) == kv_heads && kc.size(3) == hd,
                "decode_layers: layer ", l, "'s K/V caches must be [blocks, ", kv_heads, ", block_size, ", hd,
                "] in x's dtype (int8 with scales)");
    if (quantized)       // the scales' layout: the attention op checks it before it reads
      TORCH_CHECK(k_scales[l].scalar_type() == at::kBFloat16 && v_scales[l].scalar_type() == at::kBFloat16 &&
                      k_scales[l].dim() == 3 && v_scales[l].sizes() == k_scales[l].sizes() &&
                      k_scales[l].size(0) == kc.size(0) && k_scales[l].size(1) == kv_heads &&
                      k_scales[l].size(2) == kc.size(2),
                  "decode_layers: layer ", l, "'s K/V scales must be bf16 [blocks, ", kv_heads, ", block_size]");
  }
  const int64_t num_blocks = k_caches[0].size(0), block_size = k_caches[0].size(2);
  for (int64_t i = 0; i < n; ++i)      // every write lands inside the pool (attention checks its reads)
    TORCH_CHECK(blocks[i] >= 0 && blocks[i] < num_blocks && offsets[i] >= 0 && offsets[i] < block_size,
                "decode_layers: slot (", blocks[i], ", ", offsets[i], ") outside the KV cache");

  const Ops& op = ops();
  Tensor rows;              // int8 KV: each sequence's new tokens, decodes' one included
  if (quantized) {
    const int64_t d = query_lens.has_value() ? num_decodes : seq_lens.size(0);
    rows = at::ones({d}, seq_lens.options().dtype(at::kInt));
    if (query_lens.has_value()) rows = at::cat({rows, query_lens->to(at::kInt)});
  }
  Tensor x = x_in, delta, normed;
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor* w = weights.data() + l * kPerLayer;
    if (l == 0) {
      normed = at::rms_norm(x, {x.size(1)}, w[0], eps);
    } else {
      std::tie(x, normed) = op.add_rms_norm.call(x, delta, w[0], eps);
    }
    Tensor qkv = linear(op, normed, w[2], w[3], w[4]);
    Tensor qk = op.rope.call(qkv.narrow(1, 0, (heads + kv_heads) * hd).view({n, heads + kv_heads, hd}),
                             cos, signed_sin);
    Tensor v = qkv.narrow(1, (heads + kv_heads) * hd, kv_heads * hd).view({n, kv_heads, hd});
    Tensor q = qk.narrow(1, 0, heads).contiguous();
    Tensor attn;
    if (quantized) {
      store_rows_int8(qk.narrow(1, heads, kv_heads), k_caches[l], k_scales[l], blocks, offsets);
      store_rows_int8(v, v_caches[l], v_scales[l], blocks, offsets);
      // every row on the chunk kernel in one call (decode rows are one new token each)
      attn = int8_op().call(q, k_caches[l], v_caches[l], k_scales[l], v_scales[l], block_tables, seq_lens,
                            rows, scale);
    } else {
      store_rows(qk.narrow(1, heads, kv_heads), k_caches[l], blocks, offsets);
      store_rows(v, v_caches[l], blocks, offsets);
      attn = attention(op, q, k_caches[l], v_caches[l], block_tables, seq_lens, query_lens, num_decodes, scale);
    }
    Tensor o = linear(op, attn.view({n, heads * hd}), w[5], w[6], Tensor());
    std::tie(x, normed) = op.add_rms_norm.call(x, o, w[1], eps);
    delta = linear(op, op.silu_and_mul.call(linear(op, normed, w[7], w[8], Tensor())), w[9], w[10], Tensor());
  }
  return {x, delta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor cos, Tensor signed_sin, Tensor[] k_caches, "
        "Tensor[] v_caches, Tensor block_tables, Tensor seq_lens, Tensor slot_blocks, Tensor slot_offsets, "
        "Tensor? query_lens, int heads, int kv_heads, float eps, float scale, int num_decodes, "
        "Tensor[] k_scales, Tensor[] v_scales) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}
