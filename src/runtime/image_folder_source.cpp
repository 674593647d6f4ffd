#include "runtime/image_folder_source.h"

#include <algorithm>
#include <cctype>
#include <filesystem>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "core/error.h"

namespace sd {
namespace fs = std::filesystem;

bool ImageFolderSource::natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) && std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      // Compare the runs by value: strip leading zeros, then longer is larger, then lexicographic.
      size_t is = i, js = j;
      while (is + 1 < ie && a[is] == '0') ++is;
      while (js + 1 < je && b[js] == '0') ++js;
      if (ie - is != je - js) return ie - is < je - js;
      const int c = a.compare(is, ie - is, b, js, je - js);
      if (c != 0) return c < 0;
      if (ie - i != je - j) return ie - i < je - j;  // "01" vs "1": fewer leading zeros first
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

ImageFolderSource::ImageFolderSource(const std::string& dir, const SourceOptions& options)
    : dir_(dir), options_(options) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw FormatError(dir, "not a folder");
  static const char* kExt[] = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"};
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file()) continue;
    std::string ext = e.path().extension().string();
    for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (std::find_if(std::begin(kExt), std::end(kExt), [&](const char* x) { return ext == x; }) != std::end(kExt))
      files_.push_back(e.path().string());
  }
  if (ec) throw FormatError(dir, "cannot list the folder: " + ec.message());
  if (files_.empty())
    throw FormatError(dir, "the folder holds no image (png, jpg, jpeg, bmp, webp, tif, tiff, ppm, pgm)");
  std::sort(files_.begin(), files_.end(),
            [](const std::string& a, const std::string& b) {
              return natural_less(fs::path(a).filename().string(), fs::path(b).filename().string());
            });
  if (options_.realtime) pacer_.set_fps(options_.fps > 0 ? options_.fps : 30.0);
}

bool ImageFolderSource::read(cv::Mat& image, const std::atomic<bool>& stop) {
  if (next_ >= files_.size()) {
    if (!options_.loop) return false;
    next_ = 0;
  }
  if (!pacer_.wait(stop)) return false;
  const std::string& file = files_[next_++];
  image = cv::imread(file, cv::IMREAD_COLOR);
  if (image.empty()) throw FormatError(file, "cannot decode the image");
  return true;
}

torch::Tensor read_rgb_image(const std::string& path) {
  const cv::Mat bgr = cv::imread(path, cv::IMREAD_COLOR);
  if (bgr.empty()) throw FormatError(path, "cannot read as an image (missing, or a format OpenCV cannot decode)");
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, {static_cast<int64_t>(rgb.step[0]), 3, 1}, torch::kUInt8)
      .clone();
}

std::string ImageFolderSource::describe() const {
  return "image folder " + dir_ + " (" + std::to_string(files_.size()) + " images)";
}

}  // namespace sd
