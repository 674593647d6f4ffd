#include "runtime/control_command.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/text.h"
#include "pipeline/control_guidance.h"

namespace sd {
namespace {

double parse_number(const std::string& cmd, const std::string& arg) {
  if (arg.empty()) throw InvalidArgument("control: '" + cmd + "' needs a number, e.g. '" + cmd + " 1.5'");
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(arg.c_str(), &end);
  if (end == arg.c_str() || *end != '\0' || errno == ERANGE || !std::isfinite(v))
    throw InvalidArgument("control: '" + cmd + "' expects a number, got '" + arg + "'");
  return v;
}

int64_t parse_integer(const std::string& what, const std::string& s) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || end == s.c_str() || *end != '\0' || errno == ERANGE)
    throw InvalidArgument("control: " + what + " expects an integer, got '" + s + "'");
  return v;
}

}  // namespace

const std::string& control_help() {
  static const std::string help =
      "commands: prompt <text> | negative <text> | guidance <g> | delta <d> | t_index_list <i,j,...> | seed <n> | "
      "filter on|off | filter_threshold <x> | lora <name> <scale> | ip_adapter_scale <s> | image_prompt <path>|none | "
      "controlnet_scale <i> <s> | controlnet_guidance <i> <start> <end> | control_preprocessor <i> <name> | "
      "deep_cache <k> [<similarity>] | "
      "prompt_list <text:w | text:w ...> or [[\"text\", w], ...] | seed_list <seed:w, seed:w ...> or [[seed, w], ...] | "
      "transition <seconds>|<n>f|0 | prompt_blend linear|slerp | latent_feedback <0..1> | stats | quit | help";
  return help;
}

std::string control_coalesce_key(const ControlCommand& c) {
  using K = ControlCommand::Kind;
  std::string key = std::to_string(static_cast<int>(c.kind));
  switch (c.kind) {
    case K::Lora: return key + ":" + c.text;
    case K::ControlnetScale:
    case K::ControlnetGuidance:
    case K::ControlPreprocessor: return key + ":" + std::to_string(c.index);
    default: return key;
  }
}

