#pragma once
// Numbered images in a folder (created if needed): <dir>/frame_000000.png, ... — or the names of a printf pattern
// with an image extension (out/%05d.jpg). Frames are numbered in output order from 0.
#include "runtime/frame_sink.h"

namespace sd {

class ImageFolderSink : public FrameSink {
 public:
  explicit ImageFolderSink(const std::string& spec);
  void write(const cv::Mat& image, const std::atomic<bool>& stop) override;
  std::string describe() const override;
  std::string file_name(int64_t n) const;

  // True when `spec` is a name pattern like out/%05d.png.
  static bool is_pattern(const std::string& spec);

 private:
  std::string dir_, pattern_;  // pattern_: a full path printf pattern with one integer conversion
  int64_t frames_ = 0;
};

}  // namespace sd
