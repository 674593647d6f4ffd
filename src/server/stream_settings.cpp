#include "server/stream_settings.h"

#include <algorithm>
#include <cmath>

#include "core/json_limits.h"
#include "core/error.h"
#include "pipeline/control_guidance.h"
#include "runtime/control_preprocessor.h"
#include "server/image_codec.h"

namespace sd::server {
namespace {

constexpr size_t kMaxPromptBytes = 2000;
constexpr size_t kMaxSteps = 10;

double number_in(const nlohmann::json& v, const std::string& key, double lo, double hi, bool hi_open = false) {
  if (!v.is_number()) throw InvalidArgument("field '" + key + "': expected a number, got " + json_excerpt(v));
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || (hi_open ? x >= hi : x > hi))
    throw InvalidArgument("field '" + key + "': " + json_excerpt(v) + " is out of range [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + (hi_open ? ")" : "]"));
  return x;
}

std::string text(const nlohmann::json& v, const std::string& key) {
  if (!v.is_string()) throw InvalidArgument("field '" + key + "': expected a string, got " + json_excerpt(v));
  std::string s = v.get<std::string>();
  if (s.size() > kMaxPromptBytes)
    throw InvalidArgument("field '" + key + "': " + std::to_string(s.size()) + " bytes, at most " +
                          std::to_string(kMaxPromptBytes));
  return s;
}

int64_t integer_in(const nlohmann::json& v, const std::string& key, int64_t lo, int64_t hi) {
  if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
    throw InvalidArgument("field '" + key + "': expected an integer, got " + json_excerpt(v));
  const double x = v.get<double>();
  if (x < static_cast<double>(lo) || x > static_cast<double>(hi))
    throw InvalidArgument("field '" + key + "': " + json_excerpt(v) + " is out of range [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + "]");
  return v.is_number_unsigned() ? static_cast<int64_t>(v.get<uint64_t>()) : v.get<int64_t>();
}

std::vector<int64_t> spread_steps(int64_t steps, int64_t S, bool txt2img, int64_t start_index) {
  const int64_t first = txt2img ? 0 : std::min<int64_t>(start_index, S - 1);
  const int64_t last = txt2img ? S * 45 / 50 : std::max<int64_t>(first, S * 45 / 50);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t v = steps == 1 ? first : first + (last - first) * i / (steps - 1);
    if (!out.empty() && v <= out.back())
      throw InvalidArgument("field 'steps': " + std::to_string(steps) + " steps do not fit between index " +
                            std::to_string(first) + " and " + std::to_string(last) + "; give t_index_list instead");
    out.push_back(v);
  }
  return out;
}

// A base64 / data-URL JPEG or PNG through the server's image checks (size read from the header first).
cv::Mat image_field(const nlohmann::json& v, const std::string& key) {
  if (!v.is_string())
    throw InvalidArgument("field '" + key + "': expected a base64 JPEG or PNG string (a data: URL is fine) or null, " +
                          "got " + std::string(v.type_name()));
  const std::string what = "field '" + key + "'";
  return decode_image(base64_decode(v.get_ref<const std::string&>(), what), true, what);
}

