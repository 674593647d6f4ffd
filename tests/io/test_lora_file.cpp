// --lora FILE[:SCALE] parsing (paths containing ':'), LoRA naming, and the layout reader on hand-made files.
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/lora_file.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;

namespace {

class LoraSpecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = sd::test::make_temp_dir("lora_spec");
    fs::create_directories(dir_ + "/dir:with:colons");
    for (const char* f : {"a.safetensors", "dir:with:colons/b.safetensors", "x:0.5", "c:"})
      std::ofstream(dir_ + "/" + f) << "x";
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string error_of(const std::string& arg) {
    try {
      sd::parse_lora_spec(arg);
    } catch (const sd::InvalidArgument& e) {
      return e.what();
    }
    return "";
  }
  std::string dir_;
};

TEST_F(LoraSpecTest, FileAndScale) {
  auto s = sd::parse_lora_spec(dir_ + "/a.safetensors");
  EXPECT_EQ(s.path, dir_ + "/a.safetensors");
  EXPECT_EQ(s.scale, 1.0);
  s = sd::parse_lora_spec(dir_ + "/a.safetensors:0.7");
  EXPECT_EQ(s.path, dir_ + "/a.safetensors");
  EXPECT_EQ(s.scale, 0.7);
  s = sd::parse_lora_spec(dir_ + "/a.safetensors:-1.5e-1");
  EXPECT_EQ(s.scale, -0.15);
  s = sd::parse_lora_spec(dir_ + "/a.safetensors:2", "--lcm-lora");
  EXPECT_EQ(s.scale, 2.0);
}

TEST_F(LoraSpecTest, PathsContainingColons) {
  // The scale is what follows the LAST ':'.
  auto s = sd::parse_lora_spec(dir_ + "/dir:with:colons/b.safetensors:0.25");
  EXPECT_EQ(s.path, dir_ + "/dir:with:colons/b.safetensors");
  EXPECT_EQ(s.scale, 0.25);
  s = sd::parse_lora_spec(dir_ + "/dir:with:colons/b.safetensors");
  EXPECT_EQ(s.path, dir_ + "/dir:with:colons/b.safetensors");
  EXPECT_EQ(s.scale, 1.0);
  // A file whose name looks like FILE:SCALE is taken whole when it exists...
  s = sd::parse_lora_spec(dir_ + "/x:0.5");
  EXPECT_EQ(s.path, dir_ + "/x:0.5");
  EXPECT_EQ(s.scale, 1.0);
  // ...and can still get a scale of its own.
  s = sd::parse_lora_spec(dir_ + "/x:0.5:0.3");
  EXPECT_EQ(s.path, dir_ + "/x:0.5");
  EXPECT_EQ(s.scale, 0.3);
  // A file named "c:" exists: taken whole.
  s = sd::parse_lora_spec(dir_ + "/c:");
  EXPECT_EQ(s.path, dir_ + "/c:");
}

TEST_F(LoraSpecTest, BadArgumentsSayWhatIsWrong) {
  EXPECT_NE(error_of("").find("empty"), std::string::npos);
  EXPECT_NE(error_of(":0.7").find("no file before the scale"), std::string::npos);
  EXPECT_NE(error_of(dir_ + "/a.safetensors:").find("nothing after ':'"), std::string::npos);
  EXPECT_NE(error_of(dir_ + "/a.safetensors:nan").find("not a finite number"), std::string::npos);
  EXPECT_NE(error_of(dir_ + "/a.safetensors:inf").find("not a finite number"), std::string::npos);
  EXPECT_NE(error_of(dir_ + "/a.safetensors:1e999").find("not a finite number"), std::string::npos);
  EXPECT_NE(error_of(dir_ + "/missing.safetensors:0.5").find("'" + dir_ + "/missing.safetensors' not found"),
            std::string::npos);
  EXPECT_NE(error_of(dir_ + "/missing.safetensors").find("no such file"), std::string::npos);
  // Not a number after the last ':' and no such file: the whole text was the path.
  EXPECT_NE(error_of(dir_ + "/a.safetensors:x").find("no such file"), std::string::npos);
  EXPECT_NE(error_of(dir_).find("a folder"), std::string::npos);
  EXPECT_NE(error_of(dir_ + "/missing").find("--lora"), std::string::npos);
}

