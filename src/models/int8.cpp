#include "models/int8.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/device.h"
#include "core/error.h"
#include "models/cpu_parallel.h"
#include "models/simd_clones.h"

namespace sd::int8 {

namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// The min/max and code loops are vectorised through `omp simd` (-fopenmp-simd for this file, no OpenMP runtime):
// libtorch's quantize_per_tensor wants fp32 input and goes through a quantized tensor, three passes where these are
// two (a [2, 320, 64, 64] bf16 activation on 2 cores, libtorch 2.15: 2.7 ms with aminmax + quantize_per_tensor, 1.1 ms
// here).
template <class T>
inline float load(const T* x, int64_t i) {
  if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_float(x[i]);
  else return x[i];
}

// Also returns whether all n values are finite: the comparisons skip a NaN, so v - v (0, or NaN for inf and NaN) is
// summed alongside.
template <class T>
SD_CLONES bool min_max(const T* x, int64_t n, float* lo, float* hi) {
  float mn = 0, mx = 0;  // the range always holds 0
  float z = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) {
    const float v = load(x, i);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    z += v - v;
  }
  *lo = mn;
  *hi = mx;
  return z == 0;
}

template <class T>
SD_CLONES void to_codes(const T* x, uint8_t* q, int64_t n, float inv_scale, float zero_point) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float y = load(x, i) * inv_scale + zero_point + 0.5f;  // + 0.5 then truncation: round half up on y >= 0
    y = y < 0.f ? 0.f : (y > 255.f ? 255.f : y);
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(y));
  }
}

constexpr int64_t kChunk = 1 << 15;

template <class T>
QuantizedActivation quantize_impl(const torch::Tensor& x) {
  const int64_t n = x.numel();
  const T* p = reinterpret_cast<const T*>(x.data_ptr());
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> lo(static_cast<size_t>(chunks)), hi(static_cast<size_t>(chunks));
  std::vector<char> finite(static_cast<size_t>(chunks));
  sd::nn::parallel_chunks(chunks, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const auto i = static_cast<size_t>(c);
      finite[i] = min_max(p + c * kChunk, std::min(kChunk, n - c * kChunk), &lo[i], &hi[i]);
    }
  });
  float mn = 0, mx = 0;
  bool all_finite = true;
  for (int64_t c = 0; c < chunks; ++c) {
    mn = std::min(mn, lo[static_cast<size_t>(c)]);
    mx = std::max(mx, hi[static_cast<size_t>(c)]);
    all_finite = all_finite && finite[static_cast<size_t>(c)];
  }
  if (!all_finite || !std::isfinite(mn) || !std::isfinite(mx))
    throw Error("int8: the input of a quantized layer holds inf or NaN (range [" + std::to_string(mn) + ", " +
                         std::to_string(mx) + "])");
  QuantizedActivation r;
  r.scale = std::max(static_cast<double>(mx) - mn, 1e-8) / 255.0;
  r.zero_point = std::clamp<int64_t>(std::llround(-mn / r.scale), 0, 255);
  r.q = torch::empty_like(x, x.options().dtype(torch::kByte), x.suggest_memory_format());
  uint8_t* q = r.q.data_ptr<uint8_t>();
  const auto inv = static_cast<float>(1.0 / r.scale);
  const auto zp = static_cast<float>(r.zero_point);
  sd::nn::parallel_chunks(chunks, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) to_codes(p + c * kChunk, q + c * kChunk, std::min(kChunk, n - c * kChunk), inv, zp);
  });
  return r;
}

// The oneDNN int8 operators, looked up once. Typed handles check the C++ signature against the registered schema,
// so a libtorch whose operators changed shape reports it here instead of crashing later.
using ConvPrepackFn = at::Tensor(at::Tensor, at::Tensor, double, int64_t, c10::List<int64_t>, c10::List<int64_t>,
                                  c10::List<int64_t>, int64_t, c10::optional<c10::List<int64_t>>);
using ConvFn = at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
                          c10::List<int64_t>, c10::List<int64_t>, c10::List<int64_t>, int64_t, double, int64_t,
                          c10::optional<c10::ScalarType>, c10::string_view, c10::List<c10::optional<at::Scalar>>,
                          c10::optional<c10::string_view>);
using LinearPrepackFn = at::Tensor(at::Tensor, c10::optional<c10::List<int64_t>>);
using LinearFn = at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
                            double, int64_t, c10::optional<c10::ScalarType>, c10::string_view,
                            c10::List<c10::optional<at::Scalar>>, c10::string_view);

struct Ops {
  c10::TypedOperatorHandle<ConvPrepackFn> conv_prepack;
  c10::TypedOperatorHandle<ConvFn> conv;
  c10::TypedOperatorHandle<LinearPrepackFn> linear_prepack;
  c10::TypedOperatorHandle<LinearFn> linear;
};

struct Lookup {
  std::unique_ptr<Ops> ops;
  std::string reason;
};

