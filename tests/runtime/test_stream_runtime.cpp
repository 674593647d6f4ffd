// The stream runtime end to end with a stub processor (no model): lossless file -> file, latest-frame-wins, signals,
// errors from each side, live control, raw pipes.
#include <csignal>
#include <filesystem>
#include <fstream>

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>

#include "common/fixtures.h"
#include "runtime/control_channel.h"
#include "runtime/image_folder_source.h"
#include "runtime/raw_frame_sink.h"
#include "runtime/raw_frame_source.h"
#include "runtime/runtime_test_util.h"
#include "runtime/signal_guard.h"
#include "runtime/stream_runtime.h"
#include "runtime/unix_socket_client.h"
#include "runtime/video_source.h"

namespace sd {
namespace {

using namespace std::chrono_literals;
using test::MemorySink;
using test::quiet;
using test::StubProcessor;
using test::SyntheticSource;

struct TempDir {
  std::string path = test::make_temp_dir("rt_stream");
  ~TempDir() { std::filesystem::remove_all(path); }
};

std::vector<std::string> sorted_files(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

TEST(StreamRuntime, LosslessVideoToImageFolderKeepsCountAndOrder) {
  TempDir tmp;
  const int n = 37;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", n);
  auto stub = std::make_shared<StubProcessor>(/*latency=*/3, 64, 64);
  stub->invert = true;  // the output really is the processor's
  const std::string out = tmp.path + "/out";
  StreamRuntime rt(open_source(video), stub, open_sink(out), quiet());
  EXPECT_TRUE(rt.lossless()) << "a file source defaults to lossless";
  rt.run();
  const auto files = sorted_files(out);
  ASSERT_EQ(files.size(), static_cast<size_t>(n)) << "one output per input frame";
  for (int i = 0; i < n; ++i) EXPECT_EQ(test::decode_index(cv::imread(files[i]), /*invert=*/true), i) << files[i];
  const auto s = rt.summary();
  EXPECT_EQ(s["frames_in"], n);
  EXPECT_EQ(s["frames_out"], n);
  EXPECT_EQ(s["dropped"], 0);
  EXPECT_EQ(s["stop_reason"], "end of input");
  EXPECT_TRUE(s["error"].is_null());
}

TEST(StreamRuntime, LosslessVideoToVideo) {
  TempDir tmp;
  const int n = 25;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", n);
  auto stub = std::make_shared<StubProcessor>(1, 64, 64);
  stub->delay = 2ms;
  auto sink = std::make_unique<MemorySink>();
  sink->delay = 5ms;  // a sink slower than the model: back-pressure, nothing lost
  MemorySink* mem = sink.get();
  StreamRuntime rt(open_source(video), stub, std::move(sink), quiet());
  rt.run();
  ASSERT_EQ(mem->frames.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(test::decode_index(mem->frames[i]), i);
  EXPECT_TRUE(mem->closed);

  // And through an encoder: .avi out, read back.
  auto stub2 = std::make_shared<StubProcessor>(2, 64, 64);
  const std::string out = tmp.path + "/out.avi";
  SinkOptions so;
  so.fps = 25;
  StreamRuntime rt2(open_source(video), stub2, open_sink(out, so), quiet());
  rt2.run();
  const auto frames = test::read_video(out);
  ASSERT_EQ(frames.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(test::decode_index(frames[i]), i);
}

TEST(StreamRuntime, ResizesToTheProcessorSize) {
  TempDir tmp;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", 4, 128, 96);
  auto stub = std::make_shared<StubProcessor>(0, 64, 64);
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamOptions o = quiet();
  o.resize = ResizeMode::Stretch;  // the index grid survives a stretch, not a crop
  StreamRuntime rt(open_source(video), stub, std::move(sink), o);
  rt.run();
  ASSERT_EQ(mem->frames.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(mem->frames[i].cols, 64);
    EXPECT_EQ(mem->frames[i].rows, 64);
    EXPECT_EQ(test::decode_index(mem->frames[i]), i);
  }
}

TEST(StreamRuntime, LatestFrameWinsDropsAndCountsStaleFrames) {
  // A live source far faster than the model: most frames are dropped, each one counted, the model sees only fresh
  // frames in increasing order, and every captured frame is either output or dropped.
  const int n = 300;
  auto stub = std::make_shared<StubProcessor>(1, 64, 64);
  stub->delay = 10ms;
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(std::make_unique<SyntheticSource>(n, /*live=*/true, 64, 64, /*fps=*/1000), stub, std::move(sink),
                   quiet());
  EXPECT_FALSE(rt.lossless());
  rt.run();
  const auto s = rt.summary();
  std::cout << "  in " << s["frames_in"] << " model " << s["frames_model"] << " out " << s["frames_out"] << " dropped "
            << s["dropped"] << " by queue " << s["dropped_by_queue"].dump() << "\n";
  EXPECT_EQ(s["frames_in"], n);
  EXPECT_GT(s["dropped"].get<int64_t>(), n / 2);
  EXPECT_EQ(s["frames_out"].get<int64_t>() + s["dropped"].get<int64_t>(), n) << "every frame is output or dropped";
  const auto processed = stub->processed();
  for (size_t i = 1; i < processed.size(); ++i) EXPECT_GT(processed[i], processed[i - 1]);
  int prev = -1;
  for (const auto& f : mem->frames) {
    const int idx = test::decode_index(f);
    EXPECT_GT(idx, prev);
    prev = idx;
  }
}

// Takes image prompts and records the index each one carries (an index frame), in the order the model gets them.
class ImagePromptStub : public StubProcessor {
 public:
  using StubProcessor::StubProcessor;
  bool takes_image_prompts() const override { return true; }
  std::vector<Frame> process(Frame in) override {
    if (in.image_prompt_rgb.defined()) {
      const torch::Tensor rgb = in.image_prompt_rgb.contiguous();
      const cv::Mat m(static_cast<int>(rgb.size(0)), static_cast<int>(rgb.size(1)), CV_8UC3, rgb.data_ptr<uint8_t>());
      prompts.push_back(test::decode_index(m));
    }
    return StubProcessor::process(std::move(in));
  }
  std::vector<int> prompts;  // model thread only; read after run()
};

TEST(StreamRuntime, LiveDropsKeepTheImagePromptsTheDroppedFramesBrought) {
  // Image prompts 0, 1, 2 come with frames 0, 3, 6 (every 3 frames; then the prompt input ends and the last one
  // stays). A live source far faster than the model drops most frames, those among them: what such a frame brought
  // goes on with the next frame, so the model still ends on prompt 2, and gets the prompts in order.
  const int n = 300;
  auto stub = std::make_shared<ImagePromptStub>(1, 64, 64);
  stub->delay = 10ms;
  StreamRuntime rt(std::make_unique<SyntheticSource>(n, /*live=*/true, 64, 64, /*fps=*/1000), stub,
                   std::make_unique<MemorySink>(), quiet());
  rt.set_image_prompt_source(std::make_unique<SyntheticSource>(3, /*live=*/false, 32, 32), 3);
  rt.run();
  const auto s = rt.summary();
  EXPECT_GT(s["dropped"].get<int64_t>(), n / 2);
  EXPECT_EQ(s["image_prompt_source"]["read"], 3);
  ASSERT_FALSE(stub->prompts.empty());
  EXPECT_EQ(stub->prompts.back(), 2) << "the last image prompt was lost with a dropped frame";
  for (size_t i = 1; i < stub->prompts.size(); ++i) EXPECT_GT(stub->prompts[i], stub->prompts[i - 1]);
}

size_t thread_count() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

TEST(StreamRuntime, SigintMidStreamStopsWithinASecond) {
  SignalGuard guard;
  const size_t threads_before = thread_count();
  auto stub = std::make_shared<StubProcessor>(2, 64, 64);
  stub->delay = 5ms;
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  // An endless live source (a camera).
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, 100), stub, std::move(sink), quiet());
  std::atomic<int64_t> raised_at_ns{0};
  std::thread killer([&] {
    std::this_thread::sleep_for(400ms);
    raised_at_ns = StreamClock::now().time_since_epoch().count();
    std::raise(SIGINT);
  });
  rt.run();  // returns only once every stage thread has joined
  const auto returned = StreamClock::now().time_since_epoch().count();
  killer.join();
  const double stop_s = (returned - raised_at_ns.load()) / 1e9;
  std::cout << "  stopped " << stop_s * 1000 << " ms after SIGINT, " << mem->frames.size() << " frames written\n";
  EXPECT_LT(stop_s, 1.0 * test::time_scale());
  EXPECT_GT(mem->frames.size(), 0u);
  EXPECT_TRUE(mem->closed) << "the sink is closed on the way out";
  EXPECT_EQ(rt.summary()["stop_reason"], "interrupted by SIGINT");
  EXPECT_FALSE(rt.running());
  EXPECT_EQ(thread_count(), threads_before) << "every stage thread has been joined";
}

TEST(StreamRuntime, SigintStopsALosslessStreamBlockedOnASlowSink) {
  SignalGuard guard;
  auto stub = std::make_shared<StubProcessor>(1);
  auto sink = std::make_unique<MemorySink>();
  sink->delay = 100ms;  // every stage is blocked on a full queue behind it
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, false), stub, std::move(sink), quiet());
  ASSERT_TRUE(rt.lossless());
  const auto t0 = StreamClock::now();
  std::thread killer([] {
    std::this_thread::sleep_for(300ms);
    std::raise(SIGTERM);
  });
  rt.run();
  killer.join();
  const double total = std::chrono::duration<double>(StreamClock::now() - t0).count();
  EXPECT_LT(total, 1.3 * test::time_scale());
  EXPECT_EQ(rt.summary()["stop_reason"], "interrupted by SIGTERM");
}

TEST(StreamRuntime, TruncatedVideoEndsWithAClearErrorAfterWritingWhatDecoded) {
  TempDir tmp;
  const int n = 20;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", n);
  std::string bytes;
  {
    std::ifstream in(video, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string cut = tmp.path + "/cut.avi";
  {
    std::ofstream out(cut, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() * 3 / 4));  // the tail (and index) is gone
  }
  auto stub = std::make_shared<StubProcessor>(2, 64, 64);
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(open_source(cut), stub, std::move(sink), quiet());
  std::string error;
  try {
    rt.run();
  } catch (const Error& e) {
    error = e.what();
  }
  std::cout << "  error: " << error << "\n";
  EXPECT_NE(error.find("capture: " + cut), std::string::npos) << error;
  EXPECT_NE(error.find("truncated or corrupt"), std::string::npos) << error;
  EXPECT_NE(error.find("of the 20 frames"), std::string::npos) << error;
  // The frames that did decode all came out, in order.
  EXPECT_GT(mem->frames.size(), 0u);
  EXPECT_LT(mem->frames.size(), static_cast<size_t>(n));
  EXPECT_EQ(rt.summary()["frames_out"], rt.summary()["frames_in"]);
  for (size_t i = 0; i < mem->frames.size(); ++i) EXPECT_EQ(test::decode_index(mem->frames[i]), static_cast<int>(i));
}

TEST(StreamRuntime, FailingSinkStopsEverythingWithAClearError) {
  auto stub = std::make_shared<StubProcessor>(1);
  auto sink = std::make_unique<MemorySink>();
  sink->fail_at = 5;
  MemorySink* mem = sink.get();
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, false), stub, std::move(sink), quiet());
  std::string error;
  try {
    rt.run();
  } catch (const Error& e) {
    error = e.what();
  }
  EXPECT_EQ(error, "sink: memory sink: disk full (simulated)");
  EXPECT_EQ(mem->frames.size(), 5u);
  EXPECT_TRUE(mem->closed);
  EXPECT_EQ(rt.summary()["stop_reason"], "error");
}

