// Where ControlNet control images come from in the runtime (issue 15): the preprocessors (canny, gray, passthrough,
// feedback, the registry seam), the control commands, and streams on the tiny fixture model + tiny ControlNet —
// canny of each input frame equals the bare loop that sets canny images by hand, a second source is kept in step and
// ends the input when it ends first, feedback feeds the previous output back, live scale / preprocessor changes, and
// no control images are made for a ControlNet that does not run.
// Also the IP-Adapter image prompt from a second source (--image-prompt-input): read every N frames, encoded only when
// it changed, the last one kept when the source ends — equal to the bare loop that sets the image prompts by hand.
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <mutex>
#include <vector>

#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>
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
  EXPECT_NE(control_help().find("controlnet_scale"), std::string::npos);
  c = parse_control_command("controlnet_guidance 1 0.25 0.75");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->kind, K::ControlnetGuidance);
  EXPECT_EQ(c->index, 1);
  EXPECT_DOUBLE_EQ(c->number, 0.25);
  EXPECT_DOUBLE_EQ(c->end, 0.75);
  EXPECT_NE(control_coalesce_key(*c), control_coalesce_key(*parse_control_command("controlnet_guidance 0 0 1")));
  // Refused lines and what their errors say.
  for (const auto& [line, want] : std::vector<std::pair<std::string, std::string>>{
           {"controlnet_scale 0.5", "needs a ControlNet index"},
           {"controlnet_scale x 0.5", "index expects an integer, got 'x'"},
           {"controlnet_scale -1 0.5", "must be >= 0"},
           {"controlnet_scale 0 lots", "expects a number, got 'lots'"},
           {"controlnet_guidance 0 0.5", "'controlnet_guidance I START END'"},
           {"controlnet_guidance 0 0.6 0.4", "start 0.6 and end 0.4 must satisfy 0 <= start < end <= 1"},
           {"controlnet_guidance 0 0 nan", "'controlnet_guidance end' expects a number, got 'nan'"},
           {"controlnet_guidance -1 0 1", "must be >= 0"}}) {
    const std::string text = line;  // (a structured binding cannot be captured in C++17)
    const std::string e = error_of([&] { parse_control_command(text); });
    EXPECT_NE(e.find(want), std::string::npos) << text << ": " << e;
  }
  EXPECT_NE(control_help().find("controlnet_guidance <i> <start> <end>"), std::string::npos);
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

// Five img2img frames of a video through a stream with one ControlNet at scale 1 (canny of each frame) and the
// commands scheduled at their frames; the frames must equal the same run's without a ControlNet.
struct ScheduledRun {
  std::shared_ptr<StreamDiffusion> stream;
  std::shared_ptr<StreamDiffusionProcessor> proc;
  RunOut out;
};
ScheduledRun run_equal_to_no_controlnet(const std::vector<std::pair<int64_t, std::string>>& commands) {
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 5);
  ScheduledRun r;
  r.stream = make_stream(false, 1.0);
  r.proc = std::make_shared<StreamDiffusionProcessor>(r.stream, kPrompt, "", false);
  r.proc->set_control_preprocessors({make_control_preprocessor("canny")}, false);
  StreamOptions o = quiet();
  for (const auto& [frame, line] : commands) o.scheduled.push_back({frame, *parse_control_command(line)});
  r.out = run(open_source(video), r.proc, nullptr, o);
  EXPECT_EQ(r.out.frames.size(), 5u);
  auto plain = make_stream(false, 1.0, false);
  const RunOut without = run(open_source(video), std::make_shared<StreamDiffusionProcessor>(plain, kPrompt, "", false));
  for (size_t i = 0; i < std::min(r.out.frames.size(), without.frames.size()); ++i)
    EXPECT_EQ(max_abs_diff(r.out.frames[i], without.frames[i]), 0) << "frame " << i;
  return r;
}

TEST_F(ControlStream, LiveScaleZeroEqualsNoControlNetAndBadCommandsAreRefused) {
  const ScheduledRun r = run_equal_to_no_controlnet({{0, "controlnet_scale 0 0"},
                                                     {0, "control_preprocessor 0 depth"},  // unknown: refused
                                                     {0, "control_preprocessor 3 gray"},   // no such ControlNet
                                                     {0, "controlnet_scale 2 1"},          // no such ControlNet
                                                     {2, "control_preprocessor 0 canny:10:20"}});  // accepted
  EXPECT_EQ(r.out.summary["controls"].size(), 2u) << r.out.summary["controls"].dump();
  EXPECT_EQ(r.proc->control_preprocessors()[0]->name(), "canny:10:20");
  EXPECT_EQ(r.stream->stats().controlnet_calls, 0) << "scale 0 skips the ControlNet";
}

