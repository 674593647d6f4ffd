#pragma once
// The source of a txt2img stream (`--input none`): frames without pixels that only set the pace. At fps = 0 a tick
// is ready whenever the stream takes one (the model sets the rate); otherwise ticks come at `fps` in real time.
#include "runtime/frame_source.h"

namespace sd {

class TickSource : public FrameSource {
 public:
  explicit TickSource(double fps = 0);
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override;
  bool live() const override { return fps_ > 0; }
  bool has_images() const override { return false; }
  double fps() const override { return fps_; }
  std::string describe() const override;

 private:
  double fps_;
  FramePacer pacer_;
};

}  // namespace sd
