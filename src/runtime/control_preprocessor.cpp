#include "runtime/control_preprocessor.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>

#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

#include "core/error.h"

namespace sd {
namespace {

void check_image(const std::string& who, const torch::Tensor& t) {
  if (!t.defined() || t.dim() != 3 || t.size(2) != 3 || t.scalar_type() != torch::kUInt8 || t.size(0) < 1 ||
      t.size(1) < 1)
    throw InvalidArgument("control preprocessor " + who + ": expected a uint8 RGB [H, W, 3] image, got " +
                          (t.defined() ? std::string(t.toString()) + " " + c10::str(t.sizes()) : "none"));
}

// A cv::Mat view of a contiguous CPU copy (kept alive by `keep`).
cv::Mat as_mat(const torch::Tensor& rgb, torch::Tensor& keep) {
  keep = rgb.to(torch::kCPU).contiguous();
  return cv::Mat(static_cast<int>(keep.size(0)), static_cast<int>(keep.size(1)), CV_8UC3, keep.data_ptr());
}

torch::Tensor gray_to_rgb_tensor(const cv::Mat& gray) {
  cv::Mat rgb;
  cv::cvtColor(gray, rgb, cv::COLOR_GRAY2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, {static_cast<int64_t>(rgb.step[0]), 3, 1}, torch::kUInt8)
      .clone();
}

double parse_threshold(const std::string& spec, const std::string& s) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end == s.c_str() || *end != '\0' || errno == ERANGE || !std::isfinite(v) || v < 0 || v > 10000)
    throw InvalidArgument("control preprocessor '" + spec + "': threshold '" + s + "' is not a number in [0, 10000]");
  return v;
}

std::string fmt_number(double v) {
  std::string s = std::to_string(v);
  s.erase(s.find_last_not_of('0') + 1);
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

class Canny final : public ControlPreprocessor {
 public:
  Canny(double low, double high) : low_(low), high_(high) {}
  std::string name() const override { return "canny:" + fmt_number(low_) + ":" + fmt_number(high_); }
  torch::Tensor apply(const torch::Tensor& rgb_u8) const override {
    check_image(name(), rgb_u8);
    torch::Tensor keep;
    const cv::Mat rgb = as_mat(rgb_u8, keep);
    cv::Mat edges;
    // On the colour image, as controlnet_aux does: the gradient is the largest over the channels.
    cv::Canny(rgb, edges, low_, high_);
    return gray_to_rgb_tensor(edges);
  }

 private:
  double low_, high_;
};

class Gray final : public ControlPreprocessor {
 public:
  std::string name() const override { return "gray"; }
  torch::Tensor apply(const torch::Tensor& rgb_u8) const override {
    check_image(name(), rgb_u8);
    torch::Tensor keep;
    const cv::Mat rgb = as_mat(rgb_u8, keep);
    cv::Mat gray;
    cv::cvtColor(rgb, gray, cv::COLOR_RGB2GRAY);
    return gray_to_rgb_tensor(gray);
  }
};

class Passthrough final : public ControlPreprocessor {
 public:
  std::string name() const override { return "passthrough"; }
  torch::Tensor apply(const torch::Tensor& rgb_u8) const override {
    check_image(name(), rgb_u8);
    return rgb_u8;
  }
};

class Feedback final : public ControlPreprocessor {
 public:
  std::string name() const override { return "feedback"; }
  torch::Tensor apply(const torch::Tensor& rgb_u8) const override {
    check_image(name(), rgb_u8);
    return rgb_u8;
  }
  bool feedback() const override { return true; }
};

void no_args(const std::string& name, const std::vector<std::string>& args) {
  if (!args.empty()) throw InvalidArgument("control preprocessor '" + name + "' takes no arguments");
}

struct Registry {
  std::mutex mutex;
  std::map<std::string, ControlPreprocessorFactory> factories;
  Registry() {
    factories["canny"] = [](const std::vector<std::string>& a) -> std::shared_ptr<const ControlPreprocessor> {
      if (a.size() != 0 && a.size() != 2)
        throw InvalidArgument("control preprocessor 'canny' takes two thresholds (canny:LOW:HIGH), got " +
                              std::to_string(a.size()) + " argument(s)");
      double low = 100, high = 200;
      if (a.size() == 2) {
        const std::string spec = "canny:" + a[0] + ":" + a[1];
        low = parse_threshold(spec, a[0]);
        high = parse_threshold(spec, a[1]);
        if (low > high)
          throw InvalidArgument("control preprocessor '" + spec + "': the low threshold is above the high one");
      }
      return std::make_shared<Canny>(low, high);
    };
    factories["gray"] = [](const std::vector<std::string>& a) -> std::shared_ptr<const ControlPreprocessor> {
      no_args("gray", a);
      return std::make_shared<Gray>();
    };
    factories["passthrough"] = [](const std::vector<std::string>& a) -> std::shared_ptr<const ControlPreprocessor> {
      no_args("passthrough", a);
      return std::make_shared<Passthrough>();
    };
    factories["feedback"] = [](const std::vector<std::string>& a) -> std::shared_ptr<const ControlPreprocessor> {
      no_args("feedback", a);
      return std::make_shared<Feedback>();
    };
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

std::vector<std::string> control_preprocessor_names() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> names;
  for (const auto& kv : r.factories) names.push_back(kv.first);
  return names;
}

void register_control_preprocessor(const std::string& name, ControlPreprocessorFactory factory) {
  if (name.empty() || name.find_first_of(": \t") != std::string::npos || !factory)
    throw InvalidArgument("register_control_preprocessor: invalid name '" + name + "' or no factory");
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.factories[name] = std::move(factory);
}

std::shared_ptr<const ControlPreprocessor> make_control_preprocessor(const std::string& spec) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t colon = spec.find(':', start);
    parts.push_back(spec.substr(start, colon == std::string::npos ? std::string::npos : colon - start));
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  const std::string name = parts.front();
  parts.erase(parts.begin());
  ControlPreprocessorFactory factory;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.factories.find(name);
    if (it != r.factories.end()) factory = it->second;
  }
  if (!factory) {
    std::string known;
    for (const auto& n : control_preprocessor_names()) known += (known.empty() ? "" : ", ") + n;
    throw InvalidArgument("unknown control preprocessor '" + spec + "' (known: " + known +
                          "; depth and pose need a model: see README, ControlNet)");
  }
  return factory(parts);
}

}  // namespace sd
