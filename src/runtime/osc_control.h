#pragma once
// OSC (Open Sound Control over UDP) as a control channel: `--control osc://127.0.0.1:9000`, for TouchDesigner,
// ossia, Max/MSP, Pure Data, oscsend, phone controllers.
//
// Mapping: the OSC message `/name arg1 arg2 ...` is the control line `name arg1 arg2 ...`, parsed by
// parse_control_command (control_command.h), so every control command - also ones added later - works over OSC with
// nothing to change here. The command is the address's last component, so a namespace is allowed
// (`/streamdiffusion/prompt`, `/layer1/guidance`). Arguments become text: s/S as they are (line breaks become
// spaces), i/h as integers, f/d in their shortest exact decimal form (an integral float such as a TouchDesigner
// CHOP's 42.0 reads 42, so `/seed 42.0` works), T/F as true/false, N (nil) as `none`, c as the character. Blobs,
// MIDI, time tags and infinitum are refused. Examples:
//   /prompt "a watercolour fox"     -> prompt a watercolour fox
//   /guidance 1.4                   -> guidance 1.4
//   /t_index_list 20 35             -> t_index_list 20 35  (the parser takes space-separated indices)
//   /t_index_list "20,35"           -> t_index_list 20,35
//   /lora "style" 0.7               -> lora style 0.7
//   /filter T                       -> filter true
// Bundles (nested too) are taken apart; their time tags are ignored (everything is applied at the next frame).
//
// Replies: none by default (OSC senders rarely listen). `osc://HOST:PORT?reply=osc://RHOST:RPORT` sends them to a
// fixed address, `?reply=sender` to each message's source address and port; the `/reply` message changes it while
// running: `/reply` (the sender), `/reply PORT` (the sender's host, that port), `/reply HOST PORT`, `/reply none`.
// Replies are `/streamdiffusion/ok s`, `/streamdiffusion/error s` and `/streamdiffusion/status s` (the status line,
// for `/stats`), one string each, sent from the listening port.
//
// Floods (a fader sending hundreds of values a second): the channel is marked last-value-wins, so the stream keeps
// only the newest pending command of each kind (StreamRuntime::post_control with coalesce) and applies it at the
// next frame boundary; superseded commands are counted, not answered.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sd {

struct OscSpec {
  std::string host = "127.0.0.1";  // listening address (0.0.0.0 = every interface)
  int port = 0;                    // 0 = any free port (tests)
  enum class Reply { None, Fixed, Sender } reply = Reply::None;
  std::string reply_host;
  int reply_port = 0;
};

// "osc://HOST:PORT[?reply=osc://HOST:PORT|sender]" (also osc.udp://, liblo's form; HOST may be [v6]). Throws
// InvalidArgument naming what is wrong.
OscSpec parse_osc_spec(const std::string& spec);

struct OscMessageLine {
  std::string address;  // the OSC address pattern as sent
  std::string command;  // its last component
  std::string line;     // the control line
};
// One OSC message (the bytes of a packet or of a bundle element) as a control line. Throws InvalidArgument for bytes
// that are not an OSC message or an argument type without a text form. Pure: no socket, so it can be fuzzed.
OscMessageLine osc_message_to_line(const void* data, size_t size);

// The messages of a packet: the packet itself, or the elements of a #bundle (nested bundles flattened), as
// (offset, size) into `data`. Throws InvalidArgument for a malformed bundle.
std::vector<std::pair<size_t, size_t>> osc_packet_messages(const void* data, size_t size);

// An OSC message with string arguments, serialised (for replies and tests).
std::string osc_encode_strings(const std::string& address, const std::vector<std::string>& args);

// The UDP socket of an OSC channel: bound at construction, read by the channel's thread, written by replies (any
// thread). Throws sd::Error when the address cannot be bound.
class OscSocket {
 public:
  explicit OscSocket(const OscSpec& spec);
  ~OscSocket();
  OscSocket(const OscSocket&) = delete;
  OscSocket& operator=(const OscSocket&) = delete;

  int fd() const { return fd_; }
  int port() const { return port_; }  // the bound port
  const std::string& host() const { return host_; }

  // An address to send to, in the socket's address family: a sockaddr as bytes ("" = cannot be resolved).
  std::string resolve(const std::string& host, int port) const;
  // Non-blocking send; a full buffer or an unreachable peer loses the datagram (replies never slow the stream).
  void send_to(const std::string& address, const std::string& packet) const;

 private:
  int fd_ = -1;
  int family_ = 0;
  int port_ = 0;
  std::string host_;
};

}  // namespace sd