std::optional<ControlCommand> parse_control_command(const std::string& raw) {
  const std::string line = trim(raw);
  if (line.empty() || line[0] == '#') return std::nullopt;
  const auto sp = line.find_first_of(" \t");
  const std::string cmd = line.substr(0, sp);
  const std::string arg = sp == std::string::npos ? "" : trim(line.substr(sp));

  ControlCommand c;
  c.line = line;
  using K = ControlCommand::Kind;
  auto no_arg = [&](K k) {
    if (!arg.empty()) throw InvalidArgument("control: '" + cmd + "' takes no argument, got '" + arg + "'");
    c.kind = k;
  };
  if (cmd == "prompt" || cmd == "negative") {
    c.kind = cmd == "prompt" ? K::Prompt : K::Negative;
    // An empty negative prompt is meaningful (the default); an empty prompt is allowed too (unconditional).
    c.text = arg;
  } else if (cmd == "guidance" || cmd == "guidance_scale") {
    c.kind = K::Guidance;
    c.number = parse_number(cmd, arg);
    if (c.number < 0) throw InvalidArgument("control: guidance must be >= 0, got " + arg);
  } else if (cmd == "delta") {
    c.kind = K::Delta;
    c.number = parse_number(cmd, arg);
  } else if (cmd == "t_index_list") {
    c.kind = K::TIndexList;
    if (arg.empty()) throw InvalidArgument("control: t_index_list needs comma-separated indices, e.g. 't_index_list 32,45'");
    // Comma-separated ("32,45", "32, 45"), or space-separated when there is no comma ("32 45").
    const char sep = arg.find(',') != std::string::npos ? ',' : ' ';
    size_t pos = 0;
    while (pos <= arg.size()) {
      size_t next = arg.find(sep, pos);
      if (next == std::string::npos) next = arg.size();
      const std::string t = trim(arg.substr(pos, next - pos));
      pos = next + 1;
      if (t.empty()) {
        if (sep == ' ') continue;  // repeated spaces
        throw InvalidArgument("control: t_index_list has an empty entry in '" + arg + "'");
      }
      const int64_t v = parse_integer("t_index_list", t);
      if (v < 0) throw InvalidArgument("control: t_index_list entries must be >= 0, got " + t);
      c.t_index_list.push_back(v);
    }
  } else if (cmd == "seed") {
    c.kind = K::Seed;
    if (arg.empty()) throw InvalidArgument("control: 'seed' needs an integer, e.g. 'seed 42'");
    const int64_t v = parse_integer("seed", arg);
    if (v < 0) throw InvalidArgument("control: seed must be >= 0, got " + arg);
    c.seed = static_cast<uint64_t>(v);
  } else if (cmd == "filter") {
    c.kind = K::Filter;
    if (arg == "on" || arg == "1" || arg == "true")
      c.on = true;
    else if (arg == "off" || arg == "0" || arg == "false")
      c.on = false;
    else
      throw InvalidArgument("control: 'filter' expects on or off, got '" + arg + "'");
  } else if (cmd == "filter_threshold") {
    c.kind = K::FilterThreshold;
    c.number = parse_number(cmd, arg);
    if (!(c.number > 0 && c.number <= 1))
      throw InvalidArgument("control: filter_threshold must be in (0, 1], got " + arg);
  } else if (cmd == "lora") {
    c.kind = K::Lora;
    const auto last = arg.find_last_of(" \t");
    if (arg.empty() || last == std::string::npos)
      throw InvalidArgument("control: 'lora' needs a LoRA name and a scale, e.g. 'lora lcm-lora-sdv1-5 0.8'");
    c.text = trim(arg.substr(0, last));
    c.number = parse_number(cmd, trim(arg.substr(last)));
  } else if (cmd == "ip_adapter_scale") {
    c.kind = K::IpAdapterScale;
    c.number = parse_number(cmd, arg);
  } else if (cmd == "image_prompt") {
    c.kind = K::ImagePrompt;
    if (arg.empty())
      throw InvalidArgument("control: 'image_prompt' needs an image file (or 'none'), e.g. 'image_prompt style.png'");
    c.text = arg == "none" ? "" : arg;
  } else if (cmd == "controlnet_scale" || cmd == "control_preprocessor") {
    const bool scale = cmd == "controlnet_scale";
    c.kind = scale ? K::ControlnetScale : K::ControlPreprocessor;
    const std::string usage = scale ? "'controlnet_scale I S', e.g. 'controlnet_scale 0 0.8'"
                                    : "'control_preprocessor I NAME', e.g. 'control_preprocessor 0 canny:50:150'";
    const auto sp2 = arg.find_first_of(" \t");
    if (arg.empty() || sp2 == std::string::npos)
      throw InvalidArgument("control: '" + cmd + "' needs a ControlNet index (0-based) and a value: " + usage);
    c.index = parse_integer(cmd + " index", arg.substr(0, sp2));
    if (c.index < 0) throw InvalidArgument("control: " + cmd + " index must be >= 0, got " + arg.substr(0, sp2));
    const std::string value = trim(arg.substr(sp2));
    if (scale)
      c.number = parse_number(cmd, value);
    else
      c.text = value;
  } else if (cmd == "controlnet_guidance") {
    c.kind = K::ControlnetGuidance;
    std::istringstream words(arg);
    std::vector<std::string> w;
    for (std::string x; words >> x;) w.push_back(x);
    if (w.size() != 3)
      throw InvalidArgument("control: 'controlnet_guidance' needs a ControlNet index (0-based), a start and an end: "
                            "'controlnet_guidance I START END', e.g. 'controlnet_guidance 0 0 0.5'");
    c.index = parse_integer(cmd + " index", w[0]);
    if (c.index < 0) throw InvalidArgument("control: " + cmd + " index must be >= 0, got " + w[0]);
    c.number = parse_number(cmd + " start", w[1]);
    c.end = parse_number(cmd + " end", w[2]);
    if (!valid_control_guidance(c.number, c.end))
      throw InvalidArgument("control: controlnet_guidance start " + w[1] + " and end " + w[2] + " must satisfy " +
                            kControlGuidanceRule);
  } else if (cmd == "deep_cache") {
    c.kind = K::DeepCache;
    const auto sp2 = arg.find_first_of(" \t");
    if (arg.empty())
      throw InvalidArgument("control: 'deep_cache' needs k (a full UNet call every k frames, 1 = off), e.g. "
                            "'deep_cache 3' or 'deep_cache 3 0.9'");
    c.index = parse_integer(cmd, arg.substr(0, sp2));
    if (c.index < 1) throw InvalidArgument("control: deep_cache k must be >= 1 (1 = off), got " + arg.substr(0, sp2));
    c.number = sp2 == std::string::npos ? std::numeric_limits<double>::quiet_NaN()
                                        : parse_number(cmd + " similarity", trim(arg.substr(sp2)));
  } else if (cmd == "prompt_list") {
    c.kind = K::PromptList;
    if (arg.empty())
      throw InvalidArgument("control: 'prompt_list' needs a weighted list, e.g. 'prompt_list a cat:1 | a dog:0.5'");
    c.prompts = parse_prompt_list(arg);
  } else if (cmd == "seed_list") {
    c.kind = K::SeedList;
    if (arg.empty()) throw InvalidArgument("control: 'seed_list' needs a weighted list, e.g. 'seed_list 1:0.7, 2:0.3'");
    c.seeds = parse_seed_list(arg);
  } else if (cmd == "transition") {
    c.kind = K::Transition;
    c.transition = parse_transition(arg);
  } else if (cmd == "prompt_blend") {
    c.kind = K::PromptBlend;
    c.blend = parse_blend_method(arg);
  } else if (cmd == "latent_feedback") {
    c.kind = K::LatentFeedback;
    c.number = parse_number(cmd, arg);
    if (!(c.number >= 0 && c.number <= 1))
      throw InvalidArgument("control: latent_feedback must be in [0, 1], got " + arg);
  } else if (cmd == "stats") {
    no_arg(K::Stats);
  } else if (cmd == "quit" || cmd == "exit") {
    no_arg(K::Quit);
  } else if (cmd == "help" || cmd == "?") {
    no_arg(K::Help);
  } else {
    throw InvalidArgument("control: unknown command '" + cmd + "'; " + control_help());
  }
  return c;
}

}  // namespace sd