TEST(StreamRuntime, UnwritableImageFolderFailsMidStream) {
  // The output folder disappears under the sink (replaced by a file): the write error names the file.
  TempDir tmp;
  const std::string out = tmp.path + "/out";
  auto sink = open_sink(out);
  std::filesystem::remove_all(out);
  std::ofstream(out) << "not a folder";
  auto stub = std::make_shared<StubProcessor>(0);
  StreamRuntime rt(std::make_unique<SyntheticSource>(10, false), stub, std::move(sink), quiet());
  std::string error;
  try {
    rt.run();
  } catch (const Error& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("sink: " + out + "/frame_000000.png: cannot write the image"), std::string::npos) << error;
}

TEST(StreamRuntime, ModelErrorReachesTheCaller) {
  auto stub = std::make_shared<StubProcessor>(1);
  stub->throw_at = 7;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, false), stub, std::make_unique<MemorySink>(), quiet());
  try {
    rt.run();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "model: stub model failure at frame 7");
  }
}

TEST(StreamRuntime, ScheduledCommandsApplyAtTheirFrame) {
  auto stub = std::make_shared<StubProcessor>(1);
  StreamOptions o = quiet();
  o.scheduled.push_back({10, *parse_control_command("guidance 2.5")});
  o.scheduled.push_back({4, *parse_control_command("prompt a cat")});
  o.scheduled.push_back({12, *parse_control_command("guidance 1000")});  // refused by the processor: no effect
  StreamRuntime rt(std::make_unique<SyntheticSource>(20, false), stub, std::make_unique<MemorySink>(), o);
  rt.run();
  const auto applied = stub->applied();
  ASSERT_EQ(applied.size(), 2u);
  EXPECT_EQ(applied[0], (std::pair<size_t, std::string>{4, "prompt a cat"}));
  EXPECT_EQ(applied[1], (std::pair<size_t, std::string>{10, "guidance 2.5"}));
  EXPECT_DOUBLE_EQ(stub->guidance, 2.5);
  const auto controls = rt.summary()["controls"];
  ASSERT_EQ(controls.size(), 2u);
  EXPECT_EQ(controls[1]["frame"], 10);
}

