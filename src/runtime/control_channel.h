#pragma once
// Reads control commands (control_command.h), one per line, on a background thread and hands them to a handler
// together with a function that answers the sender. Channels:
//   stdin        standard input (when it is not the frame source); answers go to stderr
//   fd:N         an already open descriptor (tests, embedding); answers go to stderr
//   fifo:PATH    a named pipe, created if absent (echo 'prompt a cat' > PATH); answers go to stderr
//   unix:PATH    a Unix stream socket, any number of clients (e.g. socat - UNIX-CONNECT:PATH); answers go back to
//                the client that sent the command
//   osc://HOST:PORT[?reply=osc://HOST:PORT|sender]
//                OSC messages over UDP, `/name args...` = the line `name args...` (see osc_control.h for the
//                mapping and the replies); last value wins (last_value_wins)
// A line that does not parse, or is longer than 64 KiB, is answered with the error and has no effect. End of input on
// stdin/fd (or the descriptor closed under it) only ends the channel, not the stream.
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "runtime/control_command.h"

namespace sd {

class ControlChannel {
 public:
  using Reply = std::function<void(const std::string&)>;
  using Handler = std::function<void(ControlCommand, Reply)>;

  // Starts reading. Throws InvalidArgument / sd::Error when the channel cannot be opened.
  ControlChannel(const std::string& spec, Handler handler);
  ~ControlChannel();  // stops and joins the reader thread; removes a FIFO / socket file it created
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  void stop();
  const std::string& describe() const { return name_; }
  int64_t lines() const { return lines_.load(); }  // command lines seen (for tests)
  // The input has ended (end of file, the descriptor closed) or the channel was stopped: nothing more is read.
  bool ended() const { return ended_.load(); }
  // The UDP port of an osc:// channel (the bound one when the spec said 0); 0 for other channels.
  int osc_port() const;
  // Whether a channel of this spec streams values (OSC faders), so its commands should be posted with
  // StreamRuntime::post_control(..., coalesce = true): only the newest of each kind is applied at a frame boundary.
  // Line channels (stdin, FIFO, socket) carry discrete commands, each applied.
  static bool last_value_wins(const std::string& spec);
  // Counters: received (commands and messages, blank/comment lines excepted) = bad (did not parse) + answered (help,
  // /reply: answered here) + posted (handed to the handler).
  nlohmann::json stats() const;

 private:
  struct Client;
  struct Osc;
  void run();
  void run_osc();
  void serve_osc_packet(const char* data, size_t n, const std::string& sender);
  void serve_lines(const std::shared_ptr<Client>& client, const char* data, size_t n);
  void handle_line(const std::string& line, const Reply& reply);

  Handler handler_;
  std::string name_;
  std::string path_;         // FIFO or socket path to remove at the end ("" = none)
  int fd_ = -1;              // the descriptor read (stdin/fd/fifo) or the listening socket
  bool own_fd_ = false;
  bool listening_ = false;   // unix socket
  std::atomic<bool> stop_{false};
  std::atomic<bool> ended_{false};
  std::atomic<int64_t> lines_{0};
  std::atomic<int64_t> received_{0}, bad_{0}, answered_{0}, posted_{0};
  std::shared_ptr<Osc> osc_;  // osc:// channels
  std::thread thread_;
};

}  // namespace sd
