#include "runtime/control_channel.h"

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <mutex>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <unistd.h>

#include "core/error.h"
#include "core/log.h"
#include "runtime/osc_control.h"

namespace sd {
namespace {

std::mutex g_stderr_mutex;

void reply_to_stderr(const std::string& text) {
  std::lock_guard<std::mutex> lock(g_stderr_mutex);
  const std::string line = "control: " + text + "\n";
  [[maybe_unused]] ssize_t r = ::write(STDERR_FILENO, line.data(), line.size());
}

constexpr size_t kMaxLine = 64 * 1024;  // a longer "line" is someone streaming garbage at us
// After a failed accept (out of descriptors): the connection stays queued, so polling at once would spin.
constexpr auto kAcceptRetry = std::chrono::milliseconds(200);

}  // namespace

// One connection (or the single input descriptor); replies may come from the model thread after it is gone.
struct ControlChannel::Client {
  int fd = -1;
  bool socket = false;
  std::string partial;    // the line so far, up to kMaxLine bytes
  size_t line_bytes = 0;  // its length, also past kMaxLine (then the line is refused at its newline)
  std::mutex mutex;
  bool open = true;

  void send(const std::string& text) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!open) return;
    const std::string line = text + "\n";
    // Never block the caller (the model thread): a client that does not read loses replies.
    [[maybe_unused]] ssize_t r = ::send(fd, line.data(), line.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  }
  void close_fd() {
    std::lock_guard<std::mutex> lock(mutex);
    if (open && fd >= 0) ::close(fd);
    open = false;
  }
};

// An OSC channel's socket and where its replies go. The reader thread owns `reply_to` (changed by /reply); reply
// functions hold the socket weakly and their own copy of the address, so a late reply after the channel is gone is
// dropped.
struct ControlChannel::Osc {
  OscSpec spec;
  std::shared_ptr<OscSocket> socket;
  bool to_sender = false;
  std::string reply_to;  // sockaddr bytes; "" = no replies

  std::string describe_reply() const {
    if (to_sender) return "replies to the sender";
    return reply_to.empty() ? "no replies" : "replies set";
  }
  Reply reply_for(const std::string& sender) const {
    const std::string target = to_sender ? sender : reply_to;
    if (target.empty()) return {};
    return [weak = std::weak_ptr<OscSocket>(socket), target](const std::string& text) {
      auto s = weak.lock();
      if (!s) return;
      std::string address = "/streamdiffusion/status", body = text;
      if (text.rfind("ok: ", 0) == 0) {
        address = "/streamdiffusion/ok";
        body = text.substr(4);
      } else if (text.rfind("error: ", 0) == 0) {
        address = "/streamdiffusion/error";
        body = text.substr(7);
      }
      s->send_to(target, osc_encode_strings(address, {body}));
    };
  }
};

bool ControlChannel::last_value_wins(const std::string& spec) {
  return spec.rfind("osc://", 0) == 0 || spec.rfind("osc.udp://", 0) == 0;
}

int ControlChannel::osc_port() const { return osc_ ? osc_->socket->port() : 0; }

nlohmann::json ControlChannel::stats() const {
  return {{"channel", name_}, {"received", received_.load()}, {"bad", bad_.load()}, {"answered", answered_.load()},
          {"posted", posted_.load()}};
}