TEST(StreamRuntime, LiveControlOverAUnixSocket) {
  TempDir tmp;
  auto stub = std::make_shared<StubProcessor>(1);
  stub->delay = 5ms;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, 100), stub, std::make_unique<MemorySink>(),
                   quiet());
  const std::string path = tmp.path + "/ctl.sock";
  ControlChannel channel("unix:" + path, [&](ControlCommand c, ControlChannel::Reply r) {
    rt.post_control(std::move(c), std::move(r));
  });
  std::thread client([&] {
    std::this_thread::sleep_for(100ms);
    const int fd = test::connect_unix(path);
    ASSERT_GE(fd, 0);
    auto ask = [&](const std::string& line) {
      const std::string l = line + "\n";
      EXPECT_EQ(::write(fd, l.data(), l.size()), static_cast<ssize_t>(l.size()));
      std::string reply;
      char ch;
      while (::read(fd, &ch, 1) == 1 && ch != '\n') reply += ch;
      return reply;
    };
    EXPECT_NE(ask("guidance nope").find("error: 'guidance' expects a number"), std::string::npos);
    EXPECT_NE(ask("guidance 3.5").find("ok: 'guidance 3.5' applied before frame"), std::string::npos);
    EXPECT_NE(ask("guidance 500").find("error: stub: guidance too large"), std::string::npos);
    EXPECT_NE(ask("stats").find("fps"), std::string::npos);
    EXPECT_NE(ask("help").find("commands:"), std::string::npos);
    EXPECT_EQ(ask("quit"), "ok: stopping");
    ::close(fd);
  });
  rt.run();
  client.join();
  EXPECT_DOUBLE_EQ(stub->guidance, 3.5) << "the bad commands changed nothing";
  EXPECT_EQ(stub->applied().size(), 1u);
  EXPECT_EQ(rt.summary()["stop_reason"], "quit command");
}

