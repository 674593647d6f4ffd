#pragma once
// The rule of a ControlNet's guidance range (diffusers' control_guidance_start / control_guidance_end), in one
// place: the engine, the CLI, the live command and the server's settings all check it here and word their own
// errors (what names the flag or field). Header-only: the command parser's fuzz target links no engine.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sd {

inline constexpr const char* kControlGuidanceRule = "0 <= start < end <= 1";

// Whether [start, end] is a guidance range: false for NaN too (every comparison fails).
inline bool valid_control_guidance(double start, double end) { return start >= 0.0 && end <= 1.0 && start < end; }

// Whether step i of n keeps the ControlNet (diffusers' controlnet_keep).
inline bool control_guidance_keeps(double start, double end, int64_t i, int64_t n) {
  return !(static_cast<double>(i) / n < start || static_cast<double>(i + 1) / n > end);
}

// Whether some step of n keeps it (none: the ControlNet is skipped, as at scale 0, and needs no control image).
inline bool control_guidance_keeps_any(double start, double end, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (control_guidance_keeps(start, end, i, n)) return true;
  return false;
}

// The first two equal entries of t_index_list that the range tells apart (one step kept, the other not), or
// {-1, -1}. The stream tells its rows by their timestep, so it cannot condition one of them and not the other.
inline std::pair<int64_t, int64_t> control_guidance_split(double start, double end,
                                                          const std::vector<int64_t>& t_index_list) {
  const auto n = static_cast<int64_t>(t_index_list.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j)
      if (t_index_list[i] == t_index_list[j] &&
          control_guidance_keeps(start, end, i, n) != control_guidance_keeps(start, end, j, n))
        return {i, j};
  return {-1, -1};
}

// The error text of such a split: "entries A and B are both T and the guidance range of WHO keeps only one of those
// steps: ..." (the caller names t_index_list), or "" when the range splits no two entries.
inline std::string control_guidance_split_error(double start, double end, const std::vector<int64_t>& t_index_list,
                                                const std::string& who) {
  const auto [a, b] = control_guidance_split(start, end, t_index_list);
  if (a < 0) return "";
  return "entries " + std::to_string(a) + " and " + std::to_string(b) + " are both " +
         std::to_string(t_index_list[a]) + " and the guidance range of " + who +
         " keeps only one of those steps: give distinct entries, or a range that keeps both";
}

}  // namespace sd
