#include "runtime/video_source.h"

#include <filesystem>

#include <opencv2/imgproc.hpp>

#include "core/error.h"

namespace sd {
namespace {

// Containers whose frame count is read from an index or header (exact); for others OpenCV estimates it from the
// duration and may be off by a frame.
bool exact_frame_count(const std::string& path) {
  auto ext = std::filesystem::path(path).extension().string();
  for (auto& c : ext) c = static_cast<char>(std::tolower(c));
  return ext == ".avi" || ext == ".mp4" || ext == ".mov" || ext == ".m4v";
}

void to_bgr(cv::Mat& image) {
  if (image.channels() == 1)
    cv::cvtColor(image, image, cv::COLOR_GRAY2BGR);
  else if (image.channels() == 4)
    cv::cvtColor(image, image, cv::COLOR_BGRA2BGR);
}

}  // namespace

VideoFileSource::VideoFileSource(const std::string& path, const SourceOptions& options)
    : path_(path), options_(options) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw FormatError(path, "no such video file");
  open();
  fps_ = cap_.get(cv::CAP_PROP_FPS);
  if (!(fps_ > 0 && fps_ < 1000)) fps_ = 0;
  frame_count_ = static_cast<int64_t>(cap_.get(cv::CAP_PROP_FRAME_COUNT));
  if (options_.realtime) pacer_.set_fps(options_.fps > 0 ? options_.fps : (fps_ > 0 ? fps_ : 30.0));
}

void VideoFileSource::open() {
  cap_.open(path_, cv::CAP_FFMPEG);
  if (!cap_.isOpened())
    throw FormatError(path_, "cannot open as a video (not a video file, an unsupported codec, or a truncated header)");
  decoded_ = 0;
}

bool VideoFileSource::read(cv::Mat& image, const std::atomic<bool>& stop) {
  if (!pacer_.wait(stop)) return false;
  if (cap_.read(image) && !image.empty()) {
    ++decoded_;
    to_bgr(image);
    return true;
  }
  // End of the stream, or a decode failure: tell them apart by the frame count the container announced.
  const int64_t tolerance = exact_frame_count(path_) ? 0 : std::max<int64_t>(1, frame_count_ / 100);
  if (frame_count_ > 0 && decoded_ + tolerance < frame_count_)
    throw FormatError(path_, "decoding stopped after " + std::to_string(decoded_) + " of the " +
                                 std::to_string(frame_count_) + " frames the file announces (truncated or corrupt)");
  if (decoded_ == 0) throw FormatError(path_, "the video has no decodable frame");
  if (options_.loop && !stop.load()) {
    cap_.release();
    open();
    if (cap_.read(image) && !image.empty()) {
      ++decoded_;
      to_bgr(image);
      return true;
    }
    throw FormatError(path_, "cannot decode the first frame again when looping");
  }
  return false;
}

std::string VideoFileSource::describe() const {
  return "video " + path_ + " (" + (frame_count_ > 0 ? std::to_string(frame_count_) : std::string("?")) + " frames, " +
         std::to_string(fps_) + " fps)";
}

CameraSource::CameraSource(int index, const SourceOptions& options) : index_(index) {
  const std::string dev = "/dev/video" + std::to_string(index);
  std::error_code ec;
  if (!std::filesystem::exists(dev, ec))
    throw InvalidArgument("camera:" + std::to_string(index) + ": " + dev + " does not exist (no V4L2 camera)");
  cap_.open(index, cv::CAP_V4L2);
  if (!cap_.isOpened())
    throw InvalidArgument("camera:" + std::to_string(index) + ": cannot open " + dev +
                          " (busy, no permission, or not a capture device)");
  if (options.width > 0) cap_.set(cv::CAP_PROP_FRAME_WIDTH, static_cast<double>(options.width));
  if (options.height > 0) cap_.set(cv::CAP_PROP_FRAME_HEIGHT, static_cast<double>(options.height));
  if (options.fps > 0) cap_.set(cv::CAP_PROP_FPS, options.fps);
  cap_.set(cv::CAP_PROP_BUFFERSIZE, 1);  // we want the newest frame, not the driver's backlog
  fps_ = cap_.get(cv::CAP_PROP_FPS);
}

bool CameraSource::read(cv::Mat& image, const std::atomic<bool>& stop) {
  if (stop.load()) return false;
  // A V4L2 read blocks for at most one frame period.
  if (!cap_.read(image) || image.empty())
    throw Error("camera:" + std::to_string(index_) + ": stopped delivering frames after " + std::to_string(frames_) +
                " (unplugged?)");
  ++frames_;
  to_bgr(image);
  return true;
}

std::string CameraSource::describe() const {
  return "camera:" + std::to_string(index_) + " (" + std::to_string(static_cast<int>(cap_.get(cv::CAP_PROP_FRAME_WIDTH))) +
         "x" + std::to_string(static_cast<int>(cap_.get(cv::CAP_PROP_FRAME_HEIGHT))) + ", " + std::to_string(fps_) +
         " fps)";
}

}  // namespace sd