TEST(LoraNames, FileStemsMadeUnique) {
  std::vector<sd::LoraSpec> specs{{"/m/lcm-lora-sdv1-5.safetensors", 1.0, ""},
                                  {"/n/style.safetensors", 0.5, ""},
                                  {"/o/style.safetensors", 0.5, ""},
                                  {"/p/x.safetensors", 0.5, "mine"}};
  sd::name_loras(specs);
  EXPECT_EQ(specs[0].name, "lcm-lora-sdv1-5");
  EXPECT_EQ(specs[1].name, "style");
  EXPECT_EQ(specs[2].name, "style_2");
  EXPECT_EQ(specs[3].name, "mine");
  // A suffixed name that is also a file stem: every name stays unique.
  std::vector<sd::LoraSpec> clash{{"/a/a.safetensors", 1.0, ""}, {"/b/a.safetensors", 1.0, ""},
                                  {"/c/a_2.safetensors", 1.0, ""}, {"/d/a.safetensors", 1.0, ""}};
  sd::name_loras(clash);
  std::set<std::string> names;
  for (const auto& c : clash) names.insert(c.name);
  EXPECT_EQ(names.size(), clash.size()) << clash[0].name << " " << clash[1].name << " " << clash[2].name << " "
                                        << clash[3].name;
  EXPECT_EQ(clash[0].name, "a");
  EXPECT_EQ(clash[1].name, "a_2");
}

