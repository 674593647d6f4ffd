#include "pipeline/prompt_blend.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/json_limits.h"
#include "core/error.h"
#include "core/text.h"

namespace sd {
namespace {

// A finite double spelling the whole of `s`.
bool to_number(const std::string& s, double& v) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  v = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size() && errno != ERANGE && std::isfinite(v);
}

std::string num_str(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

void check_weights(const std::vector<double>& w, const std::string& what) {
  if (w.empty()) throw InvalidArgument(what + ": the list is empty");
  if (w.size() > kMaxBlendEntries)
    throw InvalidArgument(what + ": " + std::to_string(w.size()) + " entries, at most " +
                          std::to_string(kMaxBlendEntries));
  double sum = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    if (!std::isfinite(w[i]) || w[i] < 0)
      throw InvalidArgument(what + ": weight " + num_str(w[i]) + " of entry " + std::to_string(i) +
                            " must be a finite number >= 0");
    sum += w[i];
  }
  if (!(sum > 0)) throw InvalidArgument(what + ": every weight is 0 (at least one must be > 0)");
}

// Normalised weights ŵ and the indices of the non-zero ones.
std::vector<std::pair<size_t, double>> nonzero_normalised(const std::vector<double>& w) {
  check_weights(w, "blend");
  double sum = 0;
  for (double x : w) sum += x;
  std::vector<std::pair<size_t, double>> out;
  for (size_t i = 0; i < w.size(); ++i)
    if (w[i] > 0) out.push_back({i, w[i] / sum});
  return out;
}

template <class Entry>
std::vector<double> weights_of(const std::vector<Entry>& list) {
  std::vector<double> w;
  for (const auto& e : list) w.push_back(e.weight);
  return w;
}

}  // namespace

BlendMethod parse_blend_method(const std::string& name) {
  if (name == "linear") return BlendMethod::Linear;
  if (name == "slerp") return BlendMethod::Slerp;
  throw InvalidArgument("unknown prompt blend method '" + name + "' (expected linear or slerp)");
}

std::string blend_method_name(BlendMethod m) { return m == BlendMethod::Slerp ? "slerp" : "linear"; }

Transition parse_transition(const std::string& text) {
  const std::string s = trim(text);
  const std::string usage = "expected seconds (e.g. 2 or 2.5s), frames (e.g. 30f) or 0 (at once)";
  if (s.empty()) throw InvalidArgument("transition: " + usage);
  Transition t;
  const char unit = s.back();
  const std::string num = (unit == 's' || unit == 'f') ? trim(s.substr(0, s.size() - 1)) : s;
  double v = 0;
  if (!to_number(num, v) || v < 0) throw InvalidArgument("transition '" + s + "': " + usage);
  if (unit == 'f') {
    if (v != std::floor(v) || v > 1e6)
      throw InvalidArgument("transition '" + s + "': frames must be a whole number in [0, 1000000]");
    t.frames = static_cast<int64_t>(v);
  } else {
    if (v > 3600) throw InvalidArgument("transition '" + s + "': at most 3600 seconds");
    t.seconds = v;
  }
  return t;
}

std::string transition_str(const Transition& t) {
  if (t.frames > 0) return std::to_string(t.frames) + "f";
  if (t.seconds > 0) return num_str(t.seconds) + "s";
  return "0";
}

void check_prompt_list(const std::vector<WeightedPrompt>& list, const std::string& what) {
  check_weights(weights_of(list), what);
}

void check_seed_list(const std::vector<WeightedSeed>& list, const std::string& what) {
  check_weights(weights_of(list), what);
}

std::vector<WeightedPrompt> parse_prompt_list(const std::string& text) {
  const std::string s = trim(text);
  if (s.empty()) throw InvalidArgument("prompt_list: the list is empty (expected e.g. 'a cat:1 | a dog:0.5')");
  std::vector<WeightedPrompt> out;
  if (s[0] == '[') {
    nlohmann::json j;
    if (std::string why = json_depth_problem(s); !why.empty()) throw InvalidArgument("prompt_list: bad JSON: " + why);
    try {
      j = nlohmann::json::parse(s);
    } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for numbers like 1e9999 (fuzz)
      throw InvalidArgument(std::string("prompt_list: bad JSON: ") + e.what());
    }
    const std::string shape = "expected [[\"text\", weight], ...] or [{\"text\": ..., \"weight\": ...}, ...]";
    if (!j.is_array()) throw InvalidArgument("prompt_list: " + shape);
    for (const auto& e : j) {
      WeightedPrompt p;
      if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_number()) {
        p = {e[0].get<std::string>(), e[1].get<double>()};
      } else if (e.is_object() && e.contains("text") && e["text"].is_string() &&
                 (!e.contains("weight") || e["weight"].is_number()) && e.size() <= 2) {
        p = {e["text"].get<std::string>(), e.value("weight", 1.0)};
      } else if (e.is_string()) {
        p = {e.get<std::string>(), 1.0};
      } else {
        throw InvalidArgument("prompt_list: entry " + e.dump() + ": " + shape);
      }
      out.push_back(std::move(p));
    }
  } else {
    size_t pos = 0;
    while (pos <= s.size()) {
      size_t bar = s.find('|', pos);
      if (bar == std::string::npos) bar = s.size();
      const std::string item = trim(s.substr(pos, bar - pos));
      pos = bar + 1;
      WeightedPrompt p{item, 1.0};
      const auto colon = item.rfind(':');
      double w = 0;
      if (colon != std::string::npos && to_number(trim(item.substr(colon + 1)), w)) {
        p.text = trim(item.substr(0, colon));
        p.weight = w;
      }
      out.push_back(std::move(p));
    }
  }
  check_prompt_list(out, "prompt_list");
  return out;
}

