#pragma once
// Small device work off the calling thread's CUDA stream.
//
// A model thread that runs ahead of the GPU has the previous frame's kernels queued on its stream. Work that reads
// only tensors already complete (an input image_to_device_tensor uploaded and waited for) need not queue behind them:
// run_on_side_stream runs it on a side stream and waits for that stream only. The similarity filter's cosine and the
// frame upload use it, so deciding about frame N does not wait for frame N-1 to finish. Host tensors that a frame
// needs (an img2img frame from a library caller, txt2img's fresh noise) go up with to_device_nonblocking, or, where
// the filter compares the frame at once, on a side stream (complete_on_side_stream).
#include <functional>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace sd {

// On a CUDA device: fn runs with a side stream of that device current (from PyTorch's pool), after the work queued
// so far on the calling thread's current stream when `after_current` (for inputs that work may still be writing),
// and the host then waits for the side stream: what fn computed is complete on return, and nothing of it is left
// queued (also when fn throws). Side streams come from PyTorch's low-priority pool; CUDA-graph captures
// (core/cuda_graph) take theirs from the high-priority pool, so a side stream is never a stream under capture.
// Elsewhere (CPU, builds without CUDA) fn runs as it is.
void run_on_side_stream(const c10::Device& device, bool after_current, const std::function<void()>& fn);
// The same without the wait: returns what waits for fn's work (null where fn ran as it is), for a thread that hands
// the wait to another (start_image_download). When fn throws, its queued work is waited for before the rethrow.
std::function<void()> queue_on_side_stream(const c10::Device& device, bool after_current,
                                           const std::function<void()>& fn);

// A tensor made by fn on a side stream, not behind the work queued on the calling thread's stream (fn must read only
// tensors complete already: host memory, frames waited for), and waited for: complete on return, and marked in use by
// the calling thread's current stream for the caching allocator. For an input the similarity filter is about to
// compare (a host frame's upload, the runtime's cat of several frames), so that its decision waits for this work
// only, not for the previous frames' kernels. Elsewhere fn() as it is.
at::Tensor complete_on_side_stream(const c10::Device& device, const std::function<at::Tensor()>& fn);

// x.to(device, dtype) without a host wait for a host tensor going to a CUDA device: staged in pinned memory (always a
// fresh buffer, so the caller may reuse x at once, pinned or not) and copied non-blocking on the calling thread's
// stream (PyTorch's pinned-memory allocator keeps the staging buffer until the copy is done), then converted there. A blocking copy would wait for every kernel queued before it - the previous
// frames' - on each call that brings a frame or fresh noise from the host. The same values as x.to(device, dtype);
// anything else is exactly that.
at::Tensor to_device_nonblocking(const at::Tensor& x, const c10::Device& device, c10::ScalarType dtype);

}  // namespace sd
