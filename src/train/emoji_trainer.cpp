#include "train/emoji_trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>

#include "core/error.h"
#include "core/torch_compat.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/random_model.h"
#include "pipeline/lcm_scheduler.h"
#include "train/emoji_eval.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace sd::train {

json emoji_taesd_config() {
  // 4 stages = 8x down/up-sampling like SD's TAESD: 64 px <-> 8 x 8 latents with 8 channels (512 numbers per
  // image). No block at full resolution and 32 channels (24: 1 dB less PSNR at the same steps): cheap enough to train
  // on 2 CPU cores and to decode at well over 30 fps; the decoder's last stage is its output convolution.
  json c = default_taesd_config();
  c["encoder_block_out_channels"] = {32, 32, 32, 32};
  c["decoder_block_out_channels"] = {32, 32, 32, 32};
  c["num_encoder_blocks"] = {0, 1, 1, 1};
  c["num_decoder_blocks"] = {1, 1, 1, 0};
  c["latent_channels"] = 8;
  c["scaling_factor"] = 1.0;  // replaced by 1 / std of the trained latents
  return c;
}

json emoji_unet_config() {
  // 8x8 -> 4x4 -> 2x2 latents; cross-attention at 8x8, 4x4 and in the 2x2 mid block.
  json c = real_unet_config("sd-turbo");
  c["in_channels"] = 8;
  c["out_channels"] = 8;
  c["block_out_channels"] = {32, 64, 128};
  c["down_block_types"] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"};
  c["up_block_types"] = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  c["attention_head_dim"] = {1, 2, 4};  // = head count (diffusers' naming): 32-d heads
  c["layers_per_block"] = 1;
  c["cross_attention_dim"] = 128;
  c["norm_num_groups"] = 16;
  c["sample_size"] = 8;
  c["use_linear_projection"] = true;
  c["upcast_attention"] = false;
  return c;
}

json emoji_text_encoder_config(int64_t vocab_size) {
  json c = real_text_encoder_config("sd15");
  c["hidden_size"] = 128;
  c["intermediate_size"] = 512;
  c["num_hidden_layers"] = 3;
  c["num_attention_heads"] = 4;
  c["projection_dim"] = 128;
  c["max_position_embeddings"] = 24;  // emoji captions are short; the tokenizer's model_max_length matches
  c["vocab_size"] = vocab_size;
  c["bos_token_id"] = vocab_size - 2;
  c["eos_token_id"] = vocab_size - 1;
  c["pad_token_id"] = vocab_size - 1;
  return c;
}

