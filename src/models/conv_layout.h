#pragma once
// Memory layout of the convolution models' activations: channels-last (NHWC) or NCHW.
//
// CUDA: channels-last (NHWC) weights make cuDNN pick its NHWC kernels (a convolution's output follows its weight's
// format) and the transformer blocks' [B, HW, C] views free. Measured on an H200 (scripts/gpu-check.sh, 512 px random
// sd-turbo, 1 step, fp16, CUDA graphs): txt2img 82.8 -> 107.8 fps, img2img 67.7 -> 89.0 fps, TAESD decode 2.3 -> 1.6
// ms. The AutoencoderKL measured slower in channels-last (decode 25.2 -> 29.9 ms), so only the UNet and TAESD use it.
// SD_CUDA_CHANNELS_LAST=0 turns it off (for comparison).
//
// CPU: the autoencoders (TAESD, AutoencoderKL) keep NCHW weights and pick the activations' layout by their dtype at
// each call (cpu_channels_last); the UNet runs NCHW on its prepacked oneDNN weights either way.
#include <optional>

#include <c10/core/ScalarType.h>

namespace sd::nn {

// CUDA: the UNet and TAESD store their 4-d weights channels-last at load (on unless SD_CUDA_CHANNELS_LAST=0).
bool cuda_channels_last();

// Whether the autoencoders' activations of `dtype` run channels-last on the CPU. fp32 on libtorch 1.13 runs NCHW: its
// oneDNN 2.6 NHWC convolutions measured x1.4-1.7 slower than NCHW ones (Zen 2, AVX2, 2 threads, sd-turbo 512 px:
// TAESD decode 1.29 -> 0.92 s, AutoencoderKL decode 23.4 -> 13.7 s; x1.2-1.5 on 1 thread). On libtorch 2 it is the
// other way round (same machine: TAESD decode 0.92 -> 0.77 s channels-last, AutoencoderKL 13.7 -> 13.2 s), and bf16
// ran faster channels-last where it was first measured, so those run channels-last. The bench times the other layout
// beside the default (variants "... channels-last" / "... NCHW"). SD_CPU_CHANNELS_LAST=1|0 forces one layout.
bool cpu_channels_last(c10::ScalarType dtype);
// Forces the CPU layout for every dtype (1 channels-last, 0 NCHW) or restores the rule above (-1); returns the
// previous setting. For comparisons (the bench); autoencoders given a layout explicitly keep theirs.
int set_cpu_channels_last(int mode);
// The layout an autoencoder runs a call of `dtype` in: its own (set_channels_last) where it has one, else
// cpu_channels_last(dtype) on the CPU and NCHW elsewhere.
inline bool autoencoder_channels_last(const std::optional<bool>& own, c10::ScalarType dtype, bool on_cpu) {
  if (own) return *own;
  return on_cpu && cpu_channels_last(dtype);
}
// set_cpu_channels_last(mode) for a scope, the previous setting restored at its end.
class ScopedCpuChannelsLast {
 public:
  explicit ScopedCpuChannelsLast(int mode) : saved_(set_cpu_channels_last(mode)) {}
  ~ScopedCpuChannelsLast() { set_cpu_channels_last(saved_); }
  ScopedCpuChannelsLast(const ScopedCpuChannelsLast&) = delete;
  ScopedCpuChannelsLast& operator=(const ScopedCpuChannelsLast&) = delete;

 private:
  int saved_;
};

// cuDNN's fused convolution + bias (+ residual) + ReLU for the ReLU-ending convolutions of TAESD on CUDA (conv_add_relu
// in layers.h): one kernel where the eager path runs the convolution, the bias add, the residual add and the ReLU each
// as its own pass over the activations (32 MB each for TAESD at 512 px in fp16). On unless SD_CUDA_FUSED_CONV=0;
// set_cuda_fused_conv() switches it while running (the bench times both). It turns itself off, with a warning, when
// cuDNN refuses a fused call or the first fused result of a dtype differs from the eager one.
bool cuda_fused_conv();
void set_cuda_fused_conv(bool on);

}  // namespace sd::nn
