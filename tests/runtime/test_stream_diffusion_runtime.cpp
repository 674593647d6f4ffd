// The runtime driving the real StreamDiffusion pipeline on the tiny fixture model (64x64): lossless streaming keeps
// one output per input in order and matches the bare synchronous loop exactly; the frames flushed at the end are the
// same as when more input follows; the similarity filter keeps the count; a live prompt change shows in the next
// output and a t_index_list length change mid-stream loses no frame. Skipped when the fixture model is absent.
#include <filesystem>

#include <gtest/gtest.h>
#include <opencv2/imgproc.hpp>

#include "common/fixtures.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"
#include "runtime/runtime_test_util.h"
#include "runtime/stream_diffusion_processor.h"
#include "runtime/stream_runtime.h"
#include "runtime/tick_source.h"

namespace sd {
namespace {

using test::MemorySink;

const std::string kModel = "models/tiny-sd15";
const std::string kPrompt = "a photo of a cat, trending on artstation";

std::shared_ptr<const DiffusionModels> tiny_models() {
  static std::shared_ptr<const DiffusionModels> models = [] {
    LoadOptions lo;
    lo.threads = 1;  // the tiny model gains nothing from more, and a shared CI machine loses a lot (OpenMP spin)
    return load_pipeline(test::fixture_path(kModel), lo);
  }();
  return models;
}

std::shared_ptr<StreamDiffusion> make_stream(std::vector<int64_t> t_index_list, bool txt2img,
                                             SimilarityFilterOptions filter = {}, int64_t frame_buffer_size = 1) {
  StreamConfig c;
  c.frame_buffer_size = frame_buffer_size;
  c.t_index_list = std::move(t_index_list);
  c.width = c.height = 64;
  c.cfg_type = txt2img ? CfgType::None : CfgType::Self;
  c.similarity_filter = filter;
  auto s = std::make_shared<StreamDiffusion>(tiny_models(), c);
  s->prepare(kPrompt);
  return s;
}

StreamOptions quiet() {
  StreamOptions o;
  o.status_interval_s = 0;
  return o;
}

struct TempDir {
  std::string path = test::make_temp_dir("rt_sd");
  ~TempDir() { std::filesystem::remove_all(path); }
};

torch::Tensor bgr_to_rgb_tensor(const cv::Mat& bgr) {
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, torch::kUInt8).clone();
}

int64_t max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kInt32) - b.to(torch::kInt32)).abs().max().item<int64_t>();
}

class TinyModelStream : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists(kModel)) GTEST_SKIP() << "fixture model " << kModel << " not present";
  }
};

// Runs `video` through the runtime (lossless) and returns the outputs as RGB uint8 tensors.
std::vector<torch::Tensor> run_video(const std::string& video, std::shared_ptr<StreamDiffusion> stream,
                                     StreamOptions options = quiet(), nlohmann::json* summary = nullptr) {
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  auto proc = std::make_shared<StreamDiffusionProcessor>(stream, kPrompt, "", false);
  StreamRuntime rt(open_source(video), proc, std::move(sink), std::move(options));
  rt.run();
  if (summary) *summary = rt.summary();
  std::vector<torch::Tensor> out;
  for (const auto& m : mem->frames) out.push_back(bgr_to_rgb_tensor(m));
  return out;
}

TEST_F(TinyModelStream, LosslessVideoMatchesTheBareLoopFrameForFrame) {
  TempDir tmp;
  const int N = 12;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", N);
  nlohmann::json summary;
  const auto outs = run_video(video, make_stream({32, 45}, false), quiet(), &summary);
  ASSERT_EQ(outs.size(), static_cast<size_t>(N));
  EXPECT_EQ(summary["frames_out"], N);
  EXPECT_EQ(summary["latency_frames"], 1);

  // The bare synchronous loop on the same decoded frames: call k returns frame k-(n-1); the delay line is flushed by
  // repeating the last frame.
  auto bare = make_stream({32, 45}, false);
  const auto frames = test::read_video(video);
  ASSERT_EQ(frames.size(), static_cast<size_t>(N));
  std::vector<torch::Tensor> ref;
  const int64_t n = 2;
  for (int64_t k = 0; k < N + n - 1; ++k) {
    const auto& f = frames[std::min<int64_t>(k, N - 1)];
    const torch::Tensor out = bare->img2img(image_to_tensor(bgr_to_rgb_tensor(f), 64, 64));
    if (k >= n - 1) ref.push_back(tensor_to_image(out).squeeze(0));
  }
  int64_t worst = 0;
  for (int i = 0; i < N; ++i) worst = std::max(worst, max_abs_diff(outs[i], ref[i]));
  std::cout << "  max |runtime - bare loop| over " << N << " frames: " << worst << " (uint8 levels)\n";
  EXPECT_EQ(worst, 0);
  // The frames really differ from each other, so the match is an order check.
  for (int i = 1; i < N; ++i) EXPECT_GT(max_abs_diff(ref[i], ref[i - 1]), 0) << i;
}

