#pragma once
// A strict parser of the Prometheus text exposition format 0.0.4 for the /metrics tests: every line a HELP, a TYPE or
// a sample; metric and label names by the spec's grammar; label values with the three escapes; values as Go's
// ParseFloat takes them (+Inf, -Inf, NaN); one TYPE per family, before its samples; no series twice; histograms with
// ascending `le` buckets, cumulative counts that never fall, a +Inf bucket equal to _count, and a _sum. A violation
// throws std::runtime_error naming the line.
#include <cmath>
#include <cstdlib>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sd::test {

struct PromSample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

class PromText {
 public:
  explicit PromText(const std::string& text) { parse(text); }

  // The sample's value; throws when absent (so a missing series fails the test with its name).
  double value(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    const auto it = series_.find(key(name, labels));
    if (it == series_.end()) throw std::runtime_error("no series " + key(name, labels));
    return it->second;
  }
  bool has(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    return series_.count(key(name, labels)) > 0;
  }
  const std::string& type(const std::string& family) const {
    const auto it = types_.find(family);
    if (it == types_.end()) throw std::runtime_error("no TYPE for " + family);
    return it->second;
  }
  const std::vector<PromSample>& samples() const { return samples_; }

  static std::string key(const std::string& name, const std::map<std::string, std::string>& labels) {
    std::string k = name + "{";
    for (const auto& [n, v] : labels) k += n + "=\"" + v + "\",";
    return k + "}";
  }

 private:
  [[noreturn]] static void fail(size_t line_no, const std::string& line, const std::string& why) {
    throw std::runtime_error("metrics line " + std::to_string(line_no) + ": " + why + ": '" + line.substr(0, 200) + "'");
  }

  static double parse_value(const std::string& s, size_t n, const std::string& line) {
    if (s == "+Inf" || s == "Inf") return INFINITY;
    if (s == "-Inf") return -INFINITY;
    if (s == "NaN") return NAN;
    static const std::regex number(R"([+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?)");
    if (!std::regex_match(s, number)) fail(n, line, "not a number '" + s + "'");
    return std::strtod(s.c_str(), nullptr);
  }

