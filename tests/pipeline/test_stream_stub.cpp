// Stream logic with stub models (spec §15): every configuration against an independent per-row simulation of the
// spec's formulas (§3.2, §3.6 intended layout, §4.4, §4.5), plus latency, warm-up, runtime updates, the similarity
// filter, sequential mode and errors.
#include <cmath>
#include <limits>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/stream_diffusion.h"
#include "pipeline/stream_test_stubs.h"

namespace sd {
namespace {

using test::StubModels;
using torch::Tensor;

constexpr int64_t kSize = 16;  // 16x16 pixels -> 2x2 latents

Tensor frames(int64_t F, int64_t seed) {
  auto g = at::detail::createCPUGenerator(1000 + seed);
  return torch::rand({F, 3, kSize, kSize}, g) * 2.0 - 1.0;
}

StreamConfig base_config(std::vector<int64_t> t_index, int64_t F, CfgType cfg) {
  StreamConfig c;
  c.t_index_list = std::move(t_index);
  c.frame_buffer_size = F;
  c.cfg_type = cfg;
  c.guidance_scale = 1.5;
  c.delta = 0.7;
  c.width = kSize;
  c.height = kSize;
  return c;
}

// ---- Independent simulation, one row (step j, frame f) at a time -------------------------------------------------
class Simulator {
 public:
  Simulator(const StreamConfig& c, const Tensor& init_noise, const Tensor& e_c, const Tensor& e_n)
      : n_(static_cast<int64_t>(c.t_index_list.size())), F_(c.frame_buffer_size), cfg_(c.cfg_type),
        g_(c.cfg_type == CfgType::None ? 1.0 : c.guidance_scale), d_(c.delta), add_noise_(c.do_add_noise),
        N_(init_noise), ec_(e_c), en_(e_n) {
    LCMScheduler s;
    const auto ts = s.timesteps(c.num_inference_steps);
    for (auto idx : c.t_index_list) {
      const auto k = s.coefficients(ts[idx]);
      t_.push_back(ts[idx]);
      a_.push_back(k.alpha_prod_t_sqrt);
      b_.push_back(k.beta_prod_t_sqrt);
      cs_.push_back(k.c_skip);
      co_.push_back(k.c_out);
    }
    guided_ = g_ > 1.0;
    head_ = c.original_frame_layout && F_ > 1 && n_ == 1 && !(guided_ && cfg_ == CfgType::Initialize);
    const auto zero = torch::zeros_like(N_[0]);
    S_.assign(n_ * F_, zero);
    buf_.assign(n_ * F_, zero);
  }

  // z: [F, 4, h, w] new latents (already noised for txt2img, to be noised for img2img). Returns x0 rows [F, ...].
  Tensor step(const Tensor& z, bool img2img) {
    const int64_t B = n_ * F_;
    auto row = [&](int64_t j, int64_t f) { return j * F_ + f; };
    std::vector<Tensor> X(B), Sp(B), eps(B), x0(B);
    for (int64_t f = 0; f < F_; ++f) {
      const Tensor noise = head_ ? N_[0] : N_[f];
      X[row(0, f)] = img2img ? a_[0] * z[f] + b_[0] * noise : z[f];
      for (int64_t j = 1; j < n_; ++j) X[row(j, f)] = buf_[row(j, f)];
      for (int64_t j = 0; j < n_; ++j) {
        if (n_ > 1)
          Sp[row(j, f)] = j == 0 ? N_[row(0, f)] : S_[row(j - 1, f)];
        else
          Sp[row(j, f)] = S_[row(j, f)];
      }
    }
    for (int64_t j = 0; j < n_; ++j)
      for (int64_t f = 0; f < F_; ++f) {
        const int64_t r = row(j, f);
        const Tensor tt = torch::tensor({t_[j]});
        const Tensor eps_c = StubModels::stub_eps(X[r].unsqueeze(0), tt, ec_)[0];
        if (guided_ && cfg_ == CfgType::Initialize && j == 0)
          Sp[r] = StubModels::stub_eps(X[r].unsqueeze(0), tt, en_)[0];
        Tensor eps_u;
        if (guided_ && cfg_ == CfgType::Full) eps_u = StubModels::stub_eps(X[r].unsqueeze(0), tt, en_)[0];
        if (guided_ && (cfg_ == CfgType::Self || cfg_ == CfgType::Initialize)) eps_u = d_ * Sp[r];
        eps[r] = guided_ ? eps_u + g_ * (eps_c - eps_u) : eps_c;
        x0[r] = co_[j] * ((X[r] - b_[j] * eps[r]) / a_[j]) + cs_[j] * X[r];
      }
    if (cfg_ == CfgType::Self || cfg_ == CfgType::Initialize) {
      const int64_t R = head_ ? 1 : F_;
      for (int64_t r = 0; r < B; ++r) {
        const int64_t j = r / F_;
        const bool last = r + R >= B;
        const double a_next = last ? 1.0 : a_[(r + R) / F_];
        const double b_next = last ? 1.0 : b_[(r + R) / F_];
        const Tensor P = b_[j] * Sp[r];
        Tensor delta = co_[j] * ((P - b_[j] * eps[r]) / a_[j]) + cs_[j] * P;
        delta = a_next * delta;
        delta = delta / b_next;
        S_[r] = N_[(r + R) % B] + delta;
      }
    } else {
      S_ = Sp;
    }
    for (int64_t j = 0; j + 1 < n_; ++j)
      for (int64_t f = 0; f < F_; ++f) {
        Tensor v = a_[j + 1] * x0[row(j, f)];
        if (add_noise_) v = v + b_[j + 1] * N_[row(j + 1, f)];
        buf_[row(j + 1, f)] = v;
      }
    std::vector<Tensor> out;
    for (int64_t f = 0; f < F_; ++f) out.push_back(x0[row(n_ - 1, f)]);
    return torch::stack(out);
  }
  Tensor stock() const { return torch::stack(S_); }
  Tensor buffer() const {
    return n_ > 1 ? torch::stack(std::vector<Tensor>(buf_.begin() + F_, buf_.end())) : Tensor();
  }