// controlnet_guidance live: a range neither of the two steps keeps (0/2 and 1/2 < 0.9) is no ControlNet, frame for
// frame; a range for a ControlNet the stream lacks is refused and changes nothing.
TEST_F(ControlStream, LiveGuidanceRangeOfNoStepEqualsNoControlNet) {
  const ScheduledRun r = run_equal_to_no_controlnet({{0, "controlnet_guidance 0 0.9 1"},
                                                     {0, "controlnet_guidance 1 0 0.5"}});  // no such ControlNet
  EXPECT_EQ(r.out.summary["controls"].size(), 1u) << r.out.summary["controls"].dump();
  EXPECT_EQ(r.stream->controlnets()[0].guidance_start, 0.9);
  EXPECT_EQ(r.stream->controlnets()[0].guidance_end, 1.0);
  EXPECT_EQ(r.stream->stats().controlnet_calls, 0) << "no step in range skips the ControlNet";
}

// Counts the frames it made control images of (apply() runs on the pre-process thread, or the model thread for a
// frame preprocessed while its ControlNet did not run).
class CountingPreprocessor : public ControlPreprocessor {
 public:
  explicit CountingPreprocessor(std::shared_ptr<const ControlPreprocessor> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  torch::Tensor apply(const torch::Tensor& rgb) const override {
    ++calls;
    {
      std::lock_guard<std::mutex> lock(mutex);
      sources.push_back(rgb.sum().item<int64_t>());
    }
    return inner_->apply(rgb);
  }
  mutable std::atomic<int> calls{0};
  mutable std::mutex mutex;
  mutable std::vector<int64_t> sources;  // the pixel sum of each image it was applied to, in order

 private:
  std::shared_ptr<const ControlPreprocessor> inner_;
};

// A ControlNet that does not run (scale 0, or a range that keeps no step) gets no control images made, past the first
// frame's (the stream then has one, should the net be turned on later) and, after a preprocessor change, the next
// frame's; one that runs gets one per frame. Run in the synchronous loop, where each frame is preprocessed after the
// previous one was processed, so the counts are exact.
TEST_F(ControlStream, ControlImagesAreMadeOnlyForControlNetsThatRun) {
  TempDir tmp;
  const int N = 6;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", N);
  StreamOptions o = quiet();
  o.synchronous = true;
  std::shared_ptr<CountingPreprocessor> canny;
  const auto count = [&](double scale, double start, std::vector<std::pair<int64_t, std::string>> commands = {}) {
    auto stream = make_stream(false, scale);
    stream->set_controlnet_guidance(0, start, 1.0);
    auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
    canny = std::make_shared<CountingPreprocessor>(make_control_preprocessor("canny"));
    proc->set_control_preprocessors({canny}, false);
    StreamOptions with = o;
    for (const auto& [frame, line] : commands) with.scheduled.push_back({frame, *parse_control_command(line)});
    const RunOut out = run(open_source(video), proc, nullptr, with);
    EXPECT_EQ(out.frames.size(), static_cast<size_t>(N));
    return std::make_pair(canny->calls.load(), stream->stats().controlnet_calls);
  };
  EXPECT_EQ(count(1.0, 0.0), std::make_pair(N, int64_t{N + 1})) << "one a frame (and the flush's padding call)";
  EXPECT_EQ(count(0.0, 0.0), std::make_pair(1, int64_t{0})) << "scale 0: the first frame's only";
  EXPECT_EQ(count(1.0, 0.9), std::make_pair(1, int64_t{0})) << "0.9..1 keeps neither of 2 steps";
  // Off from frame 1, on again from frame 4 (commands apply before their frame's model call, after its preprocessing):
  // images of frames 0, 1, 4 and 5 (frame 4's made on the model thread: it was preprocessed while the net was off, and
  // frame 1's image, kept from before, is not frame 4's); ControlNet calls on frames 0, 4 and 5, and the flush's call.
  const std::vector<cv::Mat> frames = test::read_video(video);
  ASSERT_EQ(frames.size(), static_cast<size_t>(N));
  EXPECT_EQ(count(1.0, 0.0, {{1, "controlnet_scale 0 0"}, {4, "controlnet_scale 0 1"}}), std::make_pair(4, int64_t{4}));
  std::vector<int64_t> expected;
  for (int k : {0, 1, 4, 5}) expected.push_back(rgb_of(frames[k]).sum().item<int64_t>());
  EXPECT_EQ(canny->sources, expected) << "the images of frames 0, 1, 4 and 5";

  // The preprocessor changed while the net is off: the stream's image is the old one's, so the next frame preprocessed
  // makes one with the new preprocessor (frame 3: the command applies before frame 2's model call), then none.
  auto stream = make_stream(false, 0.0);
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
  canny = std::make_shared<CountingPreprocessor>(make_control_preprocessor("canny"));
  proc->set_control_preprocessors({canny}, false);
  StreamOptions with = o;
  with.scheduled.push_back({2, *parse_control_command("control_preprocessor 0 gray")});
  EXPECT_EQ(run(open_source(video), proc, nullptr, with).frames.size(), static_cast<size_t>(N));
  EXPECT_EQ(canny->calls.load(), 1);
  EXPECT_EQ(proc->control_preprocessors()[0]->name(), "gray");
  auto bare = make_stream(false, 0.0);
  bare->set_control_image(0, make_control_preprocessor("gray")->apply(rgb_of(frames[3])));
  EXPECT_TRUE(torch::equal(stream->control_image(0), bare->control_image(0))) << "gray of frame 3";
}

// The processor keeps a frame's control source only when it left out the image of a ControlNet that does not run
// (not for feedback, whose image is made on the model thread anyway), and a live queue that drops a frame carries its
// control images into the next frame only when that frame does not keep its source.
TEST_F(ControlStream, TheControlSourceIsKeptOnlyForControlNetsLeftOutAndStopsTheCarry) {
  const torch::Tensor rgb = torch::full({64, 64, 3}, 200, torch::kUInt8);
  const auto preprocess = [&](double scale, const std::string& spec) {
    auto stream = make_stream(false, scale);
    auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
    proc->set_control_preprocessors({make_control_preprocessor(spec)}, false);
    Frame first;
    first.tensor = proc->preprocess(rgb);
    proc->preprocess_controls(first, rgb, torch::Tensor());  // the stream has no image yet: made
    EXPECT_EQ(first.controls.size(), 1u);
    proc->process(std::move(first));  // the stream takes it; the model thread refreshes what is needed
    Frame f;
    proc->preprocess_controls(f, rgb, torch::Tensor());
    return f;
  };
  Frame on = preprocess(1.0, "gray");
  ASSERT_EQ(on.controls.size(), 1u);
  EXPECT_TRUE(on.controls[0].defined());
  EXPECT_FALSE(on.control_source.defined()) << "nothing left out";
  Frame off = preprocess(0.0, "gray");
  ASSERT_EQ(off.controls.size(), 1u);
  EXPECT_FALSE(off.controls[0].defined()) << "scale 0: none made";
  ASSERT_TRUE(off.control_source.defined());
  EXPECT_TRUE(torch::equal(off.control_source, rgb));
  Frame feedback = preprocess(1.0, "feedback");
  ASSERT_EQ(feedback.controls.size(), 1u);
  EXPECT_FALSE(feedback.controls[0].defined());
  EXPECT_FALSE(feedback.control_source.defined()) << "feedback's image is the previous output";

  // The carry of a dropped frame's image: into a frame that lacks it, not into one that keeps its source.
  const torch::Tensor img = torch::ones({64, 64, 3}, torch::kUInt8);
  Frame dropped;
  dropped.controls = {img};
  Frame next;
  next.controls = {torch::Tensor()};
  carry_frame_inputs(dropped, next);
  ASSERT_TRUE(next.controls[0].defined());
  EXPECT_TRUE(torch::equal(next.controls[0], img));
  Frame dropped2;
  dropped2.controls = {img};
  dropped2.image_prompt_rgb = img;
  carry_frame_inputs(dropped2, off);
  EXPECT_FALSE(off.controls[0].defined()) << "its own source makes it, should the net run by its call";
  ASSERT_TRUE(off.image_prompt_rgb.defined()) << "a new image prompt carries still";
  EXPECT_TRUE(torch::equal(off.image_prompt_rgb, img));
}

// ---- IP-Adapter image prompts from a second source ----------------------------------------------------------------

const std::string kAdapter = "ipadapter/models/tiny-ip-adapter-sd15";

std::shared_ptr<const DiffusionModels> tiny_models_with_ip_adapter() {
  static std::shared_ptr<const DiffusionModels> models = [] {
    LoadOptions lo;
    lo.threads = 1;
    lo.ip_adapter = test::fixture_path(kAdapter);
    lo.ip_adapter_scale = 0.6;
    return load_pipeline(test::fixture_path(kModel), lo);
  }();
  return models;
}

std::shared_ptr<StreamDiffusion> make_ip_stream() {
  StreamConfig c;
  c.t_index_list = {32, 45};
  c.width = c.height = 64;
  c.cfg_type = CfgType::Self;
  auto s = std::make_shared<StreamDiffusion>(tiny_models_with_ip_adapter(), c);
  s->prepare(kPrompt);
  return s;
}

// Three image prompts (56x40, not the model's size: the encoder resizes and crops): A, A with a faint change (mean
// absolute difference 0.5 level: "unchanged"), and B.
std::vector<torch::Tensor> image_prompts() {
  auto a = torch::empty({40, 56, 3}, torch::kUInt8);
  auto acc = a.accessor<uint8_t, 3>();
  for (int y = 0; y < 40; ++y)
    for (int x = 0; x < 56; ++x) {
      acc[y][x][0] = static_cast<uint8_t>(x * 4);
      acc[y][x][1] = static_cast<uint8_t>(y * 6);
      acc[y][x][2] = static_cast<uint8_t>((x * y) % 256);
    }
  auto faint = a.clone();
  faint.slice(0, 0, 20).add_(1);  // +1 on half the rows: mean |diff| = 0.5
  auto b = (255 - a).contiguous();
  return {a, faint, b};
}

void write_rgb_png(const std::string& path, const torch::Tensor& rgb) {
  cv::Mat m(static_cast<int>(rgb.size(0)), static_cast<int>(rgb.size(1)), CV_8UC3, rgb.data_ptr<uint8_t>());
  cv::Mat bgr;
  cv::cvtColor(m, bgr, cv::COLOR_RGB2BGR);
  ASSERT_TRUE(cv::imwrite(path, bgr)) << path;
}

class ImagePromptStream : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists(kModel) || !std::filesystem::exists(test::fixture_path(kAdapter) + "/image_encoder"))
      GTEST_SKIP() << "fixture model " << kModel << " / IP-Adapter " << kAdapter << " not present";
    const auto ims = image_prompts();
    for (size_t i = 0; i < ims.size(); ++i) write_rgb_png(tmp.path + "/prompts/" + std::to_string(i) + ".png", ims[i]);
  }
  TempDir tmp;
  bool made_ = std::filesystem::create_directories(tmp.path + "/prompts");
};

