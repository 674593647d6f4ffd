// streamdiffusion.json (pipeline/model_defaults.h): parsing and validation only, torch-free so the fuzz target
// (tests/fuzz/fuzz_recommendations.cpp) instruments it cheaply. A model folder is untrusted input.
#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/json_limits.h"
#include "core/error.h"
#include "pipeline/model_defaults.h"

namespace sd {

namespace {

using nlohmann::json;

[[noreturn]] void bad(const std::string& file, const std::string& field, const std::string& expected) {
  throw FormatError(file, "field '" + field + "': expected " + expected);
}

std::pair<int64_t, int64_t> parse_size_value(const json& v, const std::string& file, const std::string& field) {
  int64_t w = 0, h = 0;
  if (v.is_number_integer()) {
    w = h = v.get<int64_t>();
  } else if (v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer()) {
    w = v[0].get<int64_t>();
    h = v[1].get<int64_t>();
  } else if (v.is_string()) {
    const std::string s = v.get<std::string>();
    const auto x = s.find('x');
    try {
      size_t p1 = 0, p2 = 0;
      if (x == std::string::npos) throw std::invalid_argument(s);
      w = std::stoll(s.substr(0, x), &p1);
      h = std::stoll(s.substr(x + 1), &p2);
      if (p1 != x || p2 != s.size() - x - 1) throw std::invalid_argument(s);
    } catch (const std::exception&) {
      bad(file, field, "\"WIDTHxHEIGHT\" (e.g. \"512x512\"), got \"" + s + "\"");
    }
  } else {
    bad(file, field, "\"WIDTHxHEIGHT\", [width, height] or one integer");
  }
  if (w < 8 || h < 8 || w > 4096 || h > 4096 || w % 8 || h % 8)
    bad(file, field, "a size of multiples of 8 between 8 and 4096, got " + std::to_string(w) + "x" + std::to_string(h));
  return {w, h};
}

double number(const json& v, const std::string& file, const std::string& field, double lo, double hi) {
  if (!v.is_number()) bad(file, field, "a number");
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) bad(file, field, "a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

void read_mode(const json& j, const std::string& file, const std::string& prefix, ModeRecommendation& m) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string key = it.key(), field = prefix + key;
    const json& v = it.value();
    if (key == "t_index_list") {
      if (!v.is_array() || v.empty() || v.size() > 50) bad(file, field, "a list of 1..50 integers");
      std::vector<int64_t> t;
      for (const auto& e : v) {
        if (!e.is_number_integer() || e.get<int64_t>() < 0) bad(file, field, "non-negative integers");
        t.push_back(e.get<int64_t>());
      }
      m.t_index_list = t;
    } else if (key == "cfg_type") {
      static const std::vector<std::string> ok = {"none", "full", "self", "initialize"};
      if (!v.is_string() || std::find(ok.begin(), ok.end(), v.get<std::string>()) == ok.end())
        bad(file, field, "one of \"none\", \"full\", \"self\", \"initialize\"");
      m.cfg_type = v.get<std::string>();
    } else if (key == "guidance") {
      m.guidance = number(v, file, field, 0, 20);
    } else if (key == "delta") {
      m.delta = number(v, file, field, 0, 10);
    } else if (prefix.empty() && (key == "size" || key == "num_inference_steps" || key == "txt2img" ||
                                  key == "img2img" || key == "note" || key == "cpu_dtype" ||
                                  key == "cpu_threads")) {
      continue;  // top-level fields read by the caller
    } else {
      throw FormatError(file, "unknown field '" + field +
                                  "' (known: size, num_inference_steps, t_index_list, cfg_type, guidance, delta, "
                                  "txt2img, img2img, cpu_dtype, cpu_threads, note)");
    }
  }
}

}  // namespace

void apply_recommendations_json(const std::string& json_text, const std::string& file, ModelDefaults& d) {
  json j;
  if (std::string why = json_depth_problem(json_text); !why.empty()) throw FormatError(file, "not valid JSON: " + why);
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw FormatError(file, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw FormatError(file, "expected a JSON object");
  ModeRecommendation both;
  read_mode(j, file, "", both);
  if (j.contains("size")) {
    const auto [w, h] = parse_size_value(j["size"], file, "size");
    d.native_width = w;
    d.native_height = h;
    d.native_size_reason = std::filesystem::path(file).filename().string();
  }
  if (j.contains("num_inference_steps")) {
    const json& v = j["num_inference_steps"];
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 1000)
      bad(file, "num_inference_steps", "an integer in [1, 1000]");
    d.num_inference_steps = v.get<int64_t>();
  }
  if (j.contains("cpu_dtype")) {
    const json& v = j["cpu_dtype"];
    if (!v.is_string() || (v.get<std::string>() != "fp32" && v.get<std::string>() != "bf16"))
      bad(file, "cpu_dtype", "\"fp32\" or \"bf16\"");
    d.cpu_dtype = v.get<std::string>();
  }
  if (j.contains("cpu_threads")) {
    const json& v = j["cpu_threads"];
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 1024)
      bad(file, "cpu_threads", "an integer in [1, 1024]");
    d.cpu_threads = v.get<int64_t>();
  }
  if (j.contains("note")) {
    if (!j["note"].is_string()) bad(file, "note", "a string");
    d.note = j["note"].get<std::string>();
  }
  const auto merge = [](ModeRecommendation& into, const ModeRecommendation& from) {
    if (from.t_index_list) into.t_index_list = from.t_index_list;
    if (from.cfg_type) into.cfg_type = from.cfg_type;
    if (from.guidance) into.guidance = from.guidance;
    if (from.delta) into.delta = from.delta;
  };
  ModeRecommendation txt = both, img = both;
  for (const char* mode : {"txt2img", "img2img"}) {
    if (!j.contains(mode)) continue;
    if (!j[mode].is_object()) bad(file, mode, "an object");
    ModeRecommendation m;
    read_mode(j[mode], file, std::string(mode) + ".", m);
    merge(std::string(mode) == "txt2img" ? txt : img, m);
  }
  // The file's settings replace the family's wholesale per mode (a file that names t_index_list but no cfg_type
  // still gets the family's cfg_type: fields merge one by one).
  merge(d.txt2img, txt);
  merge(d.img2img, img);
  const int64_t S = d.num_inference_steps.value_or(50);
  for (const auto* m : {&d.txt2img, &d.img2img})
    if (m->t_index_list)
      for (int64_t t : *m->t_index_list)
        if (t >= S)
          throw FormatError(file, "t_index_list entry " + std::to_string(t) + " is not below num_inference_steps " +
                                      std::to_string(S));
  d.settings_source = std::filesystem::path(file).filename().string();
  d.warnings.clear();  // the model's author chose these settings
}

int threads_request(const ModelDefaults& d, int requested, bool on_cpu) {
  return requested == 0 && on_cpu && d.cpu_threads ? static_cast<int>(*d.cpu_threads) : requested;
}

std::string dtype_request(const ModelDefaults& d, const std::string& requested, bool on_cpu) {
  return requested == "auto" && on_cpu && d.cpu_dtype ? *d.cpu_dtype : requested;
}

}  // namespace sd
