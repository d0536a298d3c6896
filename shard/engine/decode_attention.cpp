// Decode-step attention on CPU: one query token per row against that row's keys/values, read in
// place from the per-slot KV cache (strided views, fp32 or bf16), with the step's additive mask.
// torch's scaled_dot_product_attention runs a blocked flash kernel built for many queries; with one
// query per (row, head) it measured 2-4x slower than reading the cache once, and in bf16 slower than
// in fp32. Here each (row, head) reads its keys and values once, widening bf16 to fp32 in registers;
// scores, softmax and the weighted sum are fp32, the output is rounded once to the query's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_vector_ops.h"

namespace {

using namespace loraplex_cpu;

inline void store(float* dst, float v) { *dst = v; }
inline void store(uint16_t* dst, float v) { *dst = to_bf16(v); }

// q: [B, H, 1, D]; k, v: [B, Hkv, L, D] (last dim contiguous); mask: [B, 1, 1, L] or empty;
// out: [B, 1, H, D] contiguous.
template <typename t>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor* mask,
            torch::Tensor& out, float scaling) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = k.size(1), len = k.size(2), groups = heads / kv_heads;
  const t* q_ptr = reinterpret_cast<const t*>(q.data_ptr());
  const t* k_ptr = reinterpret_cast<const t*>(k.data_ptr());
  const t* v_ptr = reinterpret_cast<const t*>(v.data_ptr());
  const t* m_ptr = mask ? reinterpret_cast<const t*>(mask->data_ptr()) : nullptr;
  t* o_ptr = reinterpret_cast<t*>(out.data_ptr());
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t ms0 = mask ? mask->stride(0) : 0, ms3 = mask ? mask->stride(3) : 0;
  // Captured by value: OpenMP outlines the body, and values captured by reference would be
  // reloaded through pointers inside the loops (measured 1.5x slower on one thread).
  at::parallel_for(0, batch * heads, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> qf(dim), acc(dim), scores(len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, hk = h / groups;
      const t* qr = q_ptr + b * qs0 + h * qs1;
      for (int64_t d = 0; d < dim; ++d) qf[d] = to_float(qr[d]) * scaling;
      const t* kb = k_ptr + b * ks0 + hk * ks1;
      const t* vb = v_ptr + b * vs0 + hk * vs1;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t l = 0; l < len; ++l) {
        float s = dot(kb + l * ks2, qf.data(), dim);
        if (m_ptr) s += to_float(m_ptr[b * ms0 + l * ms3]);
        scores[l] = s;
        best = std::max(best, s);
      }
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < len; ++l) {
        const float p = std::exp(scores[l] - best);
        total += p;
        // A masked column (finfo.min added) underflows to exactly 0: skip reading its values.
        if (p != 0.f) axpy(acc.data(), p, vb + l * vs2, dim);
      }
      const float inv = 1.f / total;
      t* orow = o_ptr + (b * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) store(orow + d, acc[d] * inv);
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::optional<torch::Tensor> mask,
                               double scaling) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q [B, H, 1, D], k/v [B, Hkv, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v share a dtype");
  TORCH_CHECK(q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16, "fp32 or bf16 only");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3), "shape mismatch");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dimension must be contiguous");
  torch::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == q.scalar_type(), "the mask shares the query's dtype");
    TORCH_CHECK(m.dim() == 4 && m.size(2) == 1 && m.size(3) == k.size(2) && (m.size(0) == q.size(0) || m.size(0) == 1),
                "mask [B, 1, 1, L]");
    TORCH_CHECK(m.size(1) == 1, "one mask for all heads");
    if (m.size(0) == 1) m = m.expand({q.size(0), 1, 1, k.size(2)});
  }
  auto out = torch::empty({q.size(0), 1, q.size(1), q.size(3)}, q.options());
  const torch::Tensor* mp = mask.has_value() ? &m : nullptr;
  if (q.scalar_type() == torch::kFloat) {
    attend<float>(q, k, v, mp, out, static_cast<float>(scaling));
  } else {
    attend<uint16_t>(q, k, v, mp, out, static_cast<float>(scaling));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "softmax(q k^T * scaling + mask) v for one query token per row; returns [B, 1, H, D]");
}
