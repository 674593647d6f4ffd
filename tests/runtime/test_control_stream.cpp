// Where ControlNet control images come from in the runtime (issue 15): the preprocessors (canny, gray, passthrough,
// feedback, the registry seam), the control commands, and streams on the tiny fixture model + tiny ControlNet —
// canny of each input frame equals the bare loop that sets canny images by hand, a second source is kept in step and
// ends the input when it ends first, feedback feeds the previous output back, live scale / preprocessor changes.
#include <filesystem>

#include <gtest/gtest.h>
#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"
#include "runtime/control_command.h"
#include "runtime/control_preprocessor.h"
#include "runtime/runtime_test_util.h"
#include "runtime/stream_diffusion_processor.h"
#include "runtime/stream_runtime.h"
#include "runtime/tick_source.h"

namespace sd {
namespace {

using test::MemorySink;

torch::Tensor rgb_of(const cv::Mat& bgr) {
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, torch::kUInt8).clone();
}

using test::error_of;

// ---- preprocessors -------------------------------------------------------------------------------------------------

torch::Tensor square_image() {  // a white 20x20 square on black, 64x64 RGB
  auto img = torch::zeros({64, 64, 3}, torch::kUInt8);
  img.slice(0, 22, 42).slice(1, 22, 42).fill_(255);
  return img;
}

TEST(ControlPreprocessor, CannyGivesBinaryEdgesOnTheSquareOutline) {
  auto canny = make_control_preprocessor("canny");
  EXPECT_EQ(canny->name(), "canny:100:200");
  EXPECT_FALSE(canny->feedback());
  const torch::Tensor e = canny->apply(square_image());
  ASSERT_EQ(e.sizes(), (std::vector<int64_t>{64, 64, 3}));
  ASSERT_EQ(e.scalar_type(), torch::kUInt8);
  // Three equal channels of 0 / 255 only.
  EXPECT_TRUE(torch::equal(e.select(2, 0), e.select(2, 1)));
  EXPECT_TRUE(torch::equal(e.select(2, 0), e.select(2, 2)));
  const auto v = e.select(2, 0).to(torch::kInt32);
  EXPECT_EQ(((v == 0) | (v == 255)).all().item<bool>(), true);
  // Edges on the outline (rows/cols 21..42), none in the flat inside or far outside.
  EXPECT_GT(v.slice(0, 20, 44).slice(1, 20, 44).sum().item<int64_t>(), 255 * 60);
  EXPECT_EQ(v.slice(0, 26, 38).slice(1, 26, 38).sum().item<int64_t>(), 0);
  EXPECT_EQ(v.slice(0, 0, 16).sum().item<int64_t>(), 0);
  // A flat image has no edges at all.
  EXPECT_EQ(canny->apply(torch::full({32, 48, 3}, 128, torch::kUInt8)).sum().item<int64_t>(), 0);
  // Thresholds above every gradient: no edges.
  EXPECT_EQ(make_control_preprocessor("canny:5000:6000")->apply(square_image()).sum().item<int64_t>(), 0);
  EXPECT_EQ(make_control_preprocessor("canny:50.5:150")->name(), "canny:50.5:150");
}

TEST(ControlPreprocessor, GrayPassthroughAndFeedback) {
  auto img = torch::zeros({8, 8, 3}, torch::kUInt8);
  img.select(2, 0).fill_(255);  // pure red
  const torch::Tensor g = make_control_preprocessor("gray")->apply(img);
  // OpenCV's BT.601 luma: 0.299 * 255 = 76.2.
  EXPECT_EQ(g.min().item<int>(), 76);
  EXPECT_EQ(g.max().item<int>(), 76);
  EXPECT_TRUE(torch::equal(make_control_preprocessor("passthrough")->apply(img), img));
  auto fb = make_control_preprocessor("feedback");
  EXPECT_TRUE(fb->feedback());
  EXPECT_EQ(fb->name(), "feedback");
}

TEST(ControlPreprocessor, BadSpecsAndImagesAreExplained) {
  std::string e = error_of([] { make_control_preprocessor("depth"); });
  EXPECT_NE(e.find("unknown control preprocessor 'depth'"), std::string::npos) << e;
  EXPECT_NE(e.find("canny, feedback, gray, passthrough"), std::string::npos) << e;
  e = error_of([] { make_control_preprocessor("canny:200:100"); });
  EXPECT_NE(e.find("low threshold is above the high one"), std::string::npos) << e;
  e = error_of([] { make_control_preprocessor("canny:abc:100"); });
  EXPECT_NE(e.find("threshold 'abc'"), std::string::npos) << e;
  e = error_of([] { make_control_preprocessor("canny:100"); });
  EXPECT_NE(e.find("two thresholds"), std::string::npos) << e;
  e = error_of([] { make_control_preprocessor("gray:1"); });
  EXPECT_NE(e.find("takes no arguments"), std::string::npos) << e;
  e = error_of([] { make_control_preprocessor("canny")->apply(torch::zeros({8, 8}, torch::kUInt8)); });
  EXPECT_NE(e.find("uint8 RGB [H, W, 3]"), std::string::npos) << e;
}

TEST(ControlPreprocessor, TheRegistryIsTheSeamForModelPreprocessors) {
  // What a depth model would do: register a factory; make_control_preprocessor finds it with its arguments.
  class Invert final : public ControlPreprocessor {
   public:
    std::string name() const override { return "test_invert"; }
    torch::Tensor apply(const torch::Tensor& rgb) const override { return 255 - rgb; }
  };
  std::vector<std::string> seen;
  register_control_preprocessor("test_invert", [&seen](const std::vector<std::string>& args) {
    seen = args;
    return std::make_shared<Invert>();
  });
  auto p = make_control_preprocessor("test_invert:model.safetensors");
  EXPECT_EQ(seen, std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(p->apply(torch::zeros({2, 2, 3}, torch::kUInt8)).min().item<int>(), 255);
  const auto names = control_preprocessor_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "test_invert"), names.end());
  EXPECT_THROW(register_control_preprocessor("bad:name", nullptr), InvalidArgument);
}

