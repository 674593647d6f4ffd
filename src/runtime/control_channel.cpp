#include "runtime/control_channel.h"

#include <cerrno>
#include <cstring>
#include <mutex>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "core/error.h"

namespace sd {
namespace {

std::mutex g_stderr_mutex;

void reply_to_stderr(const std::string& text) {
  std::lock_guard<std::mutex> lock(g_stderr_mutex);
  const std::string line = "control: " + text + "\n";
  [[maybe_unused]] ssize_t r = ::write(STDERR_FILENO, line.data(), line.size());
}

constexpr size_t kMaxLine = 64 * 1024;  // a longer "line" is someone streaming garbage at us

}  // namespace

// One connection (or the single input descriptor); replies may come from the model thread after it is gone.
struct ControlChannel::Client {
  int fd = -1;
  bool socket = false;
  std::string partial;
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

ControlChannel::ControlChannel(const std::string& spec, Handler handler) : handler_(std::move(handler)) {
  if (spec == "stdin" || spec == "-") {
    fd_ = STDIN_FILENO;
    name_ = "stdin";
  } else if (spec.rfind("fd:", 0) == 0) {
    char* end = nullptr;
    const long v = std::strtol(spec.c_str() + 3, &end, 10);
    if (spec.size() == 3 || *end != '\0' || v < 0) throw InvalidArgument("control channel: bad descriptor in '" + spec + "'");
    fd_ = static_cast<int>(v);
    name_ = spec;
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
    throw InvalidArgument("control channel: expected stdin, fd:N, fifo:PATH or unix:PATH, got '" + spec + "'");
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
    std::string what = e.what();
    if (what.rfind("control: ", 0) == 0) what = what.substr(9);  // the reply's channel already says so
    reply("error: " + what);
    return;
  }
  if (!cmd) return;
  ++lines_;
  if (cmd->kind == ControlCommand::Kind::Help) {
    reply(control_help());
    return;
  }
  handler_(std::move(*cmd), reply);
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
    if (data[i] == '\n') {
      handle_line(client->partial, reply);
      client->partial.clear();
    } else if (client->partial.size() < kMaxLine) {
      client->partial += data[i];
    }
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
  while (!stop_) {
    std::vector<pollfd> fds;
    if (listening_) fds.push_back({fd_, POLLIN, 0});
    for (auto& c : clients) fds.push_back({c->fd, POLLIN, 0});
    if (fds.empty()) break;  // the input ended
    const int r = ::poll(fds.data(), fds.size(), 50);
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) continue;
    size_t k = 0;
    if (listening_) {
      if (fds[0].revents & POLLIN) {
        const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) {
          auto client = std::make_shared<Client>();
          client->fd = c;
          client->socket = true;
          clients.push_back(client);
        }
      }
      k = 1;
    }
    std::vector<std::shared_ptr<Client>> keep;
    for (size_t i = 0; i < clients.size(); ++i) {
      auto& c = clients[i];
      const short ev = fds[k + i].revents;
      bool alive = true;
      if (ev & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t got = ::read(c->fd, buf, sizeof buf);
        if (got > 0) {
          serve_lines(c, buf, static_cast<size_t>(got));
        } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
          if (!c->partial.empty()) serve_lines(c, "\n", 1);  // a last line without a newline
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
}

}  // namespace sd