// The layout reader on a hand-made file holding every supported spelling once.
TEST(LoraFileReader, EveryLayoutSpelling) {
  const std::string dir = sd::test::make_temp_dir("lora_layouts_io");
  const auto d = torch::ones({2, 8}), u = torch::ones({8, 2});
  sd::save_safetensors(dir + "/all.safetensors",
                       std::vector<std::pair<std::string, torch::Tensor>>{
                           {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", torch::ones({2, 8, 1, 1})},
                           {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", torch::ones({8, 2, 1, 1})},
                           {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha", torch::full({}, 1.0, torch::kHalf)},
                           {"unet.mid_block.attentions.0.proj_out.lora.down.weight", d},
                           {"unet.mid_block.attentions.0.proj_out.lora.up.weight", u},
                           {"unet.a.processor.to_out_lora.down.weight", d},
                           {"unet.a.processor.to_out_lora.up.weight", u},
                           {"text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight", d},
                           {"text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight", u},
                           {"base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_A.weight", d},
                           {"base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_B.weight", u},
                           {"unknown.key", d}});
  const auto f = sd::read_lora_file(dir + "/all.safetensors");
  EXPECT_EQ(f.keys, 12u);
  // (diffusers + legacy names = a legacy file: those renamed only their attention pairs.)
  EXPECT_EQ(f.layout, "mixed (diffusers_legacy, kohya, peft)");
  ASSERT_EQ(f.pairs.size(), 5u);
  EXPECT_EQ(f.pairs[0].component, "unet");
  EXPECT_EQ(f.pairs[0].module, "down_blocks_0_attentions_0_proj_in");
  EXPECT_TRUE(f.pairs[0].underscored);
  ASSERT_TRUE(f.pairs[0].alpha.has_value());
  EXPECT_EQ(*f.pairs[0].alpha, 1.0);
  EXPECT_EQ(f.pairs[1].module, "mid_block.attentions.0.proj_out");
  EXPECT_FALSE(f.pairs[1].alpha.has_value());
  EXPECT_EQ(f.pairs[2].module, "a.to_out.0");
  EXPECT_EQ(f.pairs[3].component, "text_encoder");
  EXPECT_EQ(f.pairs[3].module, "text_model.encoder.layers.0.self_attn.k_proj");
  EXPECT_EQ(f.pairs[4].component, "");  // PEFT without a component prefix: decided by the module path
  EXPECT_EQ(f.pairs[4].module, "text_model.encoder.layers.1.mlp.fc1");
  EXPECT_EQ(f.unparsed, std::vector<std::string>{"unknown.key"});
  fs::remove_all(dir);
}

// LyCORIS methods without a fusion are refused naming the method, its first key and how many more modules use it,
// also when the file holds pairs that would match (fusing those alone would give other weights).
TEST(LoraFileReader, UnsupportedLycorisMethodsAreRefused) {
  const std::string dir = sd::test::make_temp_dir("lora_methods_io");
  const std::string why =
      "; LoRA, LoCon (also Tucker), LoHa, LoKr, full differences and DoRA are fused, and fusing the rest of the file "
      "without these terms would give other weights than it was trained for";
  struct Case {
    std::vector<std::string> keys;  // after one plain kohya pair
    std::string message;            // after "<file>: "
  };
  const std::vector<Case> cases = {
      {{"lora_unet_c.weight", "lora_unet_c.on_input", "lora_unet_d.on_input"},
       "LyCORIS (IA)^3 (on_input) is not supported: lora_unet_c.on_input (and 1 more module)"},
      {{"lora_unet_c.oft_blocks"}, "LyCORIS OFT (oft_blocks) is not supported: lora_unet_c.oft_blocks"},
      {{"lora_unet_c.a1.weight", "lora_unet_c.a2.weight", "lora_unet_c.b1.weight", "lora_unet_c.b2.weight"},
       "LyCORIS GLoRA (a1 / a2 / b1 / b2) is not supported: lora_unet_c.a1.weight"},
      // Beside fusable LoHa terms, the unsupported method still refuses the file.
      {{"lora_unet_e.hada_w1_a", "lora_unet_e.hada_w1_b", "lora_unet_e.hada_w2_a", "lora_unet_e.hada_w2_b",
        "lora_unet_c.oft_blocks"},
       "LyCORIS OFT (oft_blocks) is not supported: lora_unet_c.oft_blocks"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::vector<std::pair<std::string, torch::Tensor>> t = {{"lora_unet_a.lora_down.weight", torch::ones({2, 8})},
                                                             {"lora_unet_a.lora_up.weight", torch::ones({8, 2})}};
    for (const auto& k : cases[i].keys) t.emplace_back(k, torch::ones({2, 2}));
    const std::string p = dir + "/m" + std::to_string(i) + ".safetensors";
    sd::save_safetensors(p, t);
    std::string msg;
    try {
      sd::read_lora_file(p);
    } catch (const sd::FormatError& e) {
      msg = e.what();
    }
    EXPECT_EQ(msg, p + ": " + cases[i].message + why) << "case " << i;
  }
  // Plain pairs with an alpha and unknown keys are no method: read as before.
  sd::save_safetensors(dir + "/plain.safetensors",
                       std::vector<std::pair<std::string, torch::Tensor>>{
                           {"lora_unet_a.lora_down.weight", torch::ones({2, 8})},
                           {"lora_unet_a.lora_up.weight", torch::ones({8, 2})},
                           {"lora_unet_a.alpha", torch::full({}, 1.0)},
                           {"lora_unet_a.lora_down.weight_orphan", torch::ones({2})},
                           {"lora_unet_b.scale_weight", torch::ones({2})}});
  const auto f = sd::read_lora_file(dir + "/plain.safetensors");
  EXPECT_EQ(f.pairs.size(), 1u);
  EXPECT_TRUE(f.pairs[0].plain());
  EXPECT_EQ(f.unparsed,
            (std::vector<std::string>{"lora_unet_a.lora_down.weight_orphan", "lora_unet_b.scale_weight"}));
  fs::remove_all(dir);
}

using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

const sd::LoraPair& module_named(const sd::LoraFile& f, const std::string& module) {
  for (const auto& p : f.pairs)
    if (p.module == module) return p;
  throw std::runtime_error("no module " + module);
}

// Every fused method's keys, in kohya and dotted (diffusers / PEFT) names, become one module each with its method,
// factors, alpha, the shape of the difference it makes and the rank alpha divides by.
TEST(LoraFileReader, LycorisAndDoraModulesAreRead) {
  const std::string dir = sd::test::make_temp_dir("lora_lycoris_io");
  const Tensors t = {
      // LoHa (kohya), rank 2, on a [8, 6] Linear
      {"lora_unet_loha.hada_w1_a", torch::ones({8, 2})},
      {"lora_unet_loha.hada_w1_b", torch::ones({2, 6})},
      {"lora_unet_loha.hada_w2_a", torch::ones({8, 3})},
      {"lora_unet_loha.hada_w2_b", torch::ones({3, 6})},
      {"lora_unet_loha.alpha", torch::full({}, 4.0)},
      // LoHa with Tucker cores on a [8, 6, 3, 3] conv
      {"lora_unet_tk.hada_t1", torch::ones({2, 2, 3, 3})},
      {"lora_unet_tk.hada_w1_a", torch::ones({2, 8})},
      {"lora_unet_tk.hada_w1_b", torch::ones({2, 6})},
      {"lora_unet_tk.hada_t2", torch::ones({2, 2, 3, 3})},
      {"lora_unet_tk.hada_w2_a", torch::ones({2, 8})},
      {"lora_unet_tk.hada_w2_b", torch::ones({2, 6})},
      // LoKr: full w1 [2, 3], decomposed w2 [4, 1] @ [1, 2] -> [8, 6]; rank 1
      {"lora_te_lokr.lokr_w1", torch::ones({2, 3})},
      {"lora_te_lokr.lokr_w2_a", torch::ones({4, 1})},
      {"lora_te_lokr.lokr_w2_b", torch::ones({1, 2})},
      {"lora_te_lokr.alpha", torch::full({}, 1.0)},
      // LoKr conv: w1 [2, 2], 4-D w2 [4, 3, 3, 3] -> [8, 6, 3, 3]; both full: no rank
      {"lora_unet_lokr4.lokr_w1", torch::ones({2, 2})},
      {"lora_unet_lokr4.lokr_w2", torch::ones({4, 3, 3, 3})},
      // full differences, diffusers names
      {"unet.full.diff", torch::ones({8, 6})},
      {"unet.full.diff_b", torch::ones({8})},
      {"unet.bias_only.diff_b", torch::ones({8})},
      // Tucker LoCon
      {"lora_unet_mid.lora_down.weight", torch::ones({2, 6, 1, 1})},
      {"lora_unet_mid.lora_mid.weight", torch::ones({2, 2, 3, 3})},
      {"lora_unet_mid.lora_up.weight", torch::ones({8, 2, 1, 1})},
      // DoRA, kohya (dora_scale per output row) and PEFT (lora_magnitude_vector)
      {"lora_unet_dora.lora_down.weight", torch::ones({2, 6})},
      {"lora_unet_dora.lora_up.weight", torch::ones({8, 2})},
      {"lora_unet_dora.dora_scale", torch::ones({8, 1})},
      {"unet.pd.lora_A.weight", torch::ones({2, 6})},
      {"unet.pd.lora_B.weight", torch::ones({8, 2})},
      {"unet.pd.lora_magnitude_vector.weight", torch::ones({8})},
  };
  sd::save_safetensors(dir + "/all.safetensors", t);
  const auto f = sd::read_lora_file(dir + "/all.safetensors");
  EXPECT_TRUE(f.unparsed.empty());
  ASSERT_EQ(f.pairs.size(), 9u);
  size_t keys = 0;
  for (const auto& p : f.pairs) keys += p.keys().size();
  EXPECT_EQ(keys, t.size()) << "every key belongs to one module";
  struct Want {
    std::string module, method, name;
    std::vector<int64_t> shape;
    int64_t rank;
  };
  for (const Want& w : std::vector<Want>{{"loha", "loha", "LoHa", {8, 6}, 2},
                                         {"tk", "loha", "LoHa", {8, 6, 3, 3}, 2},
                                         {"lokr", "lokr", "LoKr", {8, 6}, 1},
                                         {"lokr4", "lokr", "LoKr", {8, 6, 3, 3}, 0},
                                         {"full", "full", "full", {8, 6}, 0},
                                         {"bias_only", "full", "full", {}, 0},
                                         {"mid", "lora", "Tucker LoCon", {8, 6, 3, 3}, 2},
                                         {"dora", "lora", "LoRA + DoRA", {8, 6}, 2},
                                         {"pd", "lora", "LoRA + DoRA", {8, 6}, 2}}) {
    const auto& p = module_named(f, w.module);
    EXPECT_EQ(p.method, w.method) << w.module;
    EXPECT_EQ(p.method_name(), w.name) << w.module;
    EXPECT_EQ(p.delta_shape, w.shape) << w.module;
    EXPECT_EQ(p.rank(), w.rank) << w.module;
    EXPECT_FALSE(p.plain()) << w.module;
  }
  EXPECT_EQ(*module_named(f, "loha").alpha, 4.0);
  EXPECT_EQ(module_named(f, "full").component, "unet");
  EXPECT_EQ(module_named(f, "lokr").component, "text_encoder");
  EXPECT_EQ(module_named(f, "dora").magnitude_key, "lora_unet_dora.dora_scale");
  EXPECT_EQ(module_named(f, "pd").magnitude_key, "unet.pd.lora_magnitude_vector.weight");
  EXPECT_EQ(module_named(f, "pd").magnitude.sizes(), (std::vector<int64_t>{8}));
  fs::remove_all(dir);
}

// Incomplete, mixed or misshapen modules are errors naming the file, the key(s) with their shapes and what was
// expected (never a silent skip of half a module or an exception from a matrix product).
TEST(LoraFileReader, IncompleteOrMisshapenLycorisModulesNameTheKeys) {
  const std::string dir = sd::test::make_temp_dir("lora_lycoris_errors");
  const auto loha = [](int64_t r1b) {
    return Tensors{{"lora_unet_m.hada_w1_a", torch::ones({8, 2})},
                   {"lora_unet_m.hada_w1_b", torch::ones({r1b, 6})},
                   {"lora_unet_m.hada_w2_a", torch::ones({8, 2})},
                   {"lora_unet_m.hada_w2_b", torch::ones({2, 6})}};
  };
  struct Case {
    Tensors t;
    std::string message;  // after "<file>: "
  };
  Tensors missing = loha(2);
  missing.pop_back();
  Tensors other_out = loha(2);
  other_out[2].second = torch::ones({7, 2});
  const std::vector<Case> cases = {
      {missing, "lora_unet_m.hada_w1_a: a LoHa module needs hada_w2_b too (lora_unet_m.hada_w2_b is missing)"},
      {loha(3), "lora_unet_m.hada_w1_a [8, 2] / lora_unet_m.hada_w1_b [3, 6]: hada_w1_b must be [2, in] "
                "(hada_w1_a's rank)"},
      {other_out, "lora_unet_m.hada_w2_a [7, 2] / lora_unet_m.hada_w2_b [2, 6]: w2_a @ w2_b must be [8, 6] like "
                  "w1_a @ w1_b, got [7, 6]"},
      {{{"lora_unet_k.lokr_w1", torch::ones({2, 2})}, {"lora_unet_k.lokr_w2_a", torch::ones({4, 2})}},
       "lora_unet_k.lokr_w1: a LoKr module without lokr_w2 needs lokr_w2_b too (lora_unet_k.lokr_w2_b is missing)"},
      {{{"lora_unet_k.lokr_w1", torch::ones({2, 2})},
        {"lora_unet_k.lokr_t2", torch::ones({2, 2, 3, 3})},
        {"lora_unet_k.lokr_w2_a", torch::ones({3, 4})},
        {"lora_unet_k.lokr_w2_b", torch::ones({2, 4})}},
       "lora_unet_k.lokr_t2 [2, 2, 3, 3] / lora_unet_k.lokr_w2_a [3, 4] / lora_unet_k.lokr_w2_b [2, 4]: with Tucker, "
       "lokr_w2_a must be [2, out2] and lokr_w2_b [2, in2]"},
      {{{"lora_unet_c.lora_down.weight", torch::ones({2, 6, 1, 1})},
        {"lora_unet_c.lora_mid.weight", torch::ones({3, 2, 3, 3})},
        {"lora_unet_c.lora_up.weight", torch::ones({8, 2, 1, 1})}},
       "lora_unet_c.lora_down.weight [2, 6, 1, 1] / lora_unet_c.lora_mid.weight [3, 2, 3, 3] / "
       "lora_unet_c.lora_up.weight [8, 2, 1, 1]: a Tucker LoCon needs down [r, in, 1, 1], mid [r, r, kh, kw] and up "
       "[out, r, 1, 1] (mid dim 0 = up dim 1, mid dim 1 = down dim 0)"},
      {{{"lora_unet_c.lora_mid.weight", torch::ones({2, 2, 3, 3})},
        {"lora_unet_c.lora_up.weight", torch::ones({8, 2, 1, 1})}},
       "lora_unet_c.lora_mid.weight: a Tucker LoCon module needs both halves of its pair (the down factor is "
       "missing)"},
      {{{"lora_unet_c.hada_w1_a", torch::ones({8, 2})}, {"lora_unet_c.lora_down.weight", torch::ones({2, 6})}},
       "lora_unet_c.lora_down.weight: this module mixes the terms of several methods (loha, lora); a module is "
       "patched by one method"},
      {{{"lora_unet_c.dora_scale", torch::ones({8, 1})}},
       "lora_unet_c.dora_scale: a DoRA magnitude without the factors it scales (no lora_down / lora_up, lora_A / "
       "lora_B, hada_* or lokr_* keys for this module)"},
      {{{"lora_unet_c.diff", torch::ones({8})}},
       "lora_unet_c.diff [8]: a full diff must be 2-D or 4-D (the weight's shape)"},
      // Rank 0 (empty factors) would fuse as an all-zero patch: refused as a plain pair's rank 0 is.
      {{{"lora_unet_m.hada_w1_a", torch::ones({8, 0})},
        {"lora_unet_m.hada_w1_b", torch::ones({0, 6})},
        {"lora_unet_m.hada_w2_a", torch::ones({8, 2})},
        {"lora_unet_m.hada_w2_b", torch::ones({2, 6})}},
       "lora_unet_m.hada_w1_a [8, 0]: an empty LoHa factor (rank 0 or a zero dimension)"},
      {{{"lora_unet_m.hada_w1_a", torch::ones({8, 2})},
        {"lora_unet_m.hada_w1_b", torch::ones({2, 6})},
        {"lora_unet_m.hada_w2_a", torch::ones({8, 2})},
        {"lora_unet_m.hada_w2_b", torch::ones({2, 0})}},
       "lora_unet_m.hada_w2_b [2, 0]: an empty LoHa factor (rank 0 or a zero dimension)"},
      {{{"lora_unet_k.lokr_w1", torch::ones({2, 2})},
        {"lora_unet_k.lokr_w2_a", torch::ones({4, 0})},
        {"lora_unet_k.lokr_w2_b", torch::ones({0, 4})}},
       "lora_unet_k.lokr_w2_a [4, 0]: an empty LoKr factor (rank 0 or a zero dimension)"},
      {{{"lora_unet_c.lora_down.weight", torch::ones({2, 6, 1, 1})},
        {"lora_unet_c.lora_mid.weight", torch::ones({2, 2, 0, 3})},
        {"lora_unet_c.lora_up.weight", torch::ones({8, 2, 1, 1})}},
       "lora_unet_c.lora_mid.weight [2, 2, 0, 3]: an empty Tucker LoCon factor (rank 0 or a zero dimension)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string p = dir + "/e" + std::to_string(i) + ".safetensors";
    sd::save_safetensors(p, cases[i].t);
    std::string msg;
    try {
      sd::read_lora_file(p);
    } catch (const sd::FormatError& e) {
      msg = e.what();
    }
    EXPECT_EQ(msg, p + ": " + cases[i].message) << "case " << i;
  }
  fs::remove_all(dir);
}

}  // namespace
