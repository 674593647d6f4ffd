// The line channels' edges: a descriptor that is closed (at the start or under the running channel) and a line longer
// than the 64 KiB a line may have.
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "runtime/control_channel.h"
#include "runtime/frame.h"
#include "runtime/unix_socket_client.h"

namespace sd {
namespace {

using namespace std::chrono_literals;
using test::error_of;

// Polls `done` for up to 10 s (scaled).
template <class F>
bool wait_until(F done) {
  const auto deadline = StreamClock::now() + std::chrono::duration<double>(10 * test::time_scale());
  while (!done()) {
    if (StreamClock::now() > deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

struct Received {
  std::mutex mutex;
  std::vector<std::string> lines;
  ControlChannel::Handler handler() {
    return [this](ControlCommand c, ControlChannel::Reply reply) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        lines.push_back(c.line);
      }
      if (reply) reply("ok");
    };
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mutex);
    return lines.size();
  }
};

TEST(ControlChannelInput, AClosedDescriptorIsRefusedAndOneClosedWhileReadEndsTheChannel) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  const int closed = p[0];
  ::close(p[0]);
  ::close(p[1]);
  Received received;
  const std::string spec = "fd:" + std::to_string(closed);
  EXPECT_EQ(error_of<InvalidArgument>([&] { ControlChannel(spec, received.handler()); }),
            "control channel " + spec + ": descriptor " + std::to_string(closed) + " is not open (" +
                std::strerror(EBADF) + ")");

  // stdin closed (`<&-`): the same, for the channel the CLI opens by default.
  const int saved = ::dup(STDIN_FILENO);
  if (saved >= 0) {
    ::close(STDIN_FILENO);
    const std::string e = error_of<InvalidArgument>([&] { ControlChannel("stdin", received.handler()); });
    ASSERT_EQ(::dup2(saved, STDIN_FILENO), STDIN_FILENO);
    ::close(saved);
    EXPECT_EQ(e, "control channel stdin: standard input is closed");
  }

  // Closed by its owner while the channel reads it: the channel ends (before, poll() reported the descriptor invalid
  // at once, forever: a core spinning at 100 %).
  ASSERT_EQ(::pipe(p), 0);
  ControlChannel channel("fd:" + std::to_string(p[0]), received.handler());
  const std::string line = "seed 3\n";
  ASSERT_EQ(::write(p[1], line.data(), line.size()), static_cast<ssize_t>(line.size()));
  ASSERT_TRUE(wait_until([&] { return received.size() == 1; }));
  EXPECT_FALSE(channel.ended());
  ::close(p[0]);
  EXPECT_TRUE(wait_until([&] { return channel.ended(); })) << "the channel kept polling a closed descriptor";
  ::close(p[1]);
}

TEST(ControlChannelInput, ALineOver64KiBIsRefusedWholeAndTheNextLinesStillCount) {
  const std::string dir = test::make_temp_dir("rt_channel");
  const std::string path = dir + "/ctl.sock";
  Received received;
  {
    ControlChannel channel("unix:" + path, received.handler());
    const int fd = test::connect_unix(path);
    ASSERT_GE(fd, 0);
    // Cut at 64 KiB, the first line would be a valid prompt of the first 64 KiB. The last one is exactly 64 KiB long.
    const std::string longest = "prompt " + std::string(64 * 1024 - 7, 'b');
    const std::string text = "prompt " + std::string(70000, 'a') + "\nseed 3\n" + longest + "\n";
    std::thread writer([&] {
      for (size_t sent = 0; sent < text.size();) {
        const ssize_t n = ::write(fd, text.data() + sent, text.size() - sent);
        ASSERT_GT(n, 0);
        sent += static_cast<size_t>(n);
      }
    });
    std::vector<std::string> replies;
    std::string reply;
    char ch;
    while (replies.size() < 3 && ::read(fd, &ch, 1) == 1) {
      if (ch != '\n') {
        reply += ch;
        continue;
      }
      replies.push_back(reply);
      reply.clear();
    }
    writer.join();
    ::close(fd);
    EXPECT_EQ(replies, (std::vector<std::string>{"error: line longer than 64 KiB (70007 bytes); ignored", "ok", "ok"}));
    // Sizes first: a failure should not print 64 KiB lines.
    ASSERT_EQ(received.lines.size(), 2u);
    EXPECT_EQ(received.lines[0], "seed 3");
    EXPECT_EQ(received.lines[1].size(), longest.size());
    EXPECT_TRUE(received.lines[1] == longest);
    const auto stats = channel.stats();
    EXPECT_EQ(stats["received"], 3);
    EXPECT_EQ(stats["bad"], 1);
    EXPECT_EQ(stats["posted"], 2);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace sd
