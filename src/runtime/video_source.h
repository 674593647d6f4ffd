#pragma once
// Video through OpenCV's videoio: files (FFmpeg back-end) and V4L2 cameras.
#include <opencv2/videoio.hpp>

#include "runtime/frame_source.h"

namespace sd {

// A video file. A decode failure before the frame count the container announces is an error (truncated or corrupt
// file) raised after the frames that did decode, so they still reach the sink.
class VideoFileSource : public FrameSource {
 public:
  VideoFileSource(const std::string& path, const SourceOptions& options);
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override;
  bool live() const override { return options_.realtime; }
  double fps() const override { return fps_; }
  std::string describe() const override;
  int64_t frame_count() const { return frame_count_; }  // as the container announces it (<= 0: unknown)

 private:
  void open();
  std::string path_;
  SourceOptions options_;
  cv::VideoCapture cap_;
  double fps_ = 0;
  int64_t frame_count_ = 0, decoded_ = 0;
  FramePacer pacer_;
};

class CameraSource : public FrameSource {
 public:
  CameraSource(int index, const SourceOptions& options);
  bool read(cv::Mat& image, const std::atomic<bool>& stop) override;
  bool live() const override { return true; }
  double fps() const override { return fps_; }
  std::string describe() const override;

 private:
  int index_;
  cv::VideoCapture cap_;
  double fps_ = 0;
  int64_t frames_ = 0;
};

}  // namespace sd