namespace {

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The generator of one step: independent of how the run got there (resumable).
at::Generator step_generator(uint64_t seed, int64_t step) {
  return at::detail::createCPUGenerator(splitmix(splitmix(seed) ^ static_cast<uint64_t>(step)));
}

void write_json(const fs::path& path, const json& j) {
  std::ofstream out(path);
  if (!out) throw FormatError(path.string(), "cannot write");
  out << j.dump(2) << "\n";
}

std::string clock_after(double seconds) {
  const std::time_t t = std::time(nullptr) + static_cast<std::time_t>(seconds);
  char buf[16];
  std::strftime(buf, sizeof buf, "%H:%M:%S", std::localtime(&t));
  return buf;
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

std::vector<torch::Tensor> params_of(std::initializer_list<torch::nn::Module*> mods) {
  std::vector<torch::Tensor> out;
  for (auto* m : mods)
    for (auto& p : m->parameters()) out.push_back(p);
  return out;
}

void save_opt_state(torch::optim::AdamW& opt, const std::string& prefix,
                    std::vector<std::pair<std::string, torch::Tensor>>& out) {
  const auto& params = opt.param_groups().at(0).params();
  for (size_t i = 0; i < params.size(); ++i) {
    auto it = opt.state().find(compat::optimizer_state_key(opt, params[i]));
    if (it == opt.state().end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    const std::string k = prefix + std::to_string(i);
    out.emplace_back(k + ".exp_avg", s.exp_avg());
    out.emplace_back(k + ".exp_avg_sq", s.exp_avg_sq());
    out.emplace_back(k + ".step", torch::tensor({s.step()}, torch::kInt64));
  }
}

void load_opt_state(torch::optim::AdamW& opt, const std::string& prefix, const SafeTensorsFile& f) {
  const auto& params = opt.param_groups().at(0).params();
  opt.state().clear();
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string k = prefix + std::to_string(i);
    if (!f.contains(k + ".step")) continue;
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(f.get(k + ".step").item<int64_t>());
    s->exp_avg(f.get(k + ".exp_avg").clone());
    s->exp_avg_sq(f.get(k + ".exp_avg_sq").clone());
    if (!s->exp_avg().sizes().equals(params[i].sizes()))
      throw FormatError(f.path(), "optimizer state " + k + " does not match the parameter's shape");
    opt.state()[compat::optimizer_state_key(opt, params[i])] = std::move(s);
  }
}

}  // namespace

EmojiTrainer::EmojiTrainer(TrainOptions opts, std::shared_ptr<const EmojiDataset> data)
    : o_(std::move(opts)), data_(std::move(data)) {
  if (!data_ || data_->size() == 0) throw InvalidArgument("train: the dataset is empty");
  if (o_.work_dir.empty()) throw InvalidArgument("train: a work folder is required");
  if (o_.ae_steps < 0 || o_.unet_steps < 0 || o_.batch < 1 || o_.ae_batch < 1)
    throw InvalidArgument("train: steps must be >= 0 and batch sizes >= 1");
  if (o_.ae_loss != "l2l1" && o_.ae_loss != "edge")
    throw InvalidArgument("train: autoencoder loss '" + o_.ae_loss + "' is not one of l2l1, edge");
  if (o_.ae_channels < 0)
    throw InvalidArgument("train: autoencoder channels must be >= 1, or 0 for the config's own lists; got " +
                          std::to_string(o_.ae_channels));
  if (o_.ae_channels > 0) {
    o_.taesd_config["encoder_block_out_channels"] = std::vector<int64_t>(4, o_.ae_channels);
    o_.taesd_config["decoder_block_out_channels"] = std::vector<int64_t>(4, o_.ae_channels);
  }
  log = [](const std::string& line) { std::cerr << line << std::endl; };
  fs::create_directories(o_.work_dir);

  // 1. The tokenizer: BPE learned from every caption of every sample.
  std::vector<std::string> texts;
  for (int64_t i = 0; i < data_->size(); ++i)
    for (auto& c : data_->captions(i)) texts.push_back(c);
  const std::string tok_dir = (fs::path(o_.work_dir) / "tokenizer").string();
  const int max_len = static_cast<int>(o_.text_config.value("max_position_embeddings", 77));
  vocab_ = train_clip_tokenizer(texts, tok_dir, o_.bpe, max_len);
  tokenizer_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(tok_dir));
  for (int64_t i = 0; i < data_->size(); ++i) token_ids_.push_back(tokenizer_->encode_batch(data_->captions(i)));
  empty_ids_ = tokenizer_->encode_batch({""})[0];

