// Decode-time LoRA delta on CPU, reading each row's adapter factors in place from the slot pool.
// For every entry e (row, slot, weight w):
//   out[row, t, :] += w * (A[slot, :rank, :] @ x[row, t, :]) @ Bt[slot, :rank, :]
// A row may have several entries (an adapter mix); they are adjacent, and one thread sums them all,
// so no two threads write one row.
// Stock ops must first gather every row's A and B into new tensors (write + re-read of about the
// base weights' bytes at 32 distinct adapters); this reads them once. Pools may be fp32 or bf16
// (converted to fp32 in registers; accumulation is fp32), activations fp32 or bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_vector_ops.h"

namespace {

using namespace loraplex_cpu;

// Entries [first[s], first[s + 1]) share one row. Rows must not decrease, so each row is one segment.
std::vector<int64_t> row_segments(const int64_t* rows, int64_t entries) {
  std::vector<int64_t> first;
  first.reserve(entries + 1);
  for (int64_t e = 0; e < entries; ++e) {
    if (e == 0 || rows[e] != rows[e - 1]) {
      TORCH_CHECK(e == 0 || rows[e] > rows[e - 1], "entries must be sorted by row");
      first.push_back(e);
    }
  }
  first.push_back(entries);
  return first;
}

template <typename act_t, typename pool_t>
void delta_rows(act_t* out, const act_t* x, const pool_t* a, const pool_t* bt, const int64_t* rows,
                const int64_t* slots, const float* weights, const std::vector<int64_t>& first, int64_t tokens,
                int64_t rank, int64_t in_f, int64_t out_f, int64_t pool_rank, int64_t x_row_stride,
                int64_t out_row_stride) {
  constexpr bool fp32_act = std::is_same<act_t, float>::value;
  const int64_t segments = static_cast<int64_t>(first.size()) - 1;
  // Captured by value, as in decode_attention.cpp: OpenMP outlines the body.
  at::parallel_for(0, segments, 1, [=, &first](int64_t begin, int64_t end) {
    std::vector<float> hidden(rank);
    std::vector<float> x_f32(fp32_act ? 0 : in_f), y_f32(fp32_act ? 0 : out_f);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t row = rows[first[s]];
      for (int64_t t = 0; t < tokens; ++t) {
        const act_t* x_in = x + row * x_row_stride + t * in_f;
        act_t* y_out = out + row * out_row_stride + t * out_f;
        const float* xr;
        float* yr;
        if constexpr (fp32_act) {
          xr = reinterpret_cast<const float*>(x_in);
          yr = reinterpret_cast<float*>(y_out);
        } else {
          widen(x_f32.data(), x_in, in_f);
          std::fill(y_f32.begin(), y_f32.end(), 0.f);
          xr = x_f32.data();
          yr = y_f32.data();
        }
        for (int64_t e = first[s]; e < first[s + 1]; ++e) {
          const pool_t* a_slot = a + slots[e] * pool_rank * in_f;
          const pool_t* b_slot = bt + slots[e] * pool_rank * out_f;
          const float w = weights ? weights[e] : 1.f;
          for (int64_t j = 0; j < rank; ++j) hidden[j] = w * dot(a_slot + j * in_f, xr, in_f);
          for (int64_t j = 0; j < rank; ++j) axpy(yr, hidden[j], b_slot + j * out_f, out_f);
        }
        if constexpr (!fp32_act) {
          for (int64_t k = 0; k < out_f; ++k) y_out[k] = to_bf16(to_float(y_out[k]) + yr[k]);
        }
      }
    }
  });
}