 private:
  int64_t n_, F_;
  CfgType cfg_;
  double g_, d_;
  bool add_noise_, guided_ = false, head_ = false;
  Tensor N_, ec_, en_;
  std::vector<int64_t> t_;
  std::vector<double> a_, b_, cs_, co_;
  std::vector<Tensor> S_, buf_;
};

struct SimCase {
  std::vector<int64_t> t_index;
  int64_t F;
  CfgType cfg;
  bool add_noise;
  bool original_layout;
  bool img2img;
  std::string name() const {
    std::ostringstream o;
    o << (img2img ? "img2img" : "txt2img") << "_n" << t_index.size() << "_F" << F << "_" << cfg_type_name(cfg)
      << (add_noise ? "" : "_nonoise") << (original_layout ? "" : "_intended");
    return o.str();
  }
};

void PrintTo(const SimCase& c, std::ostream* os) { *os << c.name(); }

std::vector<SimCase> sim_cases() {
  std::vector<SimCase> out;
  const std::vector<std::vector<int64_t>> lists{{35}, {32, 45}, {0, 16, 32, 45}};
  for (const auto& l : lists)
    for (int64_t F : {1, 2})
      for (CfgType cfg : {CfgType::None, CfgType::Self, CfgType::Initialize, CfgType::Full})
        for (bool noise : {true, false})
          for (bool img : {true, false}) {
            if (!noise && l.size() == 1) continue;  // no buffer: the flag has no effect
            out.push_back({l, F, cfg, noise, true, img});
            if (F > 1 && l.size() == 1) out.push_back({l, F, cfg, noise, false, img});
          }
  return out;
}

class StreamVsSpec : public ::testing::TestWithParam<SimCase> {};

TEST_P(StreamVsSpec, EveryCallMatchesTheSpecFormulas) {
  const auto& p = GetParam();
  auto models = std::make_shared<StubModels>();
  auto cfg = base_config(p.t_index, p.F, p.cfg);
  cfg.do_add_noise = p.add_noise;
  cfg.original_frame_layout = p.original_layout;
  StreamDiffusion stream(models, cfg);
  std::vector<Tensor> x0s;
  stream.set_trace([&](const std::string& name, const Tensor& t) {
    if (name == "x_0_pred_out") x0s.push_back(t.clone());
  });
  stream.prepare("a cat", "blurry");
  Simulator sim(cfg, stream.init_noise().clone(), StubModels::text_embedding("a cat", 8),
                StubModels::text_embedding("blurry", 8));
  // The simulator's copy of the stream's draws: seeded like prepare(), init_noise first.
  TorchRng mirror(cfg.seed);
  mirror.randn(stream.init_noise().sizes(), "init_noise");  // keep in step with the stream's generator
  for (int call = 0; call < 6; ++call) {
    SCOPED_TRACE("call " + std::to_string(call));
    Tensor out, expect_x0;
    if (p.img2img) {
      const Tensor x = frames(p.F, call);
      out = stream.img2img(x);
      expect_x0 = sim.step(models->encode_image(x, mirror), true);
    } else {
      out = stream.txt2img();
      const Tensor z = mirror.randn({p.F, 4, kSize / 8, kSize / 8}, "txt2img");
      expect_x0 = sim.step(z, false);
    }
    ASSERT_EQ(static_cast<int>(x0s.size()), call + 1);
    EXPECT_TRUE(test::tensors_close(x0s.back(), expect_x0, 1e-5, 1e-5, "x0 out"));
    EXPECT_TRUE(test::tensors_close(out, models->decode_latent(expect_x0), 1e-5, 1e-5, "output"));
    EXPECT_EQ(out.size(0), p.F);
    EXPECT_TRUE(test::tensors_close(stream.stock_noise(), sim.stock(), 1e-5, 1e-5, "stock_noise"));
    if (p.t_index.size() > 1)
      EXPECT_TRUE(test::tensors_close(stream.latent_buffer(), sim.buffer(), 1e-5, 1e-5, "buffer"));
    else
      EXPECT_FALSE(stream.latent_buffer().defined());
  }
  // UNet rows per call (spec §4.1 / 3.6).
  const int64_t B = static_cast<int64_t>(p.t_index.size()) * p.F;
  const int64_t rows = p.cfg == CfgType::Full ? 2 * B : p.cfg == CfgType::Initialize ? B + p.F : B;
  EXPECT_EQ(stream.unet_batch_size(), rows);
  for (const auto& c : models->unet_calls()) EXPECT_EQ(c.sample.size(0), rows);
  EXPECT_EQ(stream.stats().unet_calls, 6);
}

INSTANTIATE_TEST_SUITE_P(Stub, StreamVsSpec, ::testing::ValuesIn(sim_cases()),
                         [](const auto& info) { return test::test_name(info.param.name()); });

// ---- Latency and warm-up (spec §3.3) -------------------------------------------------------------------------------
TEST(StreamStub, FrameKComesBackAtCallKPlusNMinus1) {
  for (int64_t n : {1, 2, 3}) {
    for (int64_t F : {1, 2}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " F=" + std::to_string(F));
      std::vector<int64_t> tl;
      for (int64_t j = 0; j < n; ++j) tl.push_back(20 + 10 * j);
      const auto cfg = base_config(tl, F, CfgType::None);
      StreamDiffusion a(std::make_shared<StubModels>(), cfg), b(std::make_shared<StubModels>(), cfg);
      a.prepare("p");
      b.prepare("p");
      const int64_t k = 2;
      for (int64_t call = 0; call < 6; ++call) {
        const Tensor x = frames(F, call);
        const Tensor y = call == k ? frames(F, 99) : x;  // stream b differs only in frame(s) k
        const Tensor oa = a.img2img(x), ob = b.img2img(y);
        if (call == k + n - 1)
          EXPECT_FALSE(torch::allclose(oa, ob)) << "call " << call << " should show the changed frame";
        else
          EXPECT_TRUE(torch::equal(oa, ob)) << "call " << call << " should not depend on frame " << k;
      }
    }
  }
}

TEST(StreamStub, WarmUpOutputsComeFromTheZeroBuffer) {
  const auto cfg = base_config({0, 16, 32, 45}, 1, CfgType::None);
  auto models = std::make_shared<StubModels>();
  StreamDiffusion a(models, cfg), b(models, cfg);
  a.prepare("p");
  b.prepare("p");
  for (int call = 0; call < 3; ++call) {  // first n-1 outputs do not depend on the input at all
    const Tensor oa = a.img2img(frames(1, call)), ob = b.img2img(frames(1, 50 + call));
    EXPECT_TRUE(torch::equal(oa, ob)) << call;
  }
  EXPECT_FALSE(torch::equal(a.img2img(frames(1, 3)), b.img2img(frames(1, 53))));
}

TEST(StreamStub, BufferHoldsRenoisedPredictionsWithFixedNoise) {
  // n = 2, F = 2 (intended layout): after one call the buffer is α1·X0[0:2] + β1·init_noise[2:4].
  auto cfg = base_config({32, 45}, 2, CfgType::None);
  auto models = std::make_shared<StubModels>();
  StreamDiffusion s(models, cfg);
  s.prepare("p");
  s.img2img(frames(2, 0));
  const auto call = models->unet_calls().back();
  LCMScheduler sch;
  const auto k0 = sch.coefficients(359), k1 = sch.coefficients(99);
  ASSERT_EQ(call.sample.size(0), 4);
  EXPECT_TRUE(torch::equal(call.timesteps, torch::tensor({359, 359, 99, 99}, torch::kInt64)));
  const Tensor rows01 = call.sample.slice(0, 0, 2);
  const Tensor x0 = k0.c_out * ((rows01 - k0.beta_prod_t_sqrt * call.out.slice(0, 0, 2)) / k0.alpha_prod_t_sqrt) +
                    k0.c_skip * rows01;
  const Tensor expect = k1.alpha_prod_t_sqrt * x0 + k1.beta_prod_t_sqrt * s.init_noise().slice(0, 2, 4);
  EXPECT_TRUE(test::tensors_close(s.latent_buffer(), expect, 1e-6, 1e-6, "buffer"));
  // Next call: rows 2..3 of the UNet batch are that buffer (each frame pair goes through both steps).
  s.img2img(frames(2, 1));
  EXPECT_TRUE(torch::equal(models->unet_calls().back().sample.slice(0, 2, 4), expect));
  // Entry rows use per-frame noise rows 0 and 1.
  const Tensor z = models->encode_image(frames(2, 1), *s.rng());
  const Tensor entry = k0.alpha_prod_t_sqrt * z + k0.beta_prod_t_sqrt * s.init_noise().slice(0, 0, 2);
  EXPECT_TRUE(test::tensors_close(models->unet_calls().back().sample.slice(0, 0, 2), entry, 1e-6, 1e-6, "entry"));
}

TEST(StreamStub, OriginalLayoutForOneStepManyFramesUsesNoiseRowZero) {
  auto cfg = base_config({35}, 2, CfgType::None);
  auto models = std::make_shared<StubModels>();
  StreamDiffusion s(models, cfg);
  s.prepare("p");
  const Tensor x = frames(2, 0);
  s.img2img(x);
  const auto k = LCMScheduler().coefficients(299);
  const Tensor z = models->encode_image(x, *s.rng());
  const Tensor entry = k.alpha_prod_t_sqrt * z + k.beta_prod_t_sqrt * s.init_noise()[0];
  EXPECT_TRUE(test::tensors_close(models->unet_calls().back().sample, entry, 1e-6, 1e-6, "entry (row 0 noise)"));
}

// ---- RCFG state: an explicit closed-form check for n = 2, self, c_skip/c_out as computed -------------------------
TEST(StreamStub, SelfRcfgStockNoiseAfterTwoCalls) {
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  auto models = std::make_shared<StubModels>();
  StreamDiffusion s(models, cfg);
  s.prepare("p");
  const Tensor N = s.init_noise().clone();
  s.img2img(frames(1, 0));
  // After call 1: S was [N0, 0]; ε = δS + γ(ε_c − δS); S_new[0] = N1 + (α1/β1)·(c_out0·((β0·N0 − β0·ε0)/α0) +
  // c_skip0·β0·N0); S_new[1] = N0 + c_out1·((β1·0 − β1·ε1)/α1) + 0.
  const auto u = models->unet_calls().back();
  LCMScheduler sch;
  const auto k0 = sch.coefficients(359), k1 = sch.coefficients(99);
  const double g = 1.5, d = 0.7;
  const Tensor e0 = d * N[0] + g * (u.out[0] - d * N[0]);
  const Tensor e1 = g * u.out[1];
  const Tensor s0 = N[1] + (k1.alpha_prod_t_sqrt *
                            (k0.c_out * ((k0.beta_prod_t_sqrt * N[0] - k0.beta_prod_t_sqrt * e0) / k0.alpha_prod_t_sqrt) +
                             k0.c_skip * (k0.beta_prod_t_sqrt * N[0]))) /
                               k1.beta_prod_t_sqrt;
  const Tensor s1 = N[0] + k1.c_out * ((0 - k1.beta_prod_t_sqrt * e1) / k1.alpha_prod_t_sqrt);
  EXPECT_TRUE(test::tensors_close(s.stock_noise(), torch::stack({s0, s1}), 1e-5, 1e-5, "stock after call 1"));
  // Call 2 shifts: the UNet's guidance used [N0, s0]; the last row s1 was discarded.
  s.img2img(frames(1, 1));
  const auto u2 = models->unet_calls().back();
  const Tensor sp = torch::stack({N[0], s0});
  const Tensor eps2 = d * sp + g * (u2.out - d * sp);
  const Tensor x0_row1 = k1.c_out * ((u2.sample[1] - k1.beta_prod_t_sqrt * eps2[1]) / k1.alpha_prod_t_sqrt) +
                         k1.c_skip * u2.sample[1];
  EXPECT_TRUE(test::tensors_close(s.previous_output(), models->decode_latent(x0_row1.unsqueeze(0)), 1e-5, 1e-5,
                                  "output of call 2"));
}

TEST(StreamStub, GuidanceAtMostOneBehavesLikeNone) {
  for (CfgType cfg : {CfgType::Self, CfgType::Initialize, CfgType::Full}) {
    auto c1 = base_config({32, 45}, 1, cfg);
    c1.guidance_scale = 1.0;
    auto c2 = base_config({32, 45}, 1, CfgType::None);
    auto m1 = std::make_shared<StubModels>(), m2 = std::make_shared<StubModels>();
    StreamDiffusion a(m1, c1), b(m2, c2);
    a.prepare("p", "neg");
    b.prepare("p", "neg");
    EXPECT_EQ(a.unet_batch_size(), 2);
    EXPECT_EQ(a.uncond_rows(), 0);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(a.img2img(frames(1, i)), b.img2img(frames(1, i))));
    // the negative prompt is never encoded
    for (const auto& p : m1->prompts()) EXPECT_NE(p, "neg");
  }
  auto c = base_config({32}, 1, CfgType::None);
  c.guidance_scale = 3.0;
  StreamDiffusion s(std::make_shared<StubModels>(), c);
  s.prepare("p");
  EXPECT_EQ(s.guidance_scale(), 1.0);  // cfg none forces 1
}

