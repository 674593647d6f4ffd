#include "server/client_message.h"

#include "core/json_limits.h"
#include "core/error.h"

namespace sd::server {

ClientMessage parse_client_message(const std::string& text) {
  ClientMessage m;
  if (std::string why = json_depth_problem(text); !why.empty()) throw InvalidArgument("bad JSON: " + why);
  try {
    m.body = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw InvalidArgument(std::string("bad JSON: ") + e.what());
  }
  const auto& j = m.body;
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    throw InvalidArgument("expected a JSON object with a string field 'type' (config | generate | stats | ping)");
  m.type = j["type"].get<std::string>();
  if (m.type == "generate" || m.type == "stats" || m.type == "ping") {
    for (const auto& [k, v] : j.items())
      if (k != "type") throw InvalidArgument("unknown field '" + k + "' in a '" + m.type + "' message");
  } else if (m.type != "config") {
    throw InvalidArgument("unknown message type '" + m.type + "' (expected config | generate | stats | ping)");
  }
  return m;
}

}  // namespace sd::server
