#include "models/layers.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/cuda_graph.h"
#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "core/torch_compat.h"
#include "models/cuda_layout.h"

namespace sd::nn {

bool cuda_channels_last() {
  static const bool on = sd::env_switch_on("SD_CUDA_CHANNELS_LAST");
  return on;
}

namespace {
std::atomic<bool>& fused_conv_flag() {
  static std::atomic<bool> on{sd::env_switch_on("SD_CUDA_FUSED_CONV")};
  return on;
}
// The dtypes (bit i: c10::ScalarType i) whose first fused result was compared with the eager one.
std::atomic<uint64_t> fused_conv_checked{0};

void fused_conv_off(const std::string& why) {
  if (fused_conv_flag().exchange(false))
    log::warn("cuDNN's fused convolution + ReLU is off from now on ({}): TAESD runs its convolutions eagerly", why);
}
}  // namespace

bool cuda_fused_conv() { return fused_conv_flag().load(); }
void set_cuda_fused_conv(bool on) { fused_conv_flag().store(on); }

torch::Tensor cuda_upsample_input(const torch::Tensor& x) { return x.size(0) >= 64 ? x.contiguous() : x; }

FastPathOptions& fast_path() {
  static FastPathOptions options = [] {
    FastPathOptions o;
    // Without oneDNN's bf16 kernels (an AVX2 CPU) a bf16 matrix product runs at ~4 GFLOP/s vs ~70 in fp32: there
    // the attention computes in fp32 and rounds once.
    o.attention_reduced_cpu = sd::cpu_has_onednn_bf16();
    // SD_ONE_CONV_COPY=0 keeps the dense convolution weights beside the packed ones (to measure what one copy saves).
    o.one_conv_copy = sd::env_switch_on("SD_ONE_CONV_COPY");
    return o;
  }();
  return options;
}

namespace {
bool reduced(const torch::Tensor& x) {
  return x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf;
}

// Whether a norm over reduced-precision `x` can run on the input itself (no fp32 copies of it and its parameters):
// where the device's kernel keeps the statistics in fp32. On CUDA the copies cost four extra kernels per norm
// (~110 norms in an SD UNet call).
bool native_reduced_norm(const torch::Tensor& x, const torch::Tensor& weight) {
  return reduced(x) && (!weight.defined() || weight.scalar_type() == x.scalar_type());
}

// A parameter's identity for caches derived from it: storage + in-place version.
int64_t version_of(const torch::Tensor& t) { return t.defined() ? static_cast<int64_t>(t._version()) : -1; }
}  // namespace

LinearImpl::LinearImpl(int64_t in, int64_t out, bool has_bias) : in_features(in), out_features(out) {
  weight = register_parameter("weight", torch::empty({out, in}));
  if (has_bias) bias = register_parameter("bias", torch::empty({out}));
}

namespace {
// Whether the int8 copy should serve this call: CPU inference (no gradient wanted) with the fast path on.
bool use_int8(bool quantized, const torch::Tensor& x, const torch::Tensor& weight) {
  return quantized && fast_path().int8 && x.device().is_cpu() &&
         !(torch::GradMode::is_enabled() && (weight.requires_grad() || x.requires_grad()));
}
}  // namespace

void LinearImpl::quantize_int8() {
  torch::NoGradGuard no_grad;
  int8_ = std::make_shared<sd::int8::PackedLinear>(sd::int8::pack_linear(weight, bias));
  int8_from_ = weight.data_ptr();
  int8_version_ = version_of(weight);
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (use_int8(int8_ != nullptr, x, weight)) {
    if (int8_version_ != version_of(weight) || int8_from_ != weight.data_ptr()) quantize_int8();
    return sd::int8::linear(x, *int8_);
  }
  return torch::nn::functional::linear(x, weight, bias);
}

Conv2dImpl::Conv2dImpl(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, bool has_bias)
    : in_channels(in), out_channels(out), kernel_size(k), stride(s), padding(p) {
  weight = register_parameter("weight", torch::empty({out, in, k, k}));
  if (has_bias) bias = register_parameter("bias", torch::empty({out}));
}

bool Conv2dImpl::prepack() {
  restore_dense();  // packing reads the dense weight
  packed_ = torch::Tensor();
  dense_released_ = false;
  if (!weight.defined() || !weight.device().is_cpu() || !at::hasMKLDNN()) return false;
  if (weight.scalar_type() != torch::kFloat && weight.scalar_type() != torch::kBFloat16) return false;
  torch::NoGradGuard no_grad;
  try {
    packed_ = at::mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), {padding, padding}, {stride, stride},
                                               {1, 1}, 1);
  } catch (const c10::Error&) {
    // oneDNN refuses some dtype/CPU pairs (bf16 needs AVX-512 BW/VL/DQ: "bf16 path needs the cpu support
    // avx512bw, avx512vl and avx512dq" on an AVX2 EPYC); the eager convolution still works there.
    packed_ = torch::Tensor();
    return false;
  }
  packed_from_ = weight.data_ptr();
  packed_version_ = version_of(weight);
  return true;
}