// ---- Prompt layouts and runtime updates (spec §4.1, §6) ------------------------------------------------------------
TEST(StreamStub, PromptLayoutsAndUpdatePromptKeepNegativeRows) {
  const auto ec = [](const std::string& s) { return StubModels::text_embedding(s, 8); };
  struct L {
    CfgType cfg;
    int64_t uncond, cond;
  };
  for (const auto& l : {L{CfgType::None, 0, 4}, L{CfgType::Self, 0, 4}, L{CfgType::Full, 4, 4},
                        L{CfgType::Initialize, 2, 4}}) {
    SCOPED_TRACE(cfg_type_name(l.cfg));
    auto cfg = base_config({32, 45}, 2, l.cfg);
    StreamDiffusion s(std::make_shared<StubModels>(), cfg);
    s.prepare("first", "neg1");
    const auto check = [&](const std::string& p, const std::string& neg) {
      const Tensor pe = s.prompt_embeds();
      ASSERT_EQ(pe.size(0), l.uncond + l.cond);
      for (int64_t r = 0; r < l.uncond; ++r) EXPECT_TRUE(torch::equal(pe[r], ec(neg)[0]));
      for (int64_t r = l.uncond; r < pe.size(0); ++r) EXPECT_TRUE(torch::equal(pe[r], ec(p)[0]));
    };
    check("first", "neg1");
    s.img2img(frames(2, 0));
    s.update_prompt("second", "neg2");
    check("second", "neg2");
    EXPECT_NO_THROW(s.img2img(frames(2, 1)));
    EXPECT_NO_THROW(s.img2img(frames(2, 2)));
  }
}