  // 2. The models, randomly initialised from the seed.
  const int64_t vocab = static_cast<int64_t>(vocab_.tokens.size());
  text_config_json_ = o_.text_config;
  text_config_json_["vocab_size"] = vocab;
  text_config_json_["bos_token_id"] = tokenizer_->bos_id();
  text_config_json_["eos_token_id"] = tokenizer_->eos_id();
  text_config_json_["pad_token_id"] = tokenizer_->pad_id();
  taesd_ = AutoencoderTiny(AutoencoderTinyConfig::from_json(o_.taesd_config, "taesd config"));
  text_ = CLIPTextModel(CLIPTextConfig::from_json(text_config_json_, "text_encoder config"));
  unet_ = UNet2DConditionModel(UNet2DConditionConfig::from_json(o_.unet_config, "unet config"));
  if (taesd_->config().latent_channels != unet_->config().in_channels)
    throw InvalidArgument("train: the autoencoder's latent channels differ from the UNet's in_channels");
  randomize_parameters(*taesd_, o_.seed * 3 + 1);
  randomize_parameters(*text_, o_.seed * 3 + 2);
  randomize_parameters(*unet_, o_.seed * 3 + 3);
  {
    // The UNet's output starts near zero (a quiet start: eps-hat = 0 is the best constant guess).
    torch::NoGradGuard ng;
    unet_->conv_out->weight.mul_(0.1);
  }
  for (auto* m : std::initializer_list<torch::nn::Module*>{taesd_.get(), text_.get(), unet_.get()}) {
    m->train();
    for (auto& p : m->parameters()) p.set_requires_grad(true);
  }
  if (!o_.train_text_encoder) {
    text_->eval();
    for (auto& p : text_->parameters()) p.set_requires_grad(false);
  }
  ae_opt_ = std::make_unique<torch::optim::AdamW>(
      params_of({taesd_.get()}), torch::optim::AdamWOptions(o_.ae_lr).weight_decay(o_.weight_decay));
  opt_ = std::make_unique<torch::optim::AdamW>(
      o_.train_text_encoder ? params_of({text_.get(), unet_.get()}) : params_of({unet_.get()}),
      torch::optim::AdamWOptions(o_.lr).weight_decay(o_.weight_decay));

  const LCMScheduler sched(LCMSchedulerConfig::from_json(lcm_scheduler_config(), "scheduler config"));
  alphas_cumprod_ = sched.alphas_cumprod().to(torch::kFloat32);
  lcm_timesteps_ = sched.timesteps(50);
}

double EmojiTrainer::lr_at(int64_t s, int64_t n, double base) const {
  if (s < o_.warmup) return base * static_cast<double>(s + 1) / static_cast<double>(o_.warmup);
  const double p = n > o_.warmup ? static_cast<double>(s - o_.warmup) / static_cast<double>(n - o_.warmup) : 1.0;
  return base * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * std::min(1.0, p))));  // cosine to 10%
}

void EmojiTrainer::ae_step(int64_t s, double& loss_out) {
  auto gen = step_generator(o_.seed, step_);
  const auto idx = torch::randint(data_->size(), {o_.ae_batch}, gen, torch::kInt64);
  const auto x = data_->batch(idx);  // [B, 3, 64, 64] in [-1, 1]
  const auto z = taesd_->encode(x);  // [B, 8, 8, 8]
  const auto xr = taesd_->decode(z);
  const auto d = xr - x;
  auto loss = d.pow(2).mean() + 1e-4 * z.pow(2).mean();
  if (o_.ae_loss == "edge") {
    // Differences of neighbouring pixels: [B, 3, 64, 63] and [B, 3, 63, 64].
    const auto gx = d.slice(3, 1) - d.slice(3, 0, -1), gy = d.slice(2, 1) - d.slice(2, 0, -1);
    loss = loss + d.abs().mean() + o_.ae_grad_weight * (gx.abs().mean() + gy.abs().mean());
  } else {
    loss = loss + 0.5 * d.abs().mean();
  }
  set_lr(*ae_opt_, lr_at(s, o_.ae_steps, o_.ae_lr));
  ae_opt_->zero_grad();
  loss.backward();
  ae_opt_->step();
  loss_out = loss.item<double>();
}