#if defined(__AVX512F__)
// bf16 activations over bf16 pools, the shard's bf16 default: the same sums, with fewer
// instructions per byte read (the generic loop widened every element and read and wrote the fp32
// output row once per rank; it reached ~14 GB/s on a 2-core Xeon against ~22 for fp32 pools).
// x @ A.T multiplies bf16 pairs straight into fp32 accumulators (AVX512-BF16's dot instruction,
// where the CPU has it); the output is built 32 columns at a time in registers, summing every
// entry's rank terms before the single rounding into the bf16 output.
void delta_rows_bf16(uint16_t* out, const uint16_t* x, const uint16_t* a, const uint16_t* bt, const int64_t* rows,
                     const int64_t* slots, const float* weights, const std::vector<int64_t>& first, int64_t tokens,
                     int64_t rank, int64_t in_f, int64_t out_f, int64_t pool_rank) {
  const int64_t segments = static_cast<int64_t>(first.size()) - 1;
  at::parallel_for(0, segments, 1, [=, &first](int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
    std::vector<float> hidden;
#else
    std::vector<float> x_f32(in_f), hidden;  // x widened once per token for the fp32 dot products
#endif
    for (int64_t s = begin; s < end; ++s) {
      const int64_t row = rows[first[s]], count = first[s + 1] - first[s];
      hidden.assign(count * rank, 0.f);
      // The next row's first adapter is fetched into L2 while this row computes, a cache line for
      // every line read here: each slot's factors are a new stream that the hardware prefetcher only
      // picks up after a few misses per page (12 layers of 32 distinct rank-16 adapters, 179 MB, on a
      // 2-core Xeon: 7.4 ms instead of 10.1).
      const int64_t next_slot = slots[s + 1 < end ? first[s + 1] : first[s]];
      const uint16_t* a_next = a + next_slot * pool_rank * in_f;
      const uint16_t* b_next = bt + next_slot * pool_rank * out_f;
      for (int64_t t = 0; t < tokens; ++t) {
        const uint16_t* xr = x + (row * tokens + t) * in_f;
        uint16_t* y = out + (row * tokens + t) * out_f;
#if !defined(__AVX512BF16__)
        widen(x_f32.data(), xr, in_f);
#endif
        for (int64_t e = 0; e < count; ++e) {
          const uint16_t* a_slot = a + slots[first[s] + e] * pool_rank * in_f;
          const float w = weights ? weights[first[s] + e] : 1.f;
          for (int64_t j = 0; j < rank; ++j) {
            const uint16_t* ar = a_slot + j * in_f;
#if defined(__AVX512BF16__)
            __m512 acc = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= in_f; k += 32) {
              _mm_prefetch(reinterpret_cast<const char*>(a_next + j * in_f + k), _MM_HINT_T1);
              acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(ar + k), (__m512bh)_mm512_loadu_si512(xr + k));
            }
            float sum = _mm512_reduce_add_ps(acc);
            for (; k < in_f; ++k) sum += to_float(ar[k]) * to_float(xr[k]);
            hidden[e * rank + j] = w * sum;
#else
            hidden[e * rank + j] = w * dot(ar, x_f32.data(), in_f);
#endif
          }
        }
        int64_t c = 0;
        // 32 columns a load (even and odd halves, two accumulation chains): the factors' bytes are
        // most of a LoRA decode step, and 16-column widening loads read them at ~17 GB/s.
        for (; c + 32 <= out_f; c += 32) {
          __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
          for (int64_t e = 0; e < count; ++e) {
            const uint16_t* b_slot = bt + slots[first[s] + e] * pool_rank * out_f + c;
            for (int64_t j = 0; j < rank; ++j) {
              const __m512 h = _mm512_set1_ps(hidden[e * rank + j]);
              const __m512i raw = _mm512_loadu_si512(b_slot + j * out_f);
              _mm_prefetch(reinterpret_cast<const char*>(b_next + j * out_f + c), _MM_HINT_T1);
              even = _mm512_fmadd_ps(h, bf16_even(raw), even);
              odd = _mm512_fmadd_ps(h, bf16_odd(raw), odd);
            }
          }
          const __m512i y_raw = _mm512_loadu_si512(y + c);
          store32(y + c, _mm512_add_ps(bf16_even(y_raw), even), _mm512_add_ps(bf16_odd(y_raw), odd));
        }
        for (; c + 16 <= out_f; c += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t e = 0; e < count; ++e) {
            const uint16_t* b_slot = bt + slots[first[s] + e] * pool_rank * out_f + c;
            for (int64_t j = 0; j < rank; ++j) {
              acc = _mm512_fmadd_ps(_mm512_set1_ps(hidden[e * rank + j]), load16(b_slot + j * out_f), acc);
            }
          }
          store16(y + c, _mm512_add_ps(load16(y + c), acc));
        }
        for (; c < out_f; ++c) {
          float acc = 0.f;
          for (int64_t e = 0; e < count; ++e) {
            const uint16_t* b_slot = bt + slots[first[s] + e] * pool_rank * out_f + c;
            for (int64_t j = 0; j < rank; ++j) acc += hidden[e * rank + j] * to_float(b_slot[j * out_f]);
          }
          y[c] = to_bf16(to_float(y[c]) + acc);
        }
      }
    }
  });
}
#endif

