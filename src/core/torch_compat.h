#pragma once
// The libtorch API differences between the builds we keep compiling (Debian's 1.13, PyPI's 2.x: see
// scripts/fetch-libtorch2.sh), in one place. Code elsewhere calls these instead of testing versions itself.
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include <torch/torch.h>
#include <torch/version.h>

namespace sd::compat {

// libtorch 2's scaled_dot_product_attention (fused, never materialises the score matrix); 1.13 has none. A macro:
// the code that calls it must not be compiled against 1.13.
#define SD_HAS_SDPA (TORCH_VERSION_MAJOR >= 2)
// libtorch 2's CPU group norm on bf16 input keeps fp32 statistics (mixed-type kernels); 1.13's accumulates in bf16.
#define SD_HAS_MIXED_GROUP_NORM (TORCH_VERSION_MAJOR >= 2)
// libtorch 2's oneDNN runs fp32 channels-last (NHWC) convolutions on the CPU faster than NCHW ones; 1.13's (oneDNN
// 2.6) measured x1.4-1.7 slower than NCHW on AVX2 (models/conv_layout.h).
#define SD_HAS_FAST_CPU_NHWC_FP32 (TORCH_VERSION_MAJOR >= 2)
// CUDA's upsample_nearest2d takes bf16 from torch 2.1 (fp16 always); before, bf16 goes through an exact fp32 copy.
#define SD_HAS_CUDA_BF16_UPSAMPLE (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1))
// c10::Event::elapsedTime (timing events on any backend) is in the 2.x releases from 2.5; before, only ATen's
// CUDAEvent times, and its header needs the CUDA toolkit's.
#define SD_HAS_EVENT_TIMING (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5))
// AOTInductor's model packages (torch::inductor::AOTIModelPackageLoader with load_constants(..., user_managed) and
// load_metadata_from_package): models/compiled_unet.h. Checked against the 2.11 and 2.15 headers; older 2.x releases
// differ in these calls, so they are left out.
#if (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)) && \
    __has_include(<torch/csrc/inductor/aoti_package/model_package_loader.h>)
#define SD_HAS_AOTI 1
#else
#define SD_HAS_AOTI 0
#endif

// The key of parameter `p` in torch::optim::Optimizer::state(): a string of its TensorImpl's address up to some 2.x
// release, the address itself after (the map's key type says which).
// (A template, so that only the matching branch is compiled.)
template <class Optimizer>
auto optimizer_state_key(const Optimizer& opt, const at::Tensor& p) {
  using Key = typename std::decay_t<decltype(opt.state())>::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream o;  // what 1.13's c10::guts::to_string(TensorImpl*) writes: the address
    o << static_cast<const void*>(p.unsafeGetTensorImpl());
    return o.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

}  // namespace sd::compat
