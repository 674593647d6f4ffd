#include "core/log.h"

#include "core/error.h"

namespace sd::log {
void set_level(const std::string& level) {
  auto l = spdlog::level::from_str(level);
  if (l == spdlog::level::off && level != "off") throw InvalidArgument("unknown log level '" + level + "'");
  spdlog::set_level(l);
}
}  // namespace sd::log