void EmojiTrainer::prepare_latents() {
  torch::NoGradGuard ng;
  taesd_->eval();
  std::vector<torch::Tensor> parts;
  for (int64_t b = 0; b < data_->size(); b += 256) {
    const auto idx = torch::arange(b, std::min(data_->size(), b + 256), torch::kInt64);
    parts.push_back(taesd_->encode(data_->batch(idx)));
  }
  auto lat = torch::cat(parts);
  // Latents of std latent_std for the diffusion (stored as the TAESD's scaling_factor, which the pipeline applies).
  scaling_factor_ = std::round(1e4 * o_.latent_std / lat.std().item<double>()) / 1e4;
  latents_ = lat * scaling_factor_;
  taesd_->train();
}

torch::Tensor EmojiTrainer::sample_timesteps(int64_t n, at::Generator& gen) const {
  // 25%: t = 999 (the first stream step, where x0 comes from pure noise); 35%: one of the 50 LCM timesteps the
  // pipeline's t_index_list picks from; 40%: uniform over [0, 1000).
  const auto u = torch::rand({n}, gen);
  const auto uni = torch::randint(0, 1000, {n}, gen, torch::kInt64);
  const auto pick = torch::randint(0, static_cast<int64_t>(lcm_timesteps_.size()), {n}, gen, torch::kInt64);
  const auto lcm = torch::tensor(lcm_timesteps_, torch::kInt64).index_select(0, pick);
  auto t = torch::where(u < 0.25, torch::full({n}, 999, torch::kInt64), torch::where(u < 0.6, lcm, uni));
  return t;
}

void EmojiTrainer::prepare_text_features() {
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> ids;
  caption_row_.clear();
  int64_t rows = 0;
  for (const auto& v : token_ids_) {
    caption_row_.push_back(rows);
    rows += v.size(0);
    ids.push_back(v);
  }
  ids.push_back(empty_ids_.unsqueeze(0));
  const auto all = torch::cat(ids);  // [rows + 1, L]
  std::vector<torch::Tensor> parts;
  for (int64_t b = 0; b < all.size(0); b += 512) parts.push_back(text_->forward(all.slice(0, b, b + 512)));
  text_features_ = torch::cat(parts);  // [rows + 1, L, D]
}

void EmojiTrainer::unet_step(int64_t s, double& loss_out) {
  auto gen = step_generator(o_.seed, step_);
  const int64_t B = o_.batch;
  const auto idx = torch::randint(data_->size(), {B}, gen, torch::kInt64);
  const auto variant = torch::randint(0, 1 << 30, {B}, gen, torch::kInt64);
  const auto drop = torch::rand({B}, gen);
  const auto canonical = torch::rand({B}, gen);
  // Which caption of each sample: the empty one (dropped), the name, or any variant.
  std::vector<int64_t> pick(static_cast<size_t>(B));
  const auto* ip = idx.data_ptr<int64_t>();
  const auto* vp = variant.data_ptr<int64_t>();
  const auto* dp = drop.data_ptr<float>();
  const auto* cp = canonical.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = token_ids_[static_cast<size_t>(ip[b])].size(0);
    pick[static_cast<size_t>(b)] = dp[b] < o_.uncond_prob ? -1 : cp[b] < o_.canonical_prob ? 0 : vp[b] % n;
  }
  torch::Tensor ehs;  // [B, L, D]
  if (o_.train_text_encoder) {
    std::vector<torch::Tensor> ids;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = pick[static_cast<size_t>(b)];
      ids.push_back(p < 0 ? empty_ids_ : token_ids_[static_cast<size_t>(ip[b])][p]);
    }
    ehs = text_->forward(torch::stack(ids));  // ids [B, L]
  } else {
    if (!text_features_.defined()) prepare_text_features();
    std::vector<int64_t> rows;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = pick[static_cast<size_t>(b)];
      rows.push_back(p < 0 ? text_features_.size(0) - 1 : caption_row_[static_cast<size_t>(ip[b])] + p);
    }
    ehs = text_features_.index_select(0, torch::tensor(rows, torch::kInt64));
  }
  const auto t = sample_timesteps(B, gen);   // [B]
  const auto x0 = latents_.index_select(0, idx);
  const auto noise = torch::randn(x0.sizes(), gen);
  const auto a = alphas_cumprod_.index_select(0, t).view({B, 1, 1, 1});
  auto xt = a.sqrt() * x0 + (1 - a).sqrt() * noise;  // [B, C, h, w]
  auto target = noise;
  if (o_.terminal_pure_noise) {
    const auto terminal = (t == 999).view({B, 1, 1, 1});
    xt = torch::where(terminal, noise, xt);
    target = torch::where(terminal, (noise - a.sqrt() * x0) / (1 - a).sqrt(), noise);
  }
  const auto eps = unet_->forward(xt, t, ehs);
  const auto w = ((1 - a) / a).clamp(1.0, o_.max_loss_weight).view({B});
  const auto loss = (w * (eps - target).pow(2).mean({1, 2, 3})).mean();
  set_lr(*opt_, lr_at(s, o_.unet_steps, o_.lr));
  opt_->zero_grad();
  loss.backward();
  torch::nn::utils::clip_grad_norm_(opt_->param_groups()[0].params(), 1.0);
  opt_->step();
  loss_out = loss.item<double>();
}

