// Vector helpers shared by the shard's C++ CPU kernels (shard/lora/lora_decode_kernel.cpp,
// shard/engine/decode_attention.cpp, shard/engine/fused_ops.cpp): fp32 or bf16 rows widened to
// fp32 in registers, rounded back to bf16, and exp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace loraplex_cpu {

// Which vector path a build takes follows the CPU it is compiled on (-march=native):
// AVX-512F: 16 lanes; AVX2 + FMA (no AVX-512): 8 lanes; anything else: the scalar loops.
#if defined(__AVX512F__)
// 16 pool elements widened to fp32 in registers (bf16 -> fp32 is a 16-bit shift).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}
// fp32 lanes rounded to bf16 precision (to nearest even, NaN stays NaN), kept as fp32.
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), high);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_and_si512(bits, high), _mm512_set1_epi32(0x00400000));
  return _mm512_castsi512_ps(r);
}
// Round to the destination's precision: a no-op for fp32, bf16 rounding for bf16.
inline __m512 round16(__m512 v, const float*) { return v; }
inline __m512 round16(__m512 v, const uint16_t*) { return round_bf16(v); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {
  const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
// 32 bf16 values in one 512-bit load, widened without cross-lane shuffles: the even-indexed ones by
// a shift, the odd-indexed ones by a mask (a 16-value load16 spends a shuffle on every load).
inline __m512 bf16_even(__m512i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)); }
inline __m512 bf16_odd(__m512i raw) {
  return _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// The inverse: 32 bf16 values (each rounded to nearest even) from their even and odd halves.
inline void store32(uint16_t* p, __m512 even, __m512 odd) {
  const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(even)), 16);
  const __m512i hi = _mm512_castps_si512(round_bf16(odd));
  _mm512_storeu_si512(p, _mm512_or_si512(lo, hi));
}
// exp(x): Cephes' single-precision polynomial (about 1 ulp over the clamped range).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);
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

// exp(x), scalar: the same Cephes polynomial as exp16, for loop tails and CPUs without AVX-512.
inline float exp_approx(float x) {
  x = std::fmin(std::fmax(x, -87.3f), 88.3f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

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

// bf16 values travel as their uint16_t bits; they are widened to fp32 for all arithmetic and
// rounded back (to nearest even) once.
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

// One value stored to, or rounded to the precision of, an fp32 or bf16 destination: the scalar
// twins of store16/round16, for loop tails and CPUs without AVX-512.
inline void store1(float* dst, float v) { *dst = v; }
inline void store1(uint16_t* dst, float v) { *dst = to_bf16(v); }
inline float round1(float v, const float*) { return v; }
inline float round1(float v, const uint16_t*) { return to_float(to_bf16(v)); }

}  // namespace loraplex_cpu
