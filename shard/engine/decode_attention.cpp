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
#include <type_traits>
#include <vector>

#include "cpu_vector_ops.h"

namespace {

using namespace loraplex_cpu;

// Where one (row, head) reads its query, keys, values and mask and writes its output.
template <typename t>
struct Operands {
  int64_t batch, heads, dim, len, groups;
  const t *q, *k, *v, *m;
  t* o;
  int64_t qs0, qs1, ks0, ks1, ks2, vs0, vs1, vs2, ms0, ms3;

  Operands(const torch::Tensor& q_, const torch::Tensor& k_, const torch::Tensor& v_, const torch::Tensor* mask,
           torch::Tensor& out)
      : batch(q_.size(0)), heads(q_.size(1)), dim(q_.size(3)), len(k_.size(2)), groups(q_.size(1) / k_.size(1)),
        q(reinterpret_cast<const t*>(q_.data_ptr())), k(reinterpret_cast<const t*>(k_.data_ptr())),
        v(reinterpret_cast<const t*>(v_.data_ptr())),
        m(mask ? reinterpret_cast<const t*>(mask->data_ptr()) : nullptr), o(reinterpret_cast<t*>(out.data_ptr())),
        qs0(q_.stride(0)), qs1(q_.stride(1)), ks0(k_.stride(0)), ks1(k_.stride(1)), ks2(k_.stride(2)),
        vs0(v_.stride(0)), vs1(v_.stride(1)), vs2(v_.stride(2)), ms0(mask ? mask->stride(0) : 0),
        ms3(mask ? mask->stride(3) : 0) {}

  const t* query(int64_t b, int64_t h) const { return q + b * qs0 + h * qs1; }
  const t* keys(int64_t b, int64_t h) const { return k + b * ks0 + (h / groups) * ks1; }
  const t* values(int64_t b, int64_t h) const { return v + b * vs0 + (h / groups) * vs1; }
  t* output(int64_t b, int64_t h) const { return o + (b * heads + h) * dim; }
};

// q: [B, H, 1, D]; k, v: [B, Hkv, L, D] (last dim contiguous); mask: [B, 1, 1, L] or empty;
// out: [B, 1, H, D] contiguous.
template <typename t>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor* mask,
            torch::Tensor& out, float scaling) {
  const Operands<t> ops(q, k, v, mask, out);
  const int64_t heads = ops.heads, dim = ops.dim, len = ops.len, ks2 = ops.ks2, vs2 = ops.vs2, ms3 = ops.ms3;
  // Captured by value: OpenMP outlines the body, and values captured by reference would be
  // reloaded through pointers inside the loops (measured 1.5x slower on one thread).
  at::parallel_for(0, ops.batch * heads, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> qf(dim), acc(dim), scores(len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const t* qr = ops.query(b, h);
      for (int64_t d = 0; d < dim; ++d) qf[d] = to_float(qr[d]) * scaling;
      const t* kb = ops.keys(b, h);
      const t* vb = ops.values(b, h);
      const t* m_ptr = ops.m;
      const int64_t ms0 = ops.ms0;
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
      t* orow = ops.output(b, h);
      for (int64_t d = 0; d < dim; ++d) store1(orow + d, acc[d] * inv);
    }
  });
}

#if defined(__AVX512F__)
// The lane sums of 16 vectors in one: result[4k + i] is the sum of v[4i + k]. Three rounds of
// adding halves (28 shuffles and 15 adds for 16 sums, against ~8 shuffles and adds per sum for
// a separate horizontal reduction of each).
inline __m512 lane_sums16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  const __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(y0), _mm512_castps_pd(y1))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(y0), _mm512_castps_pd(y1))));
}

// The same computation with the head dimension held in NV registers of 16 lanes: the query and
// the weighted sum of values stay in registers across keys, and the scores are exponentiated 16
// at a time (a scalar exp per key was most of the kernel's time).
// scores[0..len) = products(key l) summed over its lanes, 16 keys at a time where it can.
template <typename t, typename Products>
inline void score_keys(float* scores, const t* kb, int64_t len, int64_t ks2, const Products& products) {
  int64_t l = 0;
  for (; l + 16 <= len; l += 16) {
    __m512 block[16];
    // key l + 4k + i goes to block[4i + k], so that lane_sums16 returns the scores in order
    for (int j = 0; j < 16; ++j) block[(j & 3) * 4 + (j >> 2)] = products(kb + (l + j) * ks2);
    _mm512_storeu_ps(scores + l, lane_sums16(block));
  }
  for (; l < len; ++l) scores[l] = _mm512_reduce_add_ps(products(kb + l * ks2));
}