TrainStats EmojiTrainer::run() {
  const std::string ckpt = (fs::path(o_.work_dir) / "checkpoint.safetensors").string();
  if (o_.resume && load_checkpoint(ckpt) && log)
    log("train: resumed from " + ckpt + " at step " + std::to_string(step_));
  TrainStats st;
  const int64_t total = o_.ae_steps + o_.unet_steps;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t done_here = 0, window_start = step_;
  double window_sum = 0;
  int64_t window_n = 0;
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  while (step_ < total) {
    if (o_.stop_after > 0 && done_here >= o_.stop_after) {
      save_checkpoint(ckpt);  // so the next run continues from here
      break;
    }
    const bool ae = step_ < o_.ae_steps;
    if (!ae && !latents_.defined()) prepare_latents();
    double loss = 0;
    if (ae) {
      ae_step(step_, loss);
    } else {
      unet_step(step_ - o_.ae_steps, loss);
    }
    if (!std::isfinite(loss)) throw Error("train: the loss is not finite at step " + std::to_string(step_));
    ++step_;
    ++done_here;
    window_sum += loss;
    ++window_n;
    const bool phase_end = step_ == o_.ae_steps || step_ == total;
    if ((o_.log_every > 0 && step_ % o_.log_every == 0) || phase_end) {
      const double mean = window_sum / std::max<int64_t>(1, window_n);
      st.loss_curve.emplace_back(step_, mean);
      (ae ? st.ae_loss : st.unet_loss) = mean;
      if (log && o_.log_every > 0) {
        const double sec = elapsed();
        const double per_step = sec / static_cast<double>(done_here);
        const double eta = per_step * static_cast<double>(total - step_);
        char buf[256];
        std::snprintf(buf, sizeof buf, "train [%s] step %lld/%lld  loss %.5f  %.2f steps/s  elapsed %.0fs  ETA %.0fs (%s)",
                      ae ? "autoencoder" : "unet+text", static_cast<long long>(step_), static_cast<long long>(total),
                      mean, 1.0 / per_step, sec, eta, clock_after(eta).c_str());
        log(buf);
      }
      window_sum = 0;
      window_n = 0;
      window_start = step_;
    }
    if ((o_.checkpoint_every > 0 && step_ % o_.checkpoint_every == 0) || phase_end) save_checkpoint(ckpt);
    if (!ae && log && o_.probe_every > 0 && ((step_ - o_.ae_steps) % o_.probe_every == 0 || step_ == total)) {
      const auto p = probe_adherence();
      char buf[200];
      std::snprintf(buf, sizeof buf,
                    "train [probe] step %lld: 1-step adherence %d/%d = %.0f%% (mean L2 16x16 own %.3f, other %.3f); "
                    "retrieval top-1 %.0f%%, top-5 %.0f%%; sharpness %.3f",
                    static_cast<long long>(step_), p.closer, p.n, 100.0 * p.closer / std::max(1, p.n), p.mean_own,
                    p.mean_other, 100 * p.top1, 100 * p.top5, p.sharpness);
      log(buf);
    }
    if (ae && step_ == o_.ae_steps && log && o_.probe_every > 0) {
      const auto p = probe_autoencoder();
      char buf[160];
      std::snprintf(buf, sizeof buf, "train [probe] autoencoder at step %lld: PSNR %.2f dB, SSIM %.4f over %lld images",
                    static_cast<long long>(step_), p.psnr_db, p.ssim, static_cast<long long>(p.n));
      log(buf);
    }
  }
  (void)window_start;
  if (step_ >= o_.ae_steps && !latents_.defined()) prepare_latents();
  st.step = step_;
  st.seconds = elapsed();
  return st;
}

