// Many streams, one UNet call (pipeline/multi_stream.h) on the fixture models: several streams with different
// prompts, seeds, cfg types (none, self, initialize, full), modes (img2img, txt2img) and t_index_lists, over several
// consecutive calls (so latent buffers and RCFG state roll), batched into one UNet call per step, give what each
// stream gives on its own. The only difference allowed is the floating-point one of a UNet / decoder evaluated on a
// larger batch (fp32; kTol below, measured and printed). Plus the counters, the fallbacks (streams that cannot
// share a call run their own, bit for bit the one-stream path), the errors, and shared calls that fail (each stream
// then makes its own).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include <ATen/CPUGeneratorImpl.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/multi_stream.h"
#include "pipeline/stream_diffusion.h"
#include "stream_test_stubs.h"

namespace sd {
namespace {

using torch::Tensor;
using test::error_of;

// Max |batched - one-by-one| / max(1, max|one-by-one|) allowed on every output image, stock noise and latent buffer,
// fp32. Measured on this machine (2-core Xeon, libtorch 1.13, oneDNN): at most 4.4e-6 (5 mixed streams), see the
// "[multi-stream]" lines the tests print.
constexpr double kTol = 2e-5;
constexpr int64_t kSize = 64;

std::shared_ptr<const DiffusionModels> load(const std::string& model, const std::string& taesd = "") {
  LoadOptions o;
  o.threads = -1;
  o.taesd = taesd;
  return load_pipeline(test::fixture_path(model), o);
}

// "folder" or "folder:vae" (the AutoencoderKL, whose encode draws from each stream's Rng).
std::shared_ptr<const DiffusionModels> models_for(const std::string& param) {
  static std::map<std::string, std::shared_ptr<const DiffusionModels>> cache;
  auto it = cache.find(param);
  if (it != cache.end()) return it->second;
  const auto colon = param.find(':');
  auto m = colon == std::string::npos ? load(param) : load(param.substr(0, colon), "none");
  cache[param] = m;
  return m;
}

std::string folder_of(const std::string& param) { return param.substr(0, param.find(':')); }

struct Spec {
  std::string prompt;
  uint64_t seed;
  CfgType cfg;
  double guidance;
  std::vector<int64_t> t;
  bool img2img;
  double delta = 1.0;
};

std::unique_ptr<StreamDiffusion> make_stream(const std::shared_ptr<const DiffusionModels>& m, const Spec& s,
                                             int64_t size = kSize) {
  StreamConfig c;
  c.width = c.height = size;
  c.t_index_list = s.t;
  c.cfg_type = s.cfg;
  c.guidance_scale = s.guidance;
  c.delta = s.delta;
  c.seed = s.seed;
  auto st = std::make_unique<StreamDiffusion>(m, c);
  st->prepare(s.prompt, "blurry, low quality");
  return st;
}

Tensor frame(int64_t call, int64_t stream, int64_t size = kSize) {
  auto g = at::detail::createCPUGenerator(7000 + 97 * call + stream);
  return torch::rand({3, size, size}, g) * 2.0 - 1.0;
}

// max|a - ref| / max(1, max|ref|): the absolute difference for images and latents (values of order 1), relative for
// the RCFG stock noise, which the update scales by (α_{j+1}/β_{j+1})·(β_j/α_j) and can grow well above 1.
double max_abs(const Tensor& a, const Tensor& ref) {
  if (!a.defined() && !ref.defined()) return 0;
  const double scale = std::max(1.0, ref.to(torch::kDouble).abs().max().item<double>());
  return (a.to(torch::kDouble) - ref.to(torch::kDouble)).abs().max().item<double>() / scale;
}

const std::vector<Spec> kSpecs = {
    {"a photo of a cat", 2, CfgType::Self, 1.4, {32, 45}, true, 0.7},
    {"a red car in the rain", 11, CfgType::Initialize, 1.5, {30, 40}, true},
    {"an oil painting of a harbour", 5, CfgType::Full, 1.3, {20, 35}, true},
    {"a forest at night", 9, CfgType::None, 1.0, {10, 25}, false},
    {"a lighthouse", 17, CfgType::Self, 1.2, {25, 45}, false},  // txt2img with RCFG: the stream allows it
};

// Runs `calls` steps of the given streams one by one and batched (twin streams, same seeds) and compares.
// Returns the largest difference seen.
double compare_batched(const std::shared_ptr<const DiffusionModels>& m, const std::vector<Spec>& specs, int calls,
                       const std::string& label) {
  std::vector<std::unique_ptr<StreamDiffusion>> one, many;
  for (const auto& s : specs) {
    one.push_back(make_stream(m, s));
    many.push_back(make_stream(m, s));
  }
  double worst = 0;
  MultiStreamStats stats;
  for (int c = 0; c < calls; ++c) {
    std::vector<StreamCall> step;
    std::vector<Tensor> expect;
    for (size_t i = 0; i < specs.size(); ++i) {
      const Tensor x = specs[i].img2img ? frame(c, static_cast<int64_t>(i)) : Tensor();
      expect.push_back(specs[i].img2img ? one[i]->img2img(x) : one[i]->txt2img());
      step.push_back({many[i].get(), x});
    }
    const std::vector<StreamCallResult> res = run_stream_calls(step, {}, &stats);
    for (size_t i = 0; i < specs.size(); ++i) {
      EXPECT_FALSE(res[i].error) << label << " call " << c << " stream " << i;
      if (res[i].error) continue;
      EXPECT_EQ(res[i].shared_with, static_cast<int64_t>(specs.size()));
      EXPECT_TRUE(res[i].fallback.empty()) << res[i].fallback;
      EXPECT_EQ(res[i].output.sizes(), expect[i].sizes());
      if (res[i].output.sizes() != expect[i].sizes()) continue;
      if (specs.size() == 1) {  // one stream: its own UNet call, the one-stream path itself
        EXPECT_TRUE(torch::equal(res[i].output, expect[i])) << label << " call " << c;
      }
      const double d = max_abs(res[i].output, expect[i]);
      EXPECT_LE(d, kTol) << label << " call " << c << " stream " << i << " output";
      worst = std::max(worst, d);
    }
  }
  // The rolled state after the last call: RCFG stock noise, latent buffer, init noise.
  for (size_t i = 0; i < specs.size(); ++i) {
    const double ds = max_abs(many[i]->stock_noise(), one[i]->stock_noise());
    const double db = max_abs(many[i]->latent_buffer(), one[i]->latent_buffer());
    EXPECT_LE(ds, kTol) << label << " stream " << i << " stock_noise";
    EXPECT_LE(db, kTol) << label << " stream " << i << " latent buffer";
    EXPECT_TRUE(torch::equal(many[i]->init_noise(), one[i]->init_noise()));
    worst = std::max({worst, ds, db});
    // Counters: the same calls, UNet evaluations and rows as one by one; every one in a shared call (N >= 2).
    const StreamStats& a = one[i]->stats();
    const StreamStats& b = many[i]->stats();
    EXPECT_EQ(b.calls, a.calls);
    EXPECT_EQ(b.processed, a.processed);
    EXPECT_EQ(b.unet_calls, a.unet_calls);
    EXPECT_EQ(b.unet_rows, a.unet_rows);
    EXPECT_EQ(a.batched_calls, 0);
    EXPECT_EQ(b.batched_calls, specs.size() >= 2 ? calls : 0);
  }
  EXPECT_EQ(stats.steps, calls);
  EXPECT_EQ(stats.stream_calls, calls * static_cast<int64_t>(specs.size()));
  EXPECT_EQ(stats.errors, 0);
  // The img2img inputs share one encode per step when it is deterministic (TAESD), never with the AutoencoderKL.
  const int64_t img2img_streams = std::count_if(specs.begin(), specs.end(), [](const Spec& s) { return s.img2img; });
  EXPECT_EQ(stats.shared_encode_calls, specs.size() >= 2 && img2img_streams >= 2 && m->deterministic_encode() ? calls : 0)
      << label;
  if (specs.size() >= 2) {
    EXPECT_EQ(stats.shared_unet_calls, calls);
    EXPECT_EQ(stats.batched_calls, calls * static_cast<int64_t>(specs.size()));
    EXPECT_EQ(stats.max_batch, static_cast<int64_t>(specs.size()));
    int64_t rows = 0;
    for (const auto& s : many) rows += s->unet_batch_size();
    EXPECT_EQ(stats.max_rows, rows);
  } else {
    EXPECT_EQ(stats.own_calls, calls);
    EXPECT_EQ(stats.shared_unet_calls, 0);
  }
  std::cout << "  [multi-stream] " << label << ": " << specs.size() << " streams x " << calls
            << " calls, max |batched - one by one| / max(1, |ref|) = " << worst << " (tolerance " << kTol << ")\n";
  ::testing::Test::RecordProperty("max_abs_diff", std::to_string(worst));
  return worst;
}

class MultiStream : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!test::fixture_exists(folder_of(GetParam()) + "/model_index.json"))
      GTEST_SKIP() << folder_of(GetParam()) << " not in the fixture root";
  }
};

