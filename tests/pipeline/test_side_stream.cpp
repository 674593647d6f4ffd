// Small device work off the model thread's stream (core/side_stream.h) and the promise that an img2img input is
// complete (InputReady). On the CPU run_on_side_stream is the function itself and both promises take one path, so
// these tests check the results and the decisions; in test_device on a GPU host (scripts/gpu-check.sh,
// SD_TEST_DEVICE=cuda) they check the same on a side stream: that work queued on the calling thread's stream is waited
// for when asked, and that a stream fed complete frames decides and computes what a stream fed queued ones does.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "core/side_stream.h"
#include "core/torch_compat.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/similarity_filter.h"
#include "pipeline/stream_diffusion.h"

#if SD_WITH_CUDA
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {
namespace {

#if SD_WITH_CUDA && SD_HAS_EVENT_TIMING
constexpr bool kDeviceTimed = true;  // StreamStats::ema_call_s from CUDA timing events
#else
constexpr bool kDeviceTimed = false;
#endif

TEST(SideStream, SeesTheWorkQueuedBeforeItWhenAskedAndReturnsCompleteResults) {
  const c10::Device device = test::test_device();
  const auto opts = torch::TensorOptions().device(device).dtype(torch::kFloat);
  // Queued on the calling thread's stream just before: on a GPU milliseconds of matrix products (40 of 2048^3 through
  // the identity, exact for these small integers) still running when the side stream starts; had it not waited, it
  // would read y's memory before the last product wrote it.
  const int64_t n = device.is_cuda() ? 2048 : 64;
  const torch::Tensor v = torch::arange(n * n, opts).remainder(7).reshape({n, n});
  const torch::Tensor eye = torch::eye(n, opts);
  torch::Tensor y = v;
  for (int i = 0; i < 40; ++i) y = torch::mm(y, eye);
  y = y + 1;
  double sum = 0;
  torch::Tensor made;
  run_on_side_stream(device, /*after_current=*/true, [&] {
    sum = y.to(torch::kDouble).sum().item<double>();
    made = y * 2;
  });
  const double expected = v.cpu().to(torch::kDouble).sum().item<double>() + static_cast<double>(n * n);
  EXPECT_DOUBLE_EQ(sum, expected);
  // `made` is complete: read on the calling thread's stream it has its values.
  EXPECT_TRUE(torch::equal(made.cpu(), ((v + 1) * 2).cpu()));
  const torch::Tensor x = torch::arange(1 << 20, opts);
  const double nx = 1 << 20;

  // A complete input (waited for here) needs no wait: the same values.
  torch::Tensor z = x * 3;
  if (device.is_cuda()) run_on_side_stream(device, true, [] {});  // z is complete after this
  double zsum = 0;
  run_on_side_stream(device, /*after_current=*/false, [&] { zsum = z.to(torch::kDouble).sum().item<double>(); });
  EXPECT_DOUBLE_EQ(zsum, 3 * nx * (nx - 1) / 2);

  // An exception in the work reaches the caller, and the next call runs normally.
  EXPECT_THROW(run_on_side_stream(device, true, [] { throw InvalidArgument("bad"); }), InvalidArgument);
  int ran = 0;
  run_on_side_stream(device, false, [&] { ++ran; });
  EXPECT_EQ(ran, 1);
}

#if SD_WITH_CUDA
// Queues a few hundred milliseconds of fp32 matrix products (no TF32) on the calling thread's stream of `device` and
// returns an event recorded after them: not done yet when a call that should not wait for them returns.
std::unique_ptr<c10::Event> queue_long_work(const c10::Device& device) {
  const auto opts = torch::TensorOptions().device(device).dtype(torch::kFloat);
  const torch::Tensor eye = torch::eye(4096, opts);
  torch::Tensor y = torch::ones({4096, 4096}, opts);
  for (int i = 0; i < 100; ++i) y = torch::mm(y, eye);  // 100 x 137 GFLOP
  auto done = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
  done->record(c10::cuda::getCurrentCUDAStream(device.index()));
  return done;
}
#endif

TEST(SideStream, CompleteOnSideStreamMakesItsTensorWithoutWaitingForTheCallersQueuedWork) {
  const c10::Device device = test::test_device();
  const torch::Tensor host = torch::randn({4, 3, 8, 8});
  const torch::Tensor made =
      complete_on_side_stream(device, [&] { return to_device_nonblocking(host, device, c10::kFloat) * 2; });
  EXPECT_EQ(made.device().type(), device.type());
  EXPECT_TRUE(torch::equal(made.cpu(), host * 2));
  // Read on the calling thread's stream after it: its values.
  EXPECT_TRUE(torch::equal((made + 1).cpu(), host * 2 + 1));
  EXPECT_THROW(complete_on_side_stream(device, []() -> torch::Tensor { throw InvalidArgument("bad"); }),
               InvalidArgument);
#if SD_WITH_CUDA
  if (device.is_cuda()) {
    const auto done = queue_long_work(device);
    const torch::Tensor up =
        complete_on_side_stream(device, [&] { return to_device_nonblocking(host, device, c10::kHalf); });
    EXPECT_FALSE(done->query()) << "it waited for the work queued before it";
    EXPECT_TRUE(torch::equal(up.cpu(), host.to(c10::kHalf)));
  }
#endif
}

// Frames of a static scene with sensor noise, with a cut at frame 6 (uint8 RGB, 64 px).
torch::Tensor scene_frame(int i) {
  torch::manual_seed(i < 6 ? 11 : 12);
  const torch::Tensor scene = torch::rand({64, 64, 3}) * 255;
  torch::manual_seed(100 + i);
  return (scene + torch::randn({64, 64, 3}) * 2).clamp(0, 255).to(torch::kUInt8);
}

TEST(SideStream, FilterDecidesTheSameForCompleteAndQueuedFrames) {
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = test::test_dtype();
  if (dtype == c10::kHalf && device.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
  SimilarityFilter complete(0.98, 3, std::make_shared<Mt19937UniformSource>(4));
  SimilarityFilter queued(0.98, 3, std::make_shared<Mt19937UniformSource>(4));
  int skips = 0;
  for (int i = 0; i < 12; ++i) {
    const torch::Tensor x = image_to_device_tensor(scene_frame(i), 64, 64, device, dtype);  // complete on return
    const FilterDecision a = complete.check(x, /*x_complete=*/true);
    // The queued copy is made on the calling thread's stream: the filter must wait for it.
    const FilterDecision b = queued.check(x * 1, /*x_complete=*/false);
    EXPECT_EQ(a.process, b.process) << "frame " << i;
    EXPECT_EQ(a.forced, b.forced) << "frame " << i;
    EXPECT_EQ(a.cos_sim, b.cos_sim) << "frame " << i;
    skips += a.process ? 0 : 1;
    if (i == 6) {
      EXPECT_LT(a.cos_sim, 0.9) << "the cut";
    } else if (i > 0) {
      EXPECT_GT(a.cos_sim, 0.98) << "frame " << i << " of a static scene";
    }
  }
  EXPECT_GT(skips, 3);  // the static scene is mostly skipped
  EXPECT_EQ(complete.skipped(), queued.skipped());
  EXPECT_EQ(complete.forced(), queued.forced());
}

TEST(SideStream, FilterKeepsACopyOfTheReference) {
  const c10::Device device = test::test_device();
  SimilarityFilter f(0.98, 3, std::make_shared<Mt19937UniformSource>(4));
  torch::Tensor x = torch::ones({1, 3, 8, 8}, torch::TensorOptions().device(device));
  ASSERT_TRUE(f.check(x, true).first);
  x.mul_(-1);  // the caller reuses its buffer
  const FilterDecision d = f.check(torch::ones({1, 3, 8, 8}, torch::TensorOptions().device(device)), true);
  EXPECT_NEAR(d.cos_sim, 1.0, 1e-6) << "compared with the frame as it was, not with the caller's buffer now";
  EXPECT_THROW(f.check(torch::ones({1, 3, 4, 4}, torch::TensorOptions().device(device)), true), InvalidArgument);
}

// Streams of tiny-sd15 on the test device ($SD_TEST_DEVICE / $SD_TEST_DTYPE), 64 px, two steps.
class SideStreamModel : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "no fixture tiny-sd15";
    if (dtype == c10::kHalf && device.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
    LoadOptions lo;
    lo.device = device.str();
    lo.dtype = dtype;
    lo.threads = -1;
    models = load_pipeline(test::fixture_path("models/tiny-sd15"), lo);
  }
  static StreamConfig two_step_config() {
    StreamConfig config;
    config.width = config.height = 64;
    config.t_index_list = {20, 35};
    return config;
  }
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = test::test_dtype();
  std::shared_ptr<const DiffusionModels> models;
};

TEST_F(SideStreamModel, StreamFedCompleteFramesEqualsStreamFedQueuedFrames) {
  StreamConfig config = two_step_config();
  config.cfg_type = CfgType::Self;
  config.seed = 5;
  config.similarity_filter.enabled = true;
  config.similarity_filter.threshold = 0.98;
  config.similarity_filter.max_skip_frame = 2;
  config.similarity_filter.sleep_on_skip = false;
  config.deep_cache_every = 3;
  config.deep_cache_min_similarity = 0.9;
  StreamDiffusion a(models, config, nullptr, std::make_shared<Mt19937UniformSource>(9));
  StreamDiffusion b(models, config, nullptr, std::make_shared<Mt19937UniformSource>(9));
  StreamDiffusion c(models, config, nullptr, std::make_shared<Mt19937UniformSource>(9));  // fed host frames
  a.prepare("a lighthouse at dusk");
  b.prepare("a lighthouse at dusk");
  c.prepare("a lighthouse at dusk");
  const double tol = device.is_cpu() ? 0.0 : 1e-2;
  for (int i = 0; i < 12; ++i) {
    const torch::Tensor x = image_to_device_tensor(scene_frame(i), 64, 64, device, dtype);
    const torch::Tensor oa = a.img2img(x, InputReady::complete).to(torch::kCPU, torch::kFloat);
    const torch::Tensor ob = b.img2img(x * 1, InputReady::queued).to(torch::kCPU, torch::kFloat);
    // A host frame (to_device_nonblocking: pinned, non-blocking on a GPU): the same values arrive.
    const torch::Tensor oc = c.img2img(x.cpu(), InputReady::complete).to(torch::kCPU, torch::kFloat);
    const double range = std::max(1e-6, ob.abs().max().item<double>());
    EXPECT_LE((oa - ob).abs().max().item<double>(), tol * range) << "frame " << i;
    EXPECT_LE((oc - ob).abs().max().item<double>(), tol * range) << "frame " << i << ", host frame";
  }
  const StreamStats &sa = a.stats(), &sb = b.stats(), &sc = c.stats();
  EXPECT_EQ(sc.skipped, sb.skipped);
  EXPECT_EQ(sc.unet_shallow_calls, sb.unet_shallow_calls);
  EXPECT_EQ(sa.skipped, sb.skipped);
  EXPECT_EQ(sa.forced, sb.forced);
  EXPECT_EQ(sa.unet_shallow_calls, sb.unet_shallow_calls);
  EXPECT_EQ(sa.deep_cache_forced, sb.deep_cache_forced);
  EXPECT_GT(sa.skipped, 0);
  EXPECT_GT(sa.unet_shallow_calls, 0);
  EXPECT_GE(sa.deep_cache_forced, 1) << "the cut at frame 6 refreshes the deep features";
}

// A host frame is complete by nature: with the filter on, the decision about it (and so img2img's return) does not
// wait for the kernels queued before it on the calling thread's stream. On the CPU nothing is ever queued; the values
// of host-fed streams are checked above.
TEST_F(SideStreamModel, HostFramesWithTheFilterDoNotWaitForThePreviousFramesKernels) {
  if (!device.is_cuda()) GTEST_SKIP() << "nothing is queued off a GPU";
#if SD_WITH_CUDA
  StreamConfig config = two_step_config();
  config.similarity_filter.enabled = true;
  config.similarity_filter.threshold = 0.98;
  config.similarity_filter.max_skip_frame = 2;
  config.similarity_filter.sleep_on_skip = false;
  StreamDiffusion s(models, config, nullptr, std::make_shared<Mt19937UniformSource>(9));
  s.prepare("a lighthouse at dusk");
  // Frames of the two scenes in turn: each is processed (cosine < 0.9), so the warm-up records the graphs (a capture
  // waits for the device) and each timed call launches a full frame.
  const auto frame = [](int i) { return image_to_tensor(scene_frame(i % 2 == 0 ? 0 : 6), 64, 64); };
  for (int i = 0; i < 4; ++i) s.img2img(frame(i));
  run_on_side_stream(device, /*after_current=*/true, [] {});
  const int64_t captures = s.stats().graph_captures, processed = s.stats().processed;
  ASSERT_GT(captures, 0) << "the warm-up recorded the stream's graphs";
  for (int i = 4; i < 6; ++i) {
    const auto done = queue_long_work(device);
    s.img2img(frame(i));
    EXPECT_FALSE(done->query()) << "frame " << i << ": img2img waited for the work queued before it";
    done->synchronize();
  }
  EXPECT_EQ(s.stats().processed, processed + 2) << "both timed frames ran the model";
  EXPECT_EQ(s.stats().graph_captures, captures) << "no capture (which waits) during the timed frames";
  // A device frame through the runtime's cat of several (complete_on_side_stream) goes the same way.
  const torch::Tensor a = image_to_device_tensor(scene_frame(6), 64, 64, device, dtype);
  const auto done = queue_long_work(device);
  const torch::Tensor cat = complete_on_side_stream(device, [&] { return torch::cat({a, a}, 0); });
  EXPECT_FALSE(done->query());
  EXPECT_TRUE(torch::equal(cat.cpu(), torch::cat({a, a}, 0).cpu()));
#endif
}

// StreamStats::ema_call_s (the filter's sleep on a skip): on CUDA the device time between events around each processed
// call, folded in by a later call once done; elsewhere the host time. Either way a positive time once calls finished.
TEST_F(SideStreamModel, CallTimeEmaIsFoldedInByLaterCalls) {
  StreamConfig config = two_step_config();
  StreamDiffusion s(models, config);
  s.prepare("a lighthouse at dusk");
  EXPECT_EQ(s.stats().ema_call_s, 0.0);
  const torch::Tensor x = image_to_device_tensor(scene_frame(0), 64, 64, device, dtype);
  s.img2img(x, InputReady::complete);
  // Timed on the device, the first call's time is not folded in by the call itself; on the host it is.
  if (kDeviceTimed && device.is_cuda())
    EXPECT_EQ(s.stats().ema_call_s, 0.0) << "device-timed calls are folded in by later calls";
  else
    EXPECT_GT(s.stats().ema_call_s, 0.0);
  for (int i = 0; i < 3; ++i) s.img2img(x, InputReady::complete);
  s.txt2img();
  // Every call's work done; the next call folds the finished ones in.
  run_on_side_stream(device, /*after_current=*/true, [] {});
  s.img2img(x, InputReady::complete);
  const double ema = s.stats().ema_call_s;
  EXPECT_GT(ema, 0.0);
  EXPECT_LT(ema, 60.0);
  std::cout << "[side stream] ema_call_s " << ema * 1e3 << " ms, host total " << s.stats().total_s * 1e3 << " ms for "
            << s.stats().processed << " calls\n";
}

TEST(SideStream, ToDeviceNonblockingEqualsTo) {
  const c10::Device device = test::test_device();
  const torch::Tensor host = torch::randn({2, 3, 17, 5}).transpose(2, 3);  // not contiguous
  for (const auto dtype : {c10::kFloat, c10::kHalf, c10::kBFloat16}) {
    const torch::Tensor a = to_device_nonblocking(host, device, dtype);
    const torch::Tensor b = host.to(device, dtype);
    EXPECT_EQ(a.device(), b.device());
    EXPECT_EQ(a.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(a.cpu(), b.cpu())) << c10::toString(dtype);
  }
  // Already there: the same tensor, not a copy.
  const torch::Tensor d = host.to(device, c10::kFloat);
  EXPECT_TRUE(to_device_nonblocking(d, device, c10::kFloat).is_same(d));
  // Txt2img's fresh noise goes the same way: a stream's frames equal eager ones (CUDA graphs tests); here its values.
  std::vector<torch::Tensor> staged;
  for (int i = 0; i < 4; ++i) staged.push_back(to_device_nonblocking(host * i, device, c10::kFloat));
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(torch::equal(staged[i].cpu(), host * i)) << "copy " << i;
}

}  // namespace
}  // namespace sd