bool Conv2dImpl::prepacked_current() const {
  // Released, the packed copy is the weight's only one.
  return packed_.defined() && weight.defined() &&
         (dense_released() || (packed_version_ == version_of(weight) && packed_from_ == weight.data_ptr()));
}

bool Conv2dImpl::dense_released() const {
  // A weight set since (set_data with real numbers) ends the release: the packed copy is then stale.
  return dense_released_ && weight.defined() && weight.numel() == 0 && packed_.defined();
}

bool Conv2dImpl::release_dense() {
  if (dense_released()) return true;
  if (!prepacked_current()) return false;
  torch::NoGradGuard no_grad;
  weight.set_data(torch::empty({0}, weight.options()));
  // The freed storage's address may come back for a weight set later (set_data): it must not look packed.
  packed_from_ = nullptr;
  dense_released_ = true;
  return true;
}

void Conv2dImpl::restore_dense() {
  if (dense_released()) {
    torch::NoGradGuard no_grad;
    // oneDNN's reorder back to the plain [out, in, k, k] layout: the same numbers (tested bit for bit).
    weight.set_data(packed_.to_dense());
    packed_from_ = weight.data_ptr();
    packed_version_ = version_of(weight);
  }
  dense_released_ = false;
}

void Conv2dImpl::quantize_int8() {
  restore_dense();
  torch::NoGradGuard no_grad;
  int8_ = std::make_shared<sd::int8::PackedConv>(sd::int8::pack_conv(weight, bias, stride, padding));
  int8_from_ = weight.data_ptr();
  int8_version_ = version_of(weight);
  packed_ = torch::Tensor();
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  if (use_int8(int8_ != nullptr, x, weight)) {
    if (int8_version_ != version_of(weight) || int8_from_ != weight.data_ptr()) quantize_int8();
    return sd::int8::conv2d(x, *int8_);
  }
  const bool released = dense_released();
  if (packed_.defined() && fast_path().prepack_conv && x.device().is_cpu() &&
      x.scalar_type() == weight.scalar_type() &&
      (released || (packed_version_ == version_of(weight) && packed_from_ == weight.data_ptr())) &&
      !(torch::GradMode::is_enabled() && (weight.requires_grad() || x.requires_grad()))) {
    return at::mkldnn_convolution(x, packed_, bias, {padding, padding}, {stride, stride}, {1, 1}, 1);
  }
  if (released) restore_dense();  // this call needs the dense weight (and so will the next ones like it)
  return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
}

namespace {
torch::Tensor conv_add_relu_eager(Conv2dImpl& conv, const torch::Tensor& x, const torch::Tensor& z) {
  auto h = conv.forward(x);  // a fresh tensor: the add and the ReLU run in place
  if (z.defined()) h.add_(z);
  return h.relu_();
}
}  // namespace

torch::Tensor conv_add_relu(Conv2dImpl& conv, const torch::Tensor& x, const torch::Tensor& z) {
  // cuDNN's fused kernels have no autograd: training keeps the eager path.
  const bool grad = torch::GradMode::is_enabled() &&
                    (x.requires_grad() || conv.weight.requires_grad() || (z.defined() && z.requires_grad()));
  if (!x.is_cuda() || !cuda_fused_conv() || grad) return conv_add_relu_eager(conv, x, z);
  const std::vector<int64_t> stride{conv.stride, conv.stride}, padding{conv.padding, conv.padding}, dilation{1, 1};
  const c10::optional<at::Tensor> bias = conv.bias.defined() ? c10::optional<at::Tensor>(conv.bias) : c10::nullopt;
  // Inside a capture nothing may wait for the device, and a failure belongs to the capture (the graph cache then runs
  // the call eagerly); the first call of a shape is always eager (GraphCache's warm-up), so the checks run there. Asked
  // only where it matters (a failure, the check not yet done), not on every call.
  auto capturing = [&] { return sd::cuda_stream_capturing(x.device()); };
  torch::Tensor y;
  try {
    y = z.defined() ? at::cudnn_convolution_add_relu(x, conv.weight, z, at::Scalar(1.0), bias, stride, padding,
                                                     dilation, 1)
                    : at::cudnn_convolution_relu(x, conv.weight, bias, stride, padding, dilation, 1);
  } catch (const c10::Error& e) {
    if (capturing()) throw;
    fused_conv_off(std::string("cuDNN refused the call: ") + e.what_without_backtrace());
    return conv_add_relu_eager(conv, x, z);
  }
  // The first fused result of each dtype against the eager path's (one wait for the device, once): a cuDNN whose
  // fused engine computes something else turns the fusion off instead of changing every frame. The bound is far above
  // the rounding of one convolution (fp32 1e-3, 1e-2 with TF32, fp16 1e-2, bf16 4e-2 of max |eager|) and far below a
  // missing term.
  const uint64_t bit = uint64_t{1} << (static_cast<int>(x.scalar_type()) & 63);
  if (!(fused_conv_checked.load() & bit) && !capturing() && !(fused_conv_checked.fetch_or(bit) & bit)) {
    const auto ref = conv_add_relu_eager(conv, x, z);
    const double scale = ref.abs().max().item<double>();
    const double diff = (y.to(torch::kFloat) - ref.to(torch::kFloat)).abs().max().item<double>();
    const bool fp32 = x.scalar_type() == torch::kFloat;
    const double tol = fp32 ? (at::globalContext().allowTF32CuDNN() ? 1e-2 : 1e-3)
                            : x.scalar_type() == torch::kHalf ? 1e-2 : 4e-2;
    if (!(diff <= tol * std::max(scale, 1e-6))) {
      fused_conv_off("its first " + std::string(c10::toString(x.scalar_type())) + " result differs from the eager " +
                     "path's by " + std::to_string(diff) + " (max |eager| " + std::to_string(scale) + ")");
      return ref;
    }
    log::info("cuDNN's fused convolution + ReLU checked against the eager path ({}, difference {:.3g} of max {:.3g})",
              c10::toString(x.scalar_type()), diff, scale);
  }
  return y;
}

