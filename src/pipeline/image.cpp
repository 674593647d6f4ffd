#include "pipeline/image.h"

#include <torch/torch.h>

#include "core/error.h"
#include "core/shape_str.h"
#include "core/side_stream.h"

#if SD_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {

void check_image_size(int64_t width, int64_t height, const char* what) {
  if (width <= 0 || height <= 0 || width % 8 != 0 || height % 8 != 0)
    throw InvalidArgument(std::string(what) + ": size " + std::to_string(width) + "x" + std::to_string(height) +
                          " is not supported; width and height must be positive multiples of 8 (the VAE works on "
                          "8x8 pixel blocks), e.g. 512x512");
}

namespace {

// The checks of image_to_tensor; returns the [N, H, W, 3] view.
torch::Tensor checked_nhwc(const torch::Tensor& img, int64_t expect_height, int64_t expect_width) {
  const std::string expected =
      "expected uint8 RGB pixels of shape [H, W, 3] or [N, H, W, 3]" +
      (expect_height > 0 ? " with H=" + std::to_string(expect_height) + ", W=" + std::to_string(expect_width) : "");
  if (img.scalar_type() != torch::kUInt8)
    throw InvalidArgument("image has dtype " + std::string(c10::toString(img.scalar_type())) + "; " + expected);
  if (img.dim() != 3 && img.dim() != 4)
    throw InvalidArgument("image has shape " + shape_str(img.sizes()) + "; " + expected);
  const torch::Tensor nhwc = img.dim() == 3 ? img.unsqueeze(0) : img;
  if (nhwc.size(3) != 3)
    throw InvalidArgument("image has " + std::to_string(nhwc.size(3)) + " channels (shape " +
                          shape_str(img.sizes()) + "); " + expected + " (convert gray/RGBA to RGB first)");
  if (expect_height > 0 && (nhwc.size(1) != expect_height || nhwc.size(2) != expect_width))
    throw InvalidArgument("image is " + std::to_string(nhwc.size(2)) + "x" + std::to_string(nhwc.size(1)) +
                          " (WxH) but the stream works at " + std::to_string(expect_width) + "x" +
                          std::to_string(expect_height) + "; " + expected);
  return nhwc;
}

torch::Tensor convert(const torch::Tensor& nhwc) {
  torch::NoGradGuard no_grad;
  // Same float32 ops as VaeImageProcessor: u8 / 255, then 2 * v - 1.
  torch::Tensor v = nhwc.to(torch::kFloat32).div(255.0).permute({0, 3, 1, 2}).contiguous();
  return v * 2.0 - 1.0;
}

}  // namespace

torch::Tensor image_to_tensor(const torch::Tensor& img, int64_t expect_height, int64_t expect_width) {
  return convert(checked_nhwc(img, expect_height, expect_width));
}

torch::Tensor image_to_device_tensor(const torch::Tensor& img, int64_t expect_height, int64_t expect_width,
                                     const c10::Device& device, c10::ScalarType dtype) {
  const torch::Tensor nhwc = checked_nhwc(img, expect_height, expect_width);
#if SD_WITH_CUDA
  if (device.is_cuda()) {
    torch::NoGradGuard no_grad;
    const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
    torch::Tensor out;
    // Not behind the frames queued on the model's stream: the pixels are complete on the host.
    run_on_side_stream(c10::Device(c10::kCUDA, index), /*after_current=*/false, [&] {
      torch::Tensor src = nhwc;
      if (src.is_cpu() && !src.is_pinned()) src = src.contiguous().pin_memory();
      out = convert(src.to(c10::Device(c10::kCUDA, index), /*non_blocking=*/true)).to(dtype);
    });
    out.record_stream(c10::cuda::getDefaultCUDAStream(index));
    return out;
  }
#endif
  return convert(nhwc).to(device, dtype);
}

namespace {

void check_decoded(const torch::Tensor& x) {
  if (x.dim() != 4 || x.size(1) != 3 || !x.is_floating_point())
    throw InvalidArgument("decoded image has shape " + shape_str(x.sizes()) + " and dtype " +
                          c10::toString(x.scalar_type()) + "; expected a float tensor [N, 3, H, W]");
}

// [N, 3, H, W] float -> uint8 [N, H, W, 3], where x is.
torch::Tensor to_pixels(const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  const torch::Tensor y = (x.detach().to(torch::kFloat32) / 2.0 + 0.5).clamp(0.0, 1.0);
  // torch::round is round-half-to-even, like numpy's .round().
  return (y * 255.0).round().to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
}

}  // namespace

torch::Tensor tensor_to_image(const torch::Tensor& x) {
  check_decoded(x);
  // Converted where the image is (on a GPU: there), so only the 8-bit pixels cross to the host.
  if (x.is_cuda()) return start_image_download(x).get();
  return to_pixels(x).to(torch::kCPU);
}

const torch::Tensor& ImageDownload::get() {
  if (wait_) {
    wait_();
    wait_ = nullptr;
  }
  return pixels_;
}

ImageDownload start_image_download(const torch::Tensor& x) {
  check_decoded(x);
#if SD_WITH_CUDA
  if (x.is_cuda()) {
    torch::NoGradGuard no_grad;
    torch::Tensor host;
    // After the frame's work so far on this thread's stream; the wait is get()'s.
    auto wait = queue_on_side_stream(x.device(), /*after_current=*/true, [&] {
      const torch::Tensor u8 = to_pixels(x);
      host = torch::empty(u8.sizes(), u8.options().device(torch::kCPU).pinned_memory(true));
      host.copy_(u8, /*non_blocking=*/true);
      // x was made on the model's stream: its memory is not handed out again before this side stream has read it.
      x.record_stream(c10::cuda::getCurrentCUDAStream(x.device().index()));
    });
    return ImageDownload(std::move(host), std::move(wait));
  }
#endif
  return ImageDownload(to_pixels(x).to(torch::kCPU), nullptr);
}

}  // namespace sd