std::vector<ControlSetting> parse_controlnets(const nlohmann::json& v, std::vector<ControlSetting> out,
                                              const StreamDefaults& d) {
  if (d.controlnets.empty())
    throw InvalidArgument("field 'controlnets': no ControlNet is loaded (start serve with --controlnet DIR)");
  const std::string n = std::to_string(d.controlnets.size());
  if (!v.is_array() || v.size() != d.controlnets.size())
    throw InvalidArgument("field 'controlnets': expected an array of " + n +
                          " object(s) {\"scale\": number, \"preprocessor\": name, \"guidance_start\": number, "
                          "\"guidance_end\": number}, one per loaded ControlNet, got " +
                          (v.is_array() ? std::to_string(v.size()) + " entries" : std::string(v.type_name())));
  out.resize(d.controlnets.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string at = "controlnets[" + std::to_string(i) + "]";
    const auto& e = v[i];
    if (!e.is_object())
      throw InvalidArgument("field '" + at + "': expected an object {\"scale\": number, \"preprocessor\": name, "
                            "\"guidance_start\": number, \"guidance_end\": number}, got " + json_excerpt(e));
    for (const auto& [k, x] : e.items()) {
      if (k == "scale") {
        out[i].scale = number_in(x, at + ".scale", 0, 2);
      } else if (k == "guidance_start") {
        out[i].guidance_start = number_in(x, at + ".guidance_start", 0, 1);
      } else if (k == "guidance_end") {
        out[i].guidance_end = number_in(x, at + ".guidance_end", 0, 1);
      } else if (k == "preprocessor") {
        if (!x.is_string())
          throw InvalidArgument("field '" + at + ".preprocessor': expected a string, got " + json_excerpt(x));
        try {
          out[i].preprocessor = make_control_preprocessor(x.get<std::string>())->name();
        } catch (const InvalidArgument& err) {
          throw InvalidArgument("field '" + at + ".preprocessor': " + err.what());
        }
      } else {
        throw InvalidArgument("unknown field '" + at + "." + k +
                              "' (expected scale, preprocessor, guidance_start, guidance_end)");
      }
    }
    // Checked as a pair once both are applied: a message may move one end past where the other was.
    if (!valid_control_guidance(out[i].guidance_start, out[i].guidance_end))
      throw InvalidArgument(
          "field '" + at + "': guidance_start " + nlohmann::json(out[i].guidance_start).dump() + " and guidance_end " +
          nlohmann::json(out[i].guidance_end).dump() + " must satisfy " + kControlGuidanceRule +
          (e.contains("guidance_start") != e.contains("guidance_end")
               ? std::string(" (the other end is the current one: send both to move the range past it)")
               : std::string()));
  }
  return out;
}

std::vector<WeightedPrompt> parse_prompt_list_field(const nlohmann::json& v) {
  const std::string key = "prompt_list";
  std::vector<WeightedPrompt> out;
  if (v.is_null()) return out;
  if (!v.is_array() || v.size() > kMaxBlendEntries)
    throw InvalidArgument("field 'prompt_list': expected an array of at most " + std::to_string(kMaxBlendEntries) +
                          " [text, weight] pairs, got " + json_excerpt(v));
  for (size_t i = 0; i < v.size(); ++i) {
    const auto& e = v[i];
    const std::string at = key + "[" + std::to_string(i) + "]";
    if (e.is_array() && e.size() == 2)
      out.push_back({text(e[0], at + "[0]"), number_in(e[1], at + "[1]", 0, 100)});
    else if (e.is_object() && e.contains("text") && e.size() <= 2 && (e.size() == 1 || e.contains("weight")))
      out.push_back({text(e["text"], at + ".text"), e.contains("weight") ? number_in(e["weight"], at + ".weight", 0, 100)
                                                                           : 1.0});
    else
      throw InvalidArgument("field '" + at + "': expected [text, weight] or {\"text\": ..., \"weight\": ...}, got " +
                            json_excerpt(e));
  }
  if (!out.empty()) check_prompt_list(out, "field 'prompt_list'");
  return out;
}

std::vector<WeightedSeed> parse_seed_list_field(const nlohmann::json& v) {
  std::vector<WeightedSeed> out;
  if (v.is_null()) return out;
  if (!v.is_array() || v.size() > kMaxBlendEntries)
    throw InvalidArgument("field 'seed_list': expected an array of at most " + std::to_string(kMaxBlendEntries) +
                          " [seed, weight] pairs, got " + json_excerpt(v));
  for (size_t i = 0; i < v.size(); ++i) {
    const auto& e = v[i];
    const std::string at = "seed_list[" + std::to_string(i) + "]";
    if (!e.is_array() || e.size() != 2)
      throw InvalidArgument("field '" + at + "': expected [seed, weight], got " + json_excerpt(e));
    out.push_back({static_cast<uint64_t>(integer_in(e[0], at + "[0]", 0, int64_t{1} << 53)),
                   number_in(e[1], at + "[1]", 0, 100)});
  }
  if (!out.empty()) check_seed_list(out, "field 'seed_list'");
  return out;
}