ControlChannel::ControlChannel(const std::string& spec, Handler handler) : handler_(std::move(handler)) {
  if (last_value_wins(spec)) {
    osc_ = std::make_shared<Osc>();
    osc_->spec = parse_osc_spec(spec);
    osc_->socket = std::make_shared<OscSocket>(osc_->spec);
    if (osc_->spec.reply == OscSpec::Reply::Sender) osc_->to_sender = true;
    if (osc_->spec.reply == OscSpec::Reply::Fixed) {
      osc_->reply_to = osc_->socket->resolve(osc_->spec.reply_host, osc_->spec.reply_port);
      if (osc_->reply_to.empty())
        throw InvalidArgument("control channel '" + spec + "': cannot resolve the reply host " + osc_->spec.reply_host);
    }
    name_ = "osc udp " + osc_->spec.host + ":" + std::to_string(osc_->socket->port()) +
            (osc_->spec.reply == OscSpec::Reply::Fixed
                 ? " (replies to " + osc_->spec.reply_host + ":" + std::to_string(osc_->spec.reply_port) + ")"
                 : " (" + osc_->describe_reply() + ")");
    thread_ = std::thread([this] { run_osc(); });
    return;
  }
  if (spec == "stdin" || spec == "-") {
    fd_ = STDIN_FILENO;
    name_ = "stdin";
    // A closed descriptor would poll as invalid forever: refuse it here, where the error can still be seen.
    if (::fcntl(fd_, F_GETFD) == -1) throw InvalidArgument("control channel stdin: standard input is closed");
  } else if (spec.rfind("fd:", 0) == 0) {
    char* end = nullptr;
    const long v = std::strtol(spec.c_str() + 3, &end, 10);
    if (spec.size() == 3 || *end != '\0' || v < 0 || v > INT_MAX)
      throw InvalidArgument("control channel: bad descriptor in '" + spec + "'");
    fd_ = static_cast<int>(v);
    name_ = spec;
    if (::fcntl(fd_, F_GETFD) == -1)
      throw InvalidArgument("control channel " + spec + ": descriptor " + std::to_string(v) + " is not open (" +
                            std::strerror(errno) + ")");
  } else if (spec.rfind("fifo:", 0) == 0) {
    const std::string path = spec.substr(5);
    if (path.empty()) throw InvalidArgument("control channel: fifo: needs a path");
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0) {
      if (!S_ISFIFO(st.st_mode)) throw InvalidArgument("control channel: " + path + " exists and is not a FIFO");
    } else {
      if (::mkfifo(path.c_str(), 0600) != 0)
        throw Error("control channel: cannot create FIFO " + path + ": " + std::strerror(errno));
      path_ = path;
    }
    // Read-write, so the FIFO always has a writer (us) and does not report end of file between clients.
    fd_ = ::open(path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd_ < 0) throw Error("control channel: cannot open FIFO " + path + ": " + std::strerror(errno));
    own_fd_ = true;
    name_ = "fifo " + path;
  } else if (spec.rfind("unix:", 0) == 0) {
    const std::string path = spec.substr(5);
    sockaddr_un addr{};
    if (path.empty() || path.size() >= sizeof(addr.sun_path))
      throw InvalidArgument("control channel: unix socket path is empty or too long: '" + path + "'");
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) throw InvalidArgument("control channel: " + path + " exists and is not a socket");
      ::unlink(path.c_str());  // a stale socket from an earlier run
    }
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw Error(std::string("control channel: socket() failed: ") + std::strerror(errno));
    own_fd_ = true;
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd_, 8) != 0) {
      const std::string err = std::strerror(errno);
      ::close(fd_);
      throw Error("control channel: cannot listen on " + path + ": " + err);
    }
    path_ = path;
    listening_ = true;
    name_ = "unix socket " + path;
  } else {
    throw InvalidArgument("control channel: expected stdin, fd:N, fifo:PATH, unix:PATH or osc://HOST:PORT, got '" +
                          spec + "'");
  }
  thread_ = std::thread([this] { run(); });
}

ControlChannel::~ControlChannel() {
  stop();
  if (own_fd_ && fd_ >= 0) ::close(fd_);
  if (!path_.empty()) ::unlink(path_.c_str());
}

void ControlChannel::stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ControlChannel::handle_line(const std::string& line, const Reply& reply) {
  std::optional<ControlCommand> cmd;
  try {
    cmd = parse_control_command(line);
  } catch (const std::exception& e) {
    ++received_;
    ++bad_;
    std::string what = e.what();
    if (what.rfind("control: ", 0) == 0) what = what.substr(9);  // the reply's channel already says so
    if (reply) reply("error: " + what);
    return;
  }
  if (!cmd) return;
  ++received_;
  ++lines_;
  if (cmd->kind == ControlCommand::Kind::Help) {
    ++answered_;
    if (reply) reply(control_help());
    return;
  }
  ++posted_;
  handler_(std::move(*cmd), reply);
}

