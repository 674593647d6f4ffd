// OSC control of a running stream: a message changes the stream at the next frame boundary, a flood of 10,000
// messages in one second leaves it running with every message accounted for (last value wins), coalescing keeps the
// newest command of each kind, and the built CLI takes liblo's `oscsend` on the tiny fixture model.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include <sys/wait.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "runtime/control_channel.h"
#include "runtime/osc_test_util.h"
#include "runtime/runtime_test_util.h"
#include "runtime/stream_runtime.h"

namespace sd {
namespace {

using namespace std::chrono_literals;
using test::MemorySink;
using test::StubProcessor;
using test::SyntheticSource;

StreamOptions quiet() {
  StreamOptions o;
  o.status_interval_s = 0;
  return o;
}

ControlCommand cmd(const std::string& line) { return *parse_control_command(line); }

int64_t count(const nlohmann::json& counts, const char* k) { return counts.at(k).get<int64_t>(); }

// posted + scheduled = answered + coalesced + applied + refused + unapplied + pending (stream_runtime.h).
void expect_counts_add_up(const nlohmann::json& c) {
  EXPECT_EQ(count(c, "posted") + count(c, "scheduled"),
            count(c, "answered") + count(c, "coalesced") + count(c, "applied") + count(c, "refused") +
                count(c, "unapplied") + count(c, "pending"))
      << c.dump();
}

TEST(ControlCoalescing, TheNewestCommandOfEachKindIsAppliedOnce) {
  auto stub = std::make_shared<StubProcessor>(0);
  StreamRuntime rt(std::make_unique<SyntheticSource>(3, false), stub, std::make_unique<MemorySink>(), quiet());
  // Posted before the first frame: all of them are pending at its boundary.
  for (int i = 1; i <= 100; ++i) rt.post_control(cmd("guidance " + std::to_string(i)), {}, true);
  rt.post_control(cmd("lora a 0.1"), {}, true);
  rt.post_control(cmd("lora b 0.2"), {}, true);
  rt.post_control(cmd("lora a 0.3"), {}, true);  // replaces lora a 0.1, not lora b
  rt.post_control(cmd("controlnet_scale 0 0.5"), {}, true);
  rt.post_control(cmd("controlnet_scale 1 0.6"), {}, true);
  rt.post_control(cmd("seed 4"), {}, false);  // not coalesced: both seeds apply
  rt.post_control(cmd("seed 5"), {}, false);
  rt.post_control(cmd("guidance 500"), {}, true);  // the last guidance wins, and the stub refuses it
  rt.run();
  std::vector<std::string> applied;
  for (const auto& [frames, line] : stub->applied()) {
    EXPECT_EQ(frames, 0u) << line << ": applied at the first frame boundary";
    applied.push_back(line);
  }
  EXPECT_EQ(applied, (std::vector<std::string>{"lora b 0.2", "lora a 0.3", "controlnet_scale 0 0.5",
                                               "controlnet_scale 1 0.6", "seed 4", "seed 5"}));
  EXPECT_DOUBLE_EQ(stub->guidance, 1.0) << "guidance 500 was refused; 1..100 were superseded";
  const auto c = rt.summary()["control_counts"];
  EXPECT_EQ(count(c, "posted"), 108);
  EXPECT_EQ(count(c, "coalesced"), 101);  // guidance 1..100 and lora a 0.1
  EXPECT_EQ(count(c, "applied"), 6);
  EXPECT_EQ(count(c, "refused"), 1);
  expect_counts_add_up(c);
}

TEST(OscControl, AMessageChangesTheStreamAtTheNextFrame) {
  auto stub = std::make_shared<StubProcessor>(1);
  stub->delay = 10ms;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, 50), stub, std::make_unique<MemorySink>(),
                   quiet());
  test::ReplyListener listener;
  const std::string spec = "osc://127.0.0.1:0?reply=osc://127.0.0.1:" + std::to_string(listener.port());
  ControlChannel channel(spec, [&](ControlCommand c, ControlChannel::Reply r) {
    rt.post_control(std::move(c), std::move(r), ControlChannel::last_value_wins(spec));
  });
  std::thread client([&] {
    while (stub->processed().size() < 5) std::this_thread::sleep_for(5ms);
    test::OscSender send(channel.osc_port());
    const size_t before = stub->processed().size();
    lo_send(send.get(), "/guidance", "f", 3.5f);
    const std::string reply = listener.next();
    const size_t after = stub->processed().size();
    std::smatch m;
    ASSERT_TRUE(std::regex_match(reply, m, std::regex("/streamdiffusion/ok 'guidance 3.5' applied before frame (\\d+)")))
        << reply;
    // The frame boundary after the message arrived: not before it was sent, and no later than the frame being
    // processed when the reply came (the model thread applies pending commands before each frame).
    const auto applied = stub->applied();
    ASSERT_EQ(applied.size(), 1u);
    EXPECT_GE(applied[0].first, before);
    EXPECT_LE(applied[0].first, after);
    lo_send(send.get(), "/quit", "");
    EXPECT_EQ(listener.next(), "/streamdiffusion/ok stopping");
  });
  rt.run();
  client.join();
  EXPECT_DOUBLE_EQ(stub->guidance, 3.5);
  EXPECT_EQ(rt.summary()["stop_reason"], "quit command");
}