ProbeResult EmojiTrainer::probe_adherence() {
  torch::NoGradGuard ng;
  if (!latents_.defined()) prepare_latents();
  std::vector<int64_t> own, other;
  std::vector<std::string> names;
  for (const auto& [i, o] : adherence_pairs(data_->size())) {
    own.push_back(i);
    other.push_back(o);
    names.push_back(data_->entries[static_cast<size_t>(i)].name);
  }
  if (own.empty()) return {};
  const int64_t B = static_cast<int64_t>(own.size());
  const bool text_training = text_->is_training(), unet_training = unet_->is_training(),
             ae_training = taesd_->is_training();
  text_->eval();
  unet_->eval();
  taesd_->eval();
  const auto ehs = text_->forward(tokenizer_->encode_batch(names));  // [B, L, D]
  auto gen = at::detail::createCPUGenerator(2);
  auto shape = latents_.sizes().vec();
  shape[0] = B;
  const auto xt = torch::randn(shape, gen);  // [B, C, h, w] pure noise, as the stream's first step
  const auto eps = unet_->forward(xt, torch::full({B}, 999, torch::kInt64), ehs);
  const double a = alphas_cumprod_[999].item<double>();
  const auto x0 = (xt - std::sqrt(1 - a) * eps) / std::sqrt(a);
  const auto img = taesd_->decode(x0 / scaling_factor_);  // [B, 3, 64, 64] in [-1, 1]
  text_->train(text_training);
  unet_->train(unet_training);
  taesd_->train(ae_training);
  auto small = [](const torch::Tensor& x) {
    return torch::adaptive_avg_pool2d((x.to(torch::kFloat32).clamp(-1, 1) + 1) / 2, {16, 16});
  };
  const auto g = small(img);
  const auto d_own = (g - small(data_->batch(torch::tensor(own, torch::kInt64)))).pow(2).sum({1, 2, 3}).sqrt();
  const auto d_oth = (g - small(data_->batch(torch::tensor(other, torch::kInt64)))).pow(2).sum({1, 2, 3}).sqrt();
  ProbeResult r;
  r.n = static_cast<int>(B);
  r.closer = static_cast<int>((d_own < d_oth).sum().item<int64_t>());
  r.mean_own = d_own.mean().item<double>();
  r.mean_other = d_oth.mean().item<double>();
  const auto own_t = torch::tensor(own, torch::kInt64);
  // The dataset's side of the retrieval does not change during training: computed at the first probe.
  if (!probe_gallery_.defined())
    probe_gallery_ = retrieval_features(data_->batch(torch::arange(data_->size(), torch::kInt64))).rgb;
  const auto ranks = retrieval_ranks(retrieval_features(img).rgb, probe_gallery_, own_t);
  r.top1 = (ranks <= 1).to(torch::kFloat64).mean().item<double>();
  r.top5 = (ranks <= 5).to(torch::kFloat64).mean().item<double>();
  const double real_sharp = rms_gradient(data_->batch(own_t)).mean().item<double>();
  r.sharpness = real_sharp > 0 ? rms_gradient(img).mean().item<double>() / real_sharp : 0;
  return r;
}

