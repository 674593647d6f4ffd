#include "runtime/osc_control.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include <lo/lo.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/error.h"

namespace sd {
namespace {

// liblo's messages are C objects; freed on every path.
struct MessageFree {
  void operator()(lo_message m) const { lo_message_free(m); }
};
using MessagePtr = std::unique_ptr<std::remove_pointer_t<lo_message>, MessageFree>;

int parse_port(const std::string& s, const std::string& spec) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < 0 || v > 65535)
    throw InvalidArgument("control channel '" + spec + "': the port must be a number in [0, 65535], got '" + s + "'");
  return static_cast<int>(v);
}

// "HOST:PORT" / "[V6]:PORT" / ":PORT" (host = 127.0.0.1) -> host, port.
std::pair<std::string, int> host_port(std::string s, const std::string& spec) {
  if (!s.empty() && s.back() == '/') s.pop_back();  // liblo URLs end with '/'
  std::string host;
  std::string port;
  if (!s.empty() && s[0] == '[') {
    const auto close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':')
      throw InvalidArgument("control channel '" + spec + "': expected [IPV6]:PORT");
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    const auto colon = s.rfind(':');
    if (colon == std::string::npos)
      throw InvalidArgument("control channel '" + spec + "': expected osc://HOST:PORT, e.g. osc://127.0.0.1:9000");
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
  }
  if (host.empty()) host = "127.0.0.1";
  return {host, parse_port(port, spec)};
}

std::string strip_scheme(const std::string& s) {
  for (const char* p : {"osc://", "osc.udp://"})
    if (s.rfind(p, 0) == 0) return s.substr(std::strlen(p));
  return "";
}

