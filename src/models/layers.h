#pragma once
// Leaf layers with diffusers/transformers parameter names ("weight", "bias"). Parameters are created empty: every
// model's weights come from a file (or an explicit random init), so paying for libtorch's default initialisation of
// a billion parameters at construction would be waste.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "models/int8.h"

namespace sd::nn {

// Inference fast paths of the leaf layers (spec-neutral: same arithmetic, other kernels). On by default; the bench
// switches them off one at a time to show what each is worth.
struct FastPathOptions {
  bool prepack_conv = true;     // Conv2d::prepack() keeps a oneDNN-ordered copy of the weight (CPU)
  // Models loaded for CPU inference keep only the packed copy of each prepacked convolution weight (the dense one is
  // re-made from it, losslessly, when something reads it: release_dense()); off = keep both (read at load time)
  bool one_conv_copy = true;
  // CPU attention in the model dtype (bf16) unless the config asks to upcast; default: where oneDNN has bf16 kernels
  bool attention_reduced_cpu = true;
  // CPU attention in (head, query tile) tasks (attention_chunked; fp32 at every size, bf16 over large score
  // matrices); off = one bmm per chunk
  bool attention_tiles_cpu = true;
  // CPU fp32 linear layers across the intra-op threads where OpenBLAS is pinned to one (models/cpu_parallel.h); off =
  // one BLAS call on one thread (SD_LINEAR_THREADS=0)
  bool linear_threads = true;
  // Layers given an int8 copy (quantize_int8(), `--dtype int8`) compute with it; off = their float path
  bool int8 = true;
  // The autoencoders' CPU nearest-2x upsampling + 3x3 convolution as four 2x2 convolutions on the small input
  // (Conv2dImpl::forward_upsampled2x; their kernels cost 16/9 of those convolutions' weights in memory); off =
  // upsample, then convolve (SD_UPSAMPLE_PHASES=0)
  bool upsample_phases = true;
};
FastPathOptions& fast_path();

// x [..., in] times weight [out, in] (+ bias [out]) as the engine's float linear layers run it: across the intra-op
// threads where fast_path().linear_threads and models/cpu_parallel.h apply, else torch's linear.
torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias);

// Which tensor a derived copy (int8, oneDNN-packed, four-phase kernels) was made from, to tell when it is stale. The
// tensor's storage is held weakly: its numbers are freed with the tensor, but the storage object stays, so no later
// storage (a weight set with set_data, whose data may land at the freed address) can look like it. Also compared:
// the data pointer, dtype, sizes and strides (another view of the same storage) and the in-place version (Inference
// tensors keep none: their in-place changes go unseen). Not thread-safe: layers use it under their lock.
class MadeFrom {
 public:
  void set(const torch::Tensor& t);
  void clear() { *this = MadeFrom(); }
  bool matches(const torch::Tensor& t) const;

 private:
  c10::weak_intrusive_ptr<c10::StorageImpl> storage_{c10::intrusive_ptr<c10::StorageImpl>()};
  const void* data_ = nullptr;
  int64_t version_ = -1;
  c10::ScalarType dtype_ = c10::ScalarType::Undefined;
  std::vector<int64_t> sizes_, strides_;
};

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias = true);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight, bias;  // [out, in], [out]
  int64_t in_features, out_features;

  // An int8 copy of the weight (per output channel) that forward() uses on the CPU, quantizing each input on the fly
  // (sd::int8). Re-made when the weight changes in place (a LoRA scale). Throws where int8 is unavailable.
  void quantize_int8();
  bool quantized() const { return int8_ != nullptr; }

 private:
  std::shared_ptr<sd::int8::PackedLinear> int8_;
  MadeFrom int8_from_;
};
TORCH_MODULE(Linear);

