// Single-file (original LDM layout) checkpoints: conversion by io/ldm_checkpoint against the equal diffusers folders
// (bit-exact for float32 files), against the fixture's key_mapping.json, config inference, and the module goldens
// through a single-file load. Data-driven over single_file/cases.json and key_mapping.json.
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/random_model.h"
#include "models/unet_2d_condition.h"

namespace {

namespace cv = sd::convert;
constexpr double kAtol = 1e-4, kRtol = 1e-5;  // fixture README: single module calls in float32
const char* kCases = "single_file/cases.json";

struct FileCase {
  int index = 0;
  std::string file;    // "tiny-sd15.safetensors"
  std::string folder;  // "models/tiny-sd15"
  std::string model;   // "tiny-sd15"
  std::string dtype;   // "float32" | "float16"
  std::string goldens; // "" = the base module goldens apply
};
void PrintTo(const FileCase& c, std::ostream* os) { *os << c.file; }

std::vector<FileCase> file_cases() {
  std::vector<FileCase> out;
  if (!sd::test::fixture_exists(kCases)) return out;
  const auto j = sd::read_json_file(sd::test::fixture_path(kCases));
  int i = 0;
  for (const auto& f : j.at("files")) {
    FileCase c;
    c.index = i++;
    c.file = f.at("file").get<std::string>();
    c.folder = f.at("equal_diffusers_folder").get<std::string>();
    c.model = c.folder.substr(c.folder.rfind('/') + 1);
    c.dtype = f.at("dtype").get<std::string>();
    if (f.contains("goldens")) c.goldens = "single_file/" + f.at("goldens").get<std::string>();
    out.push_back(c);
  }
  return out;
}

template <typename M>
std::vector<std::string> keys_of(const M& m) {
  std::vector<std::string> k;
  for (const auto& kv : sd::state_dict(*m)) k.push_back(kv.first);
  return k;
}

nlohmann::json folder_config(const FileCase& c, const std::string& comp) {
  return sd::read_json_file(sd::test::fixture_path(c.folder + "/" + comp + "/config.json"));
}

struct Tables {
  cv::LdmTable unet, vae, te;
  cv::LdmCheckpointInfo info;
};

// The tables for the module trees built from the equal folder's configs (as `--config <folder>` does).
Tables tables_for(const FileCase& c, const sd::SafeTensorsFile& f) {
  Tables t;
  t.info = cv::inspect_ldm_checkpoint(f);
  const auto unet_cfg = sd::UNet2DConditionConfig::from_json(folder_config(c, "unet"), "unet");
  const auto vae_cfg = sd::AutoencoderKLConfig::from_json(folder_config(c, "vae"), "vae");
  const auto te_cfg = sd::CLIPTextConfig::from_json(folder_config(c, "text_encoder"), "text_encoder");
  t.unet = cv::unet_ldm_table(keys_of(sd::UNet2DConditionModel(unet_cfg)));
  t.vae = cv::vae_ldm_table(keys_of(sd::AutoencoderKL(vae_cfg)));
  t.te = cv::text_encoder_ldm_table(keys_of(sd::CLIPTextModel(te_cfg)), t.info.text_layout);
  return t;
}

class SingleFile : public ::testing::TestWithParam<FileCase> {
 protected:
  void SetUp() override {
    if (!sd::test::fixture_exists("single_file/" + GetParam().file)) GTEST_SKIP() << "fixture file absent";
  }
  sd::SafeTensorsFile open() const {
    return sd::SafeTensorsFile::open(sd::test::fixture_path("single_file/" + GetParam().file));
  }
};

// Every converted tensor equals the folder's (float32: bit-exact; float16 file: exactly the folder's .half()), the
// key sets are the same, and the conversion made no copies (views of the mapped file).
TEST_P(SingleFile, ConversionEqualsDiffusersFolder) {
  const auto& c = GetParam();
  const auto f = open();
  const auto t = tables_for(c, f);
  const std::vector<std::tuple<std::string, const cv::LdmTable*, std::string>> comps = {
      {"unet", &t.unet, "UNet"}, {"vae", &t.vae, "VAE"}, {"text_encoder", &t.te, "text encoder"}};
  for (const auto& [sub, table, name] : comps) {
    SCOPED_TRACE(sub);
    const auto got = cv::gather_ldm(f, *table, name);
    const auto ref_file = sd::SafeTensorsFile::open(sd::find_weights(sd::test::fixture_path(c.folder + "/" + sub)));
    auto ref = ref_file.load_all();
    ref.erase("text_model.embeddings.position_ids");
    ASSERT_EQ(got.size(), ref.size());
    size_t equal = 0;
    for (const auto& [k, r] : ref) {
      auto it = got.find(k);
      ASSERT_NE(it, got.end()) << "missing " << k;
      const torch::Tensor expect = c.dtype == "float16" ? r.to(torch::kHalf) : r;
      ASSERT_EQ(it->second.scalar_type(), expect.scalar_type()) << k;
      EXPECT_TRUE(it->second.sizes().equals(expect.sizes())) << k << ": " << it->second.sizes() << " vs "
                                                             << expect.sizes();
      if (torch::equal(it->second, expect)) ++equal;
      else ADD_FAILURE() << k << " differs";
    }
    std::cout << "  [exact] " << c.file << " " << sub << ": " << equal << "/" << ref.size() << " tensors bit-equal\n";
  }
}

// Conversion aliases the memory-mapped file (no copy doubles peak memory): every gathered tensor's data lies inside
// the storage of a tensor read from the file.
TEST_P(SingleFile, ConversionMakesNoCopies) {
  const auto f = open();
  const auto t = tables_for(GetParam(), f);
  // The mapping's address range: from the lowest to the highest data pointer of the file's tensors.
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (const auto& info : f.tensors()) {
    const auto x = f.get(info.name);
    const auto p = reinterpret_cast<uintptr_t>(x.data_ptr());
    lo = std::min(lo, p);
    hi = std::max(hi, p + x.nbytes());
  }
  size_t inside = 0, total = 0;
  for (const auto* table : {&t.unet, &t.vae, &t.te}) {
    for (const auto& [k, x] : cv::gather_ldm(f, *table, "component")) {
      const auto p = reinterpret_cast<uintptr_t>(x.data_ptr());
      ++total;
      if (p >= lo && p + x.nbytes() <= hi) ++inside;
    }
  }
  // Tensors whose file offset is not aligned for their dtype are copied by SafeTensorsFile::get (a few at most).
  EXPECT_GE(inside, total - 4) << inside << " of " << total << " tensors alias the file";
  std::cout << "  [views] " << inside << "/" << total << " converted tensors alias the mapped file\n";
}

// Diffusers -> LDM (the inverse used to write single files) gives back the file's own tensors.
TEST_P(SingleFile, ScatterIsTheInverse) {
  const auto f = open();
  const auto t = tables_for(GetParam(), f);
  for (const auto* table : {&t.unet, &t.vae, &t.te}) {
    const auto back = cv::scatter_ldm(cv::gather_ldm(f, *table, "component"), *table);
    for (const auto& [k, x] : back) {
      ASSERT_TRUE(f.contains(k)) << k;
      EXPECT_TRUE(torch::equal(x, f.get(k))) << k;
    }
  }
}

// What the weights tell equals the folder's config; the rest is the family default (README table).
TEST_P(SingleFile, InferredConfigMatchesWhatTheWeightsTell) {
  const auto& c = GetParam();
  const auto f = open();
  const auto info = cv::inspect_ldm_checkpoint(f);
  const auto unet = folder_config(c, "unet"), vae = folder_config(c, "vae"), te = folder_config(c, "text_encoder");
  EXPECT_EQ(info.family, c.model == "tiny-sd21" ? cv::LdmFamily::SD2 : cv::LdmFamily::SD1);
  EXPECT_TRUE(info.has_unet && info.has_vae && info.has_text_encoder);
  for (const char* k : {"block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                        "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels"})
    EXPECT_EQ(info.unet_config.at(k), unet.at(k)) << "unet " << k;
  for (const char* k : {"block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"})
    EXPECT_EQ(info.vae_config.at(k), vae.at(k)) << "vae " << k;
  for (const char* k : {"hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                        "max_position_embeddings", "hidden_act"})
    EXPECT_EQ(info.text_encoder_config.at(k), te.at(k)) << "text_encoder " << k;
  // Not in the weights: family defaults (real SD), which the tiny models do not use.
  EXPECT_EQ(info.unet_config.at("norm_num_groups"), 32);
  EXPECT_EQ(info.vae_config.at("norm_num_groups"), 32);
  EXPECT_EQ(info.vae_config.at("scaling_factor"), 0.18215);
  EXPECT_EQ(info.prediction_type, "epsilon");
  EXPECT_NE(info.prediction_type_note.find("assumed"), std::string::npos);
  EXPECT_EQ(cv::inspect_ldm_checkpoint(f, "v_prediction").prediction_type, "v_prediction");
  // Every key is read by a table or is one real files carry and SD does not use.
  const auto t = tables_for(c, f);
  const auto unused = cv::unused_ldm_keys(f, {&t.unet, &t.vae, &t.te});
  EXPECT_TRUE(unused.unknown.empty()) << unused.unknown.size() << " unknown keys, first " << unused.unknown[0];
  for (const auto& b : cv::ddpm_buffer_names())
    EXPECT_NE(std::find(unused.known.begin(), unused.known.end(), b), unused.known.end()) << b;
}

// The module goldens through a single-file load (fp16 files upcast to float32 at load; their own goldens).
TEST_P(SingleFile, ModuleGoldens) {
  const auto& c = GetParam();
  const auto f = open();
  const auto t = tables_for(c, f);
  auto golden = [&](const std::string& comp, const std::string& key) -> torch::Tensor {
    if (c.goldens.empty())
      return sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + c.model + "/" + comp + ".safetensors"))
          .get(key);
    return sd::SafeTensorsFile::open(sd::test::fixture_path(c.goldens)).get(comp + "." + key);
  };
  auto inputs = [&](const std::string& comp) {
    return sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + c.model + "/" + comp + ".safetensors"));
  };
  const std::string src = sd::test::fixture_path("single_file/" + c.file);
  // Loaded outside inference mode (the UNet prepacks its convolutions, which tracks weight versions).
  auto unet = sd::load_unet(sd::UNet2DConditionConfig::from_json(folder_config(c, "unet"), "unet"),
                            cv::gather_ldm(f, t.unet, "UNet"), src);
  auto te = sd::load_clip_text_model(sd::CLIPTextConfig::from_json(folder_config(c, "text_encoder"), "te"),
                                     cv::gather_ldm(f, t.te, "text encoder"), src);
  auto vae = sd::load_vae(sd::AutoencoderKLConfig::from_json(folder_config(c, "vae"), "vae"),
                          cv::gather_ldm(f, t.vae, "VAE"), src);
  torch::InferenceMode im;
  const auto ucases = inputs("unet");
  std::set<std::string> names;
  for (const auto& k : ucases.keys()) names.insert(k.substr(0, k.rfind('.')));
  for (const auto& n : names) {
    const auto out = unet->forward(ucases.get(n + ".sample"), ucases.get(n + ".timestep"),
                                   ucases.get(n + ".encoder_hidden_states"));
    SD_EXPECT_CLOSE(out, golden("unet", n + ".out"), kAtol, kRtol, c.file + " unet " + n);
  }

  const auto tin = inputs("text_encoder");
  const auto tout = te->forward_all(tin.get("input_ids"), true);
  SD_EXPECT_CLOSE(tout.last_hidden_state, golden("text_encoder", "last_hidden_state"), kAtol, kRtol,
                  c.file + " text_encoder last_hidden_state");
  SD_EXPECT_CLOSE(tout.hidden_states[tout.hidden_states.size() - 2], golden("text_encoder", "hidden_states_penultimate"),
                  kAtol, kRtol, c.file + " text_encoder hidden_states[-2]");

  const auto vin = inputs("vae");
  const auto post = vae->encode(vin.get("encode.input"));
  SD_EXPECT_CLOSE(post.mean, golden("vae", "encode.mean"), kAtol, kRtol, c.file + " vae encode.mean");
  SD_EXPECT_CLOSE(post.std(), golden("vae", "encode.std"), kAtol, kRtol, c.file + " vae encode.std");
  SD_EXPECT_CLOSE(vae->decode(vin.get("decode.input")), golden("vae", "decode.out"), kAtol, kRtol,
                  c.file + " vae decode.out");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SingleFile, ::testing::ValuesIn(file_cases()),
                         [](const auto& info) { return sd::test::test_name(info.param.file); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(SingleFile);

// ---- key_mapping.json: the tables agree with the fixture generator's independent mapping ------------------------

std::vector<std::string> mapped_models() {
  std::vector<std::string> out;
  if (!sd::test::fixture_exists("single_file/key_mapping.json")) return out;
  const auto j = sd::read_json_file(sd::test::fixture_path("single_file/key_mapping.json"));
  for (auto& [k, v] : j.items()) out.push_back(k);
  return out;
}

class KeyMapping : public ::testing::TestWithParam<std::string> {};

TEST_P(KeyMapping, TablesEqualTheFixtureMapping) {
  const std::string model = GetParam();
  const auto all = sd::read_json_file(sd::test::fixture_path("single_file/key_mapping.json")).at(model);
  FileCase c;
  c.folder = "models/" + model;
  c.model = model;
  std::string file;
  for (const auto& fc : file_cases())
    if (fc.folder == c.folder && fc.dtype == "float32") file = fc.file;
  ASSERT_FALSE(file.empty()) << "no float32 single file for " << model << " in " << kCases;
  const auto f = sd::SafeTensorsFile::open(sd::test::fixture_path("single_file/" + file));
  const auto t = tables_for(c, f);
  const std::map<std::string, const cv::LdmTable*> comps = {{"unet", &t.unet}, {"vae", &t.vae}, {"text_encoder", &t.te}};
  for (const auto& [comp, table] : comps) {
    SCOPED_TRACE(comp);
    std::map<std::string, std::pair<std::string, std::string>> expect;  // diffusers -> (ldm, op)
    for (const auto& row : all.at(comp)) {
      if (row.at(1).is_null()) continue;
      std::string op = row.at(2).get<std::string>();
      op = op.rfind("rows", 0) == 0 ? "rows" : op.rfind("linear_to_conv1x1", 0) == 0 ? "conv1x1" : op;
      expect[row.at(1).get<std::string>()] = {row.at(0).get<std::string>(), op};
    }
    EXPECT_EQ(table->size(), expect.size());
    for (const auto& e : *table) {
      auto it = expect.find(e.diffusers);
      ASSERT_NE(it, expect.end()) << e.diffusers << " not in key_mapping.json";
      EXPECT_EQ(e.ldm, it->second.first) << e.diffusers;
      const std::string op = e.op == cv::LdmEntry::Op::Rows ? "rows"
                             : e.op == cv::LdmEntry::Op::Conv1x1ToLinear ? "conv1x1" : "copy";
      EXPECT_EQ(op, it->second.second) << e.diffusers;
    }
  }
  // Rows the fixture marks as unused are exactly the keys the tables leave out.
  std::set<std::string> unused_expect;
  for (const auto& comp : {"unet", "vae", "text_encoder", "schedule_buffers"})
    for (const auto& row : all.at(comp))
      if (row.at(1).is_null()) unused_expect.insert(row.at(0).get<std::string>());
  const auto unused = cv::unused_ldm_keys(f, {&t.unet, &t.vae, &t.te});
  EXPECT_EQ(std::set<std::string>(unused.known.begin(), unused.known.end()), unused_expect);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, KeyMapping, ::testing::ValuesIn(mapped_models()),
                         [](const auto& info) { return sd::test::test_name(info.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(KeyMapping);

// ---- general rule beyond the fixtures -------------------------------------------------------------------------

// The real SD 1.5 UNet (4 levels x 2 resnets) gives the numbering of diffusers' own converter.
TEST(LdmTables, RealSd15UNetNumbering) {
  sd::UNet2DConditionConfig cfg;  // diffusers defaults = SD 1.x layout
  cfg.cross_attention_dim = {768, 768, 768, 768};
  const auto table = cv::unet_ldm_table(keys_of(sd::UNet2DConditionModel(cfg)));
  std::map<std::string, std::string> m;
  for (const auto& e : table) m[e.diffusers] = e.ldm;
  const std::string P = "model.diffusion_model.";
  EXPECT_EQ(m.at("down_blocks.0.resnets.1.conv1.weight"), P + "input_blocks.2.0.in_layers.2.weight");
  EXPECT_EQ(m.at("down_blocks.0.downsamplers.0.conv.weight"), P + "input_blocks.3.0.op.weight");
  EXPECT_EQ(m.at("down_blocks.1.attentions.0.proj_in.weight"), P + "input_blocks.4.1.proj_in.weight");
  EXPECT_EQ(m.at("down_blocks.3.resnets.1.time_emb_proj.weight"), P + "input_blocks.11.0.emb_layers.1.weight");
  EXPECT_EQ(m.at("mid_block.attentions.0.proj_out.weight"), P + "middle_block.1.proj_out.weight");
  EXPECT_EQ(m.at("mid_block.resnets.1.norm2.bias"), P + "middle_block.2.out_layers.0.bias");
  EXPECT_EQ(m.at("up_blocks.0.resnets.2.conv_shortcut.weight"), P + "output_blocks.2.0.skip_connection.weight");
  EXPECT_EQ(m.at("up_blocks.0.upsamplers.0.conv.weight"), P + "output_blocks.2.1.conv.weight");
  EXPECT_EQ(m.at("up_blocks.1.upsamplers.0.conv.weight"), P + "output_blocks.5.2.conv.weight");
  EXPECT_EQ(m.at("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
            P + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight");
  EXPECT_EQ(m.at("conv_norm_out.weight"), P + "out.0.weight");
  EXPECT_EQ(m.at("time_embedding.linear_2.bias"), P + "time_embed.2.bias");
}

TEST(LdmTables, RealVaeNumberingReversesDecoderLevels) {
  sd::AutoencoderKLConfig cfg;
  cfg.block_out_channels = {128, 256, 512, 512};
  cfg.layers_per_block = 2;
  cfg.down_block_types.assign(4, "DownEncoderBlock2D");
  cfg.up_block_types.assign(4, "UpDecoderBlock2D");
  const auto table = cv::vae_ldm_table(keys_of(sd::AutoencoderKL(cfg)), "");
  std::map<std::string, cv::LdmEntry> m;
  for (const auto& e : table) m[e.diffusers] = e;
  EXPECT_EQ(m.at("decoder.up_blocks.0.resnets.2.conv1.weight").ldm, "decoder.up.3.block.2.conv1.weight");
  EXPECT_EQ(m.at("decoder.up_blocks.2.upsamplers.0.conv.weight").ldm, "decoder.up.1.upsample.conv.weight");
  EXPECT_EQ(m.at("encoder.down_blocks.1.resnets.0.conv_shortcut.weight").ldm, "encoder.down.1.block.0.nin_shortcut.weight");
  EXPECT_EQ(m.at("encoder.mid_block.attentions.0.to_out.0.weight").ldm, "encoder.mid.attn_1.proj_out.weight");
  EXPECT_EQ(m.at("encoder.mid_block.attentions.0.to_out.0.weight").op, cv::LdmEntry::Op::Conv1x1ToLinear);
  EXPECT_EQ(m.at("decoder.mid_block.attentions.0.group_norm.bias").ldm, "decoder.mid.attn_1.norm.bias");
  EXPECT_EQ(m.at("decoder.conv_norm_out.weight").ldm, "decoder.norm_out.weight");
}

// ---- SDXL (Stability's sgm layout) ------------------------------------------------------------------------------

// Published SDXL base / sdxl-turbo key names, written out literally from the layout (not from the tables): the
// real architecture's structure (3 levels x 2 resnets, transformer depth [1, 2, 10], 12 + 32 text layers, 4 VAE
// levels) at small widths, so the modules are cheap to build.
TEST(LdmTables, SdxlPublishedKeyNames) {
  nlohmann::json u = sd::real_unet_config("sdxl");
  u["block_out_channels"] = {32, 64, 128};
  u["attention_head_dim"] = {1, 2, 4};
  u["cross_attention_dim"] = 96;
  u["projection_class_embeddings_input_dim"] = 16 + 6 * 256;
  nlohmann::json t1 = sd::real_text_encoder_config("sdxl");
  t1["hidden_size"] = 32;
  t1["intermediate_size"] = 64;
  t1["num_attention_heads"] = 1;
  t1["vocab_size"] = 100;
  nlohmann::json t2 = sd::real_text_encoder_2_config();
  t2["hidden_size"] = 64;
  t2["intermediate_size"] = 128;
  t2["num_attention_heads"] = 1;
  t2["projection_dim"] = 16;
  t2["vocab_size"] = 100;
  nlohmann::json v = sd::real_vae_config("sdxl");
  v["block_out_channels"] = {32, 32, 32, 32};
  std::map<std::string, cv::LdmEntry> m;
  const auto add = [&](const cv::LdmTable& t) {
    for (const auto& e : t) m[e.diffusers + "@" + e.ldm.substr(0, e.ldm.find('.'))] = e;
  };
  add(cv::unet_ldm_table(keys_of(sd::UNet2DConditionModel(sd::UNet2DConditionConfig::from_json(u, "unet")))));
  add(cv::vae_ldm_table(keys_of(sd::AutoencoderKL(sd::AutoencoderKLConfig::from_json(v, "vae")))));
  add(cv::text_encoder_ldm_table(keys_of(sd::CLIPTextModel(sd::CLIPTextConfig::from_json(t1, "te"))),
                                 cv::TextEncoderLayout::HfClip, cv::kSdxlClipPrefix));
  const auto te2 = sd::CLIPTextConfig::from_json(t2, "te2");
  ASSERT_TRUE(te2.with_projection);
  // text_encoder_2 keys are told apart from text_encoder's by a "2:" mark.
  for (const auto& e : cv::text_encoder_ldm_table(keys_of(sd::CLIPTextModel(te2)), cv::TextEncoderLayout::OpenClip,
                                                  cv::kSdxlOpenClipPrefix))
    m["2:" + e.diffusers] = e;
  const auto ldm = [&](const std::string& k, const char* comp) -> std::string {
    auto it = m.find(std::string(k) + "@" + comp);
    if (it == m.end()) return "<no entry for " + k + ">";
    return it->second.ldm;
  };
  const std::string U = "model.diffusion_model.";
  const std::vector<std::pair<std::string, std::string>> unet = {
      {"conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"},
      {"time_embedding.linear_1.weight", "model.diffusion_model.time_embed.0.weight"},
      {"time_embedding.linear_2.bias", "model.diffusion_model.time_embed.2.bias"},
      {"add_embedding.linear_1.weight", "model.diffusion_model.label_emb.0.0.weight"},
      {"add_embedding.linear_2.bias", "model.diffusion_model.label_emb.0.2.bias"},
      {"down_blocks.0.resnets.0.norm1.weight", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"},
      {"down_blocks.0.resnets.1.time_emb_proj.weight", "model.diffusion_model.input_blocks.2.0.emb_layers.1.weight"},
      {"down_blocks.0.downsamplers.0.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight"},
      {"down_blocks.1.resnets.0.conv_shortcut.weight", "model.diffusion_model.input_blocks.4.0.skip_connection.weight"},
      {"down_blocks.1.attentions.0.proj_in.weight", "model.diffusion_model.input_blocks.4.1.proj_in.weight"},
      {"down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight",
       "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"},
      {"down_blocks.1.downsamplers.0.conv.bias", "model.diffusion_model.input_blocks.6.0.op.bias"},
      {"down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2.weight",
       "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight"},
      {"down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight",
       "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight"},
      {"mid_block.resnets.0.conv1.weight", "model.diffusion_model.middle_block.0.in_layers.2.weight"},
      {"mid_block.attentions.0.transformer_blocks.9.norm3.weight",
       "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight"},
      {"mid_block.resnets.1.conv2.weight", "model.diffusion_model.middle_block.2.out_layers.3.weight"},
      {"up_blocks.0.resnets.0.conv_shortcut.weight", "model.diffusion_model.output_blocks.0.0.skip_connection.weight"},
      {"up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0.weight",
       "model.diffusion_model.output_blocks.2.1.transformer_blocks.9.attn1.to_out.0.weight"},
      {"up_blocks.0.upsamplers.0.conv.weight", "model.diffusion_model.output_blocks.2.2.conv.weight"},
      {"up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v.weight",
       "model.diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_v.weight"},
      {"up_blocks.1.upsamplers.0.conv.bias", "model.diffusion_model.output_blocks.5.2.conv.bias"},
      {"up_blocks.2.resnets.0.norm2.weight", "model.diffusion_model.output_blocks.6.0.out_layers.0.weight"},
      {"up_blocks.2.resnets.2.time_emb_proj.weight", "model.diffusion_model.output_blocks.8.0.emb_layers.1.weight"},
      {"conv_norm_out.bias", "model.diffusion_model.out.0.bias"},
      {"conv_out.weight", "model.diffusion_model.out.2.weight"},
  };
  for (const auto& [d, l] : unet) EXPECT_EQ(ldm(d, "model"), l) << d;
  // No output_blocks.9+: SDXL's UNet has 9 output blocks.
  for (const auto& [k, e] : m) EXPECT_EQ(e.ldm.find(U + "output_blocks.9."), std::string::npos) << e.ldm;
  const std::vector<std::pair<std::string, std::string>> vae = {
      {"encoder.conv_in.weight", "first_stage_model.encoder.conv_in.weight"},
      {"encoder.down_blocks.0.downsamplers.0.conv.weight", "first_stage_model.encoder.down.0.downsample.conv.weight"},
      {"decoder.up_blocks.0.resnets.0.conv1.weight", "first_stage_model.decoder.up.3.block.0.conv1.weight"},
      {"decoder.up_blocks.3.resnets.2.norm2.bias", "first_stage_model.decoder.up.0.block.2.norm2.bias"},
      {"encoder.mid_block.attentions.0.to_q.weight", "first_stage_model.encoder.mid.attn_1.q.weight"},
      {"decoder.mid_block.resnets.1.conv2.weight", "first_stage_model.decoder.mid.block_2.conv2.weight"},
      {"quant_conv.weight", "first_stage_model.quant_conv.weight"},
      {"post_quant_conv.bias", "first_stage_model.post_quant_conv.bias"},
  };
  for (const auto& [d, l] : vae) EXPECT_EQ(ldm(d, "first_stage_model"), l) << d;
  const std::vector<std::pair<std::string, std::string>> te1 = {
      {"text_model.embeddings.token_embedding.weight",
       "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"},
      {"text_model.embeddings.position_embedding.weight",
       "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"},
      {"text_model.encoder.layers.0.self_attn.q_proj.weight",
       "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"},
      {"text_model.encoder.layers.11.mlp.fc2.bias",
       "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias"},
      {"text_model.final_layer_norm.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"},
  };
  for (const auto& [d, l] : te1) EXPECT_EQ(ldm(d, "conditioner"), l) << d;
  struct Te2 {
    std::string diffusers, ldm;
    cv::LdmEntry::Op op;
    int chunk;
  };
  using Op = cv::LdmEntry::Op;
  const std::vector<Te2> te2_expect = {
      {"text_model.embeddings.token_embedding.weight", "conditioner.embedders.1.model.token_embedding.weight", Op::Copy, 0},
      {"text_model.embeddings.position_embedding.weight", "conditioner.embedders.1.model.positional_embedding", Op::Copy, 0},
      {"text_model.encoder.layers.0.self_attn.q_proj.weight",
       "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", Op::Rows, 0},
      {"text_model.encoder.layers.5.self_attn.k_proj.bias",
       "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_bias", Op::Rows, 1},
      {"text_model.encoder.layers.31.self_attn.v_proj.weight",  // the last layer is used (SD 2 drops it)
       "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", Op::Rows, 2},
      {"text_model.encoder.layers.31.self_attn.out_proj.weight",
       "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight", Op::Copy, 0},
      {"text_model.encoder.layers.7.layer_norm1.weight", "conditioner.embedders.1.model.transformer.resblocks.7.ln_1.weight",
       Op::Copy, 0},
      {"text_model.encoder.layers.7.layer_norm2.bias", "conditioner.embedders.1.model.transformer.resblocks.7.ln_2.bias",
       Op::Copy, 0},
      {"text_model.encoder.layers.3.mlp.fc1.weight", "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight",
       Op::Copy, 0},
      {"text_model.encoder.layers.3.mlp.fc2.bias", "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_proj.bias",
       Op::Copy, 0},
      {"text_model.final_layer_norm.bias", "conditioner.embedders.1.model.ln_final.bias", Op::Copy, 0},
      {"text_projection.weight", "conditioner.embedders.1.model.text_projection", Op::Transpose, 0},
  };
  for (const auto& x : te2_expect) {
    auto it = m.find("2:" + x.diffusers);
    ASSERT_NE(it, m.end()) << x.diffusers;
    EXPECT_EQ(it->second.ldm, x.ldm) << x.diffusers;
    EXPECT_EQ(it->second.op, x.op) << x.diffusers;
    if (x.op == Op::Rows) {
      EXPECT_EQ(it->second.chunk, x.chunk) << x.diffusers;
      EXPECT_EQ(it->second.chunks, 3) << x.diffusers;
    }
  }
  EXPECT_EQ(m.count("2:text_model.encoder.layers.32.self_attn.q_proj.weight"), 0u);
}

// text_projection: the file holds [hidden, proj] (OpenCLIP: x @ P), the model [proj, hidden]; gather and scatter
// are inverse transposes, and a 1-D or wrong-shaped tensor is reported under its file key.
TEST(LdmTables, TextProjectionTransposeBothWays) {
  const cv::LdmTable table = {
      {"text_projection.weight", "conditioner.embedders.1.model.text_projection", cv::LdmEntry::Op::Transpose}};
  const auto w = torch::arange(12, torch::kFloat).view({3, 4});  // diffusers [proj 3, hidden 4]
  const auto out = cv::scatter_ldm({{"text_projection.weight", w}}, table);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].first, "conditioner.embedders.1.model.text_projection");
  EXPECT_TRUE(torch::equal(out[0].second, w.t()));
  EXPECT_EQ(out[0].second.sizes(), (std::vector<int64_t>{4, 3}));
  const std::string dir = sd::test::make_temp_dir("ldm_proj");
  const std::string p = dir + "/proj.safetensors";
  sd::save_safetensors(p, out);
  const auto back = cv::gather_ldm(sd::SafeTensorsFile::open(p), table, "text_encoder_2", {{"text_projection.weight", {3, 4}}});
  EXPECT_TRUE(torch::equal(back.at("text_projection.weight"), w));
  // Wrong shapes: 1-D, and a [hidden - 1, proj] matrix against the model's shape.
  for (const auto& bad : {torch::zeros({12}), torch::zeros({3, 3})}) {
    const std::string q = dir + "/bad.safetensors";
    sd::save_safetensors(q, std::map<std::string, torch::Tensor>{{"conditioner.embedders.1.model.text_projection", bad}});
    try {
      cv::gather_ldm(sd::SafeTensorsFile::open(q), table, "text_encoder_2", {{"text_projection.weight", {3, 4}}});
      ADD_FAILURE() << "no error for " << bad.sizes();
    } catch (const sd::FormatError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(q), std::string::npos) << msg;
      EXPECT_NE(msg.find("conditioner.embedders.1.model.text_projection"), std::string::npos) << msg;
      EXPECT_NE(msg.find("text_encoder_2"), std::string::npos) << msg;
    }
  }
}

// Bad files: clear errors naming the file, never a crash.
TEST(LdmInspect, UnknownLayoutAndMissingTensorsAreClearErrors) {
  const std::string dir = sd::test::make_temp_dir("ldm_bad");
  const std::string p = dir + "/other.safetensors";
  sd::save_safetensors(p, std::map<std::string, torch::Tensor>{{"some.weight", torch::zeros({2, 2})}});
  const auto f = sd::SafeTensorsFile::open(p);
  EXPECT_FALSE(cv::is_ldm_checkpoint(f));
  try {
    cv::inspect_ldm_checkpoint(f);
    FAIL() << "no error";
  } catch (const sd::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown checkpoint layout"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
  cv::LdmTable table = {{"conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"}};
  try {
    cv::gather_ldm(f, table, "UNet");
    FAIL() << "no error";
  } catch (const sd::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("input_blocks.0.0.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("UNet"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cv::unet_ldm_table({"time_embedding.cond_proj.weight"}), sd::InvalidArgument);
}

}  // namespace