TEST(OscControl, TenThousandMessagesInOneSecondLeaveTheStreamRunningAndAreCounted) {
  auto stub = std::make_shared<StubProcessor>(1);
  stub->delay = 5ms;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, 100), stub, std::make_unique<MemorySink>(),
                   quiet());
  const std::string spec = "osc://127.0.0.1:0";
  ControlChannel channel(spec, [&](ControlCommand c, ControlChannel::Reply r) {
    rt.post_control(std::move(c), std::move(r), ControlChannel::last_value_wins(spec));
  });
  constexpr int kMessages = 10000;
  bool running_after_flood = false;
  int64_t frames_during_flood = 0;
  std::thread client([&] {
    while (stub->processed().size() < 3) std::this_thread::sleep_for(5ms);
    test::OscSender send(channel.osc_port());
    const auto t0 = std::chrono::steady_clock::now();
    const size_t frames0 = stub->processed().size();
    for (int i = 0; i < kMessages; ++i) {
      // A fader (guidance), a knob (delta), and one message in ten that does not parse.
      if (i % 10 == 9)
        lo_send(send.get(), "/guidance", "s", "loud");
      else if (i % 2 == 0)
        lo_send(send.get(), "/guidance", "f", 1.0f + static_cast<float>(i % 97) / 100.0f);
      else
        lo_send(send.get(), "/delta", "f", static_cast<float>(i % 89) / 100.0f);
      // Paced to 10,000 per second (a burst per millisecond), the rate a busy show controller reaches.
      if (i % 10 == 9) std::this_thread::sleep_until(t0 + std::chrono::microseconds(100 * (i + 1)));
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 1500ms) << "the sender itself was too slow";
    std::this_thread::sleep_for(200ms);
    running_after_flood = rt.running();
    frames_during_flood = static_cast<int64_t>(stub->processed().size() - frames0);
    // The final values after the flood are the ones the stream ends with.
    lo_send(send.get(), "/guidance", "f", 7.0f);
    lo_send(send.get(), "/delta", "f", 0.25f);
    std::this_thread::sleep_for(200ms);
    lo_send(send.get(), "/quit", "");
  });
  rt.run();
  client.join();
  channel.stop();
  EXPECT_TRUE(running_after_flood);
  EXPECT_GT(frames_during_flood, 10) << "frames kept coming during the flood";
  EXPECT_DOUBLE_EQ(stub->guidance, 7.0);
  EXPECT_EQ(stub->applied().back().second, "delta 0.25");

  const auto ch = channel.stats();
  const auto c = rt.summary()["control_counts"];
  // The channel: every message is bad, answered or posted; the stream: every posted one is accounted for.
  EXPECT_EQ(ch["received"].get<int64_t>(),
            ch["bad"].get<int64_t>() + ch["answered"].get<int64_t>() + ch["posted"].get<int64_t>())
      << ch.dump();
  EXPECT_EQ(ch["posted"].get<int64_t>(), count(c, "posted")) << "one channel, one stream";
  expect_counts_add_up(c);
  // UDP on loopback may drop under load; what arrived is nearly all of it here, and the flood was coalesced.
  EXPECT_GE(ch["received"].get<int64_t>(), kMessages / 2) << ch.dump();
  EXPECT_GT(ch["bad"].get<int64_t>(), 0);
  EXPECT_GT(count(c, "coalesced"), count(c, "applied")) << c.dump();
  EXPECT_LE(static_cast<int64_t>(rt.summary()["controls"].size()), 1000) << "the listed commands stay bounded";
  std::printf("[ flood    ] received %lld (bad %lld), posted %lld: applied %lld, coalesced %lld; %lld frames\n",
              static_cast<long long>(ch["received"].get<int64_t>()), static_cast<long long>(ch["bad"].get<int64_t>()),
              static_cast<long long>(count(c, "posted")), static_cast<long long>(count(c, "applied")),
              static_cast<long long>(count(c, "coalesced")), static_cast<long long>(frames_during_flood));
}