// Adds the mask row (if any), exponentiates scores[0..padded) relative to their maximum in place
// and returns their sum; padding columns [len, padded) come out ~1e-38 and are never read.
template <typename t>
inline float softmax_numerators(float* scores, const t* mask_row, int64_t ms3, int64_t len, int64_t padded) {
  if (mask_row) {
    int64_t l = 0;
    if (ms3 == 1)
      for (; l + 16 <= len; l += 16)
        _mm512_storeu_ps(scores + l, _mm512_add_ps(_mm512_loadu_ps(scores + l), load16(mask_row + l)));
    for (; l < len; ++l) scores[l] += to_float(mask_row[l * ms3]);
  }
  for (int64_t l = len; l < padded; ++l) scores[l] = -std::numeric_limits<float>::infinity();
  __m512 best16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t l = 0; l < padded; l += 16) best16 = _mm512_max_ps(best16, _mm512_loadu_ps(scores + l));
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(best16));
  __m512 total16 = _mm512_setzero_ps();
  for (int64_t l = 0; l < padded; l += 16) {
    // exp16 clamps its input: the padding's -inf (and a masked column's finfo.min) become
    // exp(-87.3) ~ 1e-38 instead of 0, which no sum of in-range terms can notice.
    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + l), best));
    _mm512_storeu_ps(scores + l, p);
    total16 = _mm512_add_ps(total16, p);
  }
  return _mm512_reduce_add_ps(total16);
}

template <typename t, int NV>
void attend_vectorized(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor* mask, torch::Tensor& out, float scaling) {
  const Operands<t> ops(q, k, v, mask, out);
  const int64_t heads = ops.heads, len = ops.len, ks2 = ops.ks2, vs2 = ops.vs2, ms3 = ops.ms3;
  const int64_t padded = (len + 15) / 16 * 16;
  at::parallel_for(0, ops.batch * heads, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> scores(padded);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const t* qr = ops.query(b, h);
      __m512 qv[NV];
      for (int i = 0; i < NV; ++i) qv[i] = _mm512_mul_ps(load16(qr + 16 * i), _mm512_set1_ps(scaling));
      const t* vb = ops.values(b, h);
      score_keys(scores.data(), ops.keys(b, h), len, ks2, [&](const t* kr) {
        __m512 acc = _mm512_mul_ps(load16(kr), qv[0]);
        for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(load16(kr + 16 * i), qv[i], acc);
        return acc;
      });
      const float total = softmax_numerators(scores.data(), ops.m ? ops.m + b * ops.ms0 : nullptr, ms3, len, padded);
      __m512 acc[NV];
      for (int i = 0; i < NV; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t l = 0; l < len; ++l) {
        // A masked column's weight is ~1e-38 of the row's largest: skip reading its values.
        if (scores[l] < 1e-30f) continue;
        const __m512 p = _mm512_set1_ps(scores[l]);
        const t* vr = vb + l * vs2;
        for (int i = 0; i < NV; ++i) acc[i] = _mm512_fmadd_ps(p, load16(vr + 16 * i), acc[i]);
      }
      const __m512 inv = _mm512_set1_ps(1.f / total);
      t* orow = ops.output(b, h);
      for (int i = 0; i < NV; ++i) store16(orow + 16 * i, _mm512_mul_ps(acc[i], inv));
    }
  });
}

// bf16 keys and values, read 32 at a time (one 512-bit load) and widened without cross-lane
// shuffles (bf16_even / bf16_odd). The head dimension is thus held as two halves (even, odd) in
// registers; the output is interleaved back once. Measured on a 2-core Xeon (AMX, AVX-512 BF16),
// 12 layers of 32 rows x 12 heads x 96 tokens read from memory: 4.5 ms against 5.3 ms for the
// widening loads of attend_vectorized.

