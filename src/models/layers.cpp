#include "models/layers.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/cuda_graph.h"
#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "core/torch_compat.h"
#include "models/cpu_parallel.h"
#include "models/conv_layout.h"

namespace sd::nn {

bool cuda_channels_last() {
  static const bool on = sd::env_switch_on("SD_CUDA_CHANNELS_LAST");
  return on;
}

namespace {
std::atomic<int>& cpu_layout_mode() {
  static std::atomic<int> mode{[] {
    const char* v = std::getenv("SD_CPU_CHANNELS_LAST");
    if (!v || !*v) return -1;
    return std::string(v) == "0" ? 0 : 1;
  }()};
  return mode;
}
}  // namespace

bool cpu_channels_last(c10::ScalarType dtype) {
  const int mode = cpu_layout_mode().load();
  if (mode >= 0) return mode == 1;
  return dtype != c10::kFloat || SD_HAS_FAST_CPU_NHWC_FP32;
}

int set_cpu_channels_last(int mode) { return cpu_layout_mode().exchange(mode < 0 ? -1 : mode > 0 ? 1 : 0); }

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

torch::Tensor upsample_nearest(const torch::Tensor& x, const std::vector<int64_t>& size) {
  const auto dt = x.scalar_type();
  const bool detour = x.is_cuda() ? (dt == torch::kBFloat16 && !SD_HAS_CUDA_BF16_UPSAMPLE) : dt == torch::kHalf;
  if (detour) return at::upsample_nearest2d(x.to(torch::kFloat), size).to(dt);
  return at::upsample_nearest2d(x.is_cuda() ? cuda_upsample_input(x) : x, size);
}

FastPathOptions& fast_path() {
  static FastPathOptions options = [] {
    FastPathOptions o;
    // Without oneDNN's bf16 kernels (an AVX2 CPU) a bf16 matrix product runs at ~4 GFLOP/s vs ~70 in fp32: there
    // the attention computes in fp32 and rounds once.
    o.attention_reduced_cpu = sd::cpu_has_onednn_bf16();
    // SD_ONE_CONV_COPY=0 keeps the dense convolution weights beside the packed ones (to measure what one copy saves).
    o.one_conv_copy = sd::env_switch_on("SD_ONE_CONV_COPY");
    // SD_UPSAMPLE_PHASES=0: upsample, then convolve (no four-phase kernels: 16/9 of those convolutions' weights less).
    o.upsample_phases = sd::env_switch_on("SD_UPSAMPLE_PHASES");
    // SD_LINEAR_THREADS=0: fp32 linear layers as one BLAS call (one thread where OpenBLAS is pinned).
    o.linear_threads = sd::env_switch_on("SD_LINEAR_THREADS");
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

int64_t version_of(const torch::Tensor& t) {
  return !t.defined() ? -1 : t.is_inference() ? 0 : static_cast<int64_t>(t._version());
}
}  // namespace

void MadeFrom::set(const torch::Tensor& t) {
  clear();
  if (!t.defined() || !t.has_storage()) return;
  storage_ = t.storage().getWeakStorageImpl();
  data_ = t.data_ptr();
  version_ = version_of(t);
  dtype_ = t.scalar_type();
  sizes_ = t.sizes().vec();
  strides_ = t.strides().vec();
}

bool MadeFrom::matches(const torch::Tensor& t) const {
  return t.defined() && t.has_storage() && storage_._unsafe_get_target() != nullptr &&
         t.storage().unsafeGetStorageImpl() == storage_._unsafe_get_target() && t.data_ptr() == data_ &&
         version_of(t) == version_ && t.scalar_type() == dtype_ && t.sizes() == sizes_ && t.strides() == strides_;
}

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

// Streams may share a model across threads (Python's Streams, the server's workers): on the CPU a call checks,
// re-makes and takes a layer's derived copy (int8, packed, four-phase kernels) or restores its dense weight under
// this lock, then computes with what it took outside it. Uncontended it costs tens of nanoseconds a layer.
std::mutex& copies_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

void LinearImpl::quantize_int8() {
  torch::NoGradGuard no_grad;
  int8_ = std::make_shared<sd::int8::PackedLinear>(sd::int8::pack_linear(weight, bias));
  int8_from_.set(weight);
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (x.device().is_cpu() && fast_path().int8) {
    std::shared_ptr<sd::int8::PackedLinear> q;
    {
      const std::lock_guard<std::mutex> lock(copies_mutex());
      if (use_int8(int8_ != nullptr, x, weight)) {
        if (!int8_from_.matches(weight)) quantize_int8();
        q = int8_;
      }
    }
    if (q) return sd::int8::linear(x, *q);
  }
  return float_linear(x, weight, bias);
}

torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  // fp32 on the CPU with OpenBLAS pinned to one thread: the product across the intra-op threads (models/cpu_parallel.h).
  if (fast_path().linear_threads && use_linear_cpu_threads(x, weight, bias)) return linear_cpu_threads(x, weight, bias);
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
  packed_from_.set(weight);
  return true;
}

bool Conv2dImpl::prepacked_current() const {
  // Released, the packed copy is the weight's only one.
  return packed_.defined() && weight.defined() &&
         (dense_released() || packed_from_.matches(weight));
}

bool Conv2dImpl::dense_released() const {
  // A weight set since (set_data with real numbers) ends the release: the packed copy is then stale.
  return dense_released_ && weight.defined() && weight.numel() == 0 && packed_.defined();
}

bool Conv2dImpl::release_dense() {
  if (dense_released()) return true;
  if (!prepacked_current()) return false;
  torch::NoGradGuard no_grad;
  const bool phases = upsample_phases_current();
  weight.set_data(torch::empty({0}, weight.options()));
  packed_from_.clear();
  dense_released_ = true;
  phases_from_.clear();
  phases_from_packed_ = phases;  // made from the numbers the packed copy now holds alone
  return true;
}

void Conv2dImpl::restore_dense() {
  if (dense_released()) {
    torch::NoGradGuard no_grad;
    // oneDNN's reorder back to the plain [out, in, k, k] layout: the same numbers (tested bit for bit).
    const bool phases = upsample_phases_current();
    weight.set_data(packed_.to_dense());
    packed_from_.set(weight);
    if (phases) {  // the same numbers, now in the dense weight
      phases_from_.set(weight);
      phases_from_packed_ = false;
    }
  }
  dense_released_ = false;
}

void Conv2dImpl::quantize_int8() {
  restore_dense();
  torch::NoGradGuard no_grad;
  int8_ = std::make_shared<sd::int8::PackedConv>(sd::int8::pack_conv(weight, bias, stride, padding));
  int8_from_.set(weight);
  packed_ = torch::Tensor();
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  if (x.device().is_cpu()) {
    std::shared_ptr<sd::int8::PackedConv> q;
    torch::Tensor packed;
    {
      const std::lock_guard<std::mutex> lock(copies_mutex());
      if (use_int8(int8_ != nullptr, x, weight)) {
        if (!int8_from_.matches(weight)) quantize_int8();
        q = int8_;
      } else if (packed_.defined() && fast_path().prepack_conv && x.scalar_type() == weight.scalar_type() &&
                 (dense_released() || packed_from_.matches(weight)) &&
                 !(torch::GradMode::is_enabled() && (weight.requires_grad() || x.requires_grad()))) {
        packed = packed_;
      } else if (dense_released()) {
        restore_dense();  // this call needs the dense weight (and so will the next ones like it)
      }
    }
    if (q) return sd::int8::conv2d(x, *q);
    if (packed.defined())
      return at::mkldnn_convolution(x, packed, bias, {padding, padding}, {stride, stride}, {1, 1}, 1);
  } else if (dense_released()) {
    const std::lock_guard<std::mutex> lock(copies_mutex());
    restore_dense();
  }
  return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
}

bool Conv2dImpl::upsample_phases_current() const {
  if (!phases_) return false;
  if (bias.defined() && !phases_bias_from_.matches(bias)) return false;
  if (dense_released()) return phases_from_packed_;
  return !phases_from_packed_ && weight.numel() > 0 && phases_from_.matches(weight);
}

void Conv2dImpl::make_upsample_phases() {
  torch::NoGradGuard no_grad;
  const bool released = dense_released();
  const auto w = (released ? packed_.to_dense() : weight).to(torch::kDouble);  // [out, in, 3, 3]
  // Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. x rows (i - 1, i, i) for a = 0 and
  // (i, i, i + 1) for a = 1 (the padding row of the upsampled image is x's padding row): R[a][p][r] = 1 where tap r
  // lands on the p-th of the two x rows. Columns alike.
  const auto r = torch::tensor({1., 0., 0., 0., 1., 1., 1., 1., 0., 0., 0., 1.}, w.options()).view({2, 2, 3});
  const auto k = torch::einsum("apr,oirs,bqs->aboipq", {r, w, r})  // [2, 2, out, in, 2, 2]
                     .reshape({4 * out_channels, in_channels, 2, 2})
                     .to(weight.scalar_type())
                     .contiguous();
  auto p = std::make_shared<Conv2dImpl>(in_channels, 4 * out_channels, 2, 1, 1, bias.defined());
  p->weight.set_data(k);
  p->weight.set_requires_grad(false);
  if (bias.defined()) {
    p->bias.set_data(bias.detach().repeat({4}));  // [4 * out]: block a * 2 + b is phase (a, b)
    p->bias.set_requires_grad(false);
  }
  // Prepacked (one copy) where this convolution is: the phases then cost 16/9 of its weight in memory.
  if (packed_.defined() && p->prepack() && fast_path().one_conv_copy) p->release_dense();
  phases_ = std::move(p);
  if (released) {
    phases_from_.clear();
  } else {
    phases_from_.set(weight);
  }
  phases_from_packed_ = released;
  phases_bias_from_.set(bias);
}

torch::Tensor Conv2dImpl::forward_upsampled2x(const torch::Tensor& x) {
  const auto dt = x.scalar_type();
  const bool shape_applies = fast_path().upsample_phases && kernel_size == 3 && stride == 1 && padding == 1 &&
                             x.dim() == 4 && x.device().is_cpu() && (dt == torch::kFloat || dt == torch::kBFloat16) &&
                             x.size(1) == in_channels && x.size(2) > 0 && x.size(3) > 0;
  std::shared_ptr<Conv2dImpl> phases_conv;
  if (shape_applies) {
    // The layer's state is read under the lock forward() takes; one thread makes the kernels, and each call keeps
    // the ones it started with.
    const std::lock_guard<std::mutex> lock(copies_mutex());
    const bool grad = torch::GradMode::is_enabled() &&
                      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
    if (weight.device().is_cpu() && !grad && !use_int8(int8_ != nullptr, x, weight) && dt == weight.scalar_type()) {
      if (!upsample_phases_current()) make_upsample_phases();
      phases_conv = phases_;
    }
  }
  if (!phases_conv) return forward(upsample_nearest(x, {x.size(2) * 2, x.size(3) * 2}));
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3), o = out_channels;
  // [N, 4 * out, H + 1, W + 1] in x's memory format: phase (a, b)'s output pixel (i, j) is at row i + a, column
  // j + b of channel block a * 2 + b, an address linear in (a, b) whatever the strides. So one strided view reads
  // the four phases in output order, [N, out, H, 2 (a), W, 2 (b)], and one copy writes them into the
  // [N, out, 2H, 2W] output (in x's memory format too: TAESD runs channels-last on the CPU).
  const auto y = phases_conv->forward(x);
  const int64_t sn = y.stride(0), sc = y.stride(1), sh = y.stride(2), sw = y.stride(3);
  const auto phased = y.as_strided({n, o, h, 2, w, 2}, {sn, sc, sh, 2 * o * sc + sh, sw, o * sc + sw});
  auto out = torch::empty({n, o, 2 * h, 2 * w}, y.options().memory_format(x.suggest_memory_format()));
  const int64_t on = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  out.as_strided({n, o, h, 2, w, 2}, {on, oc, 2 * oh, oh, 2 * ow, ow}).copy_(phased);
  return out;
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