RunOut run_with_image_prompts(std::unique_ptr<FrameSource> source, std::shared_ptr<StreamDiffusionProcessor> proc,
                              std::unique_ptr<FrameSource> prompts, int64_t every, StreamOptions options = quiet()) {
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(std::move(source), proc, std::move(sink), std::move(options));
  rt.set_image_prompt_source(std::move(prompts), every);
  rt.run();
  RunOut r;
  r.summary = rt.summary();
  for (const auto& m : mem->frames) r.frames.push_back(rgb_of(m));
  return r;
}

TEST_F(ImagePromptStream, ReadEveryNFramesEncodedOnlyWhenChangedAndTheLastOneStays) {
  const int N = 8;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", N);
  for (const bool synchronous : {false, true}) {
    SCOPED_TRACE(synchronous ? "synchronous" : "threads");
    auto stream = make_ip_stream();
    auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
    StreamOptions o = quiet();
    o.synchronous = synchronous;
    // Read with frames 0 (A), 2 (A faint: not encoded), 4 (B); at 6 the folder has ended: B stays, the input goes on.
    const RunOut out = run_with_image_prompts(open_source(video), proc, open_source(tmp.path + "/prompts"), 2, o);
    ASSERT_EQ(out.frames.size(), static_cast<size_t>(N));
    EXPECT_EQ(out.summary["stop_reason"], "end of input");
    EXPECT_EQ(out.summary["image_prompt_source"]["read"], 3) << out.summary.dump();
    EXPECT_EQ(out.summary["image_prompt_source"]["every"], 2);
    EXPECT_EQ(out.summary["image_prompt_source"]["ended"], true);
    EXPECT_EQ(stream->stats().image_prompt_encodes, 2);
    EXPECT_EQ(proc->image_prompts_unchanged(), 1);

    // The bare loop: A set before frame 0, B before frame 4; the delay line flushed with the last frame.
    auto bare = make_ip_stream();
    const auto ims = image_prompts();
    const auto frames = test::read_video(video);
    for (int k = 0; k < N + 1; ++k) {
      if (k == 0) bare->set_image_prompt(ims[0]);
      if (k == 4) bare->set_image_prompt(ims[2]);
      const torch::Tensor o = bare->img2img(image_to_tensor(rgb_of(frames[std::min(k, N - 1)]), 64, 64));
      if (k >= 1) {
        EXPECT_EQ(max_abs_diff(out.frames[k - 1], tensor_to_image(o).squeeze(0)), 0) << "frame " << k - 1;
      }
    }
  }
  // The image prompts matter: without them (zero image) the outputs differ.
  const RunOut without = run(open_source(video),
                             std::make_shared<StreamDiffusionProcessor>(make_ip_stream(), kPrompt, "", false));
  auto with_proc = std::make_shared<StreamDiffusionProcessor>(make_ip_stream(), kPrompt, "", false);
  const RunOut with = run_with_image_prompts(open_source(video), with_proc, open_source(tmp.path + "/prompts"), 2);
  int64_t diff = 0;
  for (int i = 0; i < N; ++i) diff = std::max(diff, max_abs_diff(with.frames[i], without.frames[i]));
  EXPECT_GT(diff, 0);
}