Transition parse_transition_field(const nlohmann::json& v) {
  Transition t;
  if (v.is_number()) {
    t.seconds = number_in(v, "transition", 0, 60);
    return t;
  }
  if (!v.is_string())
    throw InvalidArgument("field 'transition': expected seconds (a number in [0, 60]) or a string \"2.5s\" / "
                          "\"30f\", got " + json_excerpt(v));
  try {
    t = parse_transition(v.get<std::string>());
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(std::string("field 'transition': ") + e.what());
  }
  if (t.seconds > 60 || t.frames > 3600)
    throw InvalidArgument("field 'transition': " + json_excerpt(v) + " is out of range (at most 60 s or 3600 frames)");
  return t;
}

}  // namespace

std::vector<WeightedPrompt> StreamSettings::prompts() const {
  if (!prompt_list.empty()) return prompt_list;
  return {{prompt, 1.0}};
}

StreamSettings StreamSettings::defaults(const StreamDefaults& d, bool txt2img) {
  const StreamConfig& c = txt2img ? d.txt2img : d.img2img;
  StreamSettings s;
  s.txt2img = txt2img;
  s.prompt = d.prompt;
  s.negative_prompt = d.negative_prompt;
  s.guidance = c.guidance_scale;
  s.delta = c.delta;
  s.t_index_list = c.t_index_list;
  s.seed = c.seed;
  s.similarity_filter = (!txt2img && c.similarity_filter.enabled) ? c.similarity_filter.threshold : 0.0;
  for (size_t i = 0; i < d.controlnets.size(); ++i)
    s.controlnets.push_back({d.controlnets[i].scale,
                             i < d.control_preprocessors.size() ? d.control_preprocessors[i] : "canny",
                             d.controlnets[i].guidance_start, d.controlnets[i].guidance_end});
  s.image_prompt = d.image_prompt;
  s.prompt_list = d.prompt_list;
  s.seed_list = c.seed_list;
  s.transition = c.transition;
  s.prompt_blend = c.prompt_blend;
  s.latent_feedback = txt2img ? 0.0 : c.latent_feedback;
  return s;
}

StreamConfig StreamSettings::config(const StreamDefaults& d) const {
  StreamConfig c = txt2img ? d.txt2img : d.img2img;
  c.guidance_scale = guidance;
  c.delta = delta;
  c.t_index_list = t_index_list;
  c.seed = seed;
  c.similarity_filter.enabled = !txt2img && similarity_filter > 0;
  if (c.similarity_filter.enabled) c.similarity_filter.threshold = similarity_filter;
  c.similarity_filter.sleep_on_skip = false;  // the server paces nothing: a skip is answered at once
  c.seed_list = seed_list;
  c.transition = transition;
  c.prompt_blend = prompt_blend;
  c.latent_feedback = txt2img ? 0.0 : latent_feedback;
  return c;
}

std::vector<ControlNetUnit> StreamSettings::control_units(const StreamDefaults& d) const {
  std::vector<ControlNetUnit> units = d.controlnets;
  for (size_t i = 0; i < units.size() && i < controlnets.size(); ++i) {
    units[i].scale = controlnets[i].scale;
    units[i].guidance_start = controlnets[i].guidance_start;
    units[i].guidance_end = controlnets[i].guidance_end;
  }
  return units;
}

nlohmann::json StreamSettings::to_json() const {
  nlohmann::json j = {{"mode", txt2img ? "txt2img" : "img2img"},
                      {"prompt", prompt},
                      {"negative_prompt", negative_prompt},
                      {"guidance", guidance},
                      {"delta", delta},
                      {"t_index_list", t_index_list},
                      {"seed", seed},
                      {"similarity_filter", similarity_filter},
                      {"has_image_prompt", !image_prompt.empty()},
                      {"transition", transition_str(transition)},
                      {"prompt_blend", blend_method_name(prompt_blend)},
                      {"latent_feedback", latent_feedback}};
  nlohmann::json pl = nlohmann::json::array(), sl = nlohmann::json::array();
  for (const auto& p : prompt_list) pl.push_back({p.text, p.weight});
  for (const auto& e : seed_list) sl.push_back({e.seed, e.weight});
  j["prompt_list"] = pl;
  j["seed_list"] = sl;
  if (!controlnets.empty()) {
    nlohmann::json cn = nlohmann::json::array();
    for (const auto& c : controlnets)
      cn.push_back({{"scale", c.scale},
                    {"preprocessor", c.preprocessor},
                    {"guidance_start", c.guidance_start},
                    {"guidance_end", c.guidance_end}});
    j["controlnets"] = cn;
    j["has_control_image"] = !control_image.empty();
  }
  return j;
}

