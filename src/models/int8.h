#pragma once
// int8 convolutions and linear layers on the CPU (opt-in `--dtype int8`): weights int8 per output channel, activations
// uint8 per tensor, quantized dynamically (min/max of each call's input), products accumulated in int32 by oneDNN
// (VNNI / AMX-INT8) and written back in the input's dtype (bf16 or fp32) with the bias. Norms, softmax and every
// elementwise op stay in bf16/fp32: only the matrix products change.
//
// The kernels are libtorch's `onednn::qconv_prepack / qconv2d_pointwise / qlinear_prepack / qlinear_pointwise`
// operators (libtorch 2.1+, the ones PyTorch's own x86 int8 inference lowers to). They are looked up by name at run
// time, so the code builds against any libtorch; where they are missing (Debian's 1.13) int8_support() says why.
#include <string>

#include <torch/torch.h>

namespace sd::int8 {

// "" when the int8 kernels are usable here, else why not (libtorch without the oneDNN int8 operators, or a CPU
// without VNNI where int8 runs slower than the float path).
std::string unavailable_reason();
inline bool available() { return unavailable_reason().empty(); }

// Per-tensor asymmetric uint8 quantization of an activation: q = clamp(round(x / scale) + zero_point, 0, 255),
// with [min(x, 0), max(x, 0)] mapped onto [0, 255] (0 exactly representable, as oneDNN's zero points require).
struct QuantizedActivation {
  torch::Tensor q;  // uint8, x's shape and memory format
  double scale = 1;
  int64_t zero_point = 0;
};
// x: contiguous (in any memory format) bf16 or fp32 on the CPU. One pass for min/max, one for the codes.
QuantizedActivation quantize_activation(const torch::Tensor& x);

// Symmetric int8 weights per output channel (dimension 0): w ≈ q * scale[o], |q| <= 127.
struct QuantizedWeight {
  torch::Tensor q;      // int8, w's shape
  torch::Tensor scale;  // fp32 [out]
};
QuantizedWeight quantize_weight(const torch::Tensor& w);

// A convolution / linear layer's int8 form: the oneDNN-packed weight, its scales, and the bias in fp32.
struct PackedConv {
  torch::Tensor packed, scale, zero_point, bias;
  int64_t stride = 1, padding = 0;
};
PackedConv pack_conv(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride, int64_t padding);
// x [B, in, H, W] bf16/fp32 -> [B, out, H', W'] in x's dtype.
torch::Tensor conv2d(const torch::Tensor& x, const PackedConv& w);

struct PackedLinear {
  torch::Tensor packed, scale, zero_point, bias;
  int64_t in_features = 0, out_features = 0;
};
PackedLinear pack_linear(const torch::Tensor& weight, const torch::Tensor& bias);
// x [..., in] -> [..., out] in x's dtype.
torch::Tensor linear(const torch::Tensor& x, const PackedLinear& w);

}  // namespace sd::int8
