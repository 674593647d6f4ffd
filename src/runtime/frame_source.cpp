#include "runtime/frame_source.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <unistd.h>

#include "core/error.h"
#include "runtime/image_folder_source.h"
#include "runtime/raw_frame_source.h"
#include "runtime/screen_source.h"
#include "runtime/tick_source.h"
#include "runtime/video_source.h"

namespace sd {
namespace {

// A period in nanoseconds that cannot overflow the clock, even added to a time point decades ahead.
bool fps_in_range(double fps) { return fps == 0 || (fps >= kMinFps && std::isfinite(fps)); }

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

void FramePacer::set_fps(double fps) {
  if (!fps_in_range(fps))
    throw InvalidArgument("frame rate " + number(fps) + ": expected 0 (no pacing) or a finite rate of at least " +
                          number(kMinFps) + " frames per second");
  period_ = fps > 0 ? std::chrono::nanoseconds(static_cast<int64_t>(1e9 / fps)) : std::chrono::nanoseconds(0);
  started_ = false;
}

bool FramePacer::wait(const std::atomic<bool>& stop) {
  if (stop.load()) return false;
  if (period_.count() == 0) return true;
  const auto now = StreamClock::now();
  if (!started_ || next_ + period_ < now) {  // first frame, or fell behind by more than a period: restart from now
    started_ = true;
    next_ = now + period_;
    return true;
  }
  while (true) {
    const auto t = StreamClock::now();
    if (t >= next_) break;
    if (stop.load()) return false;
    std::this_thread::sleep_for(std::min<StreamClock::duration>(next_ - t, std::chrono::milliseconds(20)));
  }
  next_ += period_;
  return !stop.load();
}

std::unique_ptr<FrameSource> open_source(const std::string& spec, const SourceOptions& options) {
  if (spec.empty()) throw InvalidArgument("--input is empty");
  if (!fps_in_range(options.fps))
    throw InvalidArgument("--input-fps " + number(options.fps) + ": expected 0 (the default) or a finite rate of at "
                          "least " + number(kMinFps) + " frames per second");
  if (spec == "none") return std::make_unique<TickSource>(options.fps);
  if (spec == "-" || spec == "stdin")
    return std::make_unique<RawFrameSource>(STDIN_FILENO, options.width, options.height, "stdin");
  if (spec == "camera" || spec.rfind("camera:", 0) == 0) {
    int index = 0;
    if (spec != "camera") {
      const std::string n = spec.substr(7);
      char* end = nullptr;
      const long v = std::strtol(n.c_str(), &end, 10);
      if (n.empty() || *end != '\0' || v < 0 || v > 255)
        throw InvalidArgument("--input " + spec + ": expected camera:N with N the V4L2 device number");
      index = static_cast<int>(v);
    }
    return std::make_unique<CameraSource>(index, options);
  }
  if (spec == "screen" || spec.rfind("screen:", 0) == 0)
    return std::make_unique<ScreenSource>(parse_screen_region(spec), options);
  std::error_code ec;
  if (std::filesystem::is_directory(spec, ec)) return std::make_unique<ImageFolderSource>(spec, options);
  if (std::filesystem::exists(spec, ec)) return std::make_unique<VideoFileSource>(spec, options);
  throw FormatError(spec, "no such file or folder (--input takes a video file, an image folder, camera:N, "
                          "screen[:x,y,w,h], - for raw rgb24 frames on stdin, or none)");
}

}  // namespace sd