AutoencoderProbe EmojiTrainer::probe_autoencoder() {
  torch::NoGradGuard ng;
  const bool ae_training = taesd_->is_training();
  taesd_->eval();
  std::vector<torch::Tensor> p, s;
  for (int64_t i = 0; i < data_->size(); i += 64) {
    const auto x = data_->batch(torch::arange(i, std::min(data_->size(), i + 64), torch::kInt64));
    const auto y = taesd_->decode(taesd_->encode(x));
    p.push_back(psnr(y, x));
    s.push_back(ssim(y, x));
  }
  taesd_->train(ae_training);
  AutoencoderProbe r;
  r.n = data_->size();
  if (r.n > 0) {
    r.psnr_db = torch::cat(p).mean().item<double>();
    r.ssim = torch::cat(s).mean().item<double>();
  }
  return r;
}

std::map<std::string, torch::Tensor> EmojiTrainer::parameters() const {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [k, v] : state_dict(*taesd_)) out["taesd." + k] = v;
  for (const auto& [k, v] : state_dict(*text_)) out["text_encoder." + k] = v;
  for (const auto& [k, v] : state_dict(*unet_)) out["unet." + k] = v;
  return out;
}

void EmojiTrainer::save_checkpoint(const std::string& path) const {
  std::vector<std::pair<std::string, torch::Tensor>> t;
  for (const auto& [k, v] : parameters()) t.emplace_back(k, v.detach());
  save_opt_state(*ae_opt_, "optimizer.autoencoder.", t);
  save_opt_state(*opt_, "optimizer.unet_text.", t);
  std::ostringstream sf;
  sf.precision(17);
  sf << scaling_factor_;
  save_safetensors(path, t,
                   {{"format", "pt"},
                    {"generator", "streamdiffusion train"},
                    {"step", std::to_string(step_)},
                    {"seed", std::to_string(o_.seed)},
                    {"scaling_factor", sf.str()}});
}

bool EmojiTrainer::load_checkpoint(const std::string& path) {
  if (!fs::exists(path)) return false;
  const auto f = SafeTensorsFile::open(path);
  auto it = f.metadata().find("step");
  if (it == f.metadata().end()) throw FormatError(path, "no 'step' in the metadata (not a training checkpoint)");
  const auto seed = f.metadata().find("seed");
  if (seed != f.metadata().end() && seed->second != std::to_string(o_.seed))
    throw FormatError(path, "the checkpoint was trained with seed " + seed->second + ", this run uses seed " +
                                std::to_string(o_.seed) + " (delete the work folder or use the same seed)");
  std::map<std::string, torch::Tensor> params;
  for (const auto& k : f.keys())
    if (k.rfind("optimizer.", 0) != 0) params[k] = f.get(k);
  std::map<std::string, torch::Tensor> ta, te, un;
  for (auto& [k, v] : params) {
    if (k.rfind("taesd.", 0) == 0) ta[k.substr(6)] = v;
    else if (k.rfind("text_encoder.", 0) == 0) te[k.substr(13)] = v;
    else if (k.rfind("unet.", 0) == 0) un[k.substr(5)] = v;
    else throw FormatError(path, "unexpected tensor '" + k + "'");
  }
  {
    torch::NoGradGuard ng;
    // Copies (not adoption of the mapping): the parameters are trained further.
    for (auto& m : {&ta, &te, &un})
      for (auto& [k, v] : *m) v = v.clone();
    load_weights(*taesd_, ta, path + " (taesd.*)");
    load_weights(*text_, te, path + " (text_encoder.*)");
    load_weights(*unet_, un, path + " (unet.*)");
  }
  load_opt_state(*ae_opt_, "optimizer.autoencoder.", f);
  load_opt_state(*opt_, "optimizer.unet_text.", f);
  step_ = std::stoll(it->second);
  latents_ = torch::Tensor();
  text_features_ = torch::Tensor();
  return true;
}

