#include "runtime/video_sink.h"

#include <filesystem>

#include <unistd.h>

#include <opencv2/imgproc.hpp>

#include "core/error.h"

namespace sd {
namespace fs = std::filesystem;
namespace {

std::string lower_ext(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return ext;
}

}  // namespace

bool VideoFileSink::is_video_path(const std::string& path) {
  const std::string e = lower_ext(path);
  return e == ".avi" || e == ".mp4" || e == ".m4v" || e == ".mov" || e == ".mkv" || e == ".webm";
}

std::vector<std::string> VideoFileSink::codecs_for(const std::string& path, const std::string& fourcc_override) {
  if (!fourcc_override.empty()) {
    if (fourcc_override.size() != 4)
      throw InvalidArgument("--fourcc must have four characters (MJPG, avc1, mp4v, VP80, ...), got '" +
                            fourcc_override + "'");
    return {fourcc_override};
  }
  const std::string e = lower_ext(path);
  if (e == ".avi") return {"MJPG"};
  if (e == ".mp4" || e == ".m4v" || e == ".mov") return {"avc1", "mp4v"};
  if (e == ".mkv") return {"avc1", "MJPG"};
  if (e == ".webm") return {"VP80"};
  throw InvalidArgument(path + ": unknown video extension (use .avi, .mp4, .m4v, .mov, .mkv or .webm)");
}

VideoFileSink::VideoFileSink(const std::string& path, const SinkOptions& options) : path_(path), options_(options) {
  codecs_for(path, options.fourcc);  // validates the extension / override now
  if (!(options.fps > 0)) throw InvalidArgument(path + ": the output frame rate must be > 0");
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw FormatError(path, "cannot write the video: folder '" + dir.string() + "' does not exist");
  if (::access(dir.c_str(), W_OK) != 0)
    throw FormatError(path, "cannot write the video: folder '" + dir.string() + "' is not writable");
  if (fs::is_directory(path, ec)) throw FormatError(path, "cannot write the video: a folder has that name");
}

void VideoFileSink::write(const cv::Mat& image, const std::atomic<bool>&) {
  if (!writer_.isOpened()) {
    size_ = image.size();
    std::string tried;
    for (const auto& c : codecs_for(path_, options_.fourcc)) {
      if (writer_.open(path_, cv::CAP_FFMPEG, cv::VideoWriter::fourcc(c[0], c[1], c[2], c[3]), options_.fps, size_)) {
        codec_ = c;
        break;
      }
      tried += (tried.empty() ? "" : ", ") + c;
    }
    if (!writer_.isOpened())
      throw FormatError(path_, "cannot open the video for writing (codec " + tried + ", " +
                                   std::to_string(size_.width) + "x" + std::to_string(size_.height) + ")");
  }
  if (image.size() != size_)
    throw InvalidArgument(path_ + ": frame " + std::to_string(frames_) + " is " + std::to_string(image.cols) + "x" +
                          std::to_string(image.rows) + " but the video is " + std::to_string(size_.width) + "x" +
                          std::to_string(size_.height));
  writer_.write(image);
  ++frames_;
}

void VideoFileSink::close() {
  if (!writer_.isOpened()) return;
  writer_.release();
  std::error_code ec;
  if (!fs::exists(path_, ec) || fs::file_size(path_, ec) == 0)
    throw FormatError(path_, "the video file is empty after writing " + std::to_string(frames_) + " frames");
}

std::string VideoFileSink::describe() const {
  return "video " + path_ + " (" + (codec_.empty() ? codecs_for(path_, options_.fourcc).front() : codec_) + ", " +
         std::to_string(options_.fps) + " fps)";
}

}  // namespace sd