bool StreamSettings::operator==(const StreamSettings& o) const {
  return txt2img == o.txt2img && prompt == o.prompt && negative_prompt == o.negative_prompt &&
         guidance == o.guidance && delta == o.delta && t_index_list == o.t_index_list && seed == o.seed &&
         similarity_filter == o.similarity_filter && controlnets == o.controlnets &&
         control_image.data == o.control_image.data && image_prompt.data == o.image_prompt.data &&
         prompt_list == o.prompt_list && seed_list == o.seed_list && transition == o.transition &&
         prompt_blend == o.prompt_blend && latent_feedback == o.latent_feedback;
}

StreamSettings apply_settings_json(const nlohmann::json& j, const StreamSettings& s0, const StreamDefaults& d,
                                   const std::set<std::string>& skip, bool allow_mode) {
  if (!j.is_object()) throw InvalidArgument("expected a JSON object, got " + std::string(j.type_name()));
  StreamSettings s = s0;
  // Mode first: the index list and cfg defaults depend on it.
  if (j.contains("mode") && !skip.count("mode")) {
    if (!allow_mode) throw InvalidArgument("unknown field 'mode' (the endpoint decides the mode)");
    const auto& v = j.at("mode");
    if (!v.is_string() || (v != "img2img" && v != "txt2img"))
      throw InvalidArgument("field 'mode': expected \"img2img\" or \"txt2img\", got " + json_excerpt(v));
    const bool t2i = v == "txt2img";
    if (t2i != s.txt2img) {
      s.txt2img = t2i;
      s.t_index_list = (t2i ? d.txt2img : d.img2img).t_index_list;  // the mode's default unless given below
      if (t2i) s.similarity_filter = 0;
    }
  }
  if (j.contains("steps") && j.contains("t_index_list") && !skip.count("steps"))
    throw InvalidArgument("give either 'steps' or 't_index_list', not both");
  const int64_t S = (s.txt2img ? d.txt2img : d.img2img).num_inference_steps;
  for (const auto& [key, v] : j.items()) {
    if (skip.count(key) || key == "mode") continue;
    if (key == "prompt") {
      s.prompt = text(v, key);
      if (!j.contains("prompt_list")) s.prompt_list.clear();  // a plain prompt replaces the blend
    } else if (key == "negative_prompt") {
      s.negative_prompt = text(v, key);
    } else if (key == "guidance") {
      s.guidance = number_in(v, key, 0, 20);
    } else if (key == "delta") {
      s.delta = number_in(v, key, 0, 10);
    } else if (key == "seed") {
      s.seed = static_cast<uint64_t>(integer_in(v, key, 0, int64_t{1} << 53));
      if (!j.contains("seed_list")) s.seed_list.clear();  // a plain seed replaces the blend
    } else if (key == "prompt_list") {
      s.prompt_list = parse_prompt_list_field(v);
    } else if (key == "seed_list") {
      s.seed_list = parse_seed_list_field(v);
    } else if (key == "transition") {
      s.transition = parse_transition_field(v);
    } else if (key == "prompt_blend") {
      if (!v.is_string() || (v != "linear" && v != "slerp"))
        throw InvalidArgument("field 'prompt_blend': expected \"linear\" or \"slerp\", got " + json_excerpt(v));
      s.prompt_blend = parse_blend_method(v.get<std::string>());
    } else if (key == "latent_feedback") {
      s.latent_feedback = number_in(v, key, 0, 1);
    } else if (key == "similarity_filter") {
      const double x = number_in(v, key, 0, 1, true);
      if (x > 0 && s.txt2img) throw InvalidArgument("field 'similarity_filter': needs input images (img2img mode)");
      s.similarity_filter = x;
    } else if (key == "steps") {
      s.t_index_list = spread_steps(integer_in(v, key, 1, kMaxSteps), S, s.txt2img, d.start_index);
    } else if (key == "t_index_list") {
      if (!v.is_array() || v.empty() || v.size() > kMaxSteps)
        throw InvalidArgument("field 't_index_list': expected an array of 1.." + std::to_string(kMaxSteps) +
                              " integers, got " + json_excerpt(v));
      std::vector<int64_t> list;
      for (const auto& e : v) list.push_back(integer_in(e, key, 0, S - 1));
      s.t_index_list = std::move(list);
    } else if (key == "lora") {
      if (!v.is_object() || v.empty())
        throw InvalidArgument("field 'lora': expected an object {\"<lora name>\": scale}, got " + json_excerpt(v));
      if (d.lora_names.empty()) throw InvalidArgument("field 'lora': no LoRA is loaded (start serve with --lora FILE)");
      for (const auto& [name, scale] : v.items()) {
        if (std::find(d.lora_names.begin(), d.lora_names.end(), name) == d.lora_names.end()) {
          std::string names;
          for (const auto& n : d.lora_names) names += (names.empty() ? "" : ", ") + n;
          throw InvalidArgument("field 'lora': no LoRA named '" + name + "' (loaded: " + names + ")");
        }
        s.lora[name] = number_in(scale, "lora." + name, -10, 10);
      }
    } else if (key == "controlnets") {
      s.controlnets = parse_controlnets(v, s.controlnets, d);
    } else if (key == "control_image") {
      if (d.controlnets.empty())
        throw InvalidArgument("field 'control_image': no ControlNet is loaded (start serve with --controlnet DIR)");
      s.control_image = v.is_null() ? cv::Mat()
                                    : fit_image(image_field(v, key), static_cast<int>(d.img2img.width),
                                                static_cast<int>(d.img2img.height));
      if (!s.control_image.empty() && !s.control_image.isContinuous()) s.control_image = s.control_image.clone();
    } else if (key == "image_prompt") {
      if (!d.ip_adapter)
        throw InvalidArgument("field 'image_prompt': the model has no IP-Adapter (start serve with --ip-adapter)");
      s.image_prompt = v.is_null() ? cv::Mat() : image_field(v, key);
    } else if (key == "ip_adapter_scale") {
      if (!d.ip_adapter)
        throw InvalidArgument("field 'ip_adapter_scale': the model has no IP-Adapter (start serve with --ip-adapter)");
      s.ip_adapter_scale = number_in(v, key, 0, 2);
    } else {
      throw InvalidArgument("unknown field '" + key + "' (expected " + (allow_mode ? "mode, " : "") +
                            "prompt, negative_prompt, guidance, delta, t_index_list, steps, seed, similarity_filter, prompt_list, "
                            "seed_list, transition, prompt_blend, latent_feedback" +
                            (d.lora_names.empty() ? "" : ", lora") +
                            (d.controlnets.empty() ? "" : ", controlnets, control_image") +
                            (d.ip_adapter ? ", image_prompt, ip_adapter_scale" : "") +
                            (skip.count("width") ? ", width, height" : "") + (skip.count("image") ? ", image" : "") +
                            ")");
    }
  }
  // The pair the stream would refuse at every frame (it tells rows by their timestep): refused here, naming both. A
  // ControlNet at scale 0 is skipped before that check.
  for (size_t i = 0; i < s.controlnets.size(); ++i) {
    const ControlSetting& c = s.controlnets[i];
    if (c.scale == 0) continue;
    if (const std::string e = control_guidance_split_error(c.guidance_start, c.guidance_end, s.t_index_list,
                                                           "controlnets[" + std::to_string(i) + "]");
        !e.empty())
      throw InvalidArgument("field 't_index_list': " + e);
  }
  return s;
}

}  // namespace sd::server
