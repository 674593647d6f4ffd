#include "core/side_stream.h"

#include <ATen/ATen.h>

#if SD_WITH_CUDA
#include <c10/core/Event.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {

void run_on_side_stream(const c10::Device& device, bool after_current, const std::function<void()>& fn) {
#if SD_WITH_CUDA
  if (device.is_cuda()) {
    const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
    if (after_current) {
      c10::Event queued(c10::DeviceType::CUDA);
      queued.record(c10::cuda::getCurrentCUDAStream(index));
      queued.block(side);
    }
    {
      c10::cuda::CUDAStreamGuard guard(side);
      fn();
    }
    side.synchronize();
    return;
  }
#endif
  (void)device;
  (void)after_current;
  fn();
}

at::Tensor to_device_nonblocking(const at::Tensor& x, const c10::Device& device, c10::ScalarType dtype) {
  if (device.is_cuda() && x.is_cpu())
    return x.contiguous().pin_memory().to(device, /*non_blocking=*/true).to(dtype);
  return x.to(device, dtype);
}

}  // namespace sd