TEST_P(MultiStream, OneStreamIsTheOneStreamPathBitForBit) {
  compare_batched(models_for(GetParam()), {kSpecs[0]}, 3, GetParam() + " N=1 self");
  compare_batched(models_for(GetParam()), {kSpecs[3]}, 3, GetParam() + " N=1 txt2img");
}

TEST_P(MultiStream, TwoStreamsEqualOneByOne) {
  compare_batched(models_for(GetParam()), {kSpecs[0], kSpecs[1]}, 4, GetParam() + " N=2 self+initialize");
}

TEST_P(MultiStream, ThreeStreamsEqualOneByOne) {
  compare_batched(models_for(GetParam()), {kSpecs[1], kSpecs[2], kSpecs[3]}, 4,
                  GetParam() + " N=3 initialize+full+txt2img");
}

TEST_P(MultiStream, MixedModesCfgTypesAndStepCounts) {
  // Five streams: every cfg type, both modes, and one with three steps (more rows) in the same UNet call.
  std::vector<Spec> specs = kSpecs;
  specs[4].t = {5, 20, 40};
  compare_batched(models_for(GetParam()), specs, 4, GetParam() + " N=5 mixed");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MultiStream,
                         ::testing::Values("models/tiny-sd15", "models/tiny-sd21", "models/tiny-sd15:vae",
                                           "sdxl/models/tiny-sdxl"),
                         [](const auto& info) { return test::test_name(info.param); });

