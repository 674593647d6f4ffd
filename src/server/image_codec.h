#pragma once
// Images crossing the server's boundary: JPEG frames on the WebSocket, JPEG/PNG (base64) into the HTTP API, PNG out.
//
// What is accepted: JPEG (baseline or progressive) and PNG, 3-channel colour or grey (decoded to RGB), any size from
// 8x8 up to kMaxImageSide pixels per side. The dimensions are read from the file header BEFORE decoding, so a crafted
// header cannot make the decoder allocate gigabytes. A frame of any accepted size is centre-cropped to the stream's
// aspect ratio and resized to the stream size (fit_image).
#include <cstdint>
#include <string>
#include <string_view>

#include <opencv2/core/mat.hpp>

namespace sd::server {

constexpr int kMaxImageSide = 4096;
constexpr int kMinImageSide = 8;

enum class ImageFormat { Unknown, Jpeg, Png };

struct ImageHeader {
  ImageFormat format = ImageFormat::Unknown;
  int width = 0, height = 0;
};

// Reads the format and size from the first bytes (JPEG SOFn marker, PNG IHDR). Throws sd::InvalidArgument naming
// what is wrong (not a JPEG/PNG, truncated header, size out of range).
ImageHeader probe_image(std::string_view data, const std::string& what);

// Decodes JPEG/PNG bytes to RGB 8UC3 after probe_image(); `allow_png` false accepts JPEG only (frames).
// Throws InvalidArgument for undecodable data.
cv::Mat decode_image(std::string_view data, bool allow_png, const std::string& what);

// Centre-crop to width:height, then resize to exactly width x height (RGB or BGR, any 8UC3).
cv::Mat fit_image(const cv::Mat& image, int width, int height);

// RGB 8UC3 -> encoded bytes.
std::string encode_jpeg(const cv::Mat& rgb, int quality = 85);
std::string encode_png(const cv::Mat& rgb);

// Standard base64 (RFC 4648, padding optional, whitespace ignored); a "data:...;base64," prefix is skipped.
// Throws InvalidArgument on any other character.
std::string base64_decode(std::string_view text, const std::string& what);
std::string base64_encode(std::string_view bytes);

}  // namespace sd::server