TEST(StreamRuntime, ControlLinesFromAPipeApplyBetweenFrames) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  auto stub = std::make_shared<StubProcessor>(1);
  stub->delay = 5ms;
  StreamRuntime rt(std::make_unique<SyntheticSource>(60, false), stub, std::make_unique<MemorySink>(), quiet());
  ControlChannel channel("fd:" + std::to_string(p[0]),
                         [&](ControlCommand c, ControlChannel::Reply r) { rt.post_control(std::move(c), r); });
  const std::string lines = "# comment\nbogus\nguidance 4\nseed 7\n";
  ASSERT_EQ(::write(p[1], lines.data(), lines.size()), static_cast<ssize_t>(lines.size()));
  rt.run();
  channel.stop();
  ::close(p[0]);
  ::close(p[1]);
  const auto applied = stub->applied();
  ASSERT_EQ(applied.size(), 2u);
  EXPECT_EQ(applied[0].second, "guidance 4");
  EXPECT_EQ(applied[1].second, "seed 7");
  EXPECT_EQ(applied[0].first, applied[1].first) << "queued together, applied at the same frame boundary";
  EXPECT_DOUBLE_EQ(stub->guidance, 4.0);
}

TEST(StreamRuntime, ControlLinesFromAFifo) {
  TempDir tmp;
  const std::string path = tmp.path + "/ctl.fifo";
  std::mutex m;
  std::vector<std::string> got;
  {
    ControlChannel channel("fifo:" + path, [&](ControlCommand c, ControlChannel::Reply) {
      std::lock_guard<std::mutex> lock(m);
      got.push_back(c.line);
    });
    // Two writers one after the other (echo ... > fifo twice): the channel keeps listening between them.
    for (const char* line : {"prompt a red fox\n", "seed 3\nquit\n"}) {
      const int fd = ::open(path.c_str(), O_WRONLY);
      ASSERT_GE(fd, 0);
      ASSERT_GT(::write(fd, line, std::strlen(line)), 0);
      ::close(fd);
    }
    for (int i = 0; i < 100; ++i) {
      {
        std::lock_guard<std::mutex> lock(m);
        if (got.size() == 3) break;
      }
      std::this_thread::sleep_for(10ms);
    }
  }
  EXPECT_EQ(got, (std::vector<std::string>{"prompt a red fox", "seed 3", "quit"}));
  EXPECT_FALSE(std::filesystem::exists(path)) << "the FIFO the channel created is removed";
}