TEST(StreamStub, SetGuidanceScaleRebuildsTheLayout) {
  auto cfg = base_config({32, 45}, 1, CfgType::Full);
  cfg.guidance_scale = 1.0;
  auto models = std::make_shared<StubModels>();
  StreamDiffusion s(models, cfg);
  s.prepare("p", "neg");
  EXPECT_EQ(s.prompt_embeds().size(0), 2);
  s.img2img(frames(1, 0));
  s.set_guidance_scale(2.0);
  EXPECT_EQ(s.prompt_embeds().size(0), 4);
  EXPECT_EQ(s.uncond_rows(), 2);
  s.img2img(frames(1, 1));
  EXPECT_EQ(models->unet_calls().back().sample.size(0), 4);
  s.set_guidance_scale(0.5);
  EXPECT_EQ(s.prompt_embeds().size(0), 2);
  s.set_delta(0.25);
  EXPECT_EQ(s.delta(), 0.25);
}

TEST(StreamStub, SetTIndexListSameLengthKeepsBuffersOtherLengthResets) {
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  StreamDiffusion s(std::make_shared<StubModels>(), cfg);
  s.prepare("p");
  s.img2img(frames(1, 0));
  s.img2img(frames(1, 1));
  const Tensor buf = s.latent_buffer().clone(), stock = s.stock_noise().clone(), noise = s.init_noise().clone();
  s.set_t_index_list({30, 40});
  EXPECT_EQ(s.sub_timesteps(), (std::vector<int64_t>{399, 199}));
  EXPECT_TRUE(torch::equal(s.latent_buffer(), buf));
  EXPECT_TRUE(torch::equal(s.stock_noise(), stock));
  EXPECT_TRUE(torch::equal(s.init_noise(), noise));
  const auto k = LCMScheduler().coefficients(399);
  EXPECT_FLOAT_EQ(s.alpha_prod_t_sqrt()[0].item<float>(), k.alpha_prod_t_sqrt);
  s.set_t_index_list({10, 30, 40});
  EXPECT_EQ(s.batch_size(), 3);
  EXPECT_EQ(s.latent_buffer().size(0), 2);
  EXPECT_EQ(s.latent_buffer().abs().max().item<float>(), 0.0f);
  EXPECT_EQ(s.stock_noise().abs().max().item<float>(), 0.0f);
  EXPECT_EQ(s.prompt_embeds().size(0), 3);
  EXPECT_NO_THROW(s.img2img(frames(1, 2)));
  EXPECT_THROW(s.set_t_index_list({10, 60}), InvalidArgument);
  EXPECT_EQ(s.batch_size(), 3);  // unchanged after a rejected update
}

