#pragma once
// Memory layout of the convolution models on CUDA. Channels-last (NHWC) weights make cuDNN pick its NHWC kernels
// (a convolution's output follows its weight's format) and the transformer blocks' [B, HW, C] views free. Measured on
// an H200 (scripts/gpu-check.sh, 512 px random sd-turbo, 1 step, fp16, CUDA graphs): txt2img 82.8 -> 107.8 fps,
// img2img 67.7 -> 89.0 fps, TAESD decode 2.3 -> 1.6 ms. The AutoencoderKL measured slower in channels-last (decode
// 25.2 -> 29.9 ms), so only the UNet and TAESD use it. SD_CUDA_CHANNELS_LAST=0 turns it off (for comparison).
namespace sd::nn {

bool cuda_channels_last();

}  // namespace sd::nn
