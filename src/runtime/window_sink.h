#pragma once
// An OpenCV highgui window. Needs a display: without DISPLAY / WAYLAND_DISPLAY the constructor throws with a message
// that names the alternatives (highgui would abort the process instead). The window is created on the first frame,
// on the sink thread, which then owns every GUI call. q or Esc in the window, or closing it, stops the stream.
#include "runtime/frame_sink.h"

namespace sd {

class WindowSink : public FrameSink {
 public:
  explicit WindowSink(std::string title);
  void write(const cv::Mat& image, const std::atomic<bool>& stop) override;
  void close() override;
  bool wants_stop() const override { return wants_stop_; }
  std::string describe() const override { return "window '" + title_ + "'"; }

 private:
  std::string title_;
  bool shown_ = false;
  std::atomic<bool> wants_stop_{false};
};

}  // namespace sd
