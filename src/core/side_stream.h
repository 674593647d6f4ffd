#pragma once
// Small device work off the calling thread's CUDA stream.
//
// A model thread that runs ahead of the GPU has the previous frame's kernels queued on its stream. Work that reads
// only tensors already complete (an input image_to_device_tensor uploaded and waited for) need not queue behind them:
// run_on_side_stream runs it on a side stream and waits for that stream only. The similarity filter's cosine and the
// frame upload use it, so deciding about frame N does not wait for frame N-1 to finish.
#include <functional>

#include <c10/core/Device.h>

namespace sd {

// On a CUDA device: fn runs with a side stream of that device current (from PyTorch's pool), after the work queued
// so far on the calling thread's current stream when `after_current` (for inputs that work may still be writing),
// and the host then waits for the side stream: what fn computed is complete on return, and nothing of it is left
// queued. Elsewhere (CPU, builds without CUDA) fn runs as it is.
void run_on_side_stream(const c10::Device& device, bool after_current, const std::function<void()>& fn);

}  // namespace sd
