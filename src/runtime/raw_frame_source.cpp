#include "runtime/raw_frame_source.h"

#include <opencv2/imgproc.hpp>

#include "core/error.h"
#include "runtime/fd_io.h"

namespace sd {

RawFrameSource::RawFrameSource(int fd, int64_t width, int64_t height, std::string name, bool live)
    : fd_(fd), width_(width), height_(height), name_(std::move(name)), live_(live) {
  if (width <= 0 || height <= 0 || width > 16384 || height > 16384)
    throw InvalidArgument(name_ + ": raw rgb24 input needs its frame size (--input-size WxH), got " +
                          std::to_string(width) + "x" + std::to_string(height));
}

bool RawFrameSource::read(cv::Mat& image, const std::atomic<bool>& stop) {
  rgb_.create(static_cast<int>(height_), static_cast<int>(width_), CV_8UC3);
  const size_t n = static_cast<size_t>(width_ * height_ * 3);
  size_t got = 0;
  const IoStatus s = read_full(fd_, rgb_.data, n, stop, name_, &got);
  if (s == IoStatus::Stopped) return false;
  if (s == IoStatus::Eof) {
    if (got == 0) return false;
    throw Error(name_ + ": the raw input ended inside frame " + std::to_string(frames_) + " (" + std::to_string(got) +
                " of " + std::to_string(n) + " bytes); is --input-size " + std::to_string(width_) + "x" +
                std::to_string(height_) + " right?");
  }
  ++frames_;
  cv::cvtColor(rgb_, image, cv::COLOR_RGB2BGR);
  return true;
}

std::string RawFrameSource::describe() const {
  return "raw rgb24 " + std::to_string(width_) + "x" + std::to_string(height_) + " frames on " + name_;
}

}  // namespace sd