class Conv2dImpl : public torch::nn::Module {
 public:
  Conv2dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1, int64_t padding = 0, bool bias = true);
  torch::Tensor forward(const torch::Tensor& x);  // [B, in, H, W] -> [B, out, H', W']
  torch::Tensor weight, bias;                      // [out, in, k, k], [out]
  int64_t in_channels, out_channels, kernel_size, stride, padding;

  // oneDNN re-orders a plain weight into its blocked layout on every eager call (measured: 1280-channel 3x3 convs at
  // 8x8 run at 60 GFLOP/s fp32 eager vs 180 prepacked). prepack() does it once, for CPU inference in the weight's
  // dtype; the packed copy is used while the weight is unchanged (its version counter is checked) and no gradient
  // is wanted. Returns false where it does not apply (not CPU, no oneDNN, fp16, bf16 on a CPU without AVX-512).
  bool prepack();
  void unpack() {
    restore_dense();  // a released weight lives in the packed copy alone
    packed_ = torch::Tensor();
  }
  bool prepacked() const { return packed_.defined(); }
  // The packed copy exists and was made from the current weight (what forward() then reads).
  bool prepacked_current() const;
  // One copy instead of two: while the packed copy is current, the dense weight is swapped for an empty tensor of the
  // same dtype and device (so a reader that does not know shows a loud shape error, never stale numbers);
  // restore_dense() re-makes it from the packed copy (an exact reorder). forward() restores it itself where it needs
  // the dense weight (fast path off, another input dtype, autograd); LoRA fusion restores before reading.
  bool release_dense();
  void restore_dense();
  bool dense_released() const;
  // As Linear::quantize_int8; drops the float packed copy, which forward() then no longer reads.
  void quantize_int8();
  bool quantized() const { return int8_ != nullptr; }

  // forward(nearest_upsample_2x(x)): diffusers' Upsample2D and TAESD's decoder. For a 3x3, stride-1, padding-1
  // convolution on the CPU (fast_path().upsample_phases, no gradient wanted) it runs on x itself. An output pixel
  // of row parity a and column parity b sees a 2x2 window of x through its 3x3 window over the upsampled image,
  // the taps that land on the same x pixel summed: four 2x2 kernels, one per (a, b), made once from the weight
  // (sums in float64, rounded once to the weight's dtype) and run as one convolution with 4x the output channels,
  // whose four blocks are interleaved into the 2x-sized output. 16 multiply-adds instead of 36 per input pixel
  // and channel pair, and the 4x-sized upsampled image is never written. Elsewhere: upsample, then forward().
  torch::Tensor forward_upsampled2x(const torch::Tensor& x);
  // Whether the four-phase kernels exist and were made from the current weight (for tests).
  bool upsample_phases_current() const;

 private:
  // The four-phase convolution ([4 * out, in, 2, 2], padding 1; prepacked like this one), made on first use.
  std::shared_ptr<Conv2dImpl> phases_;
  // What they were made from: the dense weight, or the packed copy while the dense weight is released.
  MadeFrom phases_from_, phases_bias_from_;
  bool phases_from_packed_ = false;
  void make_upsample_phases();

  std::shared_ptr<sd::int8::PackedConv> int8_;
  MadeFrom int8_from_;
  torch::Tensor packed_;
  MadeFrom packed_from_;
  bool dense_released_ = false;
};
TORCH_MODULE(Conv2d);

// relu(conv(x) + bias [+ z]): TAESD's ReLU-ending convolutions (z: a block's residual, [B, out, H', W']). On CUDA with
// cuda_fused_conv() on, one cuDNN call (at::cudnn_convolution_relu / _add_relu); elsewhere conv(x), += z, ReLU in place.
torch::Tensor conv_add_relu(Conv2dImpl& conv, const torch::Tensor& x, const torch::Tensor& z = {});

// The input of a nearest-neighbour upsampling on CUDA: NCHW from 64 rows up, where the NHWC kernel has failed
// (diffusers' Upsample2D workaround, huggingface/diffusers#984); `x` itself below.
torch::Tensor cuda_upsample_input(const torch::Tensor& x);

// Nearest-neighbour upsampling of [B, C, H, W] to [B, C, size[0], size[1]], the memory format of x kept. Values are
// copied, never computed, so a detour through fp32 is exact; it is taken only where libtorch lacks the dtype's kernel:
// fp16 on the CPU (1.13), bf16 on CUDA before torch 2.1. The CPU kernel takes bf16 (1.13 too, 3-5x faster than the
// detour) and CUDA fp16.
torch::Tensor upsample_nearest(const torch::Tensor& x, const std::vector<int64_t>& size);

// GroupNorm over NCHW (or [B, C, *]); statistics in fp32 when the input is reduced precision.
class GroupNormImpl : public torch::nn::Module {
 public:
  GroupNormImpl(int64_t groups, int64_t channels, double eps, bool affine = true);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight, bias;
  int64_t num_groups, num_channels;
  double eps;
};
TORCH_MODULE(GroupNorm);

// LayerNorm over the last dimension; statistics in fp32 when the input is reduced precision.
class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps, bool affine = true);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight, bias;
  int64_t dim;
  double eps;
};
TORCH_MODULE(LayerNorm);

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim);
  torch::Tensor forward(const torch::Tensor& ids);  // int64 [...] -> [..., dim]
  torch::Tensor weight;                             // [num, dim]
  int64_t num_embeddings, embedding_dim;
};
TORCH_MODULE(Embedding);

// Prepacks every Conv2d under `module` (see Conv2dImpl::prepack); returns how many were packed. With
// fast_path().one_conv_copy, the packed ones then drop their dense weight (Conv2dImpl::release_dense).
int64_t prepack_convolutions(torch::nn::Module& module);
// Re-makes the dense weight of every Conv2d under `module` that released it (before code that reads weights
// generically: LoRA matching and fusion, state dicts); returns how many.
int64_t restore_dense_convolutions(torch::nn::Module& module);
// The number of parameters of `module`, released convolution weights counted at their real size.
int64_t parameter_count(torch::nn::Module& module);

// Gives every Conv2d and Linear under `module` (and `module` itself) that `keep_float(dotted name, layer)` does not
// accept an int8 copy; returns how many. Throws InvalidArgument naming the reason where int8 is unavailable
// (sd::int8::unavailable_reason()).
using KeepFloat = std::function<bool(const std::string& name, const torch::nn::Module& layer)>;
int64_t quantize_int8(torch::nn::Module& module, const KeepFloat& keep_float);

}  // namespace sd::nn
