// OSC control (runtime/osc_control.h: `stream --control osc://HOST:PORT`): a UDP datagram as the channel takes it
// apart - the packet's messages (bundles flattened), each message decoded by liblo into a control line, each line
// parsed as a control command (runtime/control_command.h). Every step either gives a result whose invariants hold
// or throws sd::InvalidArgument saying what is wrong; anything else is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "fuzz_util.h"
#include "runtime/control_command.h"
#include "runtime/osc_control.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::pair<size_t, size_t>> messages;
  try {
    messages = sd::osc_packet_messages(data, size);
  } catch (const sd::InvalidArgument&) {
    return 0;
  }
  for (const auto& [offset, n] : messages) {
    if (offset > size || n > size - offset) {
      std::fprintf(stderr, "message [%zu, +%zu) outside the %zu-byte packet\n", offset, n, size);
      std::abort();
    }
    try {
      const auto m = sd::osc_message_to_line(data + offset, n);
      if (m.command.empty() || m.command.find('/') != std::string::npos || m.line.rfind(m.command, 0) != 0 ||
          m.line.find_first_of("\r\n") != std::string::npos) {
        std::fprintf(stderr, "decoded message breaks an invariant: address '%s' command '%s' line '%s'\n",
                     m.address.c_str(), m.command.c_str(), m.line.c_str());
        std::abort();
      }
      sd::parse_control_command(m.line);
    } catch (const sd::InvalidArgument&) {
    }
  }
  return 0;
}
