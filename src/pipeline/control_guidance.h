#pragma once
// The rule of a ControlNet's guidance range (diffusers' control_guidance_start / control_guidance_end), in one
// place: the engine, the CLI, the live control command and the server's settings all check it here and word their
// own errors (what names the flag or field). Header-only: the command parser's fuzz target links no engine.

namespace sd {

inline constexpr const char* kControlGuidanceRule = "0 <= start < end <= 1";

// Whether [start, end] is a guidance range: false for NaN too (every comparison fails).
inline bool valid_control_guidance(double start, double end) { return start >= 0.0 && end <= 1.0 && start < end; }

}  // namespace sd
