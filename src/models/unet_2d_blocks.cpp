#include "models/unet_2d_blocks.h"

#include "core/error.h"

namespace sd {

Transformer2DOptions transformer_options(const UNetBlockOptions& o, int64_t channels) {
  if (o.heads <= 0 || channels % o.heads != 0)
    throw InvalidArgument("UNet block: " + std::to_string(channels) + " channels are not divisible by " +
                          std::to_string(o.heads) + " attention heads");
  Transformer2DOptions t;
  t.in_channels = channels;
  t.heads = o.heads;
  t.dim_head = channels / o.heads;
  t.num_layers = o.transformer_layers;
  t.norm_num_groups = o.resnet_groups;
  t.cross_attention_dim = o.cross_attention_dim;
  t.use_linear_projection = o.use_linear_projection;
  t.upcast_attention = o.upcast_attention;
  t.only_cross_attention = o.only_cross_attention;
  return t;
}

namespace {
ResnetBlock2D make_resnet(int64_t in, int64_t out, const UNetBlockOptions& o) {
  return ResnetBlock2D(in, out, o.temb_channels, o.resnet_groups, o.resnet_eps, o.output_scale_factor);
}
}  // namespace

UNetDownBlockImpl::UNetDownBlockImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers,
                                     bool add_downsample, int64_t downsample_padding, const UNetBlockOptions& o) {
  auto resnets = register_module("resnets", torch::nn::ModuleList());
  torch::nn::ModuleList attentions{nullptr};
  if (o.cross_attention) attentions = register_module("attentions", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    resnet_list.push_back(make_resnet(i == 0 ? in_channels : out_channels, out_channels, o));
    resnets->push_back(resnet_list.back());
    if (o.cross_attention) {
      attention_list.emplace_back(transformer_options(o, out_channels));
      attentions->push_back(attention_list.back());
    }
  }
  if (add_downsample) {
    downsampler = Downsample2D(out_channels, out_channels, downsample_padding);
    auto downsamplers = register_module("downsamplers", torch::nn::ModuleList());
    downsamplers->push_back(downsampler);
  }
}

torch::Tensor UNetDownBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& temb,
                                         const torch::Tensor& context, std::vector<torch::Tensor>& skips,
                                         bool downsample) {
  auto h = x;
  for (size_t i = 0; i < resnet_list.size(); ++i) {
    h = resnet_list[i](h, temb);
    if (!attention_list.empty()) h = attention_list[i](h, context);
    skips.push_back(h);
  }
  if (downsampler && downsample) {
    h = downsampler(h);
    skips.push_back(h);
  }
  return h;
}

UNetMidBlock2DCrossAttnImpl::UNetMidBlock2DCrossAttnImpl(int64_t channels, int64_t num_layers,
                                                         const UNetBlockOptions& o) {
  auto resnets = register_module("resnets", torch::nn::ModuleList());
  auto attentions = register_module("attentions", torch::nn::ModuleList());
  resnet_list.push_back(make_resnet(channels, channels, o));
  resnets->push_back(resnet_list.back());
  for (int64_t i = 0; i < num_layers; ++i) {
    attention_list.emplace_back(transformer_options(o, channels));
    attentions->push_back(attention_list.back());
    resnet_list.push_back(make_resnet(channels, channels, o));
    resnets->push_back(resnet_list.back());
  }
}

torch::Tensor UNetMidBlock2DCrossAttnImpl::forward(const torch::Tensor& x, const torch::Tensor& temb,
                                                   const torch::Tensor& context) {
  auto h = resnet_list[0](x, temb);
  for (size_t i = 0; i < attention_list.size(); ++i) {
    h = attention_list[i](h, context);
    h = resnet_list[i + 1](h, temb);
  }
  return h;
}

UNetUpBlockImpl::UNetUpBlockImpl(int64_t in_channels, int64_t prev_output_channels, int64_t out_channels,
                                 int64_t num_layers, bool add_upsample, const UNetBlockOptions& o) {
  auto resnets = register_module("resnets", torch::nn::ModuleList());
  torch::nn::ModuleList attentions{nullptr};
  if (o.cross_attention) attentions = register_module("attentions", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    // The last layer's skip comes from the previous (shallower) down block, hence in_channels.
    const int64_t skip_channels = i == num_layers - 1 ? in_channels : out_channels;
    const int64_t resnet_in = i == 0 ? prev_output_channels : out_channels;
    resnet_list.push_back(make_resnet(resnet_in + skip_channels, out_channels, o));
    resnets->push_back(resnet_list.back());
    if (o.cross_attention) {
      attention_list.emplace_back(transformer_options(o, out_channels));
      attentions->push_back(attention_list.back());
    }
  }
  if (add_upsample) {
    upsampler = Upsample2D(out_channels, out_channels);
    auto upsamplers = register_module("upsamplers", torch::nn::ModuleList());
    upsamplers->push_back(upsampler);
  }
}

torch::Tensor UNetUpBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& temb,
                                       const torch::Tensor& context, std::vector<torch::Tensor>& skips,
                                       std::optional<std::pair<int64_t, int64_t>> upsample_size) {
  if (skips.size() < resnet_list.size())
    throw InvalidArgument("UNet up block: needs " + std::to_string(resnet_list.size()) + " skip tensors, " +
                          std::to_string(skips.size()) + " left");
  auto h = x;
  for (size_t i = 0; i < resnet_list.size(); ++i) {
    auto skip = std::move(skips.back());
    skips.pop_back();
    h = resnet_list[i](torch::cat({h, skip}, 1), temb);
    if (!attention_list.empty()) h = attention_list[i](h, context);
  }
  if (upsampler) h = upsampler(h, upsample_size);
  return h;
}

}  // namespace sd
