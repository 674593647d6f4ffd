#include "models/softmax_rows.h"

#include <cstring>
#include <vector>

#include "models/simd_clones.h"

namespace sd::kernels {

namespace {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// exp(x) for x <= 0 (after the row maximum is subtracted); below −87.3 the result is clamped to ~1e-38 (0 in bf16).
inline float exp_nonpositive(float x) {
  x = x < -87.3f ? -87.3f : x;  // a NaN stays NaN (the comparison is false)
  // n = round(x / ln2) by the 1.5·2^23 trick (plain arithmetic, so the loop vectorises on every x86-64 level); its
  // low mantissa bits are n itself.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float fn = t - 12582912.0f;
  const float r = x - fn * 0.693359375f - fn * -2.12194440e-4f;  // x − n·ln2 in two parts (Cephes)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t n = float_to_bits(t) - 0x4B400000u;  // two's complement n in the low bits
  return y * bits_to_float((n + 127u) << 23);
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  const uint32_t b = float_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// The reductions are vectorised through `omp simd` (-fopenmp-simd for this file: no OpenMP runtime involved); without
// it the compiler may not reorder a float sum or max.
SD_CLONES float row_max(const float* x, int64_t n) {
  float m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// e[i] = exp(x[i] − m); returns the sum.
SD_CLONES float exp_sub_sum(const float* x, float* e, int64_t n, float m) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    e[i] = exp_nonpositive(x[i] - m);
    s += e[i];
  }
  return s;
}

SD_CLONES void scale(float* x, int64_t n, float k) {
  for (int64_t i = 0; i < n; ++i) x[i] *= k;
}

SD_CLONES void widen(const uint16_t* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(x[i]);
}

SD_CLONES void narrow_scaled(const float* e, uint16_t* out, int64_t n, float k) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(e[i] * k);
}

bool has_nan(float m) { return m != m; }

}  // namespace

void softmax_rows_inplace(float* x, int64_t rows, int64_t cols, int64_t stride) {
  if (cols <= 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * stride;
    // A NaN anywhere poisons the sum (the max comparison may skip it, exp does not).
    const float m = row_max(row, cols);
    const float s = exp_sub_sum(row, row, cols, has_nan(m) ? 0.0f : m);
    scale(row, cols, 1.0f / s);
  }
}

void softmax_rows_inplace_bf16(uint16_t* x, int64_t rows, int64_t cols, int64_t stride) {
  if (cols <= 0) return;
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < cols) buf.resize(static_cast<size_t>(cols));
  float* f = buf.data();
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* row = x + r * stride;
    widen(row, f, cols);
    const float m = row_max(f, cols);
    const float s = exp_sub_sum(f, f, cols, has_nan(m) ? 0.0f : m);
    narrow_scaled(f, row, cols, 1.0f / s);
  }
}

}  // namespace sd::kernels
