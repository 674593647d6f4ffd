#pragma once
// Raw rgb24 frames (width·height·3 bytes each, no header) read from a file descriptor — stdin for
// `--input -`, e.g. `ffmpeg -i in.mp4 -f rawvideo -pix_fmt rgb24 -s 512x512 - | streamdiffusion stream --input - ...`.
// The stream ending between two frames is the end of input; ending inside a frame is an error.
#include "runtime/frame_source.h"

namespace sd {

class RawFrameSource : public FrameSource {
 public:
  // Does not own `fd`. `name` is used in messages ("stdin").
  RawFrameSource(int fd, int64_t width, int64_t height, std::string name = "stdin", bool live = false);
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override;
  bool live() const override { return live_; }
  std::string describe() const override;

 private:
  int fd_;
  int64_t width_, height_;
  std::string name_;
  bool live_;
  int64_t frames_ = 0;
  cv::Mat rgb_;
};

}  // namespace sd