std::vector<WeightedSeed> parse_seed_list(const std::string& text) {
  const std::string s = trim(text);
  std::vector<WeightedSeed> out;
  auto seed_of = [](double v, const std::string& shown) {
    if (!(v >= 0) || v != std::floor(v) || v > 9007199254740992.0)
      throw InvalidArgument("seed_list: seed " + shown + " must be an integer in [0, 2^53]");
    return static_cast<uint64_t>(v);
  };
  if (!s.empty() && s[0] == '[') {
    nlohmann::json j;
    if (std::string why = json_depth_problem(s); !why.empty()) throw InvalidArgument("seed_list: bad JSON: " + why);
    try {
      j = nlohmann::json::parse(s);
    } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for numbers like 1e9999 (fuzz)
      throw InvalidArgument(std::string("seed_list: bad JSON: ") + e.what());
    }
    if (!j.is_array()) throw InvalidArgument("seed_list: expected [[seed, weight], ...]");
    for (const auto& e : j) {
      if (e.is_array() && e.size() == 2 && e[0].is_number() && e[1].is_number())
        out.push_back({seed_of(e[0].get<double>(), e[0].dump()), e[1].get<double>()});
      else if (e.is_number())
        out.push_back({seed_of(e.get<double>(), e.dump()), 1.0});
      else
        throw InvalidArgument("seed_list: entry " + e.dump() + ": expected [seed, weight]");
    }
  } else {
    std::string norm = s;
    for (char& c : norm)
      if (c == ',') c = ' ';
    std::istringstream in(norm);
    std::string item;
    while (in >> item) {
      const auto colon = item.find(':');
      const std::string seed = item.substr(0, colon);
      double v = 0, w = 1.0;
      if (!to_number(seed, v)) throw InvalidArgument("seed_list: '" + item + "': expected SEED or SEED:WEIGHT");
      if (colon != std::string::npos && !to_number(item.substr(colon + 1), w))
        throw InvalidArgument("seed_list: '" + item + "': the weight after ':' is not a number");
      out.push_back({seed_of(v, seed), w});
    }
  }
  check_seed_list(out, "seed_list");
  return out;
}

std::string prompt_list_str(const std::vector<WeightedPrompt>& list) {
  std::string s;
  for (size_t i = 0; i < list.size(); ++i) s += (i ? " | " : "") + list[i].text + ":" + num_str(list[i].weight);
  return s;
}

std::string seed_list_str(const std::vector<WeightedSeed>& list) {
  std::string s;
  for (size_t i = 0; i < list.size(); ++i)
    s += (i ? ", " : "") + std::to_string(list[i].seed) + ":" + num_str(list[i].weight);
  return s;
}

torch::Tensor slerp(const torch::Tensor& a, const torch::Tensor& b, double t) {
  // Per row along the last axis, in float32, returned in a's dtype.
  const torch::Tensor a32 = a.to(torch::kFloat32), b32 = b.to(torch::kFloat32);
  const torch::Tensor na = a32.norm(2, -1, true), nb = b32.norm(2, -1, true);
  const torch::Tensor cos = ((a32 * b32).sum(-1, true) / (na * nb).clamp_min(1e-12)).clamp(-1.0, 1.0);
  const torch::Tensor theta = torch::acos(cos);
  const torch::Tensor sin = torch::sin(theta);
  const torch::Tensor parallel = theta < 1e-4;  // nearly parallel rows: linear
  const torch::Tensor safe_sin = torch::where(parallel, torch::ones_like(sin), sin);
  const torch::Tensor wa = torch::where(parallel, torch::full_like(sin, 1.0 - t), torch::sin((1.0 - t) * theta) / safe_sin);
  const torch::Tensor wb = torch::where(parallel, torch::full_like(sin, t), torch::sin(t * theta) / safe_sin);
  return (wa * a32 + wb * b32).to(a.scalar_type());
}

torch::Tensor blend_embeddings(const std::vector<torch::Tensor>& embeds, const std::vector<double>& weights,
                               BlendMethod method) {
  if (embeds.size() != weights.size()) throw InvalidArgument("blend_embeddings: one weight per tensor expected");
  const auto w = nonzero_normalised(weights);
  if (w.size() == 1) return embeds[w[0].first];  // one prompt: its embedding, bit for bit
  if (method == BlendMethod::Linear) {
    torch::Tensor sum = embeds[w[0].first].to(torch::kFloat32) * w[0].second;
    for (size_t i = 1; i < w.size(); ++i) sum = sum + embeds[w[i].first].to(torch::kFloat32) * w[i].second;
    return sum.to(embeds[w[0].first].scalar_type());
  }
  torch::Tensor e = embeds[w[0].first];
  double W = w[0].second;
  for (size_t i = 1; i < w.size(); ++i) {
    W += w[i].second;
    e = slerp(e, embeds[w[i].first], w[i].second / W);
  }
  return e;
}

torch::Tensor blend_noise(const std::vector<torch::Tensor>& noise, const std::vector<double>& weights) {
  if (noise.size() != weights.size()) throw InvalidArgument("blend_noise: one weight per tensor expected");
  const auto w = nonzero_normalised(weights);
  if (w.size() == 1) return noise[w[0].first];  // one seed: its noise, bit for bit
  double sq = 0;
  for (const auto& [i, x] : w) sq += x * x;
  const double norm = std::sqrt(sq);
  torch::Tensor sum = noise[w[0].first].to(torch::kFloat32) * (w[0].second / norm);
  for (size_t i = 1; i < w.size(); ++i) sum = sum + noise[w[i].first].to(torch::kFloat32) * (w[i].second / norm);
  return sum.to(noise[w[0].first].scalar_type());
}

}  // namespace sd
