// models/cpu_parallel: work split across libtorch's intra-op threads. That it reaches them at all (ATen's OpenMP
// template runs the whole range on the calling thread in files built without -fopenmp: the attention tiles did so,
// unnoticed, until Dec 2026), that each task runs under the caller's thread-local state, and the fp32 linear layers'
// products cut into row or column blocks, against one whole BLAS call: the same dot products, so within a few fp32
// ulps of the largest output (OpenBLAS may pick another kernel for a block; bound 1e-6 of max|ref| + 1e-6).
#include <gtest/gtest.h>

#include <atomic>
#include <set>

#include "common/fixtures.h"
#include "core/device.h"
#include "models/cpu_parallel.h"
#include "models/layers.h"

namespace {

struct Threads {  // sets the intra-op threads (and pins OpenBLAS as the engine does); restores the count after
  int saved = at::get_num_threads();
  explicit Threads(int n) { sd::set_threads(n); }
  ~Threads() { sd::set_threads(saved); }
};

}  // namespace

TEST(CpuParallel, ReachesEveryIntraOpThread) {
  {
    Threads two(2);
    const int reached = sd::nn::parallel_for_threads();
#if defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
    EXPECT_EQ(reached, 2) << "parallel_chunks ran on one thread: models/cpu_parallel.cpp lacks -fopenmp";
#else
    EXPECT_GE(reached, 1);
#endif
  }
  Threads one(1);
  EXPECT_EQ(sd::nn::parallel_for_threads(), 1);
}

TEST(CpuParallel, ChunksCoverTheRangeOnceUnderTheCallersState) {
  Threads two(2);
  for (const int64_t n : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{100}}) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    std::atomic<int> grad_on{0}, inference_off{0};
    {
      torch::NoGradGuard no_grad;
      c10::InferenceMode inference;
      sd::nn::parallel_chunks(n, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) ++seen[static_cast<size_t>(i)];
        if (torch::GradMode::is_enabled()) ++grad_on;
        if (!c10::InferenceMode::is_enabled()) ++inference_off;
      });
    }
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[static_cast<size_t>(i)].load(), 1) << "n " << n << " item " << i;
    EXPECT_EQ(grad_on.load(), 0) << "a task saw grad mode on";
    EXPECT_EQ(inference_off.load(), 0) << "a task saw inference mode off";
  }
  // An exception in a task reaches the caller.
  EXPECT_THROW(sd::nn::parallel_chunks(4, [](int64_t b, int64_t) {
                 if (b >= 0) throw std::runtime_error("task failed");
               }),
               std::runtime_error);
}

TEST(CpuParallel, LinearMatchesOneBlasCall) {
  Threads two(2);
  torch::manual_seed(3);
  torch::NoGradGuard no_grad;
  struct Case { std::vector<int64_t> x; int64_t m; bool bias; };
  // More rows than outputs (row blocks), more outputs than rows (column blocks), odd sizes, 2-d and 4-d inputs.
  for (const auto& c : {Case{{2, 300, 96}, 80, true}, Case{{1, 77, 128}, 1000, true}, Case{{301, 64}, 131, false},
                        Case{{2, 3, 50, 64}, 257, true}, Case{{5, 2048}, 1024, false}}) {
    const auto x = torch::randn(c.x);
    const auto w = torch::randn({c.m, c.x.back()}), b = c.bias ? torch::randn({c.m}) : torch::Tensor();
    ASSERT_EQ(sd::nn::use_linear_cpu_threads(x, w, b), sd::blas_single_threaded()) << c.m;
    const auto out = sd::nn::linear_cpu_threads(x, w, b);
    const auto ref = torch::nn::functional::linear(x.to(torch::kDouble), w.to(torch::kDouble),
                                                   c.bias ? b.to(torch::kDouble) : torch::Tensor());
    ASSERT_EQ(out.sizes(), ref.sizes());
    SD_EXPECT_CLOSE(out, ref, 1e-6, 1e-6, "linear " + std::to_string(c.m) + (c.bias ? " + bias" : ""));
  }
}

TEST(CpuParallel, LinearOnlyWhereItApplies) {
  Threads two(2);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 256, 128}), w = torch::randn({128, 128}), b = torch::randn({128});
  if (!sd::blas_single_threaded()) GTEST_SKIP() << "no OpenBLAS pinned to one thread (another BLAS): never applies";
  EXPECT_TRUE(sd::nn::use_linear_cpu_threads(x, w, b));
  EXPECT_FALSE(sd::nn::use_linear_cpu_threads(x.to(torch::kBFloat16), w.to(torch::kBFloat16), b.to(torch::kBFloat16)));
  EXPECT_FALSE(sd::nn::use_linear_cpu_threads(torch::randn({1, 4, 128}), w, b)) << "small: one call";
  EXPECT_FALSE(sd::nn::use_linear_cpu_threads(x, torch::randn({64, 128}), b)) << "bias of another width";
  {
    torch::AutoGradMode grad(true);
    EXPECT_FALSE(sd::nn::use_linear_cpu_threads(x, w.clone().requires_grad_(), b)) << "gradients wanted";
  }
  Threads one(1);
  EXPECT_FALSE(sd::nn::use_linear_cpu_threads(x, w, b)) << "one intra-op thread";
}

// sd::nn::Linear takes the split path for CPU fp32 inference, under inference mode too (whose tensors the other
// threads may write only inside it), with its parameters requiring grad as loaded; and the switch turns it off.
TEST(CpuParallel, LinearModuleUsesIt) {
  Threads two(2);
  torch::manual_seed(4);
  sd::nn::Linear lin(192, 160);
  {
    torch::NoGradGuard ng;
    lin->weight.set_data(torch::randn({160, 192}));
    lin->bias.set_data(torch::randn({160}));
  }
  const auto x = torch::randn({2, 100, 192});
  torch::Tensor ref, out, infer;
  {
    torch::NoGradGuard ng;
    ref = torch::nn::functional::linear(x, lin->weight, lin->bias);
    out = lin(x);
  }
  {
    c10::InferenceMode im;
    infer = lin(x);
  }
  SD_EXPECT_CLOSE(out, ref, 1e-6, 1e-6, "Linear, no grad");
  SD_EXPECT_CLOSE(infer, ref, 1e-6, 1e-6, "Linear, inference mode");
  // With gradients wanted: the plain (autograd) path.
  auto xg = x.clone().requires_grad_();
  lin(xg).sum().backward();
  EXPECT_TRUE(xg.grad().defined());
  const bool saved = sd::nn::fast_path().linear_threads;
  sd::nn::fast_path().linear_threads = false;
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::equal(lin(x), ref)) << "switched off: one BLAS call";
  sd::nn::fast_path().linear_threads = saved;
}