TEST(ControlCommands, ParseControlnetScaleAndPreprocessor) {
  using K = ControlCommand::Kind;
  auto c = parse_control_command("controlnet_scale 1 0.75");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->kind, K::ControlnetScale);
  EXPECT_EQ(c->index, 1);
  EXPECT_DOUBLE_EQ(c->number, 0.75);
  c = parse_control_command("control_preprocessor 0 canny:50:150");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->kind, K::ControlPreprocessor);
  EXPECT_EQ(c->index, 0);
  EXPECT_EQ(c->text, "canny:50:150");
  std::string e = error_of([] { parse_control_command("controlnet_scale 0.5"); });
  EXPECT_NE(e.find("needs a ControlNet index"), std::string::npos) << e;
  e = error_of([] { parse_control_command("controlnet_scale x 0.5"); });
  EXPECT_NE(e.find("index expects an integer, got 'x'"), std::string::npos) << e;
  e = error_of([] { parse_control_command("controlnet_scale -1 0.5"); });
  EXPECT_NE(e.find("must be >= 0"), std::string::npos) << e;
  e = error_of([] { parse_control_command("controlnet_scale 0 lots"); });
  EXPECT_NE(e.find("expects a number, got 'lots'"), std::string::npos) << e;
  EXPECT_NE(control_help().find("controlnet_scale"), std::string::npos);
}

// ---- streams on the tiny model + tiny ControlNet -------------------------------------------------------------------

const std::string kModel = "models/tiny-sd15";
const std::string kControlNet = "controlnet/models/tiny-controlnet-sd15";
const std::string kPrompt = "a photo of a cat";

std::shared_ptr<const DiffusionModels> tiny_models() {
  static std::shared_ptr<const DiffusionModels> models = [] {
    LoadOptions lo;
    lo.threads = 1;
    return load_pipeline(test::fixture_path(kModel), lo);
  }();
  return models;
}

std::shared_ptr<const ControlNet> tiny_controlnet() {
  static std::shared_ptr<const ControlNet> net = ControlNet::load(test::fixture_path(kControlNet), *tiny_models());
  return net;
}

std::shared_ptr<StreamDiffusion> make_stream(bool txt2img, double scale, bool with_controlnet = true) {
  StreamConfig c;
  c.t_index_list = txt2img ? std::vector<int64_t>{0, 16} : std::vector<int64_t>{32, 45};
  c.width = c.height = 64;
  c.cfg_type = txt2img ? CfgType::None : CfgType::Self;
  auto s = std::make_shared<StreamDiffusion>(tiny_models(), c);
  if (with_controlnet) s->set_controlnets({{tiny_controlnet(), scale}});
  s->prepare(kPrompt);
  return s;
}

