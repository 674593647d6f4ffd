#include "models/cpu_parallel.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/GradMode.h>

#include "core/device.h"

namespace sd::nn {

void parallel_chunks(int64_t n, const std::function<void(int64_t, int64_t)>& f) {
  if (n <= 0) return;
  const at::ThreadLocalState state;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    f(begin, end);
  });
}

int parallel_for_threads() {
  std::atomic<int> threads{0};
  parallel_chunks(at::get_num_threads(), [&](int64_t, int64_t) { ++threads; });
  return threads.load();
}

bool use_linear_cpu_threads(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!x.defined() || !weight.defined() || x.dim() < 2 || weight.dim() != 2 || !x.is_cpu() || !weight.is_cpu())
    return false;
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return false;
  if (bias.defined() && (bias.scalar_type() != at::kFloat || !bias.is_cpu() || bias.dim() != 1)) return false;
  if (c10::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad())))
    return false;
  if (x.size(-1) != weight.size(1) || (bias.defined() && bias.size(0) != weight.size(0))) return false;
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  if (rows * weight.size(0) * weight.size(1) < (int64_t{1} << 20)) return false;
  return at::get_num_threads() > 1 && !at::in_parallel_region() && sd::blas_single_threaded();
}

at::Tensor linear_cpu_threads(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t k = x.size(-1), m = weight.size(0);
  const auto x2 = x.reshape({-1, k}).contiguous();  // [N, K]
  const int64_t n = x2.size(0);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = m;
  auto out = at::empty({n, m}, x2.options());
  const auto wt = weight.t();  // [K, M], a transposed view: BLAS reads the weight as stored
  const int64_t parts = std::max<int64_t>(1, at::get_num_threads());
  const bool by_rows = n >= m;  // cut the larger side, so every block stays a sizeable product
  const int64_t len = by_rows ? n : m, step = (len + parts - 1) / parts;
  parallel_chunks(parts, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t s = p * step, e = std::min(len, s + step);
      if (s >= e) continue;
      if (by_rows) {
        auto o = out.narrow(0, s, e - s);
        if (bias.defined()) at::addmm_out(o, bias, x2.narrow(0, s, e - s), wt);
        else at::mm_out(o, x2.narrow(0, s, e - s), wt);
      } else {
        auto o = out.narrow(1, s, e - s);  // [N, cols] with row stride M: BLAS writes it in place
        if (bias.defined()) at::addmm_out(o, bias.narrow(0, s, e - s), x2, wt.narrow(1, s, e - s));
        else at::mm_out(o, x2, wt.narrow(1, s, e - s));
      }
    }
  });
  return out.view(out_sizes);
}

}  // namespace sd::nn
