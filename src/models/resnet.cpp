#include "models/resnet.h"

#include "core/error.h"

namespace sd {

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in, int64_t out, int64_t temb, int64_t groups, double eps,
                                     double scale)
    : in_channels(in), out_channels(out), temb_channels(temb), output_scale_factor(scale) {
  if (in % groups != 0 || out % groups != 0)
    throw InvalidArgument("ResnetBlock2D: channels " + std::to_string(in) + " -> " + std::to_string(out) +
                          " are not divisible by " + std::to_string(groups) + " groups");
  norm1 = register_module("norm1", sd::nn::GroupNorm(groups, in, eps));
  conv1 = register_module("conv1", sd::nn::Conv2d(in, out, 3, 1, 1));
  if (temb > 0) time_emb_proj = register_module("time_emb_proj", sd::nn::Linear(temb, out));
  norm2 = register_module("norm2", sd::nn::GroupNorm(groups, out, eps));
  conv2 = register_module("conv2", sd::nn::Conv2d(out, out, 3, 1, 1));
  if (in != out) conv_shortcut = register_module("conv_shortcut", sd::nn::Conv2d(in, out, 1, 1, 0));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  if (time_emb_proj && !temb.defined())
    throw InvalidArgument("ResnetBlock2D: this block has a time embedding projection but no temb was given");
  if (!time_emb_proj && temb.defined())
    throw InvalidArgument("ResnetBlock2D: temb given to a block built without time embedding (temb_channels 0)");
  auto h = conv1(torch::silu(norm1(x)));  // [B, out, H, W]
  if (time_emb_proj) {
    auto t = time_emb_proj(torch::silu(temb));  // [B, out]
    h = h + t.unsqueeze(-1).unsqueeze(-1);
  }
  h = conv2(torch::silu(norm2(h)));
  auto shortcut = conv_shortcut ? conv_shortcut(x) : x;
  auto out = shortcut + h;
  if (output_scale_factor != 1.0) out = out / output_scale_factor;
  return out;
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t pad) : padding(pad) {
  conv = register_module("conv", sd::nn::Conv2d(channels, out_channels, 3, 2, pad));
}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) {
  if (padding == 0) {
    // diffusers pads (left 0, right 1, top 0, bottom 1) so a stride-2 3x3 conv without padding halves even sizes.
    return conv(torch::constant_pad_nd(x, {0, 1, 0, 1}, 0));
  }
  return conv(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, int64_t out_channels, bool use_phases) : phases(use_phases) {
  conv = register_module("conv", sd::nn::Conv2d(channels, out_channels, 3, 1, 1));
}

torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x, std::optional<std::pair<int64_t, int64_t>> size) {
  std::vector<int64_t> out_size = size ? std::vector<int64_t>{size->first, size->second}
                                       : std::vector<int64_t>{x.size(2) * 2, x.size(3) * 2};
  // On the CPU, exactly 2x (where asked): four 2x2 convolutions on x instead of a 3x3 one on the 4x-sized image.
  if (phases && x.device().is_cpu() && out_size[0] == x.size(2) * 2 && out_size[1] == x.size(3) * 2)
    return conv->forward_upsampled2x(x);
  return conv(sd::nn::upsample_nearest(x, out_size));
}

}  // namespace sd