StreamOptions quiet() {
  StreamOptions o;
  o.status_interval_s = 0;
  return o;
}

struct TempDir {
  std::string path = test::make_temp_dir("rt_control");
  ~TempDir() { std::filesystem::remove_all(path); }
};

int64_t max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kInt32) - b.to(torch::kInt32)).abs().max().item<int64_t>();
}

struct RunOut {
  std::vector<torch::Tensor> frames;
  nlohmann::json summary;
};

RunOut run(std::unique_ptr<FrameSource> source, std::shared_ptr<StreamDiffusionProcessor> proc,
           std::unique_ptr<FrameSource> control = nullptr, StreamOptions options = quiet()) {
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(std::move(source), proc, std::move(sink), std::move(options));
  if (control) rt.set_control_source(std::move(control));
  rt.run();
  RunOut r;
  r.summary = rt.summary();
  for (const auto& m : mem->frames) r.frames.push_back(rgb_of(m));
  return r;
}

class ControlStream : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists(kModel) || !test::fixture_exists(kControlNet))
      GTEST_SKIP() << "fixture models " << kModel << " / " << kControlNet << " not present";
  }
};

TEST_F(ControlStream, CannyOfEachFrameMatchesTheBareLoop) {
  TempDir tmp;
  const int N = 6;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", N);
  auto stream = make_stream(false, 1.0);
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
  proc->set_control_preprocessors({make_control_preprocessor("canny")}, false);
  const RunOut out = run(open_source(video), proc);
  ASSERT_EQ(out.frames.size(), static_cast<size_t>(N));
  EXPECT_EQ(stream->stats().controlnet_calls, stream->stats().unet_calls);

  // By hand: canny of the decoded frame set before each call; the delay line flushed with the last frame.
  auto bare = make_stream(false, 1.0);
  auto canny = make_control_preprocessor("canny");
  const auto frames = test::read_video(video);
  std::vector<torch::Tensor> ref;
  for (int k = 0; k < N + 1; ++k) {
    const torch::Tensor rgb = rgb_of(frames[std::min(k, N - 1)]);
    bare->set_control_image(0, canny->apply(rgb));
    const torch::Tensor o = bare->img2img(image_to_tensor(rgb, 64, 64));
    if (k >= 1) ref.push_back(tensor_to_image(o).squeeze(0));
  }
  for (int i = 0; i < N; ++i) EXPECT_EQ(max_abs_diff(out.frames[i], ref[i]), 0) << "frame " << i;

  // The control images matter: the same run without the ControlNet differs.
  auto plain = make_stream(false, 1.0, false);
  const RunOut without = run(open_source(video), std::make_shared<StreamDiffusionProcessor>(plain, kPrompt, "", false));
  int64_t diff = 0;
  for (int i = 0; i < N; ++i) diff = std::max(diff, max_abs_diff(out.frames[i], without.frames[i]));
  EXPECT_GT(diff, 0);
}

TEST_F(ControlStream, SecondSourceIsKeptInStepAndEndsTheInputWhenItEnds) {
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 10);
  const std::string control = test::write_index_video(tmp.path + "/control.avi", 4);
  auto stream = make_stream(false, 1.0);
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
  proc->set_control_preprocessors({make_control_preprocessor("passthrough")}, true);
  const RunOut out = run(open_source(video), proc, open_source(control));
  // 4 control frames: 4 input frames are read, all of them come out (lossless), and the reason says why.
  EXPECT_EQ(out.summary["frames_in"], 4);
  EXPECT_EQ(out.summary["frames_out"], 4);
  EXPECT_EQ(out.summary["stop_reason"], "control input ended");
  EXPECT_EQ(out.summary["control_source"].is_string(), true);
  ASSERT_EQ(out.frames.size(), 4u);

  // In step: frame k was controlled by control frame k (set by hand here, passthrough of the decoded frame).
  auto bare = make_stream(false, 1.0);
  const auto frames = test::read_video(video);
  const auto controls = test::read_video(control);
  for (int k = 0; k < 5; ++k) {
    bare->set_control_image(0, rgb_of(controls[std::min(k, 3)]));
    const torch::Tensor o = bare->img2img(image_to_tensor(rgb_of(frames[std::min(k, 3)]), 64, 64));
    if (k >= 1) {
      EXPECT_EQ(max_abs_diff(out.frames[k - 1], tensor_to_image(o).squeeze(0)), 0) << "frame " << k - 1;
    }
  }
}

