// WebSocket text messages of `serve` (server/client_message.h) and the stream settings of a "config" message
// (apply_settings_json, as StreamSession::update_settings applies them): every input must either be accepted with
// settings whose invariants hold or throw sd::InvalidArgument (the server answers {"type": "error"}).
#include <cstdint>

#include "fuzz_server_defaults.h"
#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "server/client_message.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const sd::server::StreamDefaults d = sd::fuzz::server_defaults();
  try {
    const auto m = sd::server::parse_client_message(sd::fuzz::bytes(data, size));
    if (m.type == "config") {
      // A client's settings start from the mode its first byte picks (a stream may be in either).
      const auto s0 = sd::server::StreamSettings::defaults(d, size % 2 == 1);
      const auto s = sd::server::apply_settings_json(m.body, s0, d, {"type"});
      sd::fuzz::check_settings(s, d);
    }
  } catch (const sd::InvalidArgument&) {
  }
  return 0;
}