TEST_F(ImagePromptStream, ThresholdInitialImageAndLiveCommandDecideWhatIsEncoded) {
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 4);
  const auto ims = image_prompts();
  // --image-prompt A at start (the processor told), then the source gives A, A faint, B with every frame, and a live
  // 'image_prompt none' before frame 2: A faint then differs from the current (zero) image prompt and is encoded.
  auto stream = make_ip_stream();
  stream->set_image_prompt(ims[0]);
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
  proc->set_current_image_prompt(ims[0]);
  StreamOptions o = quiet();
  o.scheduled.push_back({1, *parse_control_command("image_prompt none")});
  const RunOut out = run_with_image_prompts(open_source(video), proc, open_source(tmp.path + "/prompts"), 1, o);
  EXPECT_EQ(out.frames.size(), 4u);
  EXPECT_EQ(out.summary["image_prompt_source"]["read"], 3);
  // Encodes: A by hand; frame 0 (A) unchanged; frame 1 (A faint) after 'none': encoded; frame 2 (B): encoded.
  EXPECT_EQ(stream->stats().image_prompt_encodes, 3);
  EXPECT_EQ(proc->image_prompts_unchanged(), 1);

  // Threshold 0: every distinct image is encoded (A faint too).
  auto strict = make_ip_stream();
  auto strict_proc = std::make_shared<StreamDiffusionProcessor>(strict, kPrompt, "", false);
  strict_proc->set_image_prompt_change(0);
  run_with_image_prompts(open_source(video), strict_proc, open_source(tmp.path + "/prompts"), 1);
  EXPECT_EQ(strict->stats().image_prompt_encodes, 3);
  EXPECT_EQ(strict_proc->image_prompts_unchanged(), 0);
  EXPECT_NE(error_of([&] { strict_proc->set_image_prompt_change(-1); }).find("must be a finite number >= 0"),
            std::string::npos);
}

TEST_F(ImagePromptStream, RefusedWithoutAnIpAdapterOrWithABadPeriod) {
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 2);
  auto plain = std::make_shared<StreamDiffusionProcessor>(make_stream(false, 1.0, false), kPrompt, "", false);
  StreamRuntime rt(open_source(video), plain, std::make_unique<MemorySink>(), quiet());
  std::string e = error_of([&] { rt.set_image_prompt_source(open_source(tmp.path + "/prompts"), 1); });
  EXPECT_NE(e.find("an image prompt input needs an IP-Adapter"), std::string::npos) << e;
  auto ip = std::make_shared<StreamDiffusionProcessor>(make_ip_stream(), kPrompt, "", false);
  StreamRuntime rt2(open_source(video), ip, std::make_unique<MemorySink>(), quiet());
  e = error_of([&] { rt2.set_image_prompt_source(open_source(tmp.path + "/prompts"), 0); });
  EXPECT_NE(e.find("read every 0 frames; expected >= 1"), std::string::npos) << e;
  e = error_of([&] { rt2.set_image_prompt_source(std::make_unique<TickSource>(0.0), 1); });
  EXPECT_NE(e.find("gives no images"), std::string::npos) << e;
}

}  // namespace
}  // namespace sd
