#include "runtime/fd_io.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include <poll.h>
#include <unistd.h>

#include "core/error.h"

namespace sd {
namespace {
constexpr int kSliceMs = 50;  // how often a waiting read/write looks at the stop flag
}

bool wait_readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  const int r = ::poll(&p, 1, timeout_ms);
  return r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

IoStatus read_full(int fd, void* buf, size_t n, const std::atomic<bool>& stop, const std::string& what,
                   size_t* got) {
  size_t done = 0;
  char* p = static_cast<char*>(buf);
  while (done < n) {
    if (stop.load()) {
      if (got) *got = done;
      return IoStatus::Stopped;
    }
    pollfd pf{fd, POLLIN, 0};
    const int r = ::poll(&pf, 1, kSliceMs);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(what + ": poll failed: " + std::strerror(errno));
    }
    if (r == 0) continue;
    const ssize_t k = ::read(fd, p + done, n - done);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      throw Error(what + ": read failed: " + std::strerror(errno));
    }
    if (k == 0) {
      if (got) *got = done;
      return IoStatus::Eof;
    }
    done += static_cast<size_t>(k);
  }
  if (got) *got = done;
  return IoStatus::Ok;
}

IoStatus write_full(int fd, const void* buf, size_t n, const std::atomic<bool>& stop, const std::string& what) {
  size_t done = 0;
  const char* p = static_cast<const char*>(buf);
  while (done < n) {
    if (stop.load()) return IoStatus::Stopped;
    pollfd pf{fd, POLLOUT, 0};
    const int r = ::poll(&pf, 1, kSliceMs);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(what + ": poll failed: " + std::strerror(errno));
    }
    if (r == 0) continue;
    if (pf.revents & (POLLERR | POLLHUP) && !(pf.revents & POLLOUT))
      throw Error(what + ": the reader closed the pipe");
    // POLLOUT promises room for PIPE_BUF bytes: larger writes on a blocking pipe could block past a stop request.
    const ssize_t k = ::write(fd, p + done, std::min<size_t>(n - done, PIPE_BUF));
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      if (errno == EPIPE) throw Error(what + ": the reader closed the pipe");
      throw Error(what + ": write failed: " + std::strerror(errno));
    }
    done += static_cast<size_t>(k);
  }
  return IoStatus::Ok;
}

}  // namespace sd
