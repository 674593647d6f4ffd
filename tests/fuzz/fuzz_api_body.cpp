// HTTP API request bodies of `serve` (POST /api/txt2img and /api/img2img, server/api_request.h): everything done on
// the network thread before the model work is scheduled (JSON, size, settings, image decode + fit, control images).
// The first input byte picks the endpoint. Every input must either be accepted with invariants that hold or throw
// sd::InvalidArgument (a 400 answer).
#include <cstdint>

#include <torch/torch.h>

#include "fuzz_server_defaults.h"
#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "server/api_request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const sd::server::StreamDefaults d = sd::fuzz::server_defaults();
  const bool txt2img = data[0] & 1;
  try {
    const auto b = sd::server::parse_api_body(txt2img, sd::fuzz::bytes(data + 1, size - 1), d, 8);
    bool ok = b.width >= 8 && b.height >= 8 && b.width % 8 == 0 && b.height % 8 == 0 && b.width <= d.max_width &&
              b.height <= d.max_height && b.defaults.img2img.width == b.width &&
              b.defaults.txt2img.height == b.height && b.settings.txt2img == txt2img &&
              b.control.size() == d.controlnets.size();
    if (!txt2img)
      ok = ok && b.image.type() == CV_8UC3 && b.image.cols == b.width && b.image.rows == b.height &&
           b.image.isContinuous();
    for (size_t i = 0; i < b.control.size(); ++i)
      if (b.control[i].defined())
        ok = ok && b.control[i].dim() == 3 && b.control[i].size(0) == b.height && b.control[i].size(1) == b.width &&
             b.control[i].size(2) == 3;
    if (!ok) {
      std::fprintf(stderr, "accepted request breaks an invariant (%lldx%lld)\n", static_cast<long long>(b.width),
                   static_cast<long long>(b.height));
      std::abort();
    }
    sd::fuzz::check_settings(b.settings, b.defaults);
  } catch (const sd::InvalidArgument&) {
  }
  return 0;
}
