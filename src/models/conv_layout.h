#pragma once
// Memory layout of the convolution models' activations: channels-last (NHWC) or NCHW.
//
// CUDA: channels-last (NHWC) weights make cuDNN pick its NHWC kernels (a convolution's output follows its weight's
// format) and the transformer blocks' [B, HW, C] views free. Measured on an H200 (scripts/gpu-check.sh, 512 px random
// sd-turbo, 1 step, fp16, CUDA graphs): txt2img 82.8 -> 107.8 fps, img2img 67.7 -> 89.0 fps, TAESD decode 2.3 -> 1.6 ms.
// The AutoencoderKL measured slower in channels-last (decode 25.2 -> 29.9 ms), so only the UNet and TAESD use it.
// SD_CUDA_CHANNELS_LAST=0 turns it off (for comparison).
//
// CPU: the autoencoders (TAESD, AutoencoderKL) keep NCHW weights and pick the activations' layout by their dtype at
// each call (cpu_channels_last); the UNet runs NCHW on its prepacked oneDNN weights either way.
#include <c10/core/ScalarType.h>

namespace sd::nn {

bool cuda_channels_last();

// Whether the autoencoders' activations of `dtype` run channels-last on the CPU. fp32 on libtorch 1.13 runs NCHW: its
// oneDNN 2.6 NHWC convolutions measured x1.4-1.5 slower than NCHW ones (Zen 2, AVX2, 2 threads, 256 px sd-turbo: TAESD
// decode 0.27 -> 0.19 s, AutoencoderKL decode 5.1 -> 3.3 s); on libtorch 2 both layouts measured alike, and bf16 ran
// faster channels-last where it was first measured, so those keep channels-last. The bench times the other layout
// beside the default (variants "... channels-last" / "... NCHW"). SD_CPU_CHANNELS_LAST=1|0 forces one layout.
bool cpu_channels_last(c10::ScalarType dtype);
// Forces the CPU layout for every dtype (1 channels-last, 0 NCHW) or restores the rule above (-1); returns the
// previous setting. For comparisons (the bench); autoencoders given a layout explicitly keep theirs.
int set_cpu_channels_last(int mode);
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
