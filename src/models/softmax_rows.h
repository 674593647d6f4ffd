#pragma once
// Row softmax in place over contiguous rows — the inner kernel of the CPU attention tiles (attention.cpp).
//
// Why our own: libtorch 1.13's CPU softmax runs at ~1 G elements/s per core, which made the soft-max ~65% of the
// 4096-token attention at 512 px (measured: 1.9 ms of 2.9 ms per 512-query tile, one thread). This one is a plain
// loop the compiler vectorises (one build per x86-64 level, picked at load by the loader's ifunc; -fno-trapping-math
// for this file, without which GCC kept the AVX2 build's exp loop scalar): max, exp(x − max)
// by a degree-6 polynomial (Cephes expf, relative error < 2e-7), sum, scale. bf16 rows are read and written as bf16
// (round to nearest even) with every step in fp32, as libtorch's bf16 kernel does. A NaN in a row makes the row NaN.
#include <cstdint>

namespace sd::kernels {

// `rows` rows of `cols` values, row r at x + r * stride.
void softmax_rows_inplace(float* x, int64_t rows, int64_t cols, int64_t stride);
// bf16 storage (the raw 16-bit patterns, c10::BFloat16's layout).
void softmax_rows_inplace_bf16(uint16_t* x, int64_t rows, int64_t cols, int64_t stride);

}  // namespace sd::kernels
