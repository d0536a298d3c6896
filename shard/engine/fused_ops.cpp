// The elementwise parts of a Llama-family decoder layer, fused for CPU (fp32 or bf16 activations):
// RMSNorm (optionally after the residual add), rotary position embedding in place, SiLU(gate)*up;
// and the copy of a forward's keys/values into the engine's KV cache (scatter_tokens_).
// Each is one pass over its rows instead of the 4-7 separate ops (each a full read and write of
// the activations, each with its own OpenMP region) that the stock modules run; on a 2-core CPU
// those ops were ~20% of a bf16 prefill and ~15% of a decode step. Every intermediate that the
// stock modules round to the activation dtype is rounded here at the same point, so bf16 results
// match them except where an fp32 sum is reassociated (one bf16 ulp, rarely).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_vector_ops.h"

namespace {

using namespace loraplex_cpu;

void check_rows(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, what, ": fp32 or bf16 only");
  TORCH_CHECK(x.is_contiguous(), what, ": contiguous tensors only");
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)), the statistic in fp32. With `delta`, the
// residual is first updated in place: x = round(x + delta), and that sum is what is normed.
template <typename t>
void rms_rows(t* x, const t* delta, const t* weight, t* out, int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      t* xr = x + r * width;
      const t* dr = delta != nullptr ? delta + r * width : nullptr;
      t* o = out + r * width;
      int64_t c = 0;
      float squares = 0.f;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; c + 16 <= width; c += 16) {
        __m512 v = load16(xr + c);
        if (dr != nullptr) {
          v = round16(_mm512_add_ps(v, load16(dr + c)), xr);
          store16(xr + c, v);
        }
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      squares = _mm512_reduce_add_ps(acc);
#endif
      for (; c < width; ++c) {
        float v = to_float(xr[c]);
        if (dr != nullptr) {
          v = round1(v + to_float(dr[c]), xr);
          store1(xr + c, v);
        }
        squares += v * v;
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      c = 0;
#if defined(__AVX512F__)
      const __m512 inv16 = _mm512_set1_ps(inv);
      for (; c + 16 <= width; c += 16) {
        const __m512 normed = round16(_mm512_mul_ps(load16(xr + c), inv16), xr);
        store16(o + c, _mm512_mul_ps(load16(weight + c), normed));
      }
#endif
      for (; c < width; ++c) {
        const float normed = round1(to_float(xr[c]) * inv, xr);
        store1(o + c, to_float(weight[c]) * normed);
      }
    }
  });
}

template <typename t>
t* ptr(const torch::Tensor& x) {
  return reinterpret_cast<t*>(x.data_ptr());
}

torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
  check_rows(x, "rms_norm input");
  check_rows(weight, "rms_norm weight");
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width, "rms_norm: weight [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and input share a dtype");
  if (delta.has_value()) {
    check_rows(*delta, "rms_norm delta");
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(), "rms_norm: delta like input");
  }
  auto out = torch::empty_like(x);
  const int64_t rows = x.numel() / width;
  if (x.scalar_type() == torch::kFloat) {
    rms_rows<float>(ptr<float>(x), delta ? ptr<float>(*delta) : nullptr, ptr<float>(weight), ptr<float>(out), rows,
                    width, static_cast<float>(eps));
  } else {
    rms_rows<uint16_t>(ptr<uint16_t>(x), delta ? ptr<uint16_t>(*delta) : nullptr, ptr<uint16_t>(weight),
                       ptr<uint16_t>(out), rows, width, static_cast<float>(eps));
  }
  return out;
}

// x: [N, heads, dim] (N = batch * tokens), cos/sin: [N, dim]. In place:
// x = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1].
template <typename t>
void rotate_rows(t* x, const t* cos, const t* sin, int64_t n, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, n * heads, 64, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      t* xr = x + i * dim;
      const t* c = cos + (i / heads) * dim;
      const t* s = sin + (i / heads) * dim;
      int64_t d = 0;
#if defined(__AVX512F__)
      for (; d + 16 <= half; d += 16) {
        const __m512 x1 = load16(xr + d), x2 = load16(xr + d + half);
        const __m512 a1 = round16(_mm512_mul_ps(x1, load16(c + d)), xr);
        const __m512 b1 = round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + d)), xr);
        const __m512 a2 = round16(_mm512_mul_ps(x2, load16(c + d + half)), xr);
        const __m512 b2 = round16(_mm512_mul_ps(x1, load16(s + d + half)), xr);
        store16(xr + d, _mm512_add_ps(a1, b1));
        store16(xr + d + half, _mm512_add_ps(a2, b2));
      }
#endif
      for (; d < half; ++d) {
        const float x1 = to_float(xr[d]), x2 = to_float(xr[d + half]);
        const float a1 = round1(x1 * to_float(c[d]), xr);
        const float b1 = round1(-x2 * to_float(s[d]), xr);
        const float a2 = round1(x2 * to_float(c[d + half]), xr);
        const float b2 = round1(x1 * to_float(s[d + half]), xr);
        store1(xr + d, a1 + b1);
        store1(xr + d + half, a2 + b2);
      }
    }
  });
}

