// Unit tests of the runtime's parts: queues, control-line parsing, latency percentiles, source/sink specs.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <cmath>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "core/log.h"
#include "runtime/bounded_queue.h"
#include "runtime/control_command.h"
#include "runtime/frame_sink.h"
#include "runtime/frame_source.h"
#include "runtime/image_folder_sink.h"
#include "runtime/image_folder_source.h"
#include "runtime/runtime_stats.h"
#include "runtime/screen_source.h"
#include "runtime/video_sink.h"

namespace sd {
namespace {

using namespace std::chrono_literals;

using test::error_of;

TEST(BoundedQueue, BlockPolicyKeepsEverythingInOrderAndApplesBackPressure) {
  BoundedQueue<int> q(2, OverflowPolicy::Block);
  std::thread producer([&] {
    for (int i = 0; i < 100; ++i) ASSERT_TRUE(q.push(i));
    q.close();
  });
  std::vector<int> got;
  while (auto v = q.pop()) {
    EXPECT_LE(q.size(), 2u);
    got.push_back(*v);
  }
  producer.join();
  ASSERT_EQ(got.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(got[i], i);
  EXPECT_EQ(q.dropped(), 0);
  EXPECT_FALSE(q.push(5)) << "push after close must fail";
}

TEST(BoundedQueue, DropOldestKeepsTheNewestAndCountsDrops) {
  BoundedQueue<int> q(1, OverflowPolicy::DropOldest);
  for (int i = 0; i < 10; ++i) EXPECT_TRUE(q.push(i));
  EXPECT_EQ(q.dropped(), 9);
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(*q.pop(), 9);
}

TEST(BoundedQueue, DropOldestHandsWhatADroppedItemCarriesToItsSuccessor) {
  // Items are (id, payload); a payload of 0 = none. A dropped payload goes on with the next item unless it has its own.
  BoundedQueue<std::pair<int, int>> q(2, OverflowPolicy::DropOldest);
  std::vector<std::pair<int, int>> seen;  // (dropped id, successor id)
  q.set_carry([&](std::pair<int, int>& dropped, std::pair<int, int>& next) {
    seen.push_back({dropped.first, next.first});
    if (next.second == 0) std::swap(next.second, dropped.second);
  });
  q.push({1, 10});
  q.push({2, 0});
  q.push({3, 30});  // drops 1: its 10 goes to 2
  q.push({4, 0});   // drops 2 (now with 10): 3 has its own 30, so 10 is superseded
  q.push({5, 0});   // drops 3: 30 goes to 4
  ASSERT_EQ(seen, (std::vector<std::pair<int, int>>{{1, 2}, {2, 3}, {3, 4}}));
  EXPECT_EQ(q.dropped(), 3);
  EXPECT_EQ(*q.pop(), std::make_pair(4, 30));
  EXPECT_EQ(*q.pop(), std::make_pair(5, 0));
  // Capacity 1: the successor is the item being pushed.
  BoundedQueue<std::pair<int, int>> one(1, OverflowPolicy::DropOldest);
  one.set_carry([](std::pair<int, int>& dropped, std::pair<int, int>& next) {
    if (next.second == 0) std::swap(next.second, dropped.second);
  });
  one.push({1, 7});
  one.push({2, 0});
  one.push({3, 0});
  EXPECT_EQ(*one.pop(), std::make_pair(3, 7));
}

TEST(BoundedQueue, CloseDrainsCancelDiscardsAndWakesWaiters) {
  BoundedQueue<int> q(4, OverflowPolicy::Block);
  q.push(1);
  q.push(2);
  q.close();
  EXPECT_EQ(*q.pop(), 1);
  EXPECT_EQ(*q.pop(), 2);
  EXPECT_FALSE(q.pop().has_value());

  BoundedQueue<int> full(1, OverflowPolicy::Block);
  full.push(1);
  std::atomic<bool> producer_done{false}, consumer_done{false};
  BoundedQueue<int> empty(1, OverflowPolicy::Block);
  std::thread blocked_producer([&] {
    EXPECT_FALSE(full.push(2));
    producer_done = true;
  });
  std::thread blocked_consumer([&] {
    EXPECT_FALSE(empty.pop().has_value());
    consumer_done = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(producer_done.load());
  EXPECT_FALSE(consumer_done.load());
  full.cancel();
  empty.cancel();
  blocked_producer.join();
  blocked_consumer.join();
  EXPECT_EQ(full.discarded(), 1);
  EXPECT_FALSE(full.pop().has_value());
}

TEST(LogThrottle, OneMessagePerIntervalAndACountOfTheOnesHeldBack) {
  log::Throttle t(std::chrono::seconds(10));
  const auto t0 = log::Throttle::Clock::time_point{} + std::chrono::hours(1);
  int64_t held = -1;
  ASSERT_TRUE(t.pass(held, t0));
  EXPECT_EQ(held, 0);
  for (int i = 1; i <= 5; ++i) EXPECT_FALSE(t.pass(held, t0 + std::chrono::seconds(i)));
  ASSERT_TRUE(t.pass(held, t0 + std::chrono::seconds(10)));
  EXPECT_EQ(held, 5);
  EXPECT_FALSE(t.pass(held, t0 + std::chrono::seconds(19)));
  ASSERT_TRUE(t.pass(held, t0 + std::chrono::seconds(25)));
  EXPECT_EQ(held, 1);
}

TEST(ControlCommand, ParsesEveryCommand) {
  using K = ControlCommand::Kind;
  auto c = parse_control_command("  prompt a red fox in the snow  ");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->kind, K::Prompt);
  EXPECT_EQ(c->text, "a red fox in the snow");
  EXPECT_EQ(parse_control_command("negative blurry")->text, "blurry");
  EXPECT_DOUBLE_EQ(parse_control_command("guidance 1.4")->number, 1.4);
  EXPECT_DOUBLE_EQ(parse_control_command("delta 0.5")->number, 0.5);
  EXPECT_EQ(parse_control_command("t_index_list 32,45")->t_index_list, (std::vector<int64_t>{32, 45}));
  EXPECT_EQ(parse_control_command("t_index_list 0, 16 ,32,45")->t_index_list, (std::vector<int64_t>{0, 16, 32, 45}));
  EXPECT_EQ(parse_control_command("seed 42")->seed, 42u);
  EXPECT_TRUE(parse_control_command("filter on")->on);
  EXPECT_FALSE(parse_control_command("filter off")->on);
  EXPECT_DOUBLE_EQ(parse_control_command("filter_threshold 0.95")->number, 0.95);
  auto l = parse_control_command("lora lcm-lora-sdv1-5 0.8");
  EXPECT_EQ(l->kind, K::Lora);
  EXPECT_EQ(l->text, "lcm-lora-sdv1-5");
  EXPECT_DOUBLE_EQ(l->number, 0.8);
  EXPECT_EQ(parse_control_command("lora my style  -0.5 ")->text, "my style");  // the last word is the scale
  auto ips = parse_control_command("ip_adapter_scale 0.6");
  EXPECT_EQ(ips->kind, K::IpAdapterScale);
  EXPECT_DOUBLE_EQ(ips->number, 0.6);
  auto ipi = parse_control_command("image_prompt /tmp/my style.png");
  EXPECT_EQ(ipi->kind, K::ImagePrompt);
  EXPECT_EQ(ipi->text, "/tmp/my style.png");
  EXPECT_EQ(parse_control_command("image_prompt none")->text, "");  // back to the zero image
  auto dc = parse_control_command("deep_cache 3");
  EXPECT_EQ(dc->kind, K::DeepCache);
  EXPECT_EQ(dc->index, 3);
  EXPECT_TRUE(std::isnan(dc->number));  // the similarity threshold stays as it is
  auto dcs = parse_control_command("deep_cache 2  0.9");
  EXPECT_EQ(dcs->index, 2);
  EXPECT_DOUBLE_EQ(dcs->number, 0.9);
  EXPECT_NE(error_of([] { parse_control_command("deep_cache"); }).find("needs k"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("deep_cache 0"); }).find("k must be >= 1 (1 = off), got 0"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("deep_cache 2 lots"); }).find("expects a number, got 'lots'"),
            std::string::npos);
  EXPECT_EQ(parse_control_command("stats")->kind, K::Stats);
  EXPECT_EQ(parse_control_command("quit")->kind, K::Quit);
  EXPECT_EQ(parse_control_command("help")->kind, K::Help);
  EXPECT_FALSE(parse_control_command("   ").has_value());
  EXPECT_FALSE(parse_control_command("# a comment").has_value());
}

TEST(ControlCommand, BadCommandsGiveClearMessages) {
  EXPECT_NE(error_of([] { parse_control_command("promt a cat"); }).find("unknown command 'promt'"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("guidance"); }).find("needs a number"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("guidance abc"); }).find("expects a number, got 'abc'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("delta 1.0x"); }).find("got '1.0x'"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("t_index_list 32,,45"); }).find("empty entry"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("t_index_list 32,a"); }).find("got 'a'"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("t_index_list -1"); }).find(">= 0"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("seed x"); }).find("integer"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("filter maybe"); }).find("on or off"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("filter_threshold 1.5"); }).find("(0, 1]"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("quit now"); }).find("takes no argument"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("lora"); }).find("needs a LoRA name and a scale"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("lora 0.5"); }).find("needs a LoRA name and a scale"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("lora style x"); }).find("expects a number, got 'x'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("lora style nan"); }).find("expects a number"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("ip_adapter_scale x"); }).find("expects a number, got 'x'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("image_prompt"); }).find("needs an image file"), std::string::npos);
}