TEST(StreamRuntime, RawFramesThroughPipes) {
  int in[2], out[2];
  ASSERT_EQ(::pipe(in), 0);
  ASSERT_EQ(::pipe(out), 0);
  const int n = 12, W = 32, H = 16;
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      cv::Mat rgb(H, W, CV_8UC3, cv::Scalar(i * 10, 255 - i * 10, 7));
      ASSERT_EQ(::write(in[1], rgb.data, W * H * 3), W * H * 3);
    }
    ::close(in[1]);
  });
  std::vector<uint8_t> received;
  std::thread consumer([&] {
    uint8_t buf[4096];
    ssize_t k;
    while ((k = ::read(out[0], buf, sizeof buf)) > 0) received.insert(received.end(), buf, buf + k);
  });
  auto stub = std::make_shared<StubProcessor>(2);
  {
    StreamRuntime rt(std::make_unique<RawFrameSource>(in[0], W, H, "pipe"), stub,
                     std::make_unique<RawFrameSink>(out[1], "pipe"), quiet());
    rt.run();
  }
  ::close(out[1]);
  producer.join();
  consumer.join();
  ::close(in[0]);
  ::close(out[0]);
  ASSERT_EQ(received.size(), static_cast<size_t>(n * W * H * 3));
  for (int i = 0; i < n; ++i) {
    const uint8_t* px = received.data() + static_cast<size_t>(i) * W * H * 3 + 5 * 3;
    EXPECT_EQ(px[0], i * 10);  // R, G, B in that order on both ends
    EXPECT_EQ(px[1], 255 - i * 10);
    EXPECT_EQ(px[2], 7);
  }
}