void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_rows(x, "rotary input");
  check_rows(cos, "rotary cos");
  check_rows(sin, "rotary sin");
  TORCH_CHECK(x.dim() == 4, "rotary: input [batch, tokens, heads, dim]");
  const int64_t n = x.size(0) * x.size(1), heads = x.size(2), dim = x.size(3);
  TORCH_CHECK(dim % 2 == 0, "rotary: even head dim");
  TORCH_CHECK(cos.numel() == n * dim && sin.numel() == n * dim, "rotary: cos/sin [batch, tokens, dim]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rotary: one dtype");
  if (x.scalar_type() == torch::kFloat) {
    rotate_rows<float>(ptr<float>(x), ptr<float>(cos), ptr<float>(sin), n, heads, dim);
  } else {
    rotate_rows<uint16_t>(ptr<uint16_t>(x), ptr<uint16_t>(cos), ptr<uint16_t>(sin), n, heads, dim);
  }
}

// out = round(round(silu(gate)) * up), silu(g) = g / (1 + exp(-g)) in fp32.
template <typename t>
void silu_mul_rows(const t* gate, const t* up, t* out, int64_t n) {
  at::parallel_for(0, n, 4096, [=](int64_t begin, int64_t end) {
    int64_t i = begin;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= end; i += 16) {
      const __m512 g = load16(gate + i);
      const __m512 act = round16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))), out);
      store16(out + i, _mm512_mul_ps(act, load16(up + i)));
    }
#endif
    for (; i < end; ++i) {
      const float g = to_float(gate[i]);
      const float act = round1(g / (1.f + exp_approx(-g)), out);
      store1(out + i, act * to_float(up[i]));
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  check_rows(gate, "silu_mul gate");
  check_rows(up, "silu_mul up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "silu_mul: gate and up alike");
  auto out = torch::empty_like(gate);
  if (gate.scalar_type() == torch::kFloat) {
    silu_mul_rows<float>(ptr<float>(gate), ptr<float>(up), ptr<float>(out), gate.numel());
  } else {
    silu_mul_rows<uint16_t>(ptr<uint16_t>(gate), ptr<uint16_t>(up), ptr<uint16_t>(out), gate.numel());
  }
  return out;
}

// cache[row[n], :, pos[n], :] = src[batch[n], :, step[n], :] for every n: the tokens of one forward
// written into their KV-cache rows and columns, one contiguous head vector at a time. Stock ops
// do it as a gather of the source and an indexed put, two passes with index checks (~13% of a
// bf16 prefill on a 2-core CPU).
void scatter_tokens_(torch::Tensor cache, torch::Tensor src, torch::Tensor batch, torch::Tensor step,
                     torch::Tensor row, torch::Tensor pos) {
  TORCH_CHECK(cache.device().is_cpu() && src.device().is_cpu(), "scatter_tokens_: CPU tensors only");
  TORCH_CHECK(cache.dim() == 4 && src.dim() == 4, "scatter_tokens_: cache [rows, heads, columns, dim], src [B, heads, W, dim]");
  TORCH_CHECK(cache.scalar_type() == src.scalar_type(), "scatter_tokens_: cache and src share a dtype");
  TORCH_CHECK(cache.size(1) == src.size(1) && cache.size(3) == src.size(3), "scatter_tokens_: heads and dim must match");
  TORCH_CHECK(cache.stride(3) == 1 && src.stride(3) == 1, "scatter_tokens_: the head dimension must be contiguous");
  for (const auto* index : {&batch, &step, &row, &pos}) {
    TORCH_CHECK(index->scalar_type() == torch::kLong && index->dim() == 1 && index->is_contiguous() &&
                    index->size(0) == batch.size(0),
                "scatter_tokens_: four int64 index vectors of one length");
  }
  const int64_t n = batch.size(0), heads = src.size(1), dim = src.size(3);
  const int64_t bytes = dim * src.element_size();
  const int64_t* b = batch.data_ptr<int64_t>();
  const int64_t* w = step.data_ptr<int64_t>();
  const int64_t* r = row.data_ptr<int64_t>();
  const int64_t* c = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(b[i] >= 0 && b[i] < src.size(0) && w[i] >= 0 && w[i] < src.size(2), "scatter_tokens_: source index out of range");
    TORCH_CHECK(r[i] >= 0 && r[i] < cache.size(0) && c[i] >= 0 && c[i] < cache.size(2), "scatter_tokens_: cache index out of range");
  }
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* from = static_cast<const char*>(src.data_ptr());
  const int64_t es = src.element_size();
  const int64_t cs0 = cache.stride(0) * es, cs1 = cache.stride(1) * es, cs2 = cache.stride(2) * es;
  const int64_t ss0 = src.stride(0) * es, ss1 = src.stride(1) * es, ss2 = src.stride(2) * es;
  at::parallel_for(0, n * heads, 256, [=](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = j / heads, h = j % heads;
      std::memcpy(dst + r[i] * cs0 + h * cs1 + c[i] * cs2, from + b[i] * ss0 + h * ss1 + w[i] * ss2, bytes);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without AVX-512 the kernels run their scalar loops, slower than torch's vectorized ops: the
  // caller then keeps the stock ops.
#if defined(__AVX512F__)
  m.attr("vectorized") = true;
#else
  m.attr("vectorized") = false;
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm of x's rows (after x += delta in place, when delta is given)");
  m.def("rotary_", &rotary_, "rotary position embedding of [batch, tokens, heads, dim], in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("scatter_tokens_", &scatter_tokens_, "cache[row[n], :, pos[n]] = src[batch[n], :, step[n]]");
}