// ---- fallbacks and errors (tiny-sd15) -----------------------------------------------------------------------------

class MultiStreamFallback : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("models/tiny-sd15/model_index.json")) GTEST_SKIP() << "no models/tiny-sd15";
    m_ = models_for("models/tiny-sd15");
  }
  std::shared_ptr<const DiffusionModels> m_;
};

TEST_F(MultiStreamFallback, StreamsThatCannotShareRunTheirOwnCallBitForBit) {
  // a, b share; c (deep cache), d (sequential mode), e (another size) run alone - and give exactly the one-stream
  // outputs, since they take the one-stream path.
  auto build = [&](std::vector<std::unique_ptr<StreamDiffusion>>& v) {
    v.push_back(make_stream(m_, kSpecs[0]));
    v.push_back(make_stream(m_, kSpecs[1]));
    StreamConfig c;
    c.width = c.height = kSize;
    c.deep_cache_every = 2;
    v.push_back(std::make_unique<StreamDiffusion>(m_, c));
    c.deep_cache_every = 1;
    c.use_denoising_batch = false;
    c.cfg_type = CfgType::None;
    v.push_back(std::make_unique<StreamDiffusion>(m_, c));
    v.push_back(make_stream(m_, kSpecs[2], 32));
    for (size_t i = 2; i < 4; ++i) v[i]->prepare("a dog");
  };
  std::vector<std::unique_ptr<StreamDiffusion>> one, many;
  build(one);
  build(many);
  EXPECT_EQ(many[0]->batch_blocker(), "");
  EXPECT_NE(many[2]->batch_blocker().find("deep-feature cache"), std::string::npos) << many[2]->batch_blocker();
  EXPECT_NE(many[3]->batch_blocker().find("sequential mode"), std::string::npos) << many[3]->batch_blocker();
  EXPECT_EQ(batch_incompatibility(*many[0], *many[4]), "different stream sizes (64x64 vs 32x32)");
  EXPECT_EQ(batch_incompatibility(*many[0], *many[1]), "");
  auto other = load("models/tiny-sd15");
  auto foreign = make_stream(other, kSpecs[0]);
  EXPECT_NE(batch_incompatibility(*many[0], *foreign).find("different model sets"), std::string::npos);
  EXPECT_NE(batch_incompatibility(*many[0], *many[2]).find("the second stream cannot share UNet calls: the deep"),
            std::string::npos);

  MultiStreamStats stats;
  for (int c = 0; c < 3; ++c) {
    std::vector<StreamCall> step;
    std::vector<Tensor> expect;
    for (size_t i = 0; i < one.size(); ++i) {
      const Tensor x = frame(c, static_cast<int64_t>(i), i == 4 ? 32 : kSize);
      expect.push_back(one[i]->img2img(x));
      step.push_back({many[i].get(), x});
    }
    const auto res = run_stream_calls(step, {}, &stats);
    for (size_t i = 0; i < one.size(); ++i) {
      ASSERT_FALSE(res[i].error) << i;
      if (i >= 2) {
        EXPECT_TRUE(torch::equal(res[i].output, expect[i])) << "stream " << i << " call " << c;
        EXPECT_EQ(res[i].shared_with, 1);
      } else {
        EXPECT_LE(max_abs(res[i].output, expect[i]), kTol);
        EXPECT_EQ(res[i].shared_with, 2);
      }
    }
    EXPECT_EQ(res[0].fallback, "");
    EXPECT_NE(res[2].fallback.find("deep-feature cache"), std::string::npos);
    EXPECT_NE(res[3].fallback.find("sequential mode"), std::string::npos);
    EXPECT_EQ(res[4].fallback, "no other stream of this step shares its models, size and prompt-embedding shape");
  }
  EXPECT_EQ(stats.shared_unet_calls, 3);
  EXPECT_EQ(stats.batched_calls, 6);
  EXPECT_EQ(stats.own_calls, 9);
  EXPECT_EQ(stats.max_batch, 2);
  EXPECT_EQ(many[2]->stats().batched_calls, 0);
  EXPECT_EQ(many[2]->stats().unet_shallow_calls, one[2]->stats().unet_shallow_calls);
}