int64_t prepack_convolutions(torch::nn::Module& module) {
  int64_t n = 0;
  for (auto& m : module.modules(/*include_self=*/true)) {
    if (auto* conv = dynamic_cast<Conv2dImpl*>(m.get())) {
      if (!conv->prepack()) continue;
      ++n;
      if (fast_path().one_conv_copy) conv->release_dense();
    }
  }
  return n;
}

int64_t parameter_count(torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  for (auto& m : module.modules(/*include_self=*/true))
    if (auto* conv = dynamic_cast<Conv2dImpl*>(m.get()); conv && conv->dense_released())
      n += conv->out_channels * conv->in_channels * conv->kernel_size * conv->kernel_size;
  return n;
}

int64_t restore_dense_convolutions(torch::nn::Module& module) {
  int64_t n = 0;
  for (auto& m : module.modules(/*include_self=*/true)) {
    if (auto* conv = dynamic_cast<Conv2dImpl*>(m.get()); conv && conv->dense_released()) {
      conv->restore_dense();
      ++n;
    }
  }
  return n;
}

int64_t quantize_int8(torch::nn::Module& module, const KeepFloat& keep_float) {
  const std::string why = sd::int8::unavailable_reason();
  if (!why.empty()) throw InvalidArgument("int8: " + why);
  int64_t n = 0;
  for (const auto& item : module.named_modules("", /*include_self=*/true)) {
    if (keep_float && keep_float(item.key(), *item.value())) continue;
    if (auto* conv = dynamic_cast<Conv2dImpl*>(item.value().get())) {
      conv->quantize_int8();
      ++n;
    } else if (auto* lin = dynamic_cast<LinearImpl*>(item.value().get())) {
      lin->quantize_int8();
      ++n;
    }
  }
  return n;
}

GroupNormImpl::GroupNormImpl(int64_t groups, int64_t channels, double e, bool affine)
    : num_groups(groups), num_channels(channels), eps(e) {
  if (affine) {
    weight = register_parameter("weight", torch::empty({channels}));
    bias = register_parameter("bias", torch::empty({channels}));
  }
}

torch::Tensor GroupNormImpl::forward(const torch::Tensor& x) {
  // libtorch 2's CPU group norm takes bf16 with fp32 statistics (0.27 vs 0.61 ms through an fp32 copy, [1, 320, 64,
  // 64]); 1.13's bf16 kernel is slow and accumulates in bf16, so there it runs on an fp32 copy. On CUDA the kernels
  // accumulate reduced precision in fp32 (as diffusers runs them).
  if (native_reduced_norm(x, weight) &&
      (!x.device().is_cpu() || (SD_HAS_MIXED_GROUP_NORM && x.scalar_type() == torch::kBFloat16)))
    return at::group_norm(x, num_groups, weight, bias, eps);
  if (reduced(x)) {
    auto w = weight.defined() ? weight.to(torch::kFloat) : weight;
    auto b = bias.defined() ? bias.to(torch::kFloat) : bias;
    return at::group_norm(x.to(torch::kFloat), num_groups, w, b, eps).to(x.scalar_type());
  }
  return at::group_norm(x, num_groups, weight, bias, eps);
}

LayerNormImpl::LayerNormImpl(int64_t d, double e, bool affine) : dim(d), eps(e) {
  if (affine) {
    weight = register_parameter("weight", torch::empty({d}));
    bias = register_parameter("bias", torch::empty({d}));
  }
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) {
  if (native_reduced_norm(x, weight) && !x.device().is_cpu()) return at::layer_norm(x, {dim}, weight, bias, eps);
  if (reduced(x)) {
    auto w = weight.defined() ? weight.to(torch::kFloat) : weight;
    auto b = bias.defined() ? bias.to(torch::kFloat) : bias;
    return at::layer_norm(x.to(torch::kFloat), {dim}, w, b, eps).to(x.scalar_type());
  }
  return at::layer_norm(x, {dim}, weight, bias, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t d) : num_embeddings(num), embedding_dim(d) {
  weight = register_parameter("weight", torch::empty({num, d}));
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) { return at::embedding(weight, ids); }

}  // namespace sd::nn