TEST(StreamStub, SetSeedRedrawsNoiseResetsStockKeepsBuffer) {
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  StreamDiffusion s(std::make_shared<StubModels>(), cfg);
  s.prepare("p");
  s.img2img(frames(1, 0));
  const Tensor buf = s.latent_buffer().clone(), noise = s.init_noise().clone();
  s.set_seed(5);
  EXPECT_TRUE(torch::equal(s.latent_buffer(), buf));
  EXPECT_FALSE(torch::equal(s.init_noise(), noise));
  EXPECT_TRUE(torch::equal(s.init_noise(), TorchRng(5).randn({2, 4, 2, 2}, "x")));
  EXPECT_EQ(s.stock_noise().abs().max().item<float>(), 0.0f);
}

TEST(StreamStub, ReproducibleForAFixedSeed) {
  for (bool img : {true, false}) {
    auto cfg = base_config({0, 16, 32, 45}, 1, CfgType::Self);
    auto run = [&](uint64_t seed) {
      auto c = cfg;
      c.seed = seed;
      StreamDiffusion s(std::make_shared<StubModels>(1.0, true), c);  // posterior noise draws too
      s.prepare("p");
      std::vector<Tensor> outs;
      for (int i = 0; i < 5; ++i) outs.push_back(img ? s.img2img(frames(1, i)) : s.txt2img());
      return torch::stack(outs);
    };
    EXPECT_TRUE(torch::equal(run(3), run(3)));
    EXPECT_FALSE(torch::equal(run(3), run(4)));
  }
}