TEST_F(MultiStreamFallback, MaxStreamsSplitsTheGroup) {
  std::vector<std::unique_ptr<StreamDiffusion>> one, many;
  for (int i = 0; i < 5; ++i) {
    Spec s = kSpecs[i % 2];
    s.seed += static_cast<uint64_t>(i);
    one.push_back(make_stream(m_, s));
    many.push_back(make_stream(m_, s));
  }
  MultiStreamOptions o;
  o.max_streams = 2;  // 2 + 2 + 1 (the last alone)
  MultiStreamStats stats;
  for (int c = 0; c < 2; ++c) {
    std::vector<StreamCall> step;
    std::vector<Tensor> expect;
    for (size_t i = 0; i < one.size(); ++i) {
      const Tensor x = frame(c, static_cast<int64_t>(i));
      expect.push_back(one[i]->img2img(x));
      step.push_back({many[i].get(), x});
    }
    const auto res = run_stream_calls(step, o, &stats);
    for (size_t i = 0; i < one.size(); ++i) {
      ASSERT_FALSE(res[i].error);
      EXPECT_EQ(res[i].shared_with, i < 4 ? 2 : 1) << i;
      EXPECT_EQ(res[i].fallback, i < 4 ? "" : "the shared calls of this step are full (max_streams 2)");
      EXPECT_LE(max_abs(res[i].output, expect[i]), kTol);
    }
  }
  EXPECT_EQ(stats.shared_unet_calls, 4);
  EXPECT_EQ(stats.max_batch, 2);
  EXPECT_EQ(stats.own_calls, 2);
}