TEST(LatencyHistogram, PercentilesWithinOnePercent) {
  LatencyHistogram h;
  for (int i = 1; i <= 1000; ++i) h.add(i * 0.1);  // 0.1 .. 100 ms uniformly
  EXPECT_EQ(h.count(), 1000);
  const double p50 = h.percentile(50), p95 = h.percentile(95);
  std::cout << "  p50 " << p50 << " (50.0), p95 " << p95 << " (95.0)\n";
  EXPECT_NEAR(p50, 50.0, 0.5);
  EXPECT_NEAR(p95, 95.0, 0.95);
  EXPECT_DOUBLE_EQ(h.max(), 100.0);
  EXPECT_NEAR(h.mean(), 50.05, 1e-9);
  h.clear();
  EXPECT_EQ(h.percentile(50), 0.0);
}

TEST(RuntimeStats, SummaryCountsAndRss) {
  RuntimeStats s(2);
  const auto t = StreamClock::now();
  for (int i = 0; i < 5; ++i) {
    s.on_captured();
    s.on_model_frame();
    s.on_output(t - std::chrono::milliseconds(10 * (i + 1)), t);
  }
  s.set_dropped(3);
  s.set_skipped(1);
  const std::string line = s.tick();
  EXPECT_NE(line.find("dropped 3"), std::string::npos) << line;
  EXPECT_NE(line.find("skipped 1"), std::string::npos) << line;
  EXPECT_NE(line.find("p50 30.0 ms p95 50.0 ms"), std::string::npos) << line;
  s.finish();
  const auto j = s.summary();
  EXPECT_EQ(j["frames_in"], 5);
  EXPECT_EQ(j["frames_out"], 5);
  EXPECT_EQ(j["dropped"], 3);
  EXPECT_NEAR(j["latency_ms"]["p50"].get<double>(), 30.0, 0.3);
  EXPECT_GT(j["rss_mb"]["end"].get<double>(), 1.0);
  EXPECT_GT(j["rss_mb"]["after_warmup"].get<double>(), 1.0);
  EXPECT_GT(resident_memory_mb(), 1.0);
}