TEST(StreamStub, PrepareDrawsInitNoiseFirstFromTheSeed) {
  auto cfg = base_config({32, 45}, 2, CfgType::None);
  cfg.seed = 11;
  StreamDiffusion s(std::make_shared<StubModels>(), cfg);
  s.prepare("p");
  TorchRng ref(11);
  EXPECT_TRUE(torch::equal(s.init_noise(), ref.randn({4, 4, 2, 2}, "init")));
  s.txt2img();  // next draw: the [F, 4, h, w] txt2img latent
  std::vector<Tensor> seen;
  s.set_trace([&](const std::string& n, const Tensor& t) {
    if (n == "x_t_latent_in") seen.push_back(t.clone());
  });
  ref.randn({2, 4, 2, 2}, "first txt2img");
  s.txt2img();
  EXPECT_TRUE(torch::equal(seen.at(0), ref.randn({2, 4, 2, 2}, "second txt2img")));
  // prepare again restarts the stream: zero buffer, same init_noise
  const Tensor n0 = s.init_noise().clone();
  s.prepare("p");
  EXPECT_TRUE(torch::equal(s.init_noise(), n0));
  EXPECT_EQ(s.latent_buffer().abs().max().item<float>(), 0.0f);
}

// ---- Sequential mode (spec §3.8) ------------------------------------------------------------------------------------
TEST(StreamStub, SequentialModeQuirks) {
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  cfg.use_denoising_batch = false;
  auto models = std::make_shared<StubModels>();
  // Draws: init_noise [1,...], then one fresh noise per intermediate step.
  std::vector<Tensor> draws;
  for (int i = 0; i < 4; ++i) draws.push_back(torch::randn({1, 4, 2, 2}));
  StreamDiffusion s(models, cfg, std::make_shared<ReplayRng>(draws));
  s.prepare("p");
  EXPECT_EQ(s.batch_size(), 1);
  EXPECT_EQ(s.alpha_prod_t_sqrt().size(0), 2);
  LCMScheduler sch;
  const auto k0 = sch.coefficients(359), k1 = sch.coefficients(99);
  Tensor prev_noise = draws[0];
  for (int call = 0; call < 3; ++call) {
    const Tensor x = frames(1, call);
    const Tensor out = s.img2img(x);
    const Tensor z = models->encode_image(x, *s.rng());
    const Tensor x_t = k0.alpha_prod_t_sqrt * z + k0.beta_prod_t_sqrt * prev_noise[0];
    EXPECT_TRUE(test::tensors_close(s.init_noise(), x_t, 1e-6, 0.0, "init_noise overwritten by the input latent"));
    // self without the batch: stock stays 0 -> ε = γ·ε_c
    const Tensor e0 = 1.5 * StubModels::stub_eps(x_t, torch::tensor({359}), StubModels::text_embedding("p", 8));
    const Tensor x0a = k0.c_out * ((x_t - k0.beta_prod_t_sqrt * e0) / k0.alpha_prod_t_sqrt) + k0.c_skip * x_t;
    const Tensor x1 = k1.alpha_prod_t_sqrt * x0a + k1.beta_prod_t_sqrt * draws[1 + call];
    const Tensor e1 = 1.5 * StubModels::stub_eps(x1, torch::tensor({99}), StubModels::text_embedding("p", 8));
    const Tensor x0b = k1.c_out * ((x1 - k1.beta_prod_t_sqrt * e1) / k1.alpha_prod_t_sqrt) + k1.c_skip * x1;
    EXPECT_TRUE(test::tensors_close(out, models->decode_latent(x0b), 1e-5, 1e-5, "sequential output"));
    EXPECT_EQ(s.stock_noise().abs().max().item<float>(), 0.0f);
    prev_noise = s.init_noise();
  }
  EXPECT_EQ(models->unet_calls().size(), 6u);
}