// bf16 with a head dimension of 32 * NP.
template <int NP>
void attend_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor* mask,
                 torch::Tensor& out, float scaling) {
  const Operands<uint16_t> ops(q, k, v, mask, out);
  const int64_t heads = ops.heads, len = ops.len, ks2 = ops.ks2, vs2 = ops.vs2, ms3 = ops.ms3;
  const int64_t padded = (len + 15) / 16 * 16;
  at::parallel_for(0, ops.batch * heads, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> scores(padded);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const uint16_t* qr = ops.query(b, h);
      __m512 qe[NP], qo[NP];
      for (int i = 0; i < NP; ++i) {
        const __m512i raw = _mm512_loadu_si512(qr + 32 * i);
        qe[i] = _mm512_mul_ps(bf16_even(raw), _mm512_set1_ps(scaling));
        qo[i] = _mm512_mul_ps(bf16_odd(raw), _mm512_set1_ps(scaling));
      }
      const uint16_t* kb = ops.keys(b, h);
      const uint16_t* vb = ops.values(b, h);
      // The next (row, head)'s keys and values are fetched into L2 while this one computes, a line
      // for every line read here (12 layers of 32 rows x 12 heads x 96 tokens from memory, on a
      // 2-core Xeon: 3.3 ms instead of 4.5).
      const int64_t next = bh + 1 < end ? bh + 1 : bh;
      const uint16_t* kb_next = ops.keys(next / heads, next % heads);
      const uint16_t* vb_next = ops.values(next / heads, next % heads);
      score_keys(scores.data(), kb, len, ks2, [&](const uint16_t* kr) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < NP; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(kb_next + (kr - kb) + 32 * i), _MM_HINT_T1);
          const __m512i raw = _mm512_loadu_si512(kr + 32 * i);
          acc = _mm512_fmadd_ps(bf16_even(raw), qe[i], acc);
          acc = _mm512_fmadd_ps(bf16_odd(raw), qo[i], acc);
        }
        return acc;
      });
      const float total = softmax_numerators(scores.data(), ops.m ? ops.m + b * ops.ms0 : nullptr, ms3, len, padded);
      __m512 even[NP], odd[NP];
      for (int i = 0; i < NP; ++i) even[i] = odd[i] = _mm512_setzero_ps();
      for (int64_t l = 0; l < len; ++l) {
        for (int i = 0; i < NP; ++i) _mm_prefetch(reinterpret_cast<const char*>(vb_next + l * vs2 + 32 * i), _MM_HINT_T1);
        if (scores[l] < 1e-30f) continue;
        const __m512 p = _mm512_set1_ps(scores[l]);
        const uint16_t* vr = vb + l * vs2;
        for (int i = 0; i < NP; ++i) {
          const __m512i raw = _mm512_loadu_si512(vr + 32 * i);
          even[i] = _mm512_fmadd_ps(p, bf16_even(raw), even[i]);
          odd[i] = _mm512_fmadd_ps(p, bf16_odd(raw), odd[i]);
        }
      }
      const __m512 inv = _mm512_set1_ps(1.f / total);
      uint16_t* orow = ops.output(b, h);
      for (int i = 0; i < NP; ++i) store32(orow + 32 * i, _mm512_mul_ps(even[i], inv), _mm512_mul_ps(odd[i], inv));
    }
  });
}

template <typename t>
bool attend_vectorized_if_fits(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor* mask, torch::Tensor& out, float scaling) {
  if constexpr (std::is_same_v<t, uint16_t>) {
    switch (q.size(3)) {
      case 64: attend_bf16<2>(q, k, v, mask, out, scaling); return true;
      case 128: attend_bf16<4>(q, k, v, mask, out, scaling); return true;
      case 256: attend_bf16<8>(q, k, v, mask, out, scaling); return true;
      default: break;
    }
  }
  switch (q.size(3)) {
    case 64: attend_vectorized<t, 4>(q, k, v, mask, out, scaling); return true;
    case 128: attend_vectorized<t, 8>(q, k, v, mask, out, scaling); return true;
    case 256: attend_vectorized<t, 16>(q, k, v, mask, out, scaling); return true;
    default: return false;
  }
}
#else
template <typename t>
bool attend_vectorized_if_fits(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor*,
                               torch::Tensor&, float) {
  return false;
}
#endif

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
  const float scale = static_cast<float>(scaling);
  if (q.scalar_type() == torch::kFloat) {
    if (!attend_vectorized_if_fits<float>(q, k, v, mp, out, scale)) attend<float>(q, k, v, mp, out, scale);
  } else {
    if (!attend_vectorized_if_fits<uint16_t>(q, k, v, mp, out, scale)) attend<uint16_t>(q, k, v, mp, out, scale);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "softmax(q k^T * scaling + mask) v for one query token per row; returns [B, 1, H, D]");
}