TEST_F(TinyModelStream, FlushedTailEqualsTheSameFramesWithMoreInputBehind) {
  // Output i belongs to input i: stopping after 5 frames (the last ones flushed with padding) gives the same first 5
  // outputs as the full run, with a 3-step stream (latency 2).
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 10);
  const auto full = run_video(video, make_stream({20, 32, 45}, false));
  StreamOptions o = quiet();
  o.max_frames = 5;
  const auto prefix = run_video(video, make_stream({20, 32, 45}, false), o);
  ASSERT_EQ(full.size(), 10u);
  ASSERT_EQ(prefix.size(), 5u);
  int64_t worst = 0;
  for (int i = 0; i < 5; ++i) worst = std::max(worst, max_abs_diff(prefix[i], full[i]));
  std::cout << "  max |prefix run - full run| over 5 frames: " << worst << "\n";
  EXPECT_EQ(worst, 0);
}

TEST_F(TinyModelStream, FrameBufferOfTwoKeepsCountAndOrder) {
  // F = 2 frames per call, n = 2: 7 frames (the last batch half padding) give 7 outputs, the same as the first 7 of
  // a 10-frame run.
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 10);
  nlohmann::json summary;
  const auto full = run_video(video, make_stream({32, 45}, false, {}, 2), quiet(), &summary);
  EXPECT_EQ(summary["latency_frames"], 3) << "(n-1)*F + F-1";
  StreamOptions o = quiet();
  o.max_frames = 7;
  const auto part = run_video(video, make_stream({32, 45}, false, {}, 2), o);
  ASSERT_EQ(full.size(), 10u);
  ASSERT_EQ(part.size(), 7u);
  int64_t worst = 0;
  for (int i = 0; i < 7; ++i) worst = std::max(worst, max_abs_diff(part[i], full[i]));
  std::cout << "  max |7-frame run - 10-frame run| over 7 frames (F = 2): " << worst << "\n";
  EXPECT_EQ(worst, 0);
  for (int i = 1; i < 10; ++i) EXPECT_GT(max_abs_diff(full[i], full[i - 1]), 0) << i;
}

TEST_F(TinyModelStream, SimilarityFilterSkipsKeepOneOutputPerInput) {
  // Each frame shown 4 times: with the filter on, repeats are skipped (the pipeline does not advance) and a skipped
  // frame repeats the previous output; the output count still equals the input count.
  TempDir tmp;
  const std::string video = tmp.path + "/rep.avi";
  {
    cv::VideoWriter w(video, cv::CAP_FFMPEG, cv::VideoWriter::fourcc('M', 'J', 'P', 'G'), 25, cv::Size(64, 64));
    for (int i = 0; i < 6; ++i)
      for (int r = 0; r < 4; ++r) w.write(test::index_frame(i * 4099, 64, 64));
  }
  SimilarityFilterOptions f;
  f.enabled = true;
  f.threshold = 0.9;
  f.max_skip_frame = 10;
  nlohmann::json summary;
  const auto outs = run_video(video, make_stream({32, 45}, false, f), quiet(), &summary);
  std::cout << "  24 frames in, " << outs.size() << " out, skipped " << summary["skipped"] << "\n";
  ASSERT_EQ(outs.size(), 24u);
  EXPECT_GE(summary["skipped"].get<int64_t>(), 12) << "3 of every 4 frames are exact repeats";
  // A skipped frame repeats the previous output (a repeat that is processed, forced by max_skip_frame, also gives
  // the same image: same input latent, same fixed noise). A new picture gives a new output, in order.
  int repeats = 0;
  for (size_t i = 1; i < outs.size(); ++i) {
    const bool same = max_abs_diff(outs[i], outs[i - 1]) == 0;
    repeats += same;
    if (i % 4 == 0) {
      EXPECT_FALSE(same) << "output " << i << " is a new picture";
    }
  }
  EXPECT_GE(repeats, summary["skipped"].get<int64_t>());
  EXPECT_EQ(repeats, 18);

  // Two frames per call: a skipped call answers two frames, and the summary counts frames (it counted calls).
  auto s2 = make_stream({32, 45}, false, f, 2);
  const auto outs2 = run_video(video, s2, quiet(), &summary);
  ASSERT_EQ(outs2.size(), 24u);
  EXPECT_GE(s2->stats().skipped, 6);
  EXPECT_EQ(summary["skipped"].get<int64_t>(), 2 * s2->stats().skipped);
}