template <typename act_t>
void dispatch_pool(act_t* out, const act_t* x, torch::Tensor a_pool, torch::Tensor bt_pool, const int64_t* rows,
                   const int64_t* slots, const float* weights, const std::vector<int64_t>& first, int64_t tokens,
                   int64_t rank) {
  const int64_t pool_rank = a_pool.size(1), in_f = a_pool.size(2), out_f = bt_pool.size(2);
  if (a_pool.scalar_type() == torch::kFloat) {
    delta_rows<act_t, float>(out, x, a_pool.data_ptr<float>(), bt_pool.data_ptr<float>(), rows, slots, weights,
                             first, tokens, rank, in_f, out_f, pool_rank, tokens * in_f, tokens * out_f);
  } else {
    TORCH_CHECK(a_pool.scalar_type() == torch::kBFloat16, "pools must be fp32 or bf16");
#if defined(__AVX512F__)
    if constexpr (std::is_same<act_t, uint16_t>::value) {
      delta_rows_bf16(out, x, reinterpret_cast<const uint16_t*>(a_pool.data_ptr<at::BFloat16>()),
                      reinterpret_cast<const uint16_t*>(bt_pool.data_ptr<at::BFloat16>()), rows, slots, weights, first,
                      tokens, rank, in_f, out_f, pool_rank);
      return;
    }
#endif
    delta_rows<act_t, uint16_t>(out, x, reinterpret_cast<const uint16_t*>(a_pool.data_ptr<at::BFloat16>()),
                                reinterpret_cast<const uint16_t*>(bt_pool.data_ptr<at::BFloat16>()), rows, slots,
                                weights, first, tokens, rank, in_f, out_f, pool_rank, tokens * in_f,
                                tokens * out_f);
  }
}

// `weights`: one fp32 weight per entry, or None when every weight is 1. `rows` sorted.
void lora_delta_add_(torch::Tensor out, torch::Tensor x, torch::Tensor a_pool, torch::Tensor bt_pool,
                     torch::Tensor rows, torch::Tensor slots, std::optional<torch::Tensor> weights, int64_t rank) {
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "activations and output must share a dtype");
  TORCH_CHECK(out.scalar_type() == torch::kFloat || out.scalar_type() == torch::kBFloat16,
              "fp32 or bf16 activations only");
  TORCH_CHECK(out.dim() == 3 && x.dim() == 3 && out.is_contiguous() && x.is_contiguous(), "[B, T, F] contiguous");
  TORCH_CHECK(a_pool.is_contiguous() && bt_pool.is_contiguous(), "pools must be contiguous");
  TORCH_CHECK(a_pool.scalar_type() == bt_pool.scalar_type(), "pool dtypes differ");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong, "int64 indices");
  TORCH_CHECK(rows.numel() == slots.numel(), "one slot per entry");
  const int64_t pool_rank = a_pool.size(1), in_f = a_pool.size(2), out_f = bt_pool.size(2);
  TORCH_CHECK(rank >= 0 && rank <= pool_rank, "rank outside the pool");
  TORCH_CHECK(x.size(2) == in_f && out.size(2) == out_f && x.size(1) == out.size(1), "shape mismatch");
  const int64_t entries = rows.numel(), tokens = x.size(1);
  auto rows_c = rows.contiguous();
  auto slots_c = slots.contiguous();
  torch::Tensor weights_c;
  const float* weight_ptr = nullptr;
  if (weights.has_value()) {
    TORCH_CHECK(weights->scalar_type() == torch::kFloat && weights->numel() == entries, "one fp32 weight per entry");
    weights_c = weights->contiguous();
    weight_ptr = weights_c.data_ptr<float>();
  }
  const std::vector<int64_t> first = row_segments(rows_c.data_ptr<int64_t>(), entries);
  if (out.scalar_type() == torch::kFloat) {
    dispatch_pool<float>(out.data_ptr<float>(), x.data_ptr<float>(), a_pool, bt_pool, rows_c.data_ptr<int64_t>(),
                         slots_c.data_ptr<int64_t>(), weight_ptr, first, tokens, rank);
  } else {
    dispatch_pool<uint16_t>(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()),
                            reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), a_pool, bt_pool,
                            rows_c.data_ptr<int64_t>(), slots_c.data_ptr<int64_t>(), weight_ptr, first, tokens,
                            rank);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_delta_add_", &lora_delta_add_,
        "out[rows] += weights * (x[rows] @ A[slots, :rank].T) @ Bt[slots, :rank] (a row's entries summed)");
}