TEST(StreamRuntime, RawInputEndingMidFrameIsAnError) {
  int in[2];
  ASSERT_EQ(::pipe(in), 0);
  std::vector<uint8_t> bytes(32 * 16 * 3 * 2 + 100, 9);
  ASSERT_EQ(::write(in[1], bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  ::close(in[1]);
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(std::make_unique<RawFrameSource>(in[0], 32, 16, "stdin"), std::make_shared<StubProcessor>(1),
                   std::move(sink), quiet());
  try {
    rt.run();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("stdin: the raw input ended inside frame 2 (100 of 1536 bytes); is "
                                         "--input-size 32x16 right?"),
              std::string::npos)
        << e.what();
  }
  ::close(in[0]);
  EXPECT_EQ(mem->frames.size(), 2u);
}

TEST(StreamRuntime, TicksDriveAGenerator) {
  auto stub = std::make_shared<StubProcessor>(2, 0, 0, /*images=*/false);
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamOptions o = quiet();
  o.max_frames = 15;
  StreamRuntime rt(open_source("none"), stub, std::move(sink), o);
  EXPECT_TRUE(rt.lossless()) << "ticks paced by the model are lossless";
  rt.run();
  EXPECT_EQ(mem->frames.size(), 15u);
  // Mismatched source and processor are refused up front.
  EXPECT_THROW(StreamRuntime(open_source("none"), std::make_shared<StubProcessor>(0), std::make_unique<MemorySink>()),
               InvalidArgument);
}

TEST(StreamRuntime, StatusLinesComeEverySecondish) {
  std::vector<std::string> lines;
  std::mutex m;
  StreamOptions o;
  o.status_interval_s = 0.1;
  o.status = [&](const std::string& l) {
    std::lock_guard<std::mutex> lock(m);
    lines.push_back(l);
  };
  auto stub = std::make_shared<StubProcessor>(0);
  stub->delay = 5ms;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, 200), stub, std::make_unique<MemorySink>(), o);
  std::thread stopper([&] {
    std::this_thread::sleep_for(550ms);
    rt.request_stop("test");
  });
  rt.run();
  stopper.join();
  ASSERT_GE(lines.size(), 3u);
  EXPECT_NE(lines.back().find("in "), std::string::npos);
  EXPECT_NE(lines.back().find("model "), std::string::npos);
  EXPECT_NE(lines.back().find("latency p50 "), std::string::npos);
  EXPECT_NE(lines.back().find("dropped "), std::string::npos);
  std::cout << "  " << lines.back() << "\n";
}

TEST(StreamRuntime, SynchronousModeIsTheSameStreamOnOneThread) {
  TempDir tmp;
  const int n = 15;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", n);
  auto stub = std::make_shared<StubProcessor>(2, 64, 64);
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamOptions o = quiet();
  o.synchronous = true;
  o.scheduled.push_back({3, *parse_control_command("guidance 2")});
  StreamRuntime rt(open_source(video), stub, std::move(sink), o);
  rt.run();
  ASSERT_EQ(mem->frames.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(test::decode_index(mem->frames[i]), i);
  EXPECT_TRUE(mem->closed);
  ASSERT_EQ(stub->applied().size(), 1u);
  EXPECT_EQ(stub->applied()[0].first, 3u);

  // Errors keep their stage name; a live source is stopped by a signal.
  auto failing = std::make_shared<StubProcessor>(1);
  failing->throw_at = 4;
  StreamOptions so = quiet();
  so.synchronous = true;
  StreamRuntime bad(std::make_unique<SyntheticSource>(-1, true), failing, std::make_unique<MemorySink>(), so);
  try {
    bad.run();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "model: stub model failure at frame 4");
  }
  SignalGuard guard;
  StreamRuntime live(std::make_unique<SyntheticSource>(-1, true, 64, 64, 200), std::make_shared<StubProcessor>(1),
                     std::make_unique<MemorySink>(), so);
  std::thread killer([] {
    std::this_thread::sleep_for(200ms);
    std::raise(SIGINT);
  });
  const auto t0 = StreamClock::now();
  live.run();
  killer.join();
  EXPECT_LT(std::chrono::duration<double>(StreamClock::now() - t0).count(), 1.2 * test::time_scale());
  EXPECT_EQ(live.summary()["stop_reason"], "interrupted by SIGINT");
}

TEST(StreamRuntime, SynchronousModeStopsOnASignalWhileTheSourceIsBlocked) {
  // A source that delivers a frame every 4 s (a paced input, a stalled pipe or camera) blocks the only stream thread
  // in its read; the read returns as soon as the stop flag is set, which a watcher does on Ctrl-C.
  SignalGuard guard;
  StreamOptions o = quiet();
  o.synchronous = true;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, /*fps=*/0.25),
                   std::make_shared<StubProcessor>(0), std::make_unique<MemorySink>(), o);
  std::thread killer([] {
    std::this_thread::sleep_for(300ms);
    std::raise(SIGINT);
  });
  const auto t0 = StreamClock::now();
  rt.run();
  killer.join();
  const double took = std::chrono::duration<double>(StreamClock::now() - t0).count();
  EXPECT_LT(took, 2.0 * test::time_scale()) << "the signal waited for the next frame";
  EXPECT_EQ(rt.summary()["stop_reason"], "interrupted by SIGINT");
}

