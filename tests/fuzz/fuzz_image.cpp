// Images as `serve` takes them (server/image_codec.h): base64 / data: URL text (HTTP API, settings images) or raw
// bytes (WebSocket frames), the JPEG / PNG header check, the decode and the fit to the stream size. The first input
// byte picks the path and the target size. Every input must either decode to an RGB image of the size its header
// announced (the header check is what bounds the decoder's allocation) or throw sd::InvalidArgument.
#include <cstdint>

#include <opencv2/core.hpp>

#include "fuzz_util.h"
#include "server/image_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const int kSizes[][2] = {{64, 64}, {8, 8}, {96, 32}, {24, 136}};
  const uint8_t mode = data[0];
  const bool base64 = mode & 1, allow_png = mode & 2;
  const int w = kSizes[(mode >> 2) & 3][0], h = kSizes[(mode >> 2) & 3][1];
  std::string input = sd::fuzz::bytes(data + 1, size - 1);
  try {
    if (base64) input = sd::server::base64_decode(input, "field 'image'");
    const auto header = sd::server::probe_image(input, "frame");
    // Speed: a header announcing up to 4096 x 4096 px is accepted, and the (uninstrumented) decoder then fills that
    // many pixels even from a few bytes (~0.1 s). The decode and its size check are the same at any size, so
    // inputs above 256 x 256 px stop after the header check.
    if (static_cast<int64_t>(header.width) * header.height > 256 * 256) return 0;
    const cv::Mat rgb = sd::server::decode_image(input, allow_png, "frame");
    if (rgb.type() != CV_8UC3 || rgb.cols != header.width || rgb.rows != header.height) {
      std::fprintf(stderr, "decoded %dx%d (type %d), the header said %dx%d\n", rgb.cols, rgb.rows, rgb.type(),
                   header.width, header.height);
      std::abort();
    }
    const cv::Mat fitted = sd::server::fit_image(rgb, w, h);
    if (fitted.cols != w || fitted.rows != h || fitted.type() != CV_8UC3) std::abort();
  } catch (const sd::InvalidArgument&) {
  }
  return 0;
}
