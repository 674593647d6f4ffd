#pragma once
// Thin logging facade over spdlog so the engine's call sites stay short: sd::log::info("...{}...", x).
#include <spdlog/spdlog.h>

namespace sd::log {
using spdlog::debug;
using spdlog::error;
using spdlog::info;
using spdlog::warn;
// "debug" | "info" | "warn" | "error" | "off"
void set_level(const std::string& level);
}  // namespace sd::log