void ControlChannel::serve_osc_packet(const char* data, size_t n, const std::string& sender) {
  std::vector<std::pair<size_t, size_t>> messages;
  try {
    messages = osc_packet_messages(data, n);
  } catch (const std::exception& e) {
    ++received_;
    ++bad_;
    if (auto reply = osc_->reply_for(sender)) reply(std::string("error: ") + e.what());
    return;
  }
  for (const auto& [offset, size] : messages) {
    OscMessageLine m;
    try {
      m = osc_message_to_line(data + offset, size);
    } catch (const std::exception& e) {
      ++received_;
      ++bad_;
      if (auto reply = osc_->reply_for(sender)) reply(std::string("error: ") + e.what());
      continue;
    }
    if (m.command != "reply") {
      handle_line(m.line, osc_->reply_for(sender));
      continue;
    }
    // /reply [none | PORT | HOST PORT | osc://HOST:PORT]: where replies go from now on (the sender when no argument).
    ++received_;
    std::vector<std::string> args;
    for (size_t pos = 6; pos < m.line.size();) {
      const size_t next = std::min(m.line.find(' ', pos), m.line.size());
      if (next > pos) args.push_back(m.line.substr(pos, next - pos));
      pos = next + 1;
    }
    std::string error;
    try {
      if (args.empty()) {
        osc_->to_sender = true;
      } else if (args.size() == 1 && (args[0] == "none" || args[0] == "off")) {
        osc_->to_sender = false;
        osc_->reply_to.clear();
      } else {
        const OscSpec r = args.size() == 1 && args[0].find("://") != std::string::npos
                              ? parse_osc_spec(args[0])
                              : args.size() == 1 ? parse_osc_spec("osc://:" + args[0])
                                                 : parse_osc_spec("osc://" + args[0] + ":" + args[1]);
        std::string target;
        if (args.size() == 1 && args[0].find("://") == std::string::npos) {
          // The sender's host, another port.
          target = sender;
          auto* sa = reinterpret_cast<sockaddr*>(target.data());
          if (sa->sa_family == AF_INET6)
            reinterpret_cast<sockaddr_in6*>(sa)->sin6_port = htons(static_cast<uint16_t>(r.port));
          else
            reinterpret_cast<sockaddr_in*>(sa)->sin_port = htons(static_cast<uint16_t>(r.port));
        } else {
          target = osc_->socket->resolve(r.host, r.port);
          if (target.empty()) throw InvalidArgument("cannot resolve " + r.host);
        }
        if (r.port == 0) throw InvalidArgument("the reply port cannot be 0");
        osc_->to_sender = false;
        osc_->reply_to = target;
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) {
      ++bad_;
      if (auto reply = osc_->reply_for(sender)) reply("error: /reply: " + error);
      continue;
    }
    ++answered_;
    if (auto reply = osc_->reply_for(sender)) reply("ok: replies go here");
  }
}

void ControlChannel::run_osc() {
  // One datagram at a time into a buffer of the largest UDP payload; the socket is non-blocking, so every waiting
  // datagram is read before polling again (a flood is drained as fast as it is parsed).
  std::vector<char> buf(65536);
  const int fd = osc_->socket->fd();
  while (!stop_) {
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, 50);
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) continue;
    while (!stop_) {
      sockaddr_storage from{};
      socklen_t len = sizeof from;
      const ssize_t n = ::recvfrom(fd, buf.data(), buf.size(), 0, reinterpret_cast<sockaddr*>(&from), &len);
      if (n < 0) break;  // drained (EAGAIN) or a transient error: poll again
      serve_osc_packet(buf.data(), static_cast<size_t>(n), std::string(reinterpret_cast<const char*>(&from), len));
    }
  }
  ended_ = true;
}