TEST(StreamStub, SequentialFullIsPlainCfgPerStep) {
  auto cfg = base_config({32, 45}, 1, CfgType::Full);
  cfg.use_denoising_batch = false;
  cfg.do_add_noise = false;
  auto models = std::make_shared<StubModels>();
  StreamDiffusion s(models, cfg);
  s.prepare("p", "n");
  EXPECT_EQ(s.prompt_embeds().size(0), 2);
  const Tensor out = s.txt2img();
  const auto calls = models->unet_calls();
  ASSERT_EQ(calls.size(), 2u);
  for (const auto& c : calls) {
    EXPECT_EQ(c.sample.size(0), 2);
    EXPECT_TRUE(torch::equal(c.sample[0], c.sample[1]));
  }
  LCMScheduler sch;
  const auto k1 = sch.coefficients(99);
  const auto& c1 = calls[1];
  const Tensor eps = c1.out[0] + 1.5 * (c1.out[1] - c1.out[0]);
  const Tensor x0 = k1.c_out * ((c1.sample[1] - k1.beta_prod_t_sqrt * eps) / k1.alpha_prod_t_sqrt) +
                    k1.c_skip * c1.sample[1];
  EXPECT_TRUE(test::tensors_close(out, models->decode_latent(x0.unsqueeze(0)), 1e-5, 1e-5, "CFG output"));
}

// ---- sd-turbo one-shot (spec §3.5) ----------------------------------------------------------------------------------
TEST(StreamStub, OneShotBatch) {
  auto cfg = base_config({0}, 3, CfgType::None);
  auto models = std::make_shared<StubModels>();
  std::vector<Tensor> draws{torch::randn({3, 4, 2, 2}), torch::randn({3, 4, 2, 2})};
  StreamDiffusion s(models, cfg, std::make_shared<ReplayRng>(draws));
  s.prepare("p");
  const Tensor out = s.txt2img_one_shot();
  ASSERT_EQ(out.size(0), 3);
  const auto k = LCMScheduler().coefficients(999);
  const Tensor eps = StubModels::stub_eps(draws[1], torch::tensor({999, 999, 999}),
                                          StubModels::text_embedding("p", 8).repeat({3, 1, 1}));
  const Tensor x0 = (draws[1] - k.beta_prod_t_sqrt * eps) / k.alpha_prod_t_sqrt;
  EXPECT_TRUE(test::tensors_close(out, models->decode_latent(x0), 1e-5, 1e-5, "one-shot"));
  EXPECT_FALSE(s.latent_buffer().defined());
}

// ---- Similarity filter in the stream (spec §5) ---------------------------------------------------------------------
TEST(StreamStub, SimilarityFilterSkipsWithoutTouchingState) {
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  cfg.similarity_filter.enabled = true;
  cfg.similarity_filter.threshold = 0.9;
  cfg.similarity_filter.max_skip_frame = 1;
  auto models = std::make_shared<StubModels>();
  // uniforms: skip (p=1 >= 0.5), skip, forced (count 2 > 1), different frame processed
  auto u = std::make_shared<ReplayUniformSource>(std::vector<double>{0.5, 0.5, 0.5, 0.5});
  StreamDiffusion s(models, cfg, nullptr, u);
  s.prepare("p");
  const Tensor a = frames(1, 0);
  const Tensor o0 = s.img2img(a);
  const Tensor buf = s.latent_buffer().clone(), stock = s.stock_noise().clone();
  const Tensor o1 = s.img2img(a);
  EXPECT_EQ(o1.data_ptr(), o0.data_ptr()) << "a skipped call returns the previous output tensor";
  EXPECT_TRUE(torch::equal(s.latent_buffer(), buf));
  EXPECT_TRUE(torch::equal(s.stock_noise(), stock));
  EXPECT_FALSE(s.last_filter_decision().process);
  s.img2img(a);
  EXPECT_EQ(models->unet_calls().size(), 1u);
  s.img2img(a);  // forced through
  EXPECT_TRUE(s.last_filter_decision().forced);
  EXPECT_EQ(models->unet_calls().size(), 2u);
  s.img2img(-a);  // dissimilar: processed
  EXPECT_EQ(models->unet_calls().size(), 3u);
  EXPECT_EQ(s.stats().calls, 5);
  EXPECT_EQ(s.stats().skipped, 2);
  EXPECT_EQ(s.stats().forced, 1);
  EXPECT_EQ(s.stats().processed, 3);
  EXPECT_EQ(s.similarity_filter()->skipped(), 2);
}

// A UNet that fails on chosen calls (an out-of-memory error, say).
class FailingUnet : public StubModels {
 public:
  mutable int64_t calls = 0;
  std::vector<int64_t> fail_at;
  torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& t, const torch::Tensor& ehs,
                     const AddedConditioning& added, const ControlResiduals& control) const override {
    if (std::find(fail_at.begin(), fail_at.end(), calls++) != fail_at.end()) throw Error("stub unet: out of memory");
    return StubModels::unet(sample, t, ehs, added, control);
  }
};

