#include "apps/cli/bench_chart.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "core/error.h"

#ifdef SD_BENCH_HAVE_OPENCV
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#endif

namespace sd::bench {

#ifdef SD_BENCH_HAVE_OPENCV

namespace {

struct Bar {
  std::string label;
  double value = 0;      // bar length (seconds)
  std::string note;      // printed right of the bar
};

constexpr int kWidth = 1240;
constexpr int kLabelW = 420;
constexpr int kBarH = 22;
constexpr int kGap = 8;
const cv::Scalar kInk(40, 40, 40), kGrid(215, 215, 215);

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// Draws a titled horizontal bar panel at y, returns the y below it. Bars share one linear scale (their max).
int draw_panel(cv::Mat& img, int y, const std::string& title, const std::vector<Bar>& bars, const cv::Scalar& color) {
  cv::putText(img, title, {12, y + 22}, cv::FONT_HERSHEY_SIMPLEX, 0.62, kInk, 2, cv::LINE_AA);
  y += 34;
  double vmax = 0;
  for (const auto& b : bars) vmax = std::max(vmax, b.value);
  if (vmax <= 0) vmax = 1;
  const int x0 = kLabelW, wmax = kWidth - kLabelW - 300;
  for (int k = 0; k <= 4; ++k) {  // grid at 0, 25, 50, 75, 100 % of the max
    const int x = x0 + wmax * k / 4;
    cv::line(img, {x, y - 4}, {x, y + static_cast<int>(bars.size()) * (kBarH + kGap)}, kGrid, 1);
    cv::putText(img, fmt("%.3g s", vmax * k / 4), {x - 14, y + 8}, cv::FONT_HERSHEY_SIMPLEX, 0.38, kInk, 1,
                cv::LINE_AA);
  }
  y += 18;
  for (const auto& b : bars) {
    const std::string label = b.label.size() > 50 ? b.label.substr(0, 49) + "~" : b.label;
    cv::putText(img, label, {12, y + kBarH - 6}, cv::FONT_HERSHEY_SIMPLEX, 0.45, kInk, 1, cv::LINE_AA);
    const int w = std::max(1, static_cast<int>(wmax * b.value / vmax));
    cv::rectangle(img, cv::Rect(x0, y, w, kBarH), color, cv::FILLED);
    cv::putText(img, b.note, {x0 + w + 8, y + kBarH - 6}, cv::FONT_HERSHEY_SIMPLEX, 0.45, kInk, 1, cv::LINE_AA);
    y += kBarH + kGap;
  }
  return y + 16;
}

}  // namespace

bool chart_available() { return true; }

void write_chart(const nlohmann::json& report, const std::string& path) {
  std::vector<std::pair<std::string, std::vector<Bar>>> ablations;
  if (report.contains("ablation"))
    for (const auto& a : report["ablation"]) {
      std::vector<Bar> bars;
      for (const auto& r : a["rows"])
        bars.push_back({r["label"].get<std::string>(), r["median_s"].get<double>(),
                        fmt("%.3f s  ", r["median_s"].get<double>()) +
                            fmt("x%.1f", r["speedup_vs_naive"].get<double>())});
      ablations.push_back({"Ablation txt2img " + std::to_string(a["size"].get<int64_t>()) + " px, " +
                               std::to_string(a["steps"].get<int64_t>()) + " step(s): seconds per image",
                           bars});
    }
  std::vector<Bar> comps;
  if (report.contains("results"))
    for (const auto& r : report["results"]) {
      if (r["section"] != "components") continue;
      std::string note = fmt("%.4f s", r["median_s"].get<double>());
      if (r["gflops"].get<double>() > 0) note += fmt("  %.0f GFLOP/s", r["gflops"].get<double>());
      if (r["pct_ceiling"].get<double>() > 0) note += fmt(" (%.0f%%)", r["pct_ceiling"].get<double>());
      std::string label = r["name"].get<std::string>() + " " + r["dtype"].get<std::string>();
      if (r["size"].get<int64_t>() > 0) label += " " + std::to_string(r["size"].get<int64_t>());
      if (r["batch"].get<int64_t>() > 1) label += " b" + std::to_string(r["batch"].get<int64_t>());
      comps.push_back({label, r["median_s"].get<double>(), note});
    }
  int h = 60;
  for (const auto& a : ablations) h += 70 + static_cast<int>(a.second.size()) * (kBarH + kGap) + 16;
  if (!comps.empty()) h += 70 + static_cast<int>(comps.size()) * (kBarH + kGap) + 16;
  cv::Mat img(h, kWidth, CV_8UC3, cv::Scalar(255, 255, 255));
  std::string title = "streamdiffusion bench: " + report.value("model", std::string()) + " (" +
                      report.value("device", std::string()) + ", " + std::to_string(report.value("threads", 0)) +
                      " threads)";
  cv::putText(img, title, {12, 30}, cv::FONT_HERSHEY_SIMPLEX, 0.6, kInk, 1, cv::LINE_AA);
  int y = 48;
  for (const auto& a : ablations) y = draw_panel(img, y, a.first, a.second, cv::Scalar(200, 140, 60));
  if (!comps.empty()) draw_panel(img, y, "Components: median seconds per call", comps, cv::Scalar(80, 170, 90));
  if (!cv::imwrite(path, img)) throw InvalidArgument("--chart: cannot write the PNG '" + path + "'");
}

#else

bool chart_available() { return false; }

void write_chart(const nlohmann::json&, const std::string& path) {
  throw InvalidArgument("--chart " + path + ": this build has no OpenCV (SD_ENGINE_ONLY), so no PNG chart; "
                        "use --json and chart it elsewhere");
}

#endif

}  // namespace sd::bench