TEST(ImageFolderSource, NaturalOrder) {
  EXPECT_TRUE(ImageFolderSource::natural_less("frame2.png", "frame10.png"));
  EXPECT_FALSE(ImageFolderSource::natural_less("frame10.png", "frame2.png"));
  EXPECT_TRUE(ImageFolderSource::natural_less("a.png", "b.png"));
  EXPECT_TRUE(ImageFolderSource::natural_less("img_009.png", "img_010.png"));
  EXPECT_TRUE(ImageFolderSource::natural_less("x1", "x01"));
}

TEST(SourceSpec, ClearErrors) {
  EXPECT_NE(error_of([] { open_source("/nonexistent/video.mp4"); }).find("no such file or folder"), std::string::npos);
  EXPECT_NE(error_of([] { open_source("camera:x"); }).find("camera:N"), std::string::npos);
  EXPECT_NE(error_of([] { open_source("camera:97"); }).find("/dev/video97 does not exist"), std::string::npos);
  EXPECT_NE(error_of([] { open_source("-"); }).find("--input-size"), std::string::npos);
  EXPECT_NE(error_of([] { parse_screen_region("screen:1,2,3"); }).find("screen:x,y,w,h"), std::string::npos);
  const auto r = parse_screen_region("screen:10,20,300,200");
  EXPECT_EQ(r.x, 10);
  EXPECT_EQ(r.height, 200);
  // Without a display (the test environment), screen capture says what it needs.
  const char* display = std::getenv("DISPLAY");
  if (!display || !*display) {
    EXPECT_NE(error_of([] { open_source("screen"); }).find("screen capture needs"), std::string::npos);
  }

  const std::string dir = test::make_temp_dir("rt_src");
  EXPECT_NE(error_of([&] { open_source(dir); }).find("holds no image"), std::string::npos);
  std::ofstream(dir + "/notavideo.mp4") << "hello";
  EXPECT_NE(error_of([&] { open_source(dir + "/notavideo.mp4"); }).find("cannot open as a video"), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(SinkSpec, ClearErrors) {
  EXPECT_NE(error_of([] { open_sink("/nonexistent_dir/sub/out.avi"); }).find("does not exist"), std::string::npos);
  const std::string dir = test::make_temp_dir("rt_sink");
  std::ofstream(dir + "/afile") << "x";
  // A folder output whose path is a file, and a video inside a "folder" that is a file.
  EXPECT_NE(error_of([&] { open_sink(dir + "/afile"); }).find("not a folder"), std::string::npos);
  EXPECT_NE(error_of([&] { open_sink(dir + "/afile/out.mp4"); }).find("does not exist"), std::string::npos);
  EXPECT_NE(error_of([&] { open_sink(dir + "/out.gif"); }).find("not a known output"), std::string::npos);
  SinkOptions bad;
  bad.fourcc = "H26";
  EXPECT_NE(error_of([&] { open_sink(dir + "/out.avi", bad); }).find("four characters"), std::string::npos);
  const char* display = std::getenv("DISPLAY");
  const char* wayland = std::getenv("WAYLAND_DISPLAY");
  if ((!display || !*display) && (!wayland || !*wayland)) {
    EXPECT_NE(error_of([] { open_sink("window"); }).find("needs a display"), std::string::npos);
  }
  EXPECT_EQ(VideoFileSink::codecs_for("a.mp4", ""), (std::vector<std::string>{"avc1", "mp4v"}));
  EXPECT_EQ(VideoFileSink::codecs_for("a.AVI", ""), (std::vector<std::string>{"MJPG"}));
  EXPECT_TRUE(ImageFolderSink::is_pattern("out/%05d.png"));
  EXPECT_FALSE(ImageFolderSink::is_pattern("out/%s%05d.png"));
  ImageFolderSink pattern(dir + "/imgs/%04d.jpg");
  EXPECT_EQ(pattern.file_name(7), dir + "/imgs/0007.jpg");
  // A folder whose name has '%' in it is a name, not a printf format (review: 'x%n' crashed, 'x%d' wrote to x0/).
  for (const std::string name : {"50%d x%n", "out%s", "100%"}) {
    ImageFolderSink folder(dir + "/" + name);
    EXPECT_EQ(folder.file_name(3), dir + "/" + name + "/frame_000003.png") << name;
    folder.write(cv::Mat(8, 8, CV_8UC3, cv::Scalar(1, 2, 3)), std::atomic<bool>(false));
    EXPECT_TRUE(std::filesystem::exists(dir + "/" + name + "/frame_000000.png")) << name;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace sd