TEST(StreamStub, AFailedUNetCallLeavesTheStreamWhereItWas) {
  // cfg self with two steps: the call shifts the RCFG state before its UNet call. After a failure a stream must go on
  // as if the failed call had not been made (the buffer did not move, so the stock noise must not have either).
  for (CfgType cfg_type : {CfgType::Self, CfgType::Initialize, CfgType::Full}) {
    SCOPED_TRACE(cfg_type_name(cfg_type));
    const auto cfg = base_config({32, 45}, 1, cfg_type);
    auto failing = std::make_shared<FailingUnet>();
    failing->fail_at = {2};
    auto clean = std::make_shared<FailingUnet>();
    StreamDiffusion s(failing, cfg), ref(clean, cfg);
    s.prepare("p");
    ref.prepare("p");
    for (int i = 0; i < 2; ++i) ASSERT_TRUE(torch::equal(s.img2img(frames(1, i)), ref.img2img(frames(1, i))));
    EXPECT_THROW(s.img2img(frames(1, 2)), Error);
    EXPECT_TRUE(torch::equal(s.stock_noise(), ref.stock_noise()));
    EXPECT_TRUE(torch::equal(s.latent_buffer(), ref.latent_buffer()));
    for (int i = 2; i < 5; ++i)
      EXPECT_TRUE(torch::equal(s.img2img(frames(1, i)), ref.img2img(frames(1, i)))) << "call " << i;
  }
}

TEST(StreamStub, TheFilterDoesNotSkipBeforeThereIsAnOutputToAnswerWith) {
  // The first call fails after the filter took its frame as the reference; the retry with the same frame would be
  // skipped (similarity 1) with nothing to return.
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  cfg.similarity_filter.enabled = true;
  cfg.similarity_filter.threshold = 0.9;
  auto models = std::make_shared<FailingUnet>();
  models->fail_at = {0};
  auto u = std::make_shared<ReplayUniformSource>(std::vector<double>{0.5, 0.5, 0.5});
  StreamDiffusion s(models, cfg, nullptr, u);
  s.prepare("p");
  const Tensor a = frames(1, 0);
  EXPECT_THROW(s.img2img(a), Error);
  const Tensor out = s.img2img(a);
  ASSERT_TRUE(out.defined());
  EXPECT_EQ(out.sizes().vec(), (std::vector<int64_t>{1, 3, kSize, kSize}));
  EXPECT_TRUE(s.last_filter_decision().process);
  EXPECT_EQ(s.img2img(a).data_ptr(), out.data_ptr()) << "then it skips as before";
}

// ---- Errors ----------------------------------------------------------------------------------------------------
TEST(StreamStub, Errors) {
  auto models = std::make_shared<StubModels>();
  const auto expect_invalid = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      FAIL() << "no error, expected one mentioning " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto cfg = base_config({32, 45}, 1, CfgType::Self);
  expect_invalid([&] { StreamDiffusion(models, [&] { auto c = cfg; c.width = 20; return c; }()); }, "multiples of 8");
  expect_invalid([&] { StreamDiffusion(models, [&] { auto c = cfg; c.t_index_list = {}; return c; }()); }, "empty");
  expect_invalid([&] { StreamDiffusion(models, [&] { auto c = cfg; c.t_index_list = {50}; return c; }()); },
                 "t_index_list[0] = 50");
  expect_invalid([&] { StreamDiffusion(models, [&] { auto c = cfg; c.num_inference_steps = 60; return c; }()); },
                 "original_inference_steps");
  expect_invalid([&] { StreamDiffusion(models, [&] { auto c = cfg; c.frame_buffer_size = 0; return c; }()); },
                 "frame_buffer_size");
  StreamDiffusion s(models, cfg);
  expect_invalid([&] { s.img2img(frames(1, 0)); }, "prepare");
  s.prepare("p");
  expect_invalid([&] { s.img2img(torch::zeros({1, 3, 8, 16})); }, "[1, 3, 16, 16]");
  expect_invalid([&] { s.img2img(torch::zeros({2, 3, 16, 16})); }, "[1, 3, 16, 16]");
  EXPECT_NO_THROW(s.img2img(torch::zeros({3, 16, 16})));  // a single frame without the batch dim
  // A NaN frame is refused before it touches the stream (it would stay in the RCFG state for good with n = 1).
  const int64_t calls = s.stats().calls;
  Tensor nan_frame = torch::zeros({1, 3, 16, 16});
  nan_frame[0][1][3][4] = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { s.img2img(nan_frame); }, "NaN or infinite");
  expect_invalid([&] { s.img2img(torch::full({1, 3, 16, 16}, INFINITY)); }, "NaN or infinite");
  EXPECT_EQ(s.stats().calls, calls);
  EXPECT_THROW(parse_cfg_type("cfg"), InvalidArgument);
  auto seq = cfg;
  seq.use_denoising_batch = false;
  seq.frame_buffer_size = 1;
  StreamDiffusion q(models, seq);
  q.prepare("p");
  expect_invalid([&] { q.txt2img_one_shot(); }, "sequential");
}

}  // namespace
}  // namespace sd
