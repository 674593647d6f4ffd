#pragma once
// Where the frames of a stream go. open_sink() understands:
//   window                   an OpenCV highgui window (needs a display; q or Esc in the window stops the stream)
//   out.mp4 | .avi | ...     a video file, codec from the extension (see video_sink.h)
//   path/to/folder[/]        numbered images (frame_000000.png, ...); a name with a printf %d pattern and an image
//                            extension (out/%05d.jpg) chooses names and format
//   - | stdout               raw rgb24 frames on stdout (pipe into ffmpeg -f rawvideo -pix_fmt rgb24 -s WxH -i -)
//   none                     discard (benchmarks, soak runs)
#include <atomic>
#include <memory>
#include <string>

#include <opencv2/core/mat.hpp>

namespace sd {

struct SinkOptions {
  double fps = 30;           // video file: the container's frame rate
  std::string fourcc;        // video file: codec override (four characters), else chosen from the extension
  std::string window_title = "streamdiffusion";
};

class FrameSink {
 public:
  virtual ~FrameSink() = default;
  // Writes one frame (BGR 8UC3). Throws sd::Error naming the file on failure. Returns within about 100 ms once
  // `stop` is raised (the frame may then be incomplete or missing).
  virtual void write(const cv::Mat& image, const std::atomic<bool>& stop) = 0;
  // Finishes the output (video trailer). Called once, on the thread that wrote, also after an error elsewhere.
  virtual void close() {}
  // The user asked to stop from the sink's side (window closed, q pressed).
  virtual bool wants_stop() const { return false; }
  virtual std::string describe() const = 0;
};

std::unique_ptr<FrameSink> open_sink(const std::string& spec, const SinkOptions& options = {});

class NullSink : public FrameSink {
 public:
  void write(const cv::Mat&, const std::atomic<bool>&) override {}
  std::string describe() const override { return "none (frames discarded)"; }
};

}  // namespace sd
