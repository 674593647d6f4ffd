#include "server/api_request.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>

#include <torch/torch.h>

#include "core/json_limits.h"
#include "core/error.h"
#include "runtime/control_preprocessor.h"
#include "server/image_codec.h"

namespace sd::server {

torch::Tensor mat_tensor(const cv::Mat& rgb) {
  const cv::Mat m = rgb.isContinuous() ? rgb : rgb.clone();
  return torch::from_blob(m.data, {m.rows, m.cols, 3}, torch::kUInt8).clone();
}

namespace {

// The control image of each ControlNet for one request (empty where it does not run: scale 0 or no step in its
// range; skipped, it needs none): the
// static control_image, else the preprocessed input image; `feedback` has no previous output in a one-shot request,
// so it gets what a stream's first frame gets (the input image, black in txt2img). Made here, on the network thread.
std::vector<torch::Tensor> request_control_images(const StreamSettings& s, const cv::Mat& image, bool txt2img,
                                                  int width, int height) {
  std::vector<torch::Tensor> out(s.controlnets.size());
  for (size_t i = 0; i < s.controlnets.size(); ++i) {
    const ControlSetting& c = s.controlnets[i];
    if (!c.runs(s.t_index_list.size())) continue;
    if (!s.control_image.empty()) {
      out[i] = mat_tensor(s.control_image);
      continue;
    }
    const auto pre = make_control_preprocessor(c.preprocessor);
    if (pre->feedback()) {
      out[i] = txt2img ? torch::zeros({height, width, 3}, torch::kUInt8) : mat_tensor(image);
    } else if (txt2img) {
      throw InvalidArgument("controlnets[" + std::to_string(i) + "] (preprocessor " + c.preprocessor +
                            ") has no input image to preprocess: give 'control_image' (base64 JPEG/PNG), or set "
                            "controlnets[" + std::to_string(i) + "].scale to 0");
    } else {
      out[i] = pre->apply(mat_tensor(image)).contiguous();
    }
  }
  return out;
}

// The output size of one request: "width" / "height" (each optional: the server's size), positive multiples of
// `step` (what the stream needs: 8 and the VAE's scale factor) up to the server's --max-size. InvalidArgument naming
// the field and what it expects.
std::pair<int64_t, int64_t> request_size(const nlohmann::json& j, const StreamDefaults& d, int64_t step) {
  const int64_t max_w = d.max_width > 0 ? d.max_width : d.img2img.width;
  const int64_t max_h = d.max_height > 0 ? d.max_height : d.img2img.height;
  auto side = [&](const char* key, int64_t fallback, int64_t max) {
    if (!j.contains(key)) return fallback;
    const auto& v = j.at(key);
    const int64_t hi = max / step * step;
    const std::string expected = "expected an integer multiple of " + std::to_string(step) + " in [" +
                                 std::to_string(step) + ", " + std::to_string(hi) + "] (the server's --max-size is " +
                                 std::to_string(max_w) + "x" + std::to_string(max_h) + ")";
    const bool integral =
        v.is_number_integer() || (v.is_number_float() && std::isfinite(v.get<double>()) &&
                                  std::floor(v.get<double>()) == v.get<double>() && std::abs(v.get<double>()) < 1e9);
    if (!integral) throw InvalidArgument(std::string("field '") + key + "': " + expected + ", got " + json_excerpt(v));
    int64_t x = 0;
    if (v.is_number_unsigned())
      x = static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), static_cast<uint64_t>(INT64_MAX)));
    else if (v.is_number_integer())
      x = v.get<int64_t>();
    else
      x = static_cast<int64_t>(v.get<double>());  // integral and small, checked above
    if (x < step || x > max || x % step != 0)
      throw InvalidArgument(std::string("field '") + key + "': " + expected + ", got " + json_excerpt(v));
    return x;
  };
  return {side("width", d.img2img.width, max_w), side("height", d.img2img.height, max_h)};
}

}  // namespace

ApiBody parse_api_body(bool txt2img, const std::string& body, const StreamDefaults& server, int64_t size_step) {
  ApiBody out;
  out.defaults = server;
  nlohmann::json j;
  if (std::string why = json_depth_problem(body); !why.empty()) throw InvalidArgument("bad JSON: " + why);
  try {
    j = nlohmann::json::parse(body);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw InvalidArgument(std::string("bad JSON: ") + e.what());
  }
  if (!j.is_object()) throw InvalidArgument("expected a JSON object, got " + std::string(j.type_name()));
  const auto [width, height] = request_size(j, server, size_step);
  out.width = width;
  out.height = height;
  StreamDefaults& defaults = out.defaults;  // at this request's size
  defaults.img2img.width = defaults.txt2img.width = width;
  defaults.img2img.height = defaults.txt2img.height = height;
  std::set<std::string> skip{"width", "height"};
  if (!txt2img) skip.insert("image");
  out.settings = apply_settings_json(j, StreamSettings::defaults(defaults, txt2img), defaults, skip, false);
  if (!txt2img) {
    if (!j.contains("image") || !j["image"].is_string())
      throw InvalidArgument("field 'image': expected a base64 JPEG or PNG string");
    const std::string bytes = base64_decode(j["image"].get_ref<const std::string&>(), "field 'image'");
    out.image =
        fit_image(decode_image(bytes, true, "field 'image'"), static_cast<int>(width), static_cast<int>(height));
    if (!out.image.isContinuous()) out.image = out.image.clone();
  }
  out.control =
      request_control_images(out.settings, out.image, txt2img, static_cast<int>(width), static_cast<int>(height));
  return out;
}

}  // namespace sd::server