TEST_F(MultiStreamFallback, SimilarityFilterSkipsInsideABatch) {
  // Stream 0 sees the same frame twice: its second call is skipped (previous output, no model call); stream 1 still
  // runs (alone, since nothing is left to share with) and equals its one-by-one output.
  auto build = [&](std::vector<std::unique_ptr<StreamDiffusion>>& v) {
    Spec s0 = kSpecs[0];
    v.push_back(make_stream(m_, s0));
    SimilarityFilterOptions f;
    f.enabled = true;
    f.threshold = 0.9;
    f.sleep_on_skip = true;  // left to the end of a step in which nothing ran: here stream 1 runs, so no sleep
    v.back()->set_similarity_filter(f);
    v.push_back(make_stream(m_, kSpecs[1]));
  };
  std::vector<std::unique_ptr<StreamDiffusion>> one, many;
  build(one);
  build(many);
  const Tensor still = frame(0, 0);
  std::vector<std::vector<StreamCallResult>> results;
  for (int c = 0; c < 2; ++c) {
    const Tensor x1 = frame(c, 1);
    const Tensor e0 = one[0]->img2img(still), e1 = one[1]->img2img(x1);
    results.push_back(run_stream_calls({{many[0].get(), still}, {many[1].get(), x1}}));
    const auto& r = results.back();
    ASSERT_FALSE(r[0].error);
    ASSERT_FALSE(r[1].error);
    EXPECT_LE(max_abs(r[0].output, e0), kTol);
    EXPECT_LE(max_abs(r[1].output, e1), kTol);
  }
  EXPECT_FALSE(results[0][0].skipped);
  EXPECT_EQ(results[0][0].shared_with, 2);
  EXPECT_TRUE(results[1][0].skipped);
  EXPECT_EQ(results[1][0].shared_with, 0);
  EXPECT_TRUE(torch::equal(results[1][0].output, results[0][0].output));
  EXPECT_EQ(results[1][1].shared_with, 1);
  EXPECT_EQ(many[0]->stats().skipped, 1);
  EXPECT_EQ(many[1]->stats().batched_calls, 1);
}

TEST_F(MultiStreamFallback, ErrorsFailOnlyTheirCall) {
  auto a = make_stream(m_, kSpecs[0]);
  auto b = make_stream(m_, kSpecs[1]);
  auto b_ref = make_stream(m_, kSpecs[1]);
  StreamConfig c;
  c.width = c.height = kSize;
  StreamDiffusion unprepared(m_, c);
  const Tensor bad = torch::zeros({3, 16, 16});
  const Tensor x = frame(0, 1);
  const auto res = run_stream_calls({{a.get(), bad}, {b.get(), x}, {b.get(), x}, {nullptr, x}, {&unprepared, x}});
  ASSERT_EQ(res.size(), 5u);
  auto msg = [](const std::exception_ptr& e) {
    return error_of<InvalidArgument>([&] { std::rethrow_exception(e); });
  };
  ASSERT_TRUE(res[0].error);
  EXPECT_NE(msg(res[0].error).find("img2img: input has shape [3, 16, 16]"), std::string::npos) << msg(res[0].error);
  ASSERT_FALSE(res[1].error);
  EXPECT_LE(max_abs(res[1].output, b_ref->img2img(x)), kTol);
  ASSERT_TRUE(res[2].error);
  EXPECT_EQ(msg(res[2].error), "run_stream_calls: calls 1 and 2 are for the same stream; a stream takes one call per step");
  ASSERT_TRUE(res[3].error);
  EXPECT_EQ(msg(res[3].error), "run_stream_calls: call 3 has no stream");
  ASSERT_TRUE(res[4].error);
  EXPECT_EQ(msg(res[4].error), "img2img: call prepare(prompt) first");
  EXPECT_EQ(res[4].fallback, "not prepared");
  // The failed call changed nothing: stream a still runs its first frame like a fresh twin.
  EXPECT_EQ(a->stats().calls, 0);
  // run_streams_batched rethrows the first error.
  EXPECT_EQ(error_of<InvalidArgument>([&] { run_streams_batched({{a.get(), bad}}); }).substr(0, 25),
            "img2img: input has shape ");
}