  // The family a sample belongs to: histograms' _bucket/_sum/_count series belong to the base name.
  std::string family_of(const std::string& name) const {
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string sfx = suffix;
      if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
        const std::string base = name.substr(0, name.size() - sfx.size());
        const auto it = types_.find(base);
        if (it != types_.end() && (it->second == "histogram" || it->second == "summary")) return base;
      }
    }
    return name;
  }

  void parse(const std::string& text) {
    if (text.empty()) throw std::runtime_error("metrics: empty body");
    if (text.back() != '\n') throw std::runtime_error("metrics: the last line does not end with a newline");
    static const std::regex metric_name(R"([a-zA-Z_:][a-zA-Z0-9_:]*)");
    static const std::regex label_name(R"([a-zA-Z_][a-zA-Z0-9_]*)");
    std::istringstream in(text);
    std::string line;
    size_t n = 0;
    std::set<std::string> help_seen, families_with_samples;
    while (std::getline(in, line)) {
      ++n;
      if (line.empty()) continue;
      if (line[0] == '#') {
        std::istringstream ls(line);
        std::string hash, kind, name;
        ls >> hash >> kind >> name;
        if (kind != "HELP" && kind != "TYPE") continue;  // a plain comment
        if (!std::regex_match(name, metric_name)) fail(n, line, "bad metric name");
        if (kind == "HELP") {
          if (!help_seen.insert(name).second) fail(n, line, "second HELP for " + name);
          continue;
        }
        std::string type, rest;
        ls >> type;
        if (ls >> rest) fail(n, line, "text after the type");
        if (type != "counter" && type != "gauge" && type != "histogram" && type != "summary" && type != "untyped")
          fail(n, line, "unknown type '" + type + "'");
        if (types_.count(name)) fail(n, line, "second TYPE for " + name);
        if (families_with_samples.count(name)) fail(n, line, "TYPE after samples of " + name);
        types_[name] = type;
        continue;
      }
      // name{labels} value [timestamp]
      size_t i = 0;
      while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
      PromSample s;
      s.name = line.substr(0, i);
      if (!std::regex_match(s.name, metric_name)) fail(n, line, "bad metric name");
      if (i < line.size() && line[i] == '{') {
        ++i;
        while (i < line.size() && line[i] != '}') {
          size_t eq = line.find('=', i);
          if (eq == std::string::npos) fail(n, line, "label without '='");
          const std::string lname = line.substr(i, eq - i);
          if (!std::regex_match(lname, label_name)) fail(n, line, "bad label name '" + lname + "'");
          i = eq + 1;
          if (i >= line.size() || line[i] != '"') fail(n, line, "label value not quoted");
          ++i;
          std::string v;
          for (;;) {
            if (i >= line.size()) fail(n, line, "unterminated label value");
            const char c = line[i++];
            if (c == '"') break;
            if (c == '\\') {
              if (i >= line.size()) fail(n, line, "dangling backslash");
              const char e = line[i++];
              if (e == 'n') v += '\n';
              else if (e == '\\' || e == '"') v += e;
              else fail(n, line, "bad escape");
            } else {
              v += c;
            }
          }
          if (s.labels.count(lname)) fail(n, line, "label " + lname + " twice");
          s.labels[lname] = v;
          if (i < line.size() && line[i] == ',') ++i;
          else if (i < line.size() && line[i] != '}') fail(n, line, "expected ',' or '}' after a label");
        }
        if (i >= line.size()) fail(n, line, "unterminated label set");
        ++i;
      }
      if (i >= line.size() || line[i] != ' ') fail(n, line, "expected one space before the value");
      std::istringstream vs(line.substr(i + 1));
      std::string value, timestamp, extra;
      vs >> value;
      if (vs >> timestamp) {
        static const std::regex ts(R"(-?[0-9]+)");
        if (!std::regex_match(timestamp, ts)) fail(n, line, "bad timestamp");
        if (vs >> extra) fail(n, line, "text after the timestamp");
      }
      s.value = parse_value(value, n, line);
      const std::string family = family_of(s.name);
      if (!types_.count(family)) fail(n, line, "sample before (or without) a TYPE line for " + family);
      const std::string& t = types_.at(family);
      if (t == "counter" && (s.value < 0 || std::isnan(s.value))) fail(n, line, "negative counter");
      if (t == "histogram" && s.name == family) fail(n, line, "histogram sample without _bucket/_sum/_count");
      if (t == "histogram" && s.name == family + "_bucket" && !s.labels.count("le")) fail(n, line, "bucket without le");
      families_with_samples.insert(family);
      if (!series_.emplace(key(s.name, s.labels), s.value).second) fail(n, line, "series twice");
      samples_.push_back(std::move(s));
    }
    check_histograms();
  }

  void check_histograms() const {
    for (const auto& [family, t] : types_) {
      if (t != "histogram") continue;
      // Group the buckets by their labels other than le, in document order.
      std::map<std::string, std::vector<std::pair<double, double>>> groups;
      for (const auto& s : samples_) {
        if (s.name != family + "_bucket") continue;
        auto labels = s.labels;
        const std::string le = labels.at("le");
        labels.erase("le");
        groups[key(family, labels)].push_back({le == "+Inf" ? INFINITY : std::strtod(le.c_str(), nullptr), s.value});
      }
      for (const auto& [g, buckets] : groups) {
        for (size_t i = 1; i < buckets.size(); ++i) {
          if (!(buckets[i].first > buckets[i - 1].first)) throw std::runtime_error(g + ": le bounds not ascending");
          if (buckets[i].second < buckets[i - 1].second) throw std::runtime_error(g + ": bucket counts fall");
        }
        if (buckets.empty() || !std::isinf(buckets.back().first)) throw std::runtime_error(g + ": no +Inf bucket");
        const std::string rest = g.substr(family.size());  // "{labels}"
        const auto count = series_.find(family + "_count" + rest);
        const auto sum = series_.find(family + "_sum" + rest);
        if (count == series_.end() || sum == series_.end()) throw std::runtime_error(g + ": no _count or _sum");
        if (count->second != buckets.back().second) throw std::runtime_error(g + ": +Inf bucket != _count");
      }
    }
  }

  std::map<std::string, std::string> types_;
  std::map<std::string, double> series_;
  std::vector<PromSample> samples_;
};

}  // namespace sd::test
