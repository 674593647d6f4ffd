#pragma once
// Image tensors at the pipeline's boundary (spec §7.1, §7.3). Pixels are uint8 HWC RGB; the model side is NCHW
// float in [-1, 1]. Resizing is the caller's business (the CLI does it with OpenCV): here sizes must already match.
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace sd {

// Width and height must be positive multiples of 8 (the VAE downsamples by 8); InvalidArgument naming `what`.
void check_image_size(int64_t width, int64_t height, const char* what);

// uint8 [H, W, 3] (or [N, H, W, 3]) RGB -> float32 [N, 3, H, W] = (u8 / 255) * 2 - 1 (VaeImageProcessor).
// expect_height/expect_width > 0 are checked; a wrong dtype, rank, channel count or size throws InvalidArgument
// naming the expected shape.
torch::Tensor image_to_tensor(const torch::Tensor& hwc_u8, int64_t expect_height = 0, int64_t expect_width = 0);

// image_to_tensor onto `device` in `dtype`, for frames: on CUDA the 8-bit pixels (a quarter of the float bytes) go up
// from pinned host memory on a side stream and are converted there, and the CALLING thread waits for that stream, so
// a pre-processing thread's upload overlaps the model's kernels of the previous frame instead of queueing behind them
// on the model's stream; the result is marked as used by this device's default stream (the model threads' stream;
// the caching allocator then does not hand its memory out again before their work on it is done). The same values
// as image_to_tensor(...).to(device, dtype) (the conversion is exact in float32 either way); elsewhere that itself.
// Checks as image_to_tensor, before any copy.
torch::Tensor image_to_device_tensor(const torch::Tensor& hwc_u8, int64_t expect_height, int64_t expect_width,
                                     const c10::Device& device, c10::ScalarType dtype);

// Decoder output [N, 3, H, W] (any float dtype, ≈[-1, 1]) -> uint8 [N, H, W, 3] on the host:
// y = clamp(x / 2 + 0.5, 0, 1) in float32, then round-half-to-even(255 * y) (numpy's rounding).
torch::Tensor tensor_to_image(const torch::Tensor& nchw);

// tensor_to_image in two halves, for a model thread that runs ahead of the GPU. start_image_download() takes the
// output where it is: on CUDA it queues the conversion, and the copy of the 8-bit pixels into pinned host memory, on
// a side stream behind the work queued so far on the calling thread's stream (the frame that produced it), and
// returns at once; get(), on any thread, waits for that copy only, not for the frames the model thread queued since.
// Elsewhere the pixels are ready at once. The same values as tensor_to_image. `nchw` must not be written before get()
// returns (the stream's outputs are fresh tensors: nothing writes them again).
class ImageDownload {
 public:
  ImageDownload() = default;
  ImageDownload(torch::Tensor pixels, std::function<void()> wait) : pixels_(std::move(pixels)), wait_(std::move(wait)) {}
  // uint8 [N, H, W, 3] on the host (waits for the copy the first time).
  const torch::Tensor& get();

 private:
  torch::Tensor pixels_;
  std::function<void()> wait_;
};
ImageDownload start_image_download(const torch::Tensor& nchw);

}  // namespace sd
