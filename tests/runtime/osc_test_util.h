#pragma once
// OSC test helpers: a liblo sender (what TouchDesigner / oscsend do) and a UDP listener that decodes the replies.
#include <chrono>
#include <cstring>
#include <memory>
#include <string>

#include <arpa/inet.h>
#include <lo/lo.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "runtime/osc_control.h"

namespace sd::test {

// liblo's client: an address to send to 127.0.0.1:port.
class OscSender {
 public:
  explicit OscSender(int port) : addr_(lo_address_new("127.0.0.1", std::to_string(port).c_str())) {}
  ~OscSender() { lo_address_free(addr_); }
  OscSender(const OscSender&) = delete;
  OscSender& operator=(const OscSender&) = delete;
  lo_address get() const { return addr_; }
  // Raw bytes (malformed packets).
  void raw(int port, const std::string& bytes) const {
    const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::sendto(fd, bytes.data(), bytes.size(), 0, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::close(fd);
  }

 private:
  lo_address addr_;
};

// A UDP socket on 127.0.0.1 (any port) that receives the channel's replies, decoded to "address text".
class ReplyListener {
 public:
  ReplyListener() {
    fd_ = ::socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  ~ReplyListener() { ::close(fd_); }
  int port() const { return port_; }
  // The next reply as "ADDRESS ARG..." (the control-line form with the full address), "" after `timeout`.
  std::string next(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    timeval tv{static_cast<time_t>(timeout.count() / 1000), static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n <= 0) return "";
    const OscMessageLine m = osc_message_to_line(buf, static_cast<size_t>(n));
    return m.address + m.line.substr(m.command.size());
  }

 private:
  int fd_ = -1;
  int port_ = 0;
};

}  // namespace sd::test
