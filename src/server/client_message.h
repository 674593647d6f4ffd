#pragma once
// A WebSocket text message from a client, checked before anything acts on it (the fuzz target calls this too):
//   {"type": "config", <stream settings fields, see stream_settings.h>}
//   {"type": "generate" | "stats" | "ping"}   (no other field)
#include <string>

#include <nlohmann/json.hpp>

namespace sd::server {

struct ClientMessage {
  std::string type;   // "config" | "generate" | "stats" | "ping"
  nlohmann::json body;  // the whole message (an object)
};

// Throws sd::InvalidArgument saying what is wrong: "bad JSON: ...", not an object with a string 'type', an unknown
// type, or a field other than 'type' in a generate / stats / ping message. A config message's fields are checked by
// apply_settings_json.
ClientMessage parse_client_message(const std::string& text);

}  // namespace sd::server
