#pragma once
// CPU work across libtorch's intra-op threads (its OpenMP team, the one oneDNN uses).
//
// at::parallel_for is a header template: with libtorch's OpenMP backend (Debian's 1.13 and PyPI's wheels) it splits a
// range only in files compiled with -fopenmp, and otherwise runs the whole range on the calling thread. This file is
// the one compiled so (src/CMakeLists.txt); the kernels that split work call parallel_chunks() from here.
//
// fp32 linear layers: Debian's libtorch computes fp32 products with OpenBLAS, which the engine pins to one thread
// (sd::pin_blas_threads: its own spinning workers beside the OpenMP team stalled live streams). A linear layer then
// ran on one core while the convolutions used all of them. linear_cpu_threads() cuts the product into one block of
// rows (or of output columns, when there are more of them) per intra-op thread, each an ordinary single-threaded BLAS
// call: no second thread pool.
#include <cstdint>
#include <functional>

#include <ATen/core/Tensor.h>

namespace sd::nn {

// f(begin, end) over [0, n) in one contiguous chunk per intra-op thread (at::parallel_for, grain 1), each task under
// the caller's thread-local state (grad mode, inference mode, ...: the OpenMP team's other threads would otherwise
// see grad mode on, or inference tensors outside inference mode). Exceptions reach the caller.
void parallel_chunks(int64_t n, const std::function<void(int64_t, int64_t)>& f);

// How many intra-op threads parallel_chunks() reaches at the current at::get_num_threads(): 1 where this file was
// built without OpenMP (TSan, a compiler without it).
int parallel_for_threads();

// Whether linear_cpu_threads() applies to x [..., K], weight [M, K] and bias [M] (or none): CPU fp32 inference (no
// gradient wanted), more than one intra-op thread, OpenBLAS pinned to one thread, at least ~1 M multiply-adds.
bool use_linear_cpu_threads(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// x @ weight^T + bias -> [..., M], the product split across the intra-op threads.
at::Tensor linear_cpu_threads(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace sd::nn
