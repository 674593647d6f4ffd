#include "server/image_codec.h"

#include <algorithm>
#include <array>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "core/error.h"

namespace sd::server {
namespace {

int u16be(std::string_view d, size_t i) {
  return (static_cast<unsigned char>(d[i]) << 8) | static_cast<unsigned char>(d[i + 1]);
}
uint32_t u32be(std::string_view d, size_t i) {
  return (static_cast<uint32_t>(static_cast<unsigned char>(d[i])) << 24) |
         (static_cast<uint32_t>(static_cast<unsigned char>(d[i + 1])) << 16) |
         (static_cast<uint32_t>(static_cast<unsigned char>(d[i + 2])) << 8) |
         static_cast<uint32_t>(static_cast<unsigned char>(d[i + 3]));
}

ImageHeader probe_jpeg(std::string_view d, const std::string& what) {
  // Walk the marker segments up to the first SOFn (start of frame), which holds the size.
  size_t i = 2;
  while (i + 4 <= d.size()) {
    if (static_cast<unsigned char>(d[i]) != 0xFF) throw InvalidArgument(what + ": malformed JPEG (bad marker)");
    const unsigned char m = static_cast<unsigned char>(d[i + 1]);
    if (m == 0xFF) {  // fill byte
      ++i;
      continue;
    }
    if (m == 0xD8 || (m >= 0xD0 && m <= 0xD7) || m == 0x01) {  // markers without a length
      i += 2;
      continue;
    }
    if (m == 0xD9 || m == 0xDA) break;  // end of image / start of scan before any frame header
    const int len = u16be(d, i + 2);
    if (len < 2) throw InvalidArgument(what + ": malformed JPEG (segment length " + std::to_string(len) + ")");
    const bool sof = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
    if (sof) {
      if (i + 9 > d.size() || len < 7) break;
      ImageHeader h;
      h.format = ImageFormat::Jpeg;
      h.height = u16be(d, i + 5);
      h.width = u16be(d, i + 7);
      return h;
    }
    i += 2 + static_cast<size_t>(len);
  }
  throw InvalidArgument(what + ": malformed JPEG (no frame header found in " + std::to_string(d.size()) + " bytes)");
}

}  // namespace

ImageHeader probe_image(std::string_view d, const std::string& what) {
  ImageHeader h;
  static constexpr std::array<unsigned char, 8> kPng{0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (d.size() >= 3 && static_cast<unsigned char>(d[0]) == 0xFF && static_cast<unsigned char>(d[1]) == 0xD8 &&
      static_cast<unsigned char>(d[2]) == 0xFF) {
    h = probe_jpeg(d, what);
  } else if (d.size() >= 8 && std::equal(kPng.begin(), kPng.end(), d.begin(),
                                         [](unsigned char a, char b) { return a == static_cast<unsigned char>(b); })) {
    if (d.size() < 24 || d.substr(12, 4) != "IHDR") throw InvalidArgument(what + ": malformed PNG (no IHDR chunk)");
    h.format = ImageFormat::Png;
    const uint32_t w = u32be(d, 16), hh = u32be(d, 20);
    h.width = w > 1u << 30 ? (1 << 30) : static_cast<int>(w);
    h.height = hh > 1u << 30 ? (1 << 30) : static_cast<int>(hh);
  } else {
    throw InvalidArgument(what + ": not a JPEG or PNG image (" + std::to_string(d.size()) +
                          " bytes; a JPEG starts with FF D8 FF)");
  }
  if (h.width < kMinImageSide || h.height < kMinImageSide || h.width > kMaxImageSide || h.height > kMaxImageSide)
    throw InvalidArgument(what + ": image size " + std::to_string(h.width) + "x" + std::to_string(h.height) +
                          " out of range (each side must be in [" + std::to_string(kMinImageSide) + ", " +
                          std::to_string(kMaxImageSide) + "])");
  return h;
}

cv::Mat decode_image(std::string_view data, bool allow_png, const std::string& what) {
  const ImageHeader h = probe_image(data, what);
  if (!allow_png && h.format != ImageFormat::Jpeg) throw InvalidArgument(what + ": expected a JPEG image, got a PNG");
  const cv::Mat buf(1, static_cast<int>(data.size()), CV_8UC1, const_cast<char*>(data.data()));
  cv::Mat bgr;
  try {
    bgr = cv::imdecode(buf, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    throw InvalidArgument(what + ": undecodable image (" + e.what() + ")");
  }
  if (bgr.empty() || bgr.type() != CV_8UC3)
    throw InvalidArgument(what + ": undecodable " + std::string(h.format == ImageFormat::Jpeg ? "JPEG" : "PNG") +
                          " data (" + std::to_string(data.size()) + " bytes)");
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

cv::Mat fit_image(const cv::Mat& image, int width, int height) {
  if (image.cols == width && image.rows == height) return image;
  int cw = image.cols, ch = image.rows;
  if (static_cast<int64_t>(cw) * height > static_cast<int64_t>(ch) * width)
    cw = std::max(1, static_cast<int>(static_cast<int64_t>(ch) * width / height));
  else
    ch = std::max(1, static_cast<int>(static_cast<int64_t>(cw) * height / width));
  const cv::Mat src = image(cv::Rect((image.cols - cw) / 2, (image.rows - ch) / 2, cw, ch));
  cv::Mat out;
  const bool shrink = src.cols > width || src.rows > height;
  cv::resize(src, out, cv::Size(width, height), 0, 0, shrink ? cv::INTER_AREA : cv::INTER_LINEAR);
  return out;
}

namespace {
std::string encode(const cv::Mat& rgb, const char* ext, const std::vector<int>& params) {
  cv::Mat bgr;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  std::vector<uchar> out;
  if (!cv::imencode(ext, bgr, out, params)) throw Error(std::string("cannot encode a ") + ext + " image");
  return std::string(out.begin(), out.end());
}
}  // namespace

std::string encode_jpeg(const cv::Mat& rgb, int quality) { return encode(rgb, ".jpg", {cv::IMWRITE_JPEG_QUALITY, quality}); }
std::string encode_png(const cv::Mat& rgb) { return encode(rgb, ".png", {cv::IMWRITE_PNG_COMPRESSION, 3}); }

namespace {
constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string base64_decode(std::string_view t, const std::string& what) {
  if (t.substr(0, 5) == "data:") {
    const auto comma = t.find(',');
    if (comma == std::string_view::npos || t.substr(0, comma).find(";base64") == std::string_view::npos)
      throw InvalidArgument(what + ": a data: URL must be base64 (data:image/png;base64,...)");
    t.remove_prefix(comma + 1);
  }
  std::array<int, 256> val;
  val.fill(-1);
  for (int i = 0; i < 64; ++i) val[static_cast<unsigned char>(kB64[i])] = i;
  val['-'] = 62;  // base64url too
  val['_'] = 63;
  std::string out;
  out.reserve(t.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  bool padding = false;
  for (size_t i = 0; i < t.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(t[i]);
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      padding = true;
      continue;
    }
    if (val[c] < 0 || padding)
      throw InvalidArgument(what + ": invalid base64 at character " + std::to_string(i));
    acc = (acc << 6) | static_cast<uint32_t>(val[c]);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

std::string base64_encode(std::string_view b) {
  std::string out;
  out.reserve((b.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < b.size(); i += 3) {
    const uint32_t v = (static_cast<unsigned char>(b[i]) << 16) | (static_cast<unsigned char>(b[i + 1]) << 8) |
                       static_cast<unsigned char>(b[i + 2]);
    out += {kB64[v >> 18], kB64[(v >> 12) & 63], kB64[(v >> 6) & 63], kB64[v & 63]};
  }
  if (i + 1 == b.size()) {
    const uint32_t v = static_cast<unsigned char>(b[i]) << 16;
    out += {kB64[v >> 18], kB64[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == b.size()) {
    const uint32_t v = (static_cast<unsigned char>(b[i]) << 16) | (static_cast<unsigned char>(b[i + 1]) << 8);
    out += {kB64[v >> 18], kB64[(v >> 12) & 63], kB64[(v >> 6) & 63], '='};
  }
  return out;
}

}  // namespace sd::server