const Lookup& lookup() {
  static const Lookup l = [] {
    Lookup r;
    try {
      auto& d = c10::Dispatcher::singleton();
      const char* names[] = {"onednn::qconv_prepack", "onednn::qconv2d_pointwise", "onednn::qlinear_prepack",
                             "onednn::qlinear_pointwise"};
      for (const char* name : names)
        if (!d.findSchema({name, ""})) {
          r.reason = std::string("this libtorch (") + TORCH_VERSION + ") has no " + name +
                     " operator (oneDNN int8 kernels come with libtorch 2.1+: build with "
                     "scripts/fetch-libtorch2.sh, see README)";
          return r;
        }
      auto ops = std::make_unique<Ops>(Ops{
          d.findSchemaOrThrow("onednn::qconv_prepack", "").typed<ConvPrepackFn>(),
          d.findSchemaOrThrow("onednn::qconv2d_pointwise", "").typed<ConvFn>(),
          d.findSchemaOrThrow("onednn::qlinear_prepack", "").typed<LinearPrepackFn>(),
          d.findSchemaOrThrow("onednn::qlinear_pointwise", "").typed<LinearFn>()});
      r.ops = std::move(ops);
    } catch (const std::exception& e) {
      r.reason = std::string("the oneDNN int8 operators of this libtorch have another signature: ") + e.what();
      return r;
    }
    if (!cpu_has_int8_dot())
      r.reason = "this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8): int8 would be "
                 "slower than fp32 here";
    return r;
  }();
  return l;
}

const Ops& ops() {
  const auto& l = lookup();
  if (!l.reason.empty()) throw InvalidArgument("int8: " + l.reason);
  return *l.ops;
}

c10::List<int64_t> pair(int64_t v) { return c10::List<int64_t>({v, v}); }

}  // namespace

std::string unavailable_reason() { return lookup().reason; }

QuantizedActivation quantize_activation(const torch::Tensor& x) {
  if (!x.device().is_cpu()) throw InvalidArgument("int8: activations must be on the CPU, got " + x.device().str());
  const torch::Tensor c = x.is_contiguous(x.suggest_memory_format()) ? x : x.contiguous(x.suggest_memory_format());
  if (c.scalar_type() == torch::kBFloat16) return quantize_impl<uint16_t>(c);
  if (c.scalar_type() == torch::kFloat) return quantize_impl<float>(c);
  throw InvalidArgument(std::string("int8: activations must be bf16 or fp32, got ") + c10::toString(c.scalar_type()));
}

QuantizedWeight quantize_weight(const torch::Tensor& w) {
  const torch::Tensor f = w.to(torch::kFloat);
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < f.dim(); ++d) dims.push_back(d);
  torch::Tensor amax = f.abs().amax(dims);  // [out]
  QuantizedWeight r;
  r.scale = (amax / 127.0).clamp_min(1e-12);  // an all-zero channel keeps a finite scale (its codes are 0)
  std::vector<int64_t> shape(static_cast<size_t>(f.dim()), 1);
  shape[0] = -1;
  r.q = (f / r.scale.view(shape)).round().clamp(-127, 127).to(torch::kChar);
  return r;
}

PackedConv pack_conv(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride, int64_t padding) {
  const auto& o = ops();
  const auto qw = quantize_weight(weight);
  PackedConv p;
  p.stride = stride;
  p.padding = padding;
  p.scale = qw.scale;
  p.zero_point = torch::zeros({weight.size(0)}, torch::kLong);
  // The activation scale given here only seeds oneDNN's packing; the real one is passed with every call.
  p.packed = o.conv_prepack.call(qw.q, qw.scale, 1.0, 0, pair(stride), pair(padding), pair(1), 1, c10::nullopt);
  if (bias.defined()) p.bias = bias.to(torch::kFloat).contiguous();
  return p;
}

torch::Tensor conv2d(const torch::Tensor& x, const PackedConv& w) {
  const auto& o = ops();
  const auto qx = quantize_activation(x);
  return o.conv.call(qx.q, qx.scale, qx.zero_point, w.packed, w.scale, w.zero_point,
                     w.bias.defined() ? c10::optional<at::Tensor>(w.bias) : c10::nullopt, pair(w.stride),
                     pair(w.padding), pair(1), 1, 1.0, 0, x.scalar_type(), "none",
                     c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
}

PackedLinear pack_linear(const torch::Tensor& weight, const torch::Tensor& bias) {
  const auto& o = ops();
  const auto qw = quantize_weight(weight);
  PackedLinear p;
  p.out_features = weight.size(0);
  p.in_features = weight.size(1);
  p.scale = qw.scale;
  p.zero_point = torch::zeros({weight.size(0)}, torch::kLong);
  p.packed = o.linear_prepack.call(qw.q, c10::nullopt);
  if (bias.defined()) p.bias = bias.to(torch::kFloat).contiguous();
  return p;
}

torch::Tensor linear(const torch::Tensor& x, const PackedLinear& w) {
  const auto& o = ops();
  if (x.size(-1) != w.in_features)
    throw InvalidArgument("int8 linear: input has " + std::to_string(x.size(-1)) + " features, the layer takes " +
                          std::to_string(w.in_features));
  auto sizes = x.sizes().vec();
  const auto qx = quantize_activation(x.reshape({-1, w.in_features}));
  torch::Tensor y = o.linear.call(qx.q, qx.scale, qx.zero_point, w.packed, w.scale, w.zero_point,
                                  w.bias.defined() ? c10::optional<at::Tensor>(w.bias) : c10::nullopt, 1.0, 0,
                                  x.scalar_type(), "none", c10::List<c10::optional<at::Scalar>>(), "");
  sizes.back() = w.out_features;
  return y.view(sizes);
}

}  // namespace sd::int8
