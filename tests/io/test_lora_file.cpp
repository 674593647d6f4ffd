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

// DoRA and the LyCORIS methods carry terms beyond a down / up pair: a file with any of their keys is refused naming
// the method, its first key and how many more modules use it, also when it holds plain pairs that would match (before,
// those were fused and the method's keys only counted as unparsed).
TEST(LoraFileReader, DoraAndLycorisFilesAreRefused) {
  const std::string dir = sd::test::make_temp_dir("lora_methods_io");
  const std::string why =
      "; only plain LoRA (down / up pairs, optional alpha) is fused, and fusing the rest of the file without these "
      "terms would give other weights than it was trained for (diffusers 0.24 refuses such keys too)";
  struct Case {
    std::vector<std::string> keys;  // after one plain kohya pair
    std::string message;            // after "<file>: "
  };
  const std::vector<Case> cases = {
      {{"lora_unet_a.dora_scale", "lora_unet_b.lora_down.weight", "lora_unet_b.lora_up.weight",
        "lora_unet_b.dora_scale"},
       "DoRA (dora_scale) is not supported: lora_unet_a.dora_scale (and 1 more module)"},
      {{"unet.mid_block.attentions.0.proj_out.lora_A.weight", "unet.mid_block.attentions.0.proj_out.lora_B.weight",
        "unet.mid_block.attentions.0.proj_out.lora_magnitude_vector.weight"},
       "DoRA (lora_magnitude_vector) is not supported: "
       "unet.mid_block.attentions.0.proj_out.lora_magnitude_vector.weight"},
      {{"lora_unet_a.lora_mid.weight"},
       "LyCORIS Tucker LoCon (lora_mid) is not supported: lora_unet_a.lora_mid.weight"},
      {{"lora_unet_c.hada_w1_a", "lora_unet_c.hada_w1_b", "lora_unet_c.hada_w2_a", "lora_unet_c.hada_w2_b",
        "lora_unet_c.hada_t1", "lora_unet_c.alpha"},
       "LyCORIS LoHa (hada_*) is not supported: lora_unet_c.hada_w1_a"},
      {{"lora_te_c.lokr_w1", "lora_te_c.lokr_w2_a", "lora_te_c.lokr_w2_b", "lora_te_d.lokr_w1", "lora_te_e.lokr_w1"},
       "LyCORIS LoKr (lokr_*) is not supported: lora_te_c.lokr_w1 (and 2 more modules)"},
      {{"lora_unet_c.diff", "lora_unet_c.diff_b", "lora_unet_d.diff_b"},
       "LyCORIS full weight differences (diff / diff_b) is not supported: lora_unet_c.diff (and 1 more module)"},
      {{"lora_unet_c.weight", "lora_unet_c.on_input"},
       "LyCORIS (IA)^3 (on_input) is not supported: lora_unet_c.on_input"},
      {{"lora_unet_c.oft_blocks"}, "LyCORIS OFT (oft_blocks) is not supported: lora_unet_c.oft_blocks"},
      {{"lora_unet_c.a1.weight", "lora_unet_c.a2.weight", "lora_unet_c.b1.weight", "lora_unet_c.b2.weight"},
       "LyCORIS GLoRA (a1 / a2 / b1 / b2) is not supported: lora_unet_c.a1.weight"},
      // The first method in file order is named.
      {{"lora_unet_c.hada_w1_a", "lora_unet_a.dora_scale"},
       "LyCORIS LoHa (hada_*) is not supported: lora_unet_c.hada_w1_a"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::vector<std::pair<std::string, torch::Tensor>> t = {{"lora_unet_a.lora_down.weight", torch::ones({2, 8})},
                                                             {"lora_unet_a.lora_up.weight", torch::ones({8, 2})}};
    for (const auto& k : cases[i].keys) {
      const bool down = k.find("lora_down.") != std::string::npos || k.find("lora_A.") != std::string::npos;
      t.emplace_back(k, down ? torch::ones({2, 8}) : torch::ones({8, 2}));
    }
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
  EXPECT_EQ(f.unparsed,
            (std::vector<std::string>{"lora_unet_a.lora_down.weight_orphan", "lora_unet_b.scale_weight"}));
  fs::remove_all(dir);
}

}  // namespace
