#include "runtime/window_sink.h"

#include <cstdlib>

#include <opencv2/highgui.hpp>

#include "core/error.h"

namespace sd {

WindowSink::WindowSink(std::string title) : title_(std::move(title)) {
  const char* x = std::getenv("DISPLAY");
  const char* w = std::getenv("WAYLAND_DISPLAY");
  if ((!x || !*x) && (!w || !*w))
    throw InvalidArgument("--output window needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set; write to "
                          "a video file (out.mp4), an image folder, or - (raw rgb24 frames on stdout) instead");
}

void WindowSink::write(const cv::Mat& image, const std::atomic<bool>&) {
  try {
    if (!shown_) {
      cv::namedWindow(title_, cv::WINDOW_AUTOSIZE);
      shown_ = true;
    }
    cv::imshow(title_, image);
    const int key = cv::waitKey(1);
    if (key == 'q' || key == 'Q' || key == 27) wants_stop_ = true;
    if (cv::getWindowProperty(title_, cv::WND_PROP_VISIBLE) < 1) wants_stop_ = true;  // closed by the user
  } catch (const cv::Exception& e) {
    throw Error("window output: " + std::string(e.what()));
  }
}

void WindowSink::close() {
  if (!shown_) return;
  try {
    cv::destroyWindow(title_);
    cv::waitKey(1);
  } catch (const cv::Exception&) {
  }
  shown_ = false;
}

}  // namespace sd
