#pragma once
// The body of an HTTP API image request (POST /api/txt2img, /api/img2img; see api_handlers.h), parsed and checked on
// the network thread before any model work is scheduled. The fuzz target calls this too.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/core/mat.hpp>
#include <torch/types.h>

#include "server/stream_settings.h"

namespace sd::server {

struct ApiBody {
  StreamDefaults defaults;  // the server's defaults at this request's size
  StreamSettings settings;
  int64_t width = 0, height = 0;
  cv::Mat image;                       // img2img: the input image, fitted to width x height (RGB, continuous)
  std::vector<torch::Tensor> control;  // one per ControlNet: its control image (undefined where it does not run)
};

// Throws sd::InvalidArgument naming the field and what was expected (bad JSON, unknown field, bad size or image).
// `size_step`: what width / height must be multiples of (8 and the VAE's scale factor).
ApiBody parse_api_body(bool txt2img, const std::string& body, const StreamDefaults& server, int64_t size_step);

// An RGB 8UC3 image as a [H, W, 3] uint8 tensor (a copy).
torch::Tensor mat_tensor(const cv::Mat& rgb);

}  // namespace sd::server
