#pragma once
// Memory layout of the convolution models on CUDA. Channels-last (NHWC) weights make cuDNN pick its NHWC kernels
// (a convolution's output follows its weight's format) and the transformer blocks' [B, HW, C] views free. Measured on
// an H200 (scripts/gpu-check.sh, 512 px random sd-turbo, 1 step, fp16, CUDA graphs): txt2img 82.8 -> 107.8 fps,
// img2img 67.7 -> 89.0 fps, TAESD decode 2.3 -> 1.6 ms. The AutoencoderKL measured slower in channels-last (decode
// 25.2 -> 29.9 ms), so only the UNet and TAESD use it. SD_CUDA_CHANNELS_LAST=0 turns it off (for comparison).
namespace sd::nn {

bool cuda_channels_last();

// cuDNN's fused convolution + bias (+ residual) + ReLU for the ReLU-ending convolutions of TAESD on CUDA (conv_add_relu
// in layers.h): one kernel where the eager path runs the convolution, the bias add, the residual add and the ReLU each
// as its own pass over the activations (32 MB each for TAESD at 512 px in fp16). On unless SD_CUDA_FUSED_CONV=0;
// set_cuda_fused_conv() switches it while running (the bench times both). It turns itself off, with a warning, when
// cuDNN refuses a fused call or the first fused result of a dtype differs from the eager one.
bool cuda_fused_conv();
void set_cuda_fused_conv(bool on);

}  // namespace sd::nn
