#pragma once
// The images of a folder (png, jpg, jpeg, bmp, webp, tif, tiff, ppm, pgm), in natural name order (frame2 before
// frame10). An image that cannot be decoded is an error naming the file.
#include <vector>

#include <torch/types.h>

#include "runtime/frame_source.h"

namespace sd {

// One image file as uint8 RGB [H, W, 3] at its own size (IP-Adapter image prompts); FormatError naming the file
// when it cannot be decoded.
torch::Tensor read_rgb_image(const std::string& path);

class ImageFolderSource : public FrameSource {
 public:
  ImageFolderSource(const std::string& dir, const SourceOptions& options);
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override;
  bool live() const override { return options_.realtime; }
  std::string describe() const override;
  const std::vector<std::string>& files() const { return files_; }

  // Natural order: digit runs compare by value, the rest byte-wise.
  static bool natural_less(const std::string& a, const std::string& b);

 private:
  std::string dir_;
  SourceOptions options_;
  std::vector<std::string> files_;
  size_t next_ = 0;
  FramePacer pacer_;
};

}  // namespace sd