// A shared call that fails is made again by each of its streams alone. The stub models refuse an encode, UNet call or
// decode over more than a set number of frames / rows (as a GPU out of memory at a large batch would), so the shared
// call fails and each stream's own call does not; the stub UNet is row by row, so the outputs equal the one-by-one
// outputs bit for bit whichever calls were shared.
class LimitedModels : public test::StubModels {
 public:
  int64_t max_encode = 1 << 20, max_unet_rows = 1 << 20, max_decode = 1 << 20;
  bool deterministic_encode() const override { return true; }
  torch::Tensor encode_image(const torch::Tensor& x, Rng& rng) const override {
    if (x.size(0) > max_encode) throw Error("stub encode: " + std::to_string(x.size(0)) + " frames at once");
    return StubModels::encode_image(x, rng);
  }
  torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& t, const torch::Tensor& ehs,
                     const AddedConditioning& added, const ControlResiduals& control) const override {
    if (sample.size(0) > max_unet_rows) throw Error("stub unet: " + std::to_string(sample.size(0)) + " rows at once");
    return StubModels::unet(sample, t, ehs, added, control);
  }
  torch::Tensor decode_latent(const torch::Tensor& z) const override {
    if (z.size(0) > max_decode) throw Error("stub decode: " + std::to_string(z.size(0)) + " latents at once");
    return StubModels::decode_latent(z);
  }
};

std::vector<std::unique_ptr<StreamDiffusion>> stub_streams(const std::shared_ptr<const DiffusionModels>& m) {
  std::vector<std::unique_ptr<StreamDiffusion>> s;
  for (int i = 0; i < 3; ++i) {
    StreamConfig c;
    c.width = c.height = kSize;
    c.t_index_list = {20, 35};
    c.cfg_type = i == 1 ? CfgType::Full : CfgType::Self;  // 2 or 4 UNet rows
    c.guidance_scale = 1.3;
    c.seed = 3 + i;
    s.push_back(std::make_unique<StreamDiffusion>(m, c));
    s.back()->prepare("prompt " + std::to_string(i), "blurry");
  }
  return s;
}

struct FailCase {
  const char* which;   // the shared call that fails
  const char* reason;  // its fallback line, as each call's StreamCallResult::fallback gives it
};

void PrintTo(const FailCase& c, std::ostream* os) { *os << c.which; }

class MultiStreamSharedFailure : public ::testing::TestWithParam<FailCase> {};

