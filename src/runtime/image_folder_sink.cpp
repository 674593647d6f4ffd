#include "runtime/image_folder_sink.h"

#include <cstdio>
#include <filesystem>
#include <regex>

#include <unistd.h>

#include <opencv2/imgcodecs.hpp>

#include "core/error.h"

namespace sd {
namespace fs = std::filesystem;

bool ImageFolderSink::is_pattern(const std::string& spec) {
  static const std::regex re(R"(^[^%]*%0?[0-9]*d[^%]*\.(png|jpg|jpeg|bmp|webp|tif|tiff|ppm)$)", std::regex::icase);
  return std::regex_match(spec, re);
}

ImageFolderSink::ImageFolderSink(const std::string& spec) {
  if (is_pattern(spec)) {
    pattern_ = spec;
    dir_ = fs::path(spec).parent_path().string();
    if (dir_.empty()) dir_ = ".";
  } else {
    dir_ = spec;
    while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
    // The folder's name is text in a printf pattern: its '%' are escaped ("renders_50%" is a folder, not a format).
    std::string escaped;
    for (const char c : dir_) escaped += c == '%' ? std::string("%%") : std::string(1, c);
    pattern_ = escaped + "/frame_%06d.png";
  }
  std::error_code ec;
  if (fs::exists(dir_, ec) && !fs::is_directory(dir_, ec))
    throw FormatError(dir_, "cannot write images: it exists and is not a folder");
  fs::create_directories(dir_, ec);
  if (ec) throw FormatError(dir_, "cannot create the output folder: " + ec.message());
  if (::access(dir_.c_str(), W_OK) != 0) throw FormatError(dir_, "the output folder is not writable");
}

std::string ImageFolderSink::file_name(int64_t n) const {
  char buf[4096];
  std::snprintf(buf, sizeof buf, pattern_.c_str(), static_cast<int>(n));
  return buf;
}

void ImageFolderSink::write(const cv::Mat& image, const std::atomic<bool>&) {
  const std::string file = file_name(frames_);
  bool ok = false;
  try {
    ok = cv::imwrite(file, image);
  } catch (const cv::Exception& e) {
    throw FormatError(file, std::string("cannot write the image: ") + e.what());
  }
  if (!ok) throw FormatError(file, "cannot write the image");
  ++frames_;
}

std::string ImageFolderSink::describe() const { return "images " + pattern_; }

}  // namespace sd
