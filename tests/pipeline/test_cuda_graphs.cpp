// CUDA graphs of the stream's fixed-shape components (core/cuda_graph.h, StreamConfig::cuda_graphs).
// Also a stream with a ControlNet (its own graphs, and the UNet's with the residuals as inputs).
// Here (CPU) they check the pass-through: GraphCache runs the function eagerly and counts it, and a stream with graphs
// on equals one with graphs off bit for bit. On a GPU host (scripts/gpu-check.sh: SD_TEST_DEVICE=cuda,
// SD_TEST_DTYPE=fp16 / fp32) the same tests check that graphs were recorded and replayed, that a t_index_list change
// (another UNet batch shape) records a new graph, and that the replayed stream's outputs equal the eager stream's:
// the same kernels on the same inputs, so within fp32 / fp16 rounding of a different cuDNN / cuBLAS algorithm choice
// between the eager warm-up and the capture (bound: 1e-4 of the output range in fp32, 1e-2 in fp16).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "common/fixtures.h"
#include "core/cuda_graph.h"
#include "core/device.h"
#include "io/safetensors.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/multi_stream.h"
#include "pipeline/stream_diffusion.h"

namespace sd {
namespace {

TEST(GraphCache, OffTheGpuEveryCallRunsTheFunction) {
  GraphCache cache;
  int calls = 0;
  auto fn = [&](const std::vector<at::Tensor>& in) {
    ++calls;
    return std::vector<at::Tensor>{in[0] * 2 + 1, at::Tensor()};
  };
  const auto x = torch::arange(6, torch::kFloat).reshape({2, 3});
  for (int i = 0; i < 3; ++i) {
    const auto out = cache.run("f", {x, at::Tensor()}, fn);
    ASSERT_EQ(out.size(), 2u);
    EXPECT_TRUE(torch::equal(out[0], x * 2 + 1));
    EXPECT_FALSE(out[1].defined());
  }
  EXPECT_EQ(calls, 3);
  const auto c = cache.counts();
  EXPECT_EQ(c.eager, 3);
  EXPECT_EQ(c.captures, 0);
  EXPECT_EQ(c.replays, 0);
  EXPECT_EQ(c.graphs, 0u);
}

TEST(GraphCache, DisabledRunsEagerly) {
  GraphCache cache;
  cache.set_enabled(false);
  EXPECT_FALSE(cache.enabled());
  int calls = 0;
  const auto x = torch::ones({4});
  for (int i = 0; i < 2; ++i)
    cache.run("g", {x}, [&](const std::vector<at::Tensor>& in) {
      ++calls;
      return std::vector<at::Tensor>{in[0] + 1};
    });
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(cache.counts().eager, 2);
}

// A fixture model on $SD_TEST_DEVICE in $SD_TEST_DTYPE.
std::shared_ptr<const DiffusionModels> load_on_test_device(const std::string& fixture) {
  LoadOptions lo;
  lo.device = test::test_device().str();
  lo.dtype = test::test_dtype();
  lo.threads = -1;
  return load_pipeline(test::fixture_path(fixture), lo);
}

struct GraphCase {
  std::string model;
  std::string mode;  // txt2img | img2img
  CfgType cfg;
};
void PrintTo(const GraphCase& c, std::ostream* os) { *os << c.model << "/" << c.mode << "/" << cfg_type_name(c.cfg); }

class StreamGraphs : public ::testing::TestWithParam<GraphCase> {};

TEST_P(StreamGraphs, ReplayedStreamEqualsEagerStream) {
  const GraphCase& gc = GetParam();
  if (!test::fixture_exists("models/" + gc.model)) GTEST_SKIP() << "no fixture " << gc.model;
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = test::test_dtype();
  if (dtype == c10::kHalf && device.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
  const auto models = load_on_test_device("models/" + gc.model);

  StreamConfig config;
  config.width = config.height = 64;
  config.t_index_list = {20, 35};
  config.cfg_type = gc.cfg;
  config.guidance_scale = 1.4;
  config.seed = 7;
  StreamConfig eager_config = config;
  eager_config.cuda_graphs = false;
  StreamDiffusion graphed(models, config), eager(models, eager_config);
  graphed.prepare("a red fox in the snow", "blurry");
  eager.prepare("a red fox in the snow", "blurry");

  const auto frame = [&](int i) {
    return (torch::rand({1, 3, 64, 64}, torch::TensorOptions().dtype(torch::kFloat)) * 2 - 1) * (1.0 - 0.05 * i);
  };
  torch::manual_seed(3);
  const double tol = device.is_cpu() ? 0.0 : (dtype == c10::kHalf ? 1e-2 : 1e-4);
  auto check = [&](int call) {
    torch::Tensor a, b;
    if (gc.mode == "img2img") {
      const auto x = frame(call);
      a = graphed.img2img(x);
      b = eager.img2img(x);
    } else {
      a = graphed.txt2img();
      b = eager.txt2img();
    }
    const auto af = a.to(torch::kCPU, torch::kFloat), bf = b.to(torch::kCPU, torch::kFloat);
    const double range = std::max(1e-6, bf.abs().max().item<double>());
    const double diff = (af - bf).abs().max().item<double>();
    EXPECT_LE(diff, tol * range) << "call " << call << ": graphs on vs off, max|diff| " << diff << " of range " << range;
  };
  for (int call = 0; call < 5; ++call) check(call);
  // Another UNet batch shape (three steps): a new graph, and the outputs still agree.
  graphed.set_t_index_list({10, 25, 40});
  eager.set_t_index_list({10, 25, 40});
  for (int call = 5; call < 9; ++call) check(call);

  const StreamStats& s = graphed.stats();
  if (device.is_cuda() && GraphCache::compiled()) {
    // A UNet graph per batch shape, one decode graph (the decoded rows do not change with the steps), and for
    // img2img one TAESD encode graph; the first call per shape is the eager warm-up.
    const int64_t expected = gc.mode == "img2img" ? 4 : 3;
    EXPECT_EQ(s.graph_captures, expected) << "UNet graphs for both batch shapes, decode (and encode for img2img)";
    EXPECT_EQ(s.graph_failures, 0) << "captures that failed (the log names the key)";
    EXPECT_GE(s.graph_replays, 8);
    std::cout << "[graphs] " << gc.model << " " << gc.mode << " " << cfg_type_name(gc.cfg) << ": " << s.graph_captures
              << " captures, " << s.graph_replays << " replays\n";
  } else {
    EXPECT_EQ(s.graph_captures, 0);
    EXPECT_EQ(s.graph_replays, 0);
  }
  EXPECT_EQ(eager.stats().graph_replays, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, StreamGraphs,
                         ::testing::Values(GraphCase{"tiny-sd15", "txt2img", CfgType::None},
                                           GraphCase{"tiny-sd15", "img2img", CfgType::Self},
                                           GraphCase{"tiny-sd21", "img2img", CfgType::Full},
                                           GraphCase{"tiny-sd21", "txt2img", CfgType::Initialize}),
                         [](const auto& info) {
                           std::string n = info.param.model + "_" + info.param.mode + "_" +
                                           cfg_type_name(info.param.cfg);
                           for (auto& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// Many streams, one UNet call, through SharedGraphs (pipeline/multi_stream.h): the batched calls of streams with graphs
// on equal the same batched calls of twin streams with graphs off. Three streams, then two (another row count: new
// graphs). On CUDA: a TAESD encode, a UNet and a decode graph per row count, replayed from the third step of each;
// here (CPU) every shared call goes through the cache and runs eagerly, bit for bit the eager calls; a group with
// one stream whose graphs are off does not go through it at all.
TEST(SharedStreamGraphs, BatchedCallsReplayedEqualEagerBatchedCalls) {
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "no fixture tiny-sd15";
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = test::test_dtype();
  if (dtype == c10::kHalf && device.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
  const auto models = load_on_test_device("models/tiny-sd15");

  std::vector<std::unique_ptr<StreamDiffusion>> graphed, eager;
  const std::vector<std::string> prompts = {"a red fox in the snow", "a lighthouse at dusk", "a bowl of fruit"};
  for (size_t i = 0; i < prompts.size(); ++i) {
    StreamConfig c;
    c.width = c.height = 64;
    c.t_index_list = {20, 35};
    c.cfg_type = CfgType::Self;
    c.guidance_scale = 1.3;
    c.seed = 11 + i;
    graphed.push_back(std::make_unique<StreamDiffusion>(models, c));
    c.cuda_graphs = false;
    eager.push_back(std::make_unique<StreamDiffusion>(models, c));
    graphed.back()->prepare(prompts[i], "blurry");
    eager.back()->prepare(prompts[i], "blurry");
  }
  SharedGraphs graphs;
  MultiStreamOptions with_graphs;
  with_graphs.graphs = &graphs;
  MultiStreamStats gs, es;
  torch::manual_seed(5);
  const double tol = device.is_cpu() ? 0.0 : (dtype == c10::kHalf ? 1e-2 : 1e-4);
  const auto step = [&](size_t streams, int call) {
    std::vector<StreamCall> a, b;
    for (size_t i = 0; i < streams; ++i) {
      const auto x = torch::rand({1, 3, 64, 64}) * 2 - 1;
      a.push_back({graphed[i].get(), x});
      b.push_back({eager[i].get(), x});
    }
    const auto ra = run_streams_batched(a, with_graphs, &gs);
    const auto rb = run_streams_batched(b, {}, &es);
    for (size_t i = 0; i < streams; ++i) {
      const auto af = ra[i].to(torch::kCPU, torch::kFloat), bf = rb[i].to(torch::kCPU, torch::kFloat);
      const double range = std::max(1e-6, bf.abs().max().item<double>());
      const double diff = (af - bf).abs().max().item<double>();
      EXPECT_LE(diff, tol * range) << "step " << call << " stream " << i << ": max|diff| " << diff << " of " << range;
    }
  };
  for (int call = 0; call < 4; ++call) step(3, call);
  for (int call = 4; call < 7; ++call) step(2, call);
  EXPECT_EQ(gs.shared_unet_calls, 7);
  EXPECT_EQ(gs.shared_encode_calls, 7);
  EXPECT_EQ(es.graph_captures + es.graph_replays, 0);
  if (device.is_cuda() && GraphCache::compiled()) {
    // Per row count (6 and 4 UNet rows): the eager warm-up, the capture (and its replay), then replays.
    EXPECT_EQ(gs.graph_captures, 6) << "a TAESD encode, a UNet and a decode graph for 3 streams and for 2";
    EXPECT_EQ(gs.graph_failures, 0);
    EXPECT_EQ(gs.graph_replays, 3 * 3 + 3 * 2);
    EXPECT_EQ(graphs.counts().graphs, 6u);
    std::cout << "[graphs] shared calls: " << gs.graph_captures << " captures, " << gs.graph_replays << " replays\n";
  } else {
    EXPECT_EQ(gs.graph_captures, 0);
    EXPECT_EQ(gs.graph_replays, 0);
    EXPECT_EQ(graphs.counts().eager, 3 * 7) << "every shared encode, UNet call and decode goes through the cache";
  }
  // One stream of the group with graphs off: the group's shared calls leave the cache alone.
  const auto before = graphs.counts();
  run_streams_batched({{graphed[0].get(), torch::rand({1, 3, 64, 64})}, {eager[2].get(), torch::rand({1, 3, 64, 64})}},
                      with_graphs, &gs);
  const auto after = graphs.counts();
  EXPECT_EQ(after.eager + after.replays + after.captures, before.eager + before.replays + before.captures);
}

// A stream with a ControlNet: on CUDA the ControlNet and the UNet taking its residuals are replayed from graphs of
// their own (a graph per shape; the scale applied after the ControlNet's graph, so a live scale is no new graph; a
// guidance range that keeps one of the two steps runs the ControlNet on one row: another shape). The replayed frames
// equal the eager stream's (bounds as above), and the ControlNet changes them (a graph that dropped the residuals would
// not). Here (CPU) both streams run eagerly, bit for bit.
TEST(ControlNetStreamGraphs, ReplayedControlNetStreamEqualsEagerStream) {
  const std::string cn_path = "controlnet/models/tiny-controlnet-sd15";
  if (!test::fixture_exists("models/tiny-sd15") || !test::fixture_exists(cn_path + "/config.json"))
    GTEST_SKIP() << "no fixtures";
  const c10::Device device = test::test_device();
  const c10::ScalarType dtype = test::test_dtype();
  if (dtype == c10::kHalf && device.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
  const auto models = load_on_test_device("models/tiny-sd15");
  const auto cn = ControlNet::load(test::fixture_path(cn_path), *models);
  const auto control =
      SafeTensorsFile::open(test::fixture_path("controlnet/control_images.safetensors")).get("control0");

  StreamConfig config;
  config.width = config.height = 64;
  config.t_index_list = {32, 45};
  config.cfg_type = CfgType::Self;
  config.guidance_scale = 1.3;
  config.seed = 9;
  StreamConfig eager_config = config;
  eager_config.cuda_graphs = false;
  StreamDiffusion graphed(models, config), eager(models, eager_config), plain(models, eager_config);
  for (StreamDiffusion* s : {&graphed, &eager, &plain}) s->prepare("a red fox in the snow", "blurry");
  for (StreamDiffusion* s : {&graphed, &eager}) {
    s->set_controlnets({ControlNetUnit{cn, 0.8}});
    s->set_control_image(0, control);
  }
  torch::manual_seed(4);
  const double tol = device.is_cpu() ? 0.0 : (dtype == c10::kHalf ? 1e-2 : 1e-4);
  // Per phase, the largest difference the ControlNet makes (eager stream against one without it) over its output
  // range: well above the bound, so a graph that dropped or mis-scaled the residuals would show.
  const auto phase = [&](int from, int to, const char* what) {
    double effect = 0;
    for (int call = from; call < to; ++call) {
      const auto x = (torch::rand({1, 3, 64, 64}) * 2 - 1) * (1.0 - 0.05 * call);
      const auto a = graphed.img2img(x).to(torch::kCPU, torch::kFloat);
      const auto b = eager.img2img(x).to(torch::kCPU, torch::kFloat);
      const auto p = plain.img2img(x).to(torch::kCPU, torch::kFloat);
      const double range = std::max(1e-6, b.abs().max().item<double>());
      const double diff = (a - b).abs().max().item<double>();
      EXPECT_LE(diff, tol * range) << what << " call " << call << ": graphs on vs off, max|diff| " << diff << " of "
                                   << range;
      effect = std::max(effect, (b - p).abs().max().item<double>() / range);
    }
    std::printf("[graphs] controlnet stream, %s: the ControlNet changes the frames by %.3g of their range\n", what,
                effect);
    EXPECT_GT(effect, std::max(0.02, 10 * tol)) << what << ": the ControlNet changes the frames";
  };
  phase(0, 5, "scale 0.8");
  for (StreamDiffusion* s : {&graphed, &eager}) s->set_controlnet_scale(0, 0.5);
  phase(5, 8, "scale 0.5");
  for (StreamDiffusion* s : {&graphed, &eager}) s->set_controlnet_guidance(0, 0.0, 0.5);
  phase(8, 12, "steps 0..0.5");
  EXPECT_EQ(graphed.stats().controlnet_calls, 12);

  const StreamStats& s = graphed.stats();
  if (device.is_cuda() && GraphCache::compiled()) {
    EXPECT_EQ(s.graph_captures, 5) << "TAESD encode, ControlNet on two rows and on one, UNet with residuals, decode";
    EXPECT_EQ(s.graph_failures, 0);
    // From each key's second call: encode, decode and the UNet 11 each, the ControlNet on two rows 7 and on one 3.
    EXPECT_EQ(s.graph_replays, 43);
    std::cout << "[graphs] controlnet stream: " << s.graph_captures << " captures, " << s.graph_replays << " replays\n";
  } else {
    EXPECT_EQ(s.graph_captures, 0);
    EXPECT_EQ(s.graph_replays, 0);
  }
  EXPECT_EQ(eager.stats().graph_replays, 0);
}

}  // namespace
}  // namespace sd
