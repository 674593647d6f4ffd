#pragma once
// PNG files <-> uint8 RGB [H, W, 3] tensors for the CLI tests (OpenCV; files are BGR on disk).
#include <string>

#include <gtest/gtest.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

namespace sd::test {

// An undefined tensor when the file is missing or not an image.
inline torch::Tensor read_png_rgb(const std::string& path) {
  cv::Mat bgr = cv::imread(path, cv::IMREAD_COLOR);
  if (bgr.empty()) return torch::Tensor();
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, torch::kUInt8).clone();
}

inline void write_png_rgb(const std::string& path, const torch::Tensor& hwc) {
  const auto t = hwc.contiguous();
  cv::Mat rgb(static_cast<int>(t.size(0)), static_cast<int>(t.size(1)), CV_8UC3, t.data_ptr<uint8_t>());
  cv::Mat bgr;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  ASSERT_TRUE(cv::imwrite(path, bgr)) << path;
}

inline int64_t max_pixel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kInt32) - b.to(torch::kInt32)).abs().max().item<int64_t>();
}

}  // namespace sd::test
