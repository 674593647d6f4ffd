#pragma once
// Raw rgb24 frames (width·height·3 bytes each, no header) written to a file descriptor — stdout for `--output -`.
// A reader that goes away (EPIPE) is an error that stops the stream; SIGPIPE must be ignored (SignalGuard does).
#include <opencv2/core/mat.hpp>

#include "runtime/frame_sink.h"

namespace sd {

class RawFrameSink : public FrameSink {
 public:
  // Does not own `fd`.
  explicit RawFrameSink(int fd, std::string name = "stdout");
  void write(const cv::Mat& image, const std::atomic<bool>& stop) override;
  std::string describe() const override;

 private:
  int fd_;
  std::string name_;
  cv::Mat rgb_;
  int width_ = 0, height_ = 0;
};

}  // namespace sd