TEST_F(TinyModelStream, LivePromptChangeShowsInTheNextOutput) {
  // txt2img ticks, 4 steps (n = 4, latency 3). Run A: no change. Run B: "prompt ..." sent through post_control while
  // the stream runs (from the sink thread after the 4th output); it applies before some frame k. Outputs for frames
  // j < k-(n-1) saw only the old prompt (identical to A); every later output differs, the first of them being the
  // very next output the stream produced after the change (within n frames).
  const int N = 16;
  const std::vector<int64_t> steps{0, 16, 32, 45};
  const int64_t n = 4;
  auto run = [&](bool change, nlohmann::json* summary) {
    auto proc = std::make_shared<StreamDiffusionProcessor>(make_stream(steps, true), kPrompt, "", true);
    auto sink = std::make_unique<MemorySink>();
    MemorySink* mem = sink.get();
    StreamOptions o = quiet();
    o.max_frames = N;
    StreamRuntime* self = nullptr;
    int seen = 0;
    if (change)
      o.on_output = [&](const Frame&) {
        if (++seen == 4) self->post_control(*parse_control_command("prompt an oil painting of a lighthouse"));
      };
    StreamRuntime rt(std::make_unique<TickSource>(0), proc, std::move(sink), o);
    self = &rt;
    rt.run();
    *summary = rt.summary();
    std::vector<torch::Tensor> out;
    for (const auto& m : mem->frames) out.push_back(bgr_to_rgb_tensor(m));
    return out;
  };
  nlohmann::json sa, sb;
  const auto a = run(false, &sa);
  const auto b = run(true, &sb);
  ASSERT_EQ(a.size(), static_cast<size_t>(N));
  ASSERT_EQ(b.size(), static_cast<size_t>(N));
  ASSERT_EQ(sb["controls"].size(), 1u);
  const int64_t k = sb["controls"][0]["frame"].get<int64_t>();
  std::cout << "  prompt change applied before frame " << k << "; outputs from frame " << k - (n - 1)
            << " on should differ\n";
  ASSERT_GE(k, n + 3) << "the command cannot apply before the 4th output exists";
  ASSERT_LT(k, N);
  for (int64_t j = 0; j < N; ++j) {
    const int64_t d = max_abs_diff(a[j], b[j]);
    if (j < k - (n - 1)) {
      EXPECT_EQ(d, 0) << "frame " << j << " finished before the change";
    } else {
      EXPECT_GT(d, 0) << "frame " << j << " went through the UNet after the change";
    }
  }
}

TEST_F(TinyModelStream, TIndexListLengthChangeMidStreamLosesNoFrame) {
  TempDir tmp;
  const int N = 10;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", N);
  const auto plain = run_video(video, make_stream({32, 45}, false));
  StreamOptions o = quiet();
  o.scheduled.push_back({5, *parse_control_command("t_index_list 20,30,40")});
  nlohmann::json summary;
  const auto changed = run_video(video, make_stream({32, 45}, false), o, &summary);
  ASSERT_EQ(changed.size(), static_cast<size_t>(N));
  EXPECT_EQ(summary["controls"][0]["frame"], 5);
  EXPECT_EQ(summary["latency_frames"], 2);
  // Frames before the change were flushed out with the old steps: identical to the plain run.
  for (int i = 0; i < 5; ++i) EXPECT_EQ(max_abs_diff(changed[i], plain[i]), 0) << i;
  for (int i = 5; i < N; ++i) EXPECT_GT(max_abs_diff(changed[i], plain[i]), 0) << i;
  // A refused list changes nothing.
  StreamOptions bad = quiet();
  bad.scheduled.push_back({3, *parse_control_command("t_index_list 20,30,99")});
  nlohmann::json s2;
  const auto same = run_video(video, make_stream({32, 45}, false), bad, &s2);
  ASSERT_EQ(same.size(), static_cast<size_t>(N));
  EXPECT_TRUE(s2["controls"].empty());
  for (int i = 0; i < N; ++i) EXPECT_EQ(max_abs_diff(same[i], plain[i]), 0) << i;
}

}  // namespace
}  // namespace sd