std::string number_text(double v, bool single) {
  // An integral value reads as an integer (CHOPs send floats; `seed 42.0` would not parse).
  // (Range first: converting NaN, infinities or values beyond long long is undefined - fuzz_osc found NaN.)
  if (std::isfinite(v) && std::abs(v) < 1e15 && v == std::trunc(v))
    return std::to_string(static_cast<long long>(v));
  char buf[64];
  const auto r = single ? std::to_chars(buf, buf + sizeof buf, static_cast<float>(v))
                        : std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string one_line(const char* s) {
  std::string t(s);
  for (char& c : t)
    if (c == '\n' || c == '\r') c = ' ';
  return t;
}

uint32_t read_be32(const unsigned char* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

void collect(const unsigned char* base, size_t offset, size_t size, int depth,
             std::vector<std::pair<size_t, size_t>>& out) {
  const unsigned char* p = base + offset;
  if (size >= 8 && std::memcmp(p, "#bundle", 8) == 0) {
    if (depth > 8) throw InvalidArgument("OSC bundle nested too deeply");
    if (size < 16) throw InvalidArgument("OSC bundle shorter than its header");
    size_t pos = 16;  // "#bundle\0" + 8-byte time tag
    while (pos < size) {
      if (size - pos < 4) throw InvalidArgument("OSC bundle element without its size");
      const uint32_t n = read_be32(p + pos);
      pos += 4;
      if (n == 0 || n % 4 != 0 || n > size - pos) throw InvalidArgument("OSC bundle element size " + std::to_string(n) + " is invalid");
      collect(base, offset + pos, n, depth + 1, out);
      pos += n;
    }
    return;
  }
  out.emplace_back(offset, size);
}

}  // namespace

OscSpec parse_osc_spec(const std::string& spec) {
  std::string rest = strip_scheme(spec);
  if (rest.empty() && spec.find("://") == std::string::npos)
    throw InvalidArgument("control channel '" + spec + "': expected osc://HOST:PORT");
  OscSpec s;
  std::string query;
  const auto q = rest.find('?');
  if (q != std::string::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  std::tie(s.host, s.port) = host_port(rest, spec);
  if (!query.empty()) {
    if (query.rfind("reply=", 0) != 0)
      throw InvalidArgument("control channel '" + spec + "': the only parameter is reply=osc://HOST:PORT or "
                            "reply=sender, got '" + query + "'");
    const std::string r = query.substr(6);
    if (r == "sender") {
      s.reply = OscSpec::Reply::Sender;
    } else {
      const std::string addr = strip_scheme(r);
      if (addr.empty()) throw InvalidArgument("control channel '" + spec + "': reply= expects osc://HOST:PORT or sender");
      std::tie(s.reply_host, s.reply_port) = host_port(addr, spec);
      if (s.reply_port == 0) throw InvalidArgument("control channel '" + spec + "': the reply port cannot be 0");
      s.reply = OscSpec::Reply::Fixed;
    }
  }
  return s;
}

OscMessageLine osc_message_to_line(const void* data, size_t size) {
  const char* bytes = static_cast<const char*>(data);
  if (size < 4 || bytes[0] != '/') throw InvalidArgument("not an OSC message (it must start with an address '/...')");
  const size_t alen = strnlen(bytes, size);
  if (alen == size) throw InvalidArgument("OSC address is not terminated");
  OscMessageLine out;
  out.address.assign(bytes, alen);
  int result = 0;
  // liblo validates the address, the type tags and every argument against the size before giving a message.
  MessagePtr m(lo_message_deserialise(const_cast<void*>(data), size, &result));
  if (!m || result != 0)
    throw InvalidArgument("OSC message " + out.address + " is malformed (liblo error " + std::to_string(result) + ")");
  // OSC addresses are printable ASCII (OSC 1.0); a line break in one would end the control line early (fuzz_osc).
  for (const char c : out.address)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      throw InvalidArgument("OSC address has a control character (byte " + std::to_string(static_cast<int>(c)) +
                            "): addresses are printable ASCII");
  const auto slash = out.address.find_last_of('/');
  out.command = out.address.substr(slash + 1);
  if (out.command.empty()) throw InvalidArgument("OSC address '" + out.address + "' names no command");
  out.line = out.command;
  const char* types = lo_message_get_types(m.get());
  lo_arg** argv = lo_message_get_argv(m.get());
  const int argc = lo_message_get_argc(m.get());
  // liblo's argv points into the message at 4-byte steps, while lo_arg (a union with 8-byte members) wants 8: read
  // the bytes, never through a lo_arg member (UBSan: misaligned member access, found by fuzz_osc).
  const auto read = [&](int i, auto& v) { std::memcpy(&v, static_cast<const void*>(argv[i]), sizeof v); };
  for (int i = 0; i < argc; ++i) {
    std::string a;
    switch (types[i]) {
      case LO_STRING:
      case LO_SYMBOL: a = one_line(reinterpret_cast<const char*>(argv[i])); break;
      case LO_INT32: {
        int32_t v;
        read(i, v);
        a = std::to_string(v);
        break;
      }
      case LO_INT64: {
        int64_t v;
        read(i, v);
        a = std::to_string(static_cast<long long>(v));
        break;
      }
      case LO_FLOAT: {
        float v;
        read(i, v);
        a = number_text(v, true);
        break;
      }
      case LO_DOUBLE: {
        double v;
        read(i, v);
        a = number_text(v, false);
        break;
      }
      case LO_TRUE: a = "true"; break;
      case LO_FALSE: a = "false"; break;
      case LO_NIL: a = "none"; break;
      case LO_CHAR: {
        // lo_arg's c is a char holding the 32-bit argument's low byte, as liblo stores it after byte swapping.
        char c;
        read(i, c);
        // A control character (a line break would end the control line: fuzz_osc) reads as a space, as in strings.
        a = std::string(1, static_cast<unsigned char>(c) < 0x20 || c == 0x7f ? ' ' : c);
        break;
      }
      default:
        throw InvalidArgument("OSC message " + out.address + ": argument " + std::to_string(i + 1) + " has type '" +
                              std::string(1, types[i]) + "', which has no text form (use s, i, h, f, d, T, F, N, c)");
    }
    out.line += " " + a;
  }
  return out;
}

std::vector<std::pair<size_t, size_t>> osc_packet_messages(const void* data, size_t size) {
  std::vector<std::pair<size_t, size_t>> out;
  collect(static_cast<const unsigned char*>(data), 0, size, 0, out);
  return out;
}

std::string osc_encode_strings(const std::string& address, const std::vector<std::string>& args) {
  MessagePtr m(lo_message_new());
  for (const auto& a : args) lo_message_add_string(m.get(), a.c_str());
  size_t size = 0;
  void* buf = lo_message_serialise(m.get(), address.c_str(), nullptr, &size);
  if (buf == nullptr) throw Error("OSC: cannot encode a message for " + address);
  std::string out(static_cast<const char*>(buf), size);
  std::free(buf);
  return out;
}

OscSocket::OscSocket(const OscSpec& spec) : host_(spec.host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(spec.port);
  if (const int e = ::getaddrinfo(spec.host.c_str(), port.c_str(), &hints, &res); e != 0)
    throw InvalidArgument("OSC: cannot resolve " + spec.host + ": " + gai_strerror(e));
  std::string err = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    // A deep receive buffer: a burst of messages waits for the reader instead of being dropped by the kernel (capped
    // by net.core.rmem_max).
    const int rcvbuf = 4 << 20;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      fd_ = fd;
      family_ = ai->ai_family;
      break;
    }
    err = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(res);
  if (fd_ < 0) throw Error("OSC: cannot listen on udp " + spec.host + ":" + port + ": " + err);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len);
  port_ = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                   : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

OscSocket::~OscSocket() {
  if (fd_ >= 0) ::close(fd_);
}

std::string OscSocket::resolve(const std::string& host, int port) const {
  addrinfo hints{};
  hints.ai_family = family_;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || res == nullptr) return "";
  std::string out(reinterpret_cast<const char*>(res->ai_addr), res->ai_addrlen);
  ::freeaddrinfo(res);
  return out;
}

void OscSocket::send_to(const std::string& address, const std::string& packet) const {
  if (address.empty() || fd_ < 0) return;
  [[maybe_unused]] ssize_t r = ::sendto(fd_, packet.data(), packet.size(), MSG_DONTWAIT | MSG_NOSIGNAL,
                                        reinterpret_cast<const sockaddr*>(address.data()),
                                        static_cast<socklen_t>(address.size()));
}

}  // namespace sd
