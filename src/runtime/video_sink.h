#pragma once
// A video file through OpenCV's FFmpeg writer. Codec by extension (first that opens): .avi MJPG; .mp4 .m4v .mov
// avc1 (H.264), then mp4v; .mkv avc1, then MJPG; .webm VP80. The writer opens on the first frame (its size); the
// folder is checked when the sink is made, so an unwritable path fails before the stream starts.
#include <opencv2/videoio.hpp>
#include <vector>

#include "runtime/frame_sink.h"

namespace sd {

class VideoFileSink : public FrameSink {
 public:
  VideoFileSink(const std::string& path, const SinkOptions& options);
  void write(const cv::Mat& image, const std::atomic<bool>& stop) override;
  void close() override;
  std::string describe() const override;

  static bool is_video_path(const std::string& path);
  // Codecs tried for a file name, in order (the override alone when given).
  static std::vector<std::string> codecs_for(const std::string& path, const std::string& fourcc_override);

 private:
  std::string path_;
  SinkOptions options_;
  cv::VideoWriter writer_;
  std::string codec_;
  cv::Size size_;
  int64_t frames_ = 0;
};

}  // namespace sd
