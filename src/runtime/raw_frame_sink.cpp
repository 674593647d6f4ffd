#include "runtime/raw_frame_sink.h"

#include <opencv2/imgproc.hpp>

#include "core/error.h"
#include "core/log.h"
#include "runtime/fd_io.h"

namespace sd {

RawFrameSink::RawFrameSink(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}

void RawFrameSink::write(const cv::Mat& image, const std::atomic<bool>& stop) {
  if (width_ == 0) {
    width_ = image.cols;
    height_ = image.rows;
    log::info("{}: raw rgb24 frames of {}x{} (ffmpeg -f rawvideo -pix_fmt rgb24 -s {}x{} -i -)", name_, width_, height_,
              width_, height_);
  } else if (image.cols != width_ || image.rows != height_) {
    throw InvalidArgument(name_ + ": frame size changed from " + std::to_string(width_) + "x" +
                          std::to_string(height_) + " to " + std::to_string(image.cols) + "x" +
                          std::to_string(image.rows));
  }
  cv::cvtColor(image, rgb_, cv::COLOR_BGR2RGB);
  write_full(fd_, rgb_.data, rgb_.total() * rgb_.elemSize(), stop, name_);
}

std::string RawFrameSink::describe() const { return "raw rgb24 frames on " + name_; }

}  // namespace sd