void EmojiTrainer::export_model(const std::string& out_dir, torch::ScalarType dtype) const {
  const fs::path out(out_dir);
  for (const char* sub : {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "taesd"})
    fs::create_directories(out / sub);
  write_json(out / "model_index.json", pipeline_model_index());
  write_json(out / "scheduler" / "scheduler_config.json", lcm_scheduler_config());
  write_clip_tokenizer(vocab_, (out / "tokenizer").string(), tokenizer_->max_length());
  auto save = [&](const torch::nn::Module& m, const fs::path& file) {
    std::vector<std::pair<std::string, torch::Tensor>> t;
    for (const auto& [k, v] : state_dict(m)) t.emplace_back(k, v.is_floating_point() ? v.detach().to(dtype) : v);
    save_safetensors(file.string(), t, {{"format", "pt"}, {"generator", "streamdiffusion train"}});
  };
  write_json(out / "text_encoder" / "config.json", text_config_json_);
  save(*text_, out / "text_encoder" / "model.safetensors");
  json uc = o_.unet_config;
  write_json(out / "unet" / "config.json", uc);
  save(*unet_, out / "unet" / "diffusion_pytorch_model.safetensors");
  json tc = o_.taesd_config;
  tc["scaling_factor"] = scaling_factor_;
  write_json(out / "taesd" / "config.json", tc);
  save(*taesd_, out / "taesd" / "diffusion_pytorch_model.safetensors");
  // The pipeline takes the VAE scale factor (pixels per latent cell) from vae/config.json's block_out_channels
  // (2^(n-1)); the TAESD does all encoding and decoding, so the AutoencoderKL has a config and no weights.
  json vc = real_vae_config("sd15");
  const size_t stages = tc["encoder_block_out_channels"].size();
  std::vector<int> boc;
  for (size_t i = 0; i < stages; ++i) boc.push_back(64 * (1 << std::min<size_t>(i, 2)));
  vc["block_out_channels"] = boc;
  vc["down_block_types"] = std::vector<std::string>(stages, "DownEncoderBlock2D");
  vc["up_block_types"] = std::vector<std::string>(stages, "UpDecoderBlock2D");
  vc["sample_size"] = 64;
  vc["latent_channels"] = tc["latent_channels"];
  vc["scaling_factor"] = scaling_factor_;
  write_json(out / "vae" / "config.json", vc);
  // The settings the model is measured with (tests/train/test_emoji_adherence.cpp, docs/emoji-contact-sheet.png),
  // read by every command when no flag overrides them (pipeline/model_defaults.h).
  const int64_t px = uc.value("sample_size", 8) * (int64_t{1} << (stages - 1));
  write_json(out / "streamdiffusion.json",
             json{{"size", std::to_string(px) + "x" + std::to_string(px)},
                  {"num_inference_steps", 50},
                  // bf16's conversions outweigh this small model's arithmetic: 35 vs 78 fps in fp32 (Zen 4, 2 threads).
                  {"cpu_dtype", "fp32"},
                  // Too small to gain from a thread team: 90 fps on 1 thread, 44 on 2 (2-core Zen 4, stream).
                  {"cpu_threads", 1},
                  {"txt2img", {{"t_index_list", {0, 16, 32, 45}}, {"cfg_type", "none"}}},
                  {"img2img", {{"t_index_list", {32, 45}}, {"cfg_type", "self"}, {"guidance", 1.4}, {"delta", 0.8}}},
                  {"note", "built-in emoji model (" + std::to_string(px) + "x" + std::to_string(px) +
                               "): txt2img 4 steps in one UNet batch; img2img 2 steps with RCFG self"}});
}

}  // namespace sd::train