TEST_F(ControlStream, SecondSourceEndsTheSynchronousLoopToo) {
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 6);
  const std::string control = test::write_index_video(tmp.path + "/control.avi", 2);
  auto proc = std::make_shared<StreamDiffusionProcessor>(make_stream(false, 1.0), kPrompt, "", false);
  proc->set_control_preprocessors({make_control_preprocessor("gray")}, true);
  StreamOptions o = quiet();
  o.synchronous = true;
  const RunOut out = run(open_source(video), proc, open_source(control), o);
  EXPECT_EQ(out.summary["frames_out"], 2);
  EXPECT_EQ(out.summary["stop_reason"], "control input ended");
}

TEST_F(ControlStream, Txt2ImgFeedbackFeedsThePreviousOutputBack) {
  auto stream = make_stream(true, 1.0);
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", true);
  // Canny needs frames: a txt2img stream without a second source refuses it.
  const std::string e =
      error_of([&] { proc->set_control_preprocessors({make_control_preprocessor("canny")}, false); });
  EXPECT_NE(e.find("has no input frames"), std::string::npos) << e;
  proc->set_control_preprocessors({make_control_preprocessor("feedback")}, false);
  StreamOptions o = quiet();
  o.max_frames = 5;
  const RunOut out = run(std::make_unique<TickSource>(0), proc, nullptr, o);
  ASSERT_EQ(out.frames.size(), 5u);
  EXPECT_EQ(stream->stats().controlnet_calls, stream->stats().unet_calls);
  // The control image of the last call was the newest decoded image before it.
  ASSERT_TRUE(stream->control_image(0).defined());
  EXPECT_GT(stream->control_image(0).abs().sum().item<double>(), 0.0) << "feedback stayed black";

  // By hand: the first call sees black, each later call the previous call's decode.
  auto bare = make_stream(true, 1.0);
  torch::Tensor prev = torch::zeros({1, 3, 64, 64});
  std::vector<torch::Tensor> ref;
  for (int k = 0; k < 6; ++k) {
    bare->set_control_image(0, prev);
    const torch::Tensor img = bare->txt2img();
    prev = (img.to(torch::kFloat32) / 2 + 0.5).clamp(0, 1);
    if (k >= 1) ref.push_back(tensor_to_image(img).squeeze(0));
  }
  for (int i = 0; i < 5; ++i) EXPECT_EQ(max_abs_diff(out.frames[i], ref[i]), 0) << "frame " << i;
}

TEST_F(ControlStream, LiveScaleZeroEqualsNoControlNetAndBadCommandsAreRefused) {
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 5);
  auto stream = make_stream(false, 1.0);
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
  proc->set_control_preprocessors({make_control_preprocessor("canny")}, false);
  StreamOptions o = quiet();
  o.scheduled.push_back({0, *parse_control_command("controlnet_scale 0 0")});
  o.scheduled.push_back({0, *parse_control_command("control_preprocessor 0 depth")});        // unknown: refused
  o.scheduled.push_back({0, *parse_control_command("control_preprocessor 3 gray")});         // no such ControlNet
  o.scheduled.push_back({0, *parse_control_command("controlnet_scale 2 1")});                // no such ControlNet
  o.scheduled.push_back({2, *parse_control_command("control_preprocessor 0 canny:10:20")});  // accepted
  const RunOut out = run(open_source(video), proc, nullptr, o);
  ASSERT_EQ(out.frames.size(), 5u);
  EXPECT_EQ(out.summary["controls"].size(), 2u) << out.summary["controls"].dump();
  EXPECT_EQ(proc->control_preprocessors()[0]->name(), "canny:10:20");
  EXPECT_EQ(stream->stats().controlnet_calls, 0) << "scale 0 skips the ControlNet";

  auto plain = make_stream(false, 1.0, false);
  const RunOut without = run(open_source(video), std::make_shared<StreamDiffusionProcessor>(plain, kPrompt, "", false));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(max_abs_diff(out.frames[i], without.frames[i]), 0) << "frame " << i;
}

}  // namespace
}  // namespace sd