TEST_P(MultiStreamSharedFailure, IsMadeAgainByEachStreamAloneWithTheOneByOneOutputs) {
  const FailCase fc = GetParam();
  auto limited = std::make_shared<LimitedModels>();
  const std::string which = fc.which;
  if (which == "encode") limited->max_encode = 1;
  if (which == "unet") limited->max_unet_rows = 4;  // one stream's rows at most (cfg full: 4)
  if (which == "decode") limited->max_decode = 1;
  auto plain = std::make_shared<LimitedModels>();
  auto one = stub_streams(plain), many = stub_streams(limited);
  MultiStreamStats stats;
  for (int c = 0; c < 3; ++c) {
    std::vector<StreamCall> step;
    std::vector<Tensor> expect;
    for (size_t i = 0; i < one.size(); ++i) {
      const Tensor x = i == 2 ? Tensor() : frame(c, static_cast<int64_t>(i));  // stream 2: txt2img
      expect.push_back(x.defined() ? one[i]->img2img(x) : one[i]->txt2img());
      step.push_back({many[i].get(), x});
    }
    const auto res = run_stream_calls(step, {}, &stats);
    for (size_t i = 0; i < one.size(); ++i) {
      ASSERT_FALSE(res[i].error) << which << " call " << c << " stream " << i;
      EXPECT_TRUE(torch::equal(res[i].output, expect[i])) << which << " call " << c << " stream " << i;
      // The encode is shared by the img2img streams 0 and 1 only.
      const bool fell_back = which != "encode" || i < 2;
      EXPECT_EQ(res[i].fallback, fell_back ? fc.reason : "") << which << " stream " << i;
      EXPECT_EQ(res[i].shared_with, which == "unet" ? 1 : 3) << which << " stream " << i;
    }
  }
  EXPECT_EQ(stats.shared_call_failures, 3);
  EXPECT_EQ(stats.errors, 0);
  EXPECT_EQ(stats.shared_encode_calls, which == "encode" ? 0 : 3);
  EXPECT_EQ(stats.shared_unet_calls, which == "unet" ? 0 : 3);
  EXPECT_EQ(stats.own_calls, which == "unet" ? 9 : 0);
  // The rolled state equals the one-by-one streams' too.
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_TRUE(torch::equal(many[i]->stock_noise(), one[i]->stock_noise())) << which << " stream " << i;
    EXPECT_TRUE(torch::equal(many[i]->latent_buffer(), one[i]->latent_buffer())) << which << " stream " << i;
    EXPECT_EQ(many[i]->stats().unet_calls, one[i]->stats().unet_calls);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Calls, MultiStreamSharedFailure,
    ::testing::Values(
        FailCase{"encode", "the shared encode of 2 streams failed (stub encode: 2 frames at once); each stream made "
                           "its own"},
        FailCase{"unet", "the shared UNet call of 3 streams failed (stub unet: 8 rows at once); each stream made its "
                         "own"},
        FailCase{"decode", "the shared decode of 3 streams failed (stub decode: 3 latents at once); each stream made "
                           "its own"}),
    [](const auto& info) { return std::string(info.param.which); });

TEST(MultiStreamSharedFailureAlone, ACallFailsOnlyWhenItsOwnCallFailsToo) {
  // No stream's rows fit (2 rows each, at most 1): the shared call fails, then each stream's own call; every call
  // gets its own call's error, and the streams still run once the limit is lifted.
  auto m = std::make_shared<LimitedModels>();
  m->max_unet_rows = 1;
  auto s = stub_streams(m);
  std::vector<StreamCall> step;
  for (size_t i = 0; i < s.size(); ++i)
    step.push_back({s[i].get(), i == 2 ? Tensor() : frame(0, static_cast<int64_t>(i))});
  MultiStreamStats stats;
  const auto res = run_stream_calls(step, {}, &stats);
  for (size_t i = 0; i < s.size(); ++i) {
    ASSERT_TRUE(res[i].error) << i;
    EXPECT_EQ(error_of<Error>([&] { std::rethrow_exception(res[i].error); }),
              "stub unet: " + std::to_string(s[i]->unet_batch_size()) + " rows at once");
    EXPECT_FALSE(res[i].output.defined());
  }
  EXPECT_EQ(stats.errors, 3);
  EXPECT_EQ(stats.shared_call_failures, 1);
  m->max_unet_rows = 1 << 20;
  for (size_t i = 0; i < s.size(); ++i) step[i].images = i == 2 ? Tensor() : frame(1, static_cast<int64_t>(i));
  for (const auto& r : run_stream_calls(step, {}, &stats)) EXPECT_FALSE(r.error);
}

}  // namespace
}  // namespace sd