// Gives `good` frames, then an empty one.
class EmptyFrameSource : public FrameSource {
 public:
  explicit EmptyFrameSource(int good) : good_(good) {}
  bool read(cv::Mat& image, const std::atomic<bool>&) override {
    image = n_ < good_ ? test::index_frame(n_, 64, 64) : cv::Mat();
    ++n_;
    return true;
  }
  bool live() const override { return false; }
  std::string describe() const override { return "empty-frames"; }

 private:
  int good_, n_ = 0;
};

TEST(StreamRuntime, AnEmptyFrameFromTheSourceIsAClearErrorInBothModes) {
  for (const bool synchronous : {false, true}) {
    SCOPED_TRACE(synchronous ? "synchronous" : "threads");
    StreamOptions o = quiet();
    o.synchronous = synchronous;
    auto sink = std::make_unique<MemorySink>();
    MemorySink* mem = sink.get();
    StreamRuntime rt(std::make_unique<EmptyFrameSource>(3), std::make_shared<StubProcessor>(1, 64, 64), std::move(sink),
                     o);
    try {
      rt.run();
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_STREQ(e.what(), "capture: source empty-frames delivered an empty or non-BGR frame 3");
    }
    EXPECT_EQ(mem->frames.size(), 3u) << "the frames read before it still come out";
  }
}

// A processor that starts each output's post-process on the model thread (FrameProcessor::begin_postprocess, as the
// StreamDiffusion processor does on CUDA): the post-process thread uses what it started instead of postprocess(), for
// every output, flushed ones included, and in order.
class EarlyPostprocessStub : public StubProcessor {
 public:
  using StubProcessor::StubProcessor;
  std::vector<Frame> process(Frame in) override {
    model_thread = std::this_thread::get_id();
    return StubProcessor::process(std::move(in));
  }
  void begin_postprocess(Frame& out) override {
    EXPECT_EQ(std::this_thread::get_id(), model_thread) << "begun on the model thread";
    ++begun;
    const torch::Tensor inverted = 255 - out.tensor;
    out.postprocessed = [this, inverted, begun_on = std::this_thread::get_id()] {
      ++finished;
      if (std::this_thread::get_id() == begun_on) ++on_model_thread;
      return inverted;
    };
  }
  torch::Tensor postprocess(const torch::Tensor& out) override {
    ADD_FAILURE() << "postprocess() called although the post-process was begun";
    return out;
  }
  std::thread::id model_thread;  // written and read on the model thread only
  std::atomic<int> begun{0}, finished{0}, on_model_thread{0};
};

TEST(StreamRuntime, PostprocessBegunOnTheModelThreadIsUsed) {
  TempDir tmp;
  const int n = 12;
  const std::string video = test::write_index_video(tmp.path + "/in.avi", n);
  auto stub = std::make_shared<EarlyPostprocessStub>(/*latency=*/2, 64, 64);
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(open_source(video), stub, std::move(sink), quiet());
  rt.run();
  ASSERT_EQ(mem->frames.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) EXPECT_EQ(test::decode_index(mem->frames[i], /*invert=*/true), i);
  EXPECT_EQ(stub->begun.load(), n);
  EXPECT_EQ(stub->finished.load(), n);
  EXPECT_EQ(stub->on_model_thread.load(), 0) << "finished on the post-process thread";
}

TEST(StreamRuntime, ImageFolderInput) {
  TempDir tmp;
  const std::string dir = tmp.path + "/frames";
  std::filesystem::create_directories(dir);
  for (int i : {0, 1, 2, 10, 11}) cv::imwrite(dir + "/f" + std::to_string(i) + ".png", test::index_frame(i, 64, 64));
  auto sink = std::make_unique<MemorySink>();
  MemorySink* mem = sink.get();
  StreamRuntime rt(open_source(dir), std::make_shared<StubProcessor>(1, 64, 64), std::move(sink), quiet());
  rt.run();
  ASSERT_EQ(mem->frames.size(), 5u);
  const int expect[] = {0, 1, 2, 10, 11};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(test::decode_index(mem->frames[i]), expect[i]);
}

}  // namespace
}  // namespace sd
