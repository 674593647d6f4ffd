#include "core/side_stream.h"

#include <ATen/ATen.h>

#if SD_WITH_CUDA
#include <c10/core/Event.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {

std::function<void()> queue_on_side_stream(const c10::Device& device, bool after_current,
                                           const std::function<void()>& fn) {
#if SD_WITH_CUDA
  if (device.is_cuda()) {
    const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
    if (after_current) {
      c10::Event queued(c10::DeviceType::CUDA);
      queued.record(c10::cuda::getCurrentCUDAStream(index));
      queued.block(side);
    }
    try {
      c10::cuda::CUDAStreamGuard guard(side);
      fn();
    } catch (...) {
      side.synchronize();  // nothing of it left queued
      throw;
    }
    auto done = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
    done->record(side);
    return [done] { done->synchronize(); };
  }
#endif
  (void)device;
  (void)after_current;
  fn();
  return nullptr;
}

void run_on_side_stream(const c10::Device& device, bool after_current, const std::function<void()>& fn) {
  if (const auto wait = queue_on_side_stream(device, after_current, fn)) wait();
}

at::Tensor complete_on_side_stream(const c10::Device& device, const std::function<at::Tensor()>& fn) {
#if SD_WITH_CUDA
  if (device.is_cuda()) {
    const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
    const c10::cuda::CUDAStream consumer = c10::cuda::getCurrentCUDAStream(index);
    at::Tensor out;
    run_on_side_stream(device, /*after_current=*/false, [&] { out = fn(); });
    // Made on the side stream, read on the caller's: its memory must not be handed out again before that is done.
    if (out.defined() && out.is_cuda()) out.record_stream(consumer);
    return out;
  }
#endif
  (void)device;
  return fn();
}

at::Tensor to_device_nonblocking(const at::Tensor& x, const c10::Device& device, c10::ScalarType dtype) {
  if (device.is_cuda() && x.is_cpu()) {
    // Always a fresh staging buffer: pin_memory() of a tensor already pinned would be the caller's own buffer, which
    // the copy may still read after this returns (a capture ring reusing its pinned frames).
    at::Tensor staged = at::empty(x.sizes(), x.options().pinned_memory(true));
    staged.copy_(x);
    return staged.to(device, /*non_blocking=*/true).to(dtype);
  }
  return x.to(device, dtype);
}

}  // namespace sd