void ControlChannel::serve_lines(const std::shared_ptr<Client>& client, const char* data, size_t n) {
  Reply reply;
  if (client->socket)
    reply = [weak = std::weak_ptr<Client>(client)](const std::string& text) {
      if (auto c = weak.lock()) c->send(text);
    };
  else
    reply = reply_to_stderr;
  for (size_t i = 0; i < n; ++i) {
    if (data[i] != '\n') {
      if (++client->line_bytes <= kMaxLine) client->partial += data[i];
      continue;
    }
    if (client->line_bytes > kMaxLine) {
      // Cut short it could still parse, as a different command: nothing of it is applied.
      ++received_;
      ++bad_;
      if (reply)
        reply("error: line longer than " + std::to_string(kMaxLine / 1024) + " KiB (" +
              std::to_string(client->line_bytes) + " bytes); ignored");
    } else {
      handle_line(client->partial, reply);
    }
    client->partial.clear();
    client->line_bytes = 0;
  }
}

void ControlChannel::run() {
  std::vector<std::shared_ptr<Client>> clients;
  std::shared_ptr<Client> input;
  if (!listening_) {
    input = std::make_shared<Client>();
    input->fd = fd_;
    clients.push_back(input);
  }
  char buf[4096];
  auto accept_after = std::chrono::steady_clock::time_point{};
  bool accept_failing = false;
  while (!stop_) {
    std::vector<pollfd> fds;
    const bool accepting = listening_ && std::chrono::steady_clock::now() >= accept_after;
    if (accepting) fds.push_back({fd_, POLLIN, 0});
    for (auto& c : clients) fds.push_back({c->fd, POLLIN, 0});
    if (fds.empty() && !listening_) break;  // the input ended
    const int r = ::poll(fds.data(), fds.size(), 50);
    if (r < 0 && errno != EINTR) {
      log::warn("control channel {}: poll failed ({}); no more commands from it", name_, std::strerror(errno));
      break;
    }
    if (r <= 0) continue;
    size_t k = 0;
    if (accepting) {
      if (fds[0].revents & POLLNVAL) {
        log::warn("control channel {}: the listening socket was closed; no more commands from it", name_);
        break;
      }
      if (fds[0].revents & POLLIN) {
        const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) {
          auto client = std::make_shared<Client>();
          client->fd = c;
          client->socket = true;
          clients.push_back(client);
          accept_failing = false;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
          if (!accept_failing)
            log::warn("control channel {}: cannot accept a connection ({}); trying again every {} ms", name_,
                      std::strerror(errno), kAcceptRetry.count());
          accept_failing = true;
          accept_after = std::chrono::steady_clock::now() + kAcceptRetry;
        }
      }
      k = 1;
    }
    std::vector<std::shared_ptr<Client>> keep;
    for (size_t i = 0; i < clients.size(); ++i) {
      auto& c = clients[i];
      // A client accepted above was not polled yet (no pollfd of its own: reading fds[k + i] for it read past the
      // end, found by TSan as a heap-use-after-free); it is polled from the next round on.
      const short ev = k + i < fds.size() ? fds[k + i].revents : 0;
      bool alive = true;
      if (ev & POLLNVAL) {
        // Closed under us (fd:N closed by its owner): poll() would report it at once forever.
        log::warn("control channel {}: the descriptor was closed; no more commands from it", name_);
        alive = false;
      } else if (ev & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t got = ::read(c->fd, buf, sizeof buf);
        if (got > 0) {
          serve_lines(c, buf, static_cast<size_t>(got));
        } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
          if (c->line_bytes > 0) serve_lines(c, "\n", 1);  // a last line without a newline
          alive = false;
        }
      }
      if (alive)
        keep.push_back(c);
      else if (c->socket)
        c->close_fd();
    }
    clients.swap(keep);
  }
  for (auto& c : clients)
    if (c->socket) c->close_fd();
  ended_ = true;
}

}  // namespace sd
