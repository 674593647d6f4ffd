// `streamdiffusion montage`: images side by side in one PNG, each with an optional caption below it - for a strip of
// a stream's frames (scripts/stream-strip.sh draws docs/emoji-live-stream.png from `stream --output DIR/%05d.png`).
// Scaled with nearest neighbour so that 64 x 64 pixels stay visible.
#include <iostream>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "apps/cli/commands.h"
#include "core/error.h"
#include "core/text.h"

namespace {

struct MontageOptions {
  std::vector<std::string> images;
  std::string out, labels;
  int tile = 128, columns = 0;  // columns 0 = one row
};

sd::cli::Runner setup_montage(CLI::App& app) {
  auto o = std::make_shared<MontageOptions>();
  app.add_option("images", o->images, "image files (PNG, JPEG, ...), left to right then top to bottom")->required();
  app.add_option("--out", o->out, "output PNG")->required();
  app.add_option("--labels", o->labels, "captions, one per image, separated by ';' (empty = none)");
  app.add_option("--tile", o->tile, "size of each tile in pixels (square; nearest-neighbour scaling)")
      ->capture_default_str();
  app.add_option("--columns", o->columns, "tiles per row (0 = all in one row)")->capture_default_str();
  return [o] {
    if (o->tile < 8 || o->tile > 4096) throw sd::InvalidArgument("--tile must be in [8, 4096], got " + std::to_string(o->tile));
    if (o->columns < 0) throw sd::InvalidArgument("--columns must be >= 0");
    const auto labels = sd::split(o->labels, ';', /*keep_empty=*/true);
    if (!labels.empty() && labels.size() != o->images.size())
      throw sd::InvalidArgument("--labels has " + std::to_string(labels.size()) + " captions for " +
                                std::to_string(o->images.size()) + " images (one per image, separated by ';')");
    const int n = static_cast<int>(o->images.size());
    const int cols = o->columns == 0 ? n : std::min(o->columns, n);
    const int rows = (n + cols - 1) / cols;
    const int T = o->tile, gap = 4, cap_h = labels.empty() ? 0 : 22;
    cv::Mat sheet(rows * (T + cap_h + gap), cols * (T + gap), CV_8UC3, cv::Scalar(255, 255, 255));
    for (int i = 0; i < n; ++i) {
      const cv::Mat img = cv::imread(o->images[static_cast<size_t>(i)], cv::IMREAD_COLOR);
      if (img.empty()) throw sd::FormatError(o->images[static_cast<size_t>(i)], "cannot read this image");
      cv::Mat t;
      cv::resize(img, t, cv::Size(T, T), 0, 0, cv::INTER_NEAREST);
      const int x = (i % cols) * (T + gap), y = (i / cols) * (T + cap_h + gap);
      t.copyTo(sheet(cv::Rect(x, y, T, T)));
      if (labels.empty() || labels[static_cast<size_t>(i)].empty()) continue;
      // The caption's font shrinks until it fits under its tile (down to a readable minimum).
      const std::string& text = labels[static_cast<size_t>(i)];
      double scale = 0.42;
      int base = 0;
      while (scale > 0.26 && cv::getTextSize(text, cv::FONT_HERSHEY_SIMPLEX, scale, 1, &base).width > T - 4) scale -= 0.02;
      cv::putText(sheet, text, cv::Point(x + 2, y + T + 15), cv::FONT_HERSHEY_SIMPLEX, scale, cv::Scalar(20, 20, 20), 1,
                  cv::LINE_AA);
    }
    if (!cv::imwrite(o->out, sheet)) throw sd::FormatError(o->out, "cannot write the PNG");
    std::cout << "wrote " << o->out << " (" << sheet.cols << "x" << sheet.rows << ", " << n << " images)\n";
    return 0;
  };
}

REGISTER_COMMAND("montage", "images side by side in one PNG with captions (a strip of stream frames)", 86,
                 setup_montage);

}  // namespace
