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
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

// Which vector path a build takes follows the CPU it is compiled on (-march=native):
// AVX-512F: 16 lanes; AVX2 + FMA (no AVX-512): 8 lanes; anything else: the scalar loops.
#if defined(__AVX512F__)
// 16 pool elements widened to fp32 in registers (bf16 -> fp32 is a 16-bit shift).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// sum_k row[k] * x[k]
template <typename pool_t>
inline float dot(const pool_t* row, const float* x, int64_t n) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; k + 32 <= n; k += 32) {
    acc0 = _mm512_fmadd_ps(load16(row + k), _mm512_loadu_ps(x + k), acc0);
    acc1 = _mm512_fmadd_ps(load16(row + k + 16), _mm512_loadu_ps(x + k + 16), acc1);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(load8(row + k + 8), _mm256_loadu_ps(x + k + 8), acc1);
  }
  acc = reduce8(_mm256_add_ps(acc0, acc1));
#endif
  for (; k < n; ++k) acc += to_float(row[k]) * x[k];
  return acc;
}

// y[k] += h * row[k]
template <typename pool_t>
inline void axpy(float* y, float h, const pool_t* row, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 hv = _mm512_set1_ps(h);
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(y + k, _mm512_fmadd_ps(hv, load16(row + k), _mm512_loadu_ps(y + k)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 hv = _mm256_set1_ps(h);
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(hv, load8(row + k), _mm256_loadu_ps(y + k)));
#endif
  for (; k < n; ++k) y[k] += h * to_float(row[k]);
}

// Activations are fp32 or bf16 (uint16_t bits); the delta is always computed in fp32 and a bf16
// output is rounded once (to nearest even), after the whole delta is added.
inline void widen(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void widen(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = to_float(src[k]);
}
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

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
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
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
