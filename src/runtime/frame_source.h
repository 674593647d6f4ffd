#pragma once
// Where the frames of a stream come from. open_source() understands:
//   path/to/video.mp4        a video file (OpenCV/FFmpeg)                    finite
//   path/to/folder           the images of a folder, in natural name order   finite
//   camera[:N]               V4L2 camera N (default 0) through OpenCV        live
//   screen[:x,y,w,h]         an X11 screen region (XShm), whole screen       live
//   - | stdin                raw rgb24 frames on stdin (size from SourceOptions::width/height)
//   none                     no pixels: ticks that pace a txt2img stream
#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include <opencv2/core/mat.hpp>

#include "runtime/frame.h"

namespace sd {

// The slowest pacing a source takes (a frame every ~11.6 days): below ~1e-10 fps the period overflows the clock's
// int64 nanoseconds, and this leaves a wide margin for the time points it is added to.
constexpr double kMinFps = 1e-6;

struct SourceOptions {
  int64_t width = 0, height = 0;  // raw frames: their size (required); camera: requested capture size (0 = driver's)
  // ticks / screen / image folder in real time: frames per second (0 = default; else finite and >= kMinFps, which
  // open_source() checks)
  double fps = 0;
  bool realtime = false;          // video file / image folder: deliver at the file's rate instead of as fast as read
  bool loop = false;              // video file / image folder: start over at the end (a soak or a demo)
};

class FrameSource {
 public:
  virtual ~FrameSource() = default;
  // Next frame into `image` (BGR 8UC3; left empty for ticks). false = end of input. Throws sd::Error on a failure
  // (unreadable file, truncated video, camera gone). Returns within about 100 ms once `stop` is raised.
  virtual bool read(cv::Mat& image, const std::atomic<bool>& stop) = 0;
  // Frames arrive in real time whether or not they are consumed (camera, screen): stale ones should be dropped.
  virtual bool live() const = 0;
  virtual bool has_images() const { return true; }
  // The native frame rate when known (video files), else 0.
  virtual double fps() const { return 0; }
  virtual std::string describe() const = 0;
};

std::unique_ptr<FrameSource> open_source(const std::string& spec, const SourceOptions& options = {});

// Sleeps until the next frame is due at `fps` (0 = never sleeps), in short slices so `stop` is honoured. A late
// frame does not make the following ones early (the schedule restarts from now when it falls behind).
class FramePacer {
 public:
  explicit FramePacer(double fps = 0) { set_fps(fps); }
  // InvalidArgument unless fps is 0 or finite and >= kMinFps.
  void set_fps(double fps);
  // false when stopped while waiting.
  bool wait(const std::atomic<bool>& stop);

 private:
  std::chrono::nanoseconds period_{0};
  StreamClock::time_point next_{};
  bool started_ = false;
};

}  // namespace sd