#ifdef SD_CLI_PATH
int free_udp_port() {
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

int sh(const std::string& cmd) {
  const int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// The README's recipe: a stream with --control osc://..., driven by liblo's oscsend (Debian liblo-tools).
TEST(OscCli, OscsendChangesTheRunningStream) {
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "fixture model tiny-sd15 not present";
  if (sh("command -v oscsend > /dev/null") != 0) GTEST_SKIP() << "oscsend not installed (Debian liblo-tools)";
  const std::string tmp = test::make_temp_dir("osc_cli");
  const int port = free_udp_port();
  test::ReplyListener listener;
  const std::string log = tmp + "/log.txt", stats = tmp + "/stats.json";
  const std::string cli = std::string(SD_CLI_PATH) + " stream --model '" + test::fixture_path("models/tiny-sd15") +
                          "' --size 64x64 --threads 1 --prompt 'a cat' --status-interval 0 --input none --output none"
                          " --control 'osc://127.0.0.1:" + std::to_string(port) + "?reply=osc://127.0.0.1:" +
                          std::to_string(listener.port()) + "' --stats-json '" + stats + "'";
  int status = -1;
  std::thread stream([&] { status = sh(cli + " > '" + log + "' 2>&1 < /dev/null"); });
  bool ready = false;
  for (int i = 0; i < 1200 && !ready; ++i) {  // model load on a busy machine: up to 60 s
    ready = slurp(log).find("control: osc udp 127.0.0.1:" + std::to_string(port)) != std::string::npos;
    if (!ready) std::this_thread::sleep_for(50ms);
  }
  const std::string send = "oscsend 127.0.0.1 " + std::to_string(port) + " ";
  if (ready) {
    EXPECT_EQ(sh(send + "/prompt s 'a red fox'"), 0);
    const std::string reply = listener.next(20000ms);
    EXPECT_TRUE(std::regex_match(reply, std::regex("/streamdiffusion/ok 'prompt a red fox' applied before frame \\d+")))
        << reply;
    EXPECT_EQ(sh(send + "/streamdiffusion/seed f 7.0"), 0);  // a namespace and a CHOP-style float
    EXPECT_NE(listener.next(20000ms).find("'seed 7' applied"), std::string::npos);
    EXPECT_EQ(sh(send + "/quit"), 0);
  }
  stream.join();
  ASSERT_TRUE(ready) << slurp(log);
  EXPECT_EQ(status, 0) << slurp(log);
  const auto j = nlohmann::json::parse(slurp(stats));
  std::vector<std::string> applied;
  for (const auto& c : j["controls"]) applied.push_back(c["command"]);
  EXPECT_EQ(applied, (std::vector<std::string>{"prompt a red fox", "seed 7"}));
  ASSERT_EQ(j["control_channels"].size(), 1u);
  EXPECT_EQ(j["control_channels"][0]["received"], 3);
  EXPECT_EQ(j["control_channels"][0]["posted"], 3);
  EXPECT_EQ(j["stop_reason"], "quit command");
  expect_counts_add_up(j["control_counts"]);
  std::filesystem::remove_all(tmp);
}
#endif

}  // namespace
}  // namespace sd
