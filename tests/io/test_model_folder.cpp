// diffusers folder discovery, weight-file selection and typed config reading: the errors name file and field.
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <tuple>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/shard_index.h"

namespace fs = std::filesystem;

namespace {

void touch(const fs::path& p, const std::string& content = "x") {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << content;
}

template <typename Fn>
std::string error_of(Fn&& fn) {
  return sd::test::error_of<sd::Error>(std::forward<Fn>(fn));
}

const char* kIndex = R"({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "LCMScheduler"],
  "safety_checker": [null, null], "requires_safety_checker": false})";

TEST(ModelFolder, FixtureModelsOpen) {
  const auto models = sd::test::fixture_models();
  if (models.empty()) GTEST_SKIP() << "no fixture models";
  for (const auto& m : models) {
    auto f = sd::ModelFolder::open(sd::test::fixture_path("models/" + m));
    EXPECT_EQ(f.pipeline_class(), "StableDiffusionPipeline");
    EXPECT_TRUE(f.has_component("unet"));
    EXPECT_FALSE(f.has_component("safety_checker"));  // [null, null]
    EXPECT_NE(f.weights_path("unet").find("diffusion_pytorch_model.safetensors"), std::string::npos);
    EXPECT_TRUE(f.taesd_dir().has_value());
  }
}

TEST(ModelFolder, NotAPipelineFolder) {
  const fs::path d = sd::test::make_temp_dir("sd-mf");
  EXPECT_NE(error_of([&] { sd::ModelFolder::open(d.string()); }).find("no model_index.json"), std::string::npos);
  EXPECT_NE(error_of([&] { sd::ModelFolder::open((d / "missing").string()); }).find("not a directory"),
            std::string::npos);
  touch(d / "model_index.json", "{not json");
  EXPECT_NE(error_of([&] { sd::ModelFolder::open(d.string()); }).find("not valid JSON"), std::string::npos);
  auto idx = nlohmann::json::parse(kIndex);
  idx.erase("vae");
  touch(d / "model_index.json", idx.dump());
  const std::string msg = error_of([&] { sd::ModelFolder::open(d.string()); });
  EXPECT_NE(msg.find("component 'vae' missing"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model_index.json"), std::string::npos) << msg;
  idx = nlohmann::json::parse(kIndex);
  idx["_class_name"] = "StableDiffusionXLPipeline";
  idx["text_encoder_2"] = {"transformers", "CLIPTextModelWithProjection"};
  touch(d / "model_index.json", idx.dump());
  // An SDXL pipeline opens; its tiny autoencoder is taesdxl/, never an SD taesd/.
  const auto xl = sd::ModelFolder::open(d.string());
  EXPECT_TRUE(xl.is_sdxl());
  fs::create_directories(d / "taesd");
  EXPECT_FALSE(xl.taesd_dir().has_value());
  fs::create_directories(d / "taesdxl");
  EXPECT_EQ(xl.taesd_dir().value(), (d / "taesdxl").string());
}

TEST(ModelFolder, MissingComponentFolderIsNamed) {
  const fs::path d = sd::test::make_temp_dir("sd-mf");
  touch(d / "model_index.json", kIndex);
  auto f = sd::ModelFolder::open(d.string());
  EXPECT_NE(error_of([&] { f.component_dir("unet"); }).find("component folder 'unet/' is missing"), std::string::npos);
}

// What the default logger prints while `fn` runs (at info level).
template <typename Fn>
std::string logged(Fn&& fn) {
  std::ostringstream out;
  const auto saved = spdlog::default_logger();
  auto capture = std::make_shared<spdlog::logger>("capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(out));
  capture->set_pattern("%l %v");
  capture->set_level(spdlog::level::info);
  spdlog::set_default_logger(capture);
  try {
    fn();
  } catch (...) {
    spdlog::set_default_logger(saved);
    throw;
  }
  spdlog::set_default_logger(saved);
  return out.str();
}

TEST(FindWeights, VariantsPicklesAndAmbiguity) {
  const fs::path d = sd::test::make_temp_dir("sd-fw");
  EXPECT_NE(error_of([&] { sd::find_weights(d.string()); }).find("no .safetensors weight file"), std::string::npos);
  touch(d / "diffusion_pytorch_model.bin");
  const std::string pickle = error_of([&] { sd::find_weights(d.string()); });
  EXPECT_NE(pickle.find("pickles are never loaded"), std::string::npos) << pickle;
  EXPECT_NE(pickle.find("diffusion_pytorch_model.bin"), std::string::npos) << pickle;
  touch(d / "diffusion_pytorch_model.safetensors");
  touch(d / "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(fs::path(sd::find_weights(d.string())).filename(), "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(fs::path(sd::find_weights(d.string(), "fp16")).filename(), "diffusion_pytorch_model.fp16.safetensors");
  // Asking for a variant that is absent falls back to the default weights.
  EXPECT_EQ(fs::path(sd::find_weights(d.string(), "bf16")).filename(), "diffusion_pytorch_model.safetensors");
  touch(d / "other.safetensors");
  EXPECT_NE(error_of([&] { sd::find_weights(d.string()); }).find("several .safetensors"), std::string::npos);
}

// Sharded checkpoints (save_pretrained with max_shard_size): the index is the weights (SafeTensorsFile opens its
// shards); beside a single file it wins for diffusers' components and loses for transformers' (model.safetensors),
// as each library orders them; shards without their index are refused naming it.
TEST(FindWeights, ShardIndexes) {
  const fs::path d = sd::test::make_temp_dir("sd-fw-shards");
  touch(d / "diffusion_pytorch_model-00001-of-00002.safetensors");
  touch(d / "diffusion_pytorch_model-00002-of-00002.safetensors");
  EXPECT_EQ(error_of([&] { sd::find_weights(d.string()); }),
            d.string() + ": shards of a sharded checkpoint (diffusion_pytorch_model-00001-of-00002.safetensors, "
                         "diffusion_pytorch_model-00002-of-00002.safetensors) but not their index "
                         "diffusion_pytorch_model.safetensors.index.json: download it too (it names the shard of "
                         "every tensor)");
  touch(d / "diffusion_pytorch_model.safetensors.index.json");
  EXPECT_EQ(sd::find_weights(d.string()), (d / "diffusion_pytorch_model.safetensors.index.json").string());
  // Asked for a variant it does not have: the plain (sharded) weights, logged.
  std::string found;
  EXPECT_EQ(logged([&] { found = sd::find_weights(d.string(), "fp16"); }),
            "info " + d.string() + ": no 'fp16' variant weight file (diffusion_pytorch_model.fp16.safetensors); "
                                   "loading the plain diffusion_pytorch_model.safetensors.index.json\n");
  EXPECT_EQ(found, (d / "diffusion_pytorch_model.safetensors.index.json").string());
  touch(d / "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(logged([&] { found = sd::find_weights(d.string()); }),
            "info " + d.string() + ": both diffusion_pytorch_model.safetensors and the sharded checkpoint "
                                   "diffusion_pytorch_model.safetensors.index.json; loading the shards (as diffusers "
                                   "does)\n");
  EXPECT_EQ(found, (d / "diffusion_pytorch_model.safetensors.index.json").string());
  // An asked variant present is not blocked by an ambiguity of the plain weights.
  touch(d / "other.safetensors.index.json");
  touch(d / "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_EQ(sd::find_weights(d.string(), "fp16"), (d / "diffusion_pytorch_model.fp16.safetensors").string());
  EXPECT_EQ(error_of([&] { sd::find_weights(d.string()); }),
            d.string() + ": several sharded checkpoints (diffusion_pytorch_model.safetensors.index.json, "
                         "other.safetensors.index.json); expected one");
  // transformers (the text and image encoders' model.safetensors) takes the single file before the index.
  const fs::path t = sd::test::make_temp_dir("sd-fw-shards");
  touch(t / "model.safetensors");
  touch(t / "model.safetensors.index.json");
  EXPECT_EQ(logged([&] { found = sd::find_weights(t.string()); }),
            "info " + t.string() + ": both model.safetensors and the sharded checkpoint model.safetensors.index.json; "
                                   "loading the single file (as transformers does)\n");
  EXPECT_EQ(found, (t / "model.safetensors").string());
  // A variant's single file and index: the same order, for the variant.
  touch(t / "model.fp16.safetensors");
  touch(t / "model.safetensors.index.fp16.json");
  EXPECT_EQ(sd::find_weights(t.string(), "fp16"), (t / "model.fp16.safetensors").string());
  touch(d / "diffusion_pytorch_model.safetensors.index.fp16.json");
  EXPECT_EQ(sd::find_weights(d.string(), "fp16"), (d / "diffusion_pytorch_model.safetensors.index.fp16.json").string());
  // Plain shards without their index never give way to a variant, asked or not.
  const fs::path o = sd::test::make_temp_dir("sd-fw-shards");
  touch(o / "x-00001-of-00002.safetensors");
  touch(o / "x.fp16.safetensors");
  const std::string orphan = o.string() + ": shards of a sharded checkpoint (x-00001-of-00002.safetensors) but not "
                                          "their index x.safetensors.index.json: download it too (it names the shard "
                                          "of every tensor)";
  EXPECT_EQ(error_of([&] { sd::find_weights(o.string()); }), orphan);
  EXPECT_EQ(error_of([&] { sd::find_weights(o.string(), "bf16"); }), orphan);
  EXPECT_EQ(sd::find_weights(o.string(), "fp16"), (o / "x.fp16.safetensors").string());
  // A variant's shards without their index name the variant's index.
  const fs::path v = sd::test::make_temp_dir("sd-fw-shards");
  touch(v / "model.fp16-00001-of-00002.safetensors");
  EXPECT_EQ(error_of([&] { sd::find_weights(v.string()); }),
            v.string() + ": shards of a sharded checkpoint (model.fp16-00001-of-00002.safetensors) but not their "
                         "index model.safetensors.index.fp16.json: download it too (it names the shard of every "
                         "tensor)");
  // diffusers' older variant names (still loaded, with a deprecation warning): "<stem>.safetensors.<v>.index.json"
  // and shards "<stem>-00001-of-00002.<v>.safetensors".
  const fs::path l = sd::test::make_temp_dir("sd-fw-shards");
  touch(l / "diffusion_pytorch_model-00001-of-00002.fp16.safetensors");
  touch(l / "diffusion_pytorch_model-00002-of-00002.fp16.safetensors");
  EXPECT_TRUE(sd::has_variant_weights(l.string(), "fp16"));
  EXPECT_EQ(error_of([&] { sd::find_weights(l.string(), "fp16"); }),
            l.string() + ": shards of a sharded checkpoint (diffusion_pytorch_model-00001-of-00002.fp16.safetensors, "
                         "diffusion_pytorch_model-00002-of-00002.fp16.safetensors) but not their index "
                         "diffusion_pytorch_model.safetensors.index.fp16.json: download it too (it names the shard of "
                         "every tensor)");
  touch(l / "diffusion_pytorch_model.safetensors.fp16.index.json");
  EXPECT_EQ(logged([&] { found = sd::find_weights(l.string(), "fp16"); }),
            "warning " + l.string() + ": diffusion_pytorch_model.safetensors.fp16.index.json is diffusers' deprecated "
                                      "name for a variant's shard index (now "
                                      "diffusion_pytorch_model.safetensors.index.fp16.json); loading it\n");
  EXPECT_EQ(found, (l / "diffusion_pytorch_model.safetensors.fp16.index.json").string());
  EXPECT_EQ(sd::find_weights(l.string()), found);  // the only weights there
  std::error_code ec;
  for (const auto& dir : {d, v, t, o, l}) fs::remove_all(dir, ec);
}

TEST(FindWeights, WeightFileNames) {
  using W = sd::WeightFileName;
  const std::vector<std::tuple<std::string, W::Kind, std::string, std::string, bool>> cases = {
      {"diffusion_pytorch_model.safetensors", W::kSingle, "diffusion_pytorch_model", "", false},
      {"model.fp16.safetensors", W::kSingle, "model", "fp16", false},
      {"model.safetensors.index.json", W::kIndex, "model", "", false},
      {"model.safetensors.index.fp16.json", W::kIndex, "model", "fp16", false},
      {"model.safetensors.fp16.index.json", W::kIndex, "model", "fp16", true},
      {"model-00001-of-00002.safetensors", W::kShard, "model", "", false},
      {"model.fp16-00001-of-00002.safetensors", W::kShard, "model", "fp16", false},
      {"model-00001-of-00002.fp16.safetensors", W::kShard, "model", "fp16", true},
      {"pytorch_model.fp16.bin", W::kPickle, "pytorch_model", "", false},
      {"model.ckpt", W::kPickle, "model", "", false},
      {"model.a.b.safetensors", W::kNone, "", "", false},
      {"model.safetensors.index.a.b.json", W::kNone, "", "", false},
      {".safetensors.index.json", W::kNone, "", "", false},
      {".safetensors", W::kNone, "", "", false},
      {"model.safetensors.json", W::kNone, "", "", false},
      {"config.json", W::kNone, "", "", false},
      {"model-x-of-00002.safetensors", W::kSingle, "model-x-of-00002", "", false},
  };
  for (const auto& [name, kind, stem, variant, legacy] : cases) {
    SCOPED_TRACE(name);
    const W w = sd::parse_weight_file_name(name);
    EXPECT_EQ(w.kind, kind);
    EXPECT_EQ(w.stem, stem);
    EXPECT_EQ(w.variant, variant);
    EXPECT_EQ(w.legacy, legacy);
    EXPECT_EQ(sd::is_shard_index_name(name), kind == W::kIndex);
  }
}

// Only a variant's files downloaded (e.g. allow_patterns="*.fp16.safetensors"): the one variant is the weights, and
// the log says which file; with several and no plain file the choice cannot be made, and the error names them.
TEST(FindWeights, OnlyVariantFiles) {
  const fs::path d = sd::test::make_temp_dir("sd-fw-variant");
  touch(d / "config.json");
  touch(d / "diffusion_pytorch_model.fp16.safetensors");
  std::string found;
  const std::string log = logged([&] { found = sd::find_weights(d.string()); });
  EXPECT_EQ(found, (d / "diffusion_pytorch_model.fp16.safetensors").string());
  EXPECT_EQ(log, "info " + d.string() + ": no plain .safetensors weight file; loading the 'fp16' variant "
                 "diffusion_pytorch_model.fp16.safetensors\n");
  touch(d / "diffusion_pytorch_model.bf16.safetensors");
  EXPECT_EQ(fs::path(sd::find_weights(d.string(), "bf16")).filename(), "diffusion_pytorch_model.bf16.safetensors");
  const std::string several =
      d.string() + ": no plain .safetensors weight file and 2 variants (diffusion_pytorch_model.bf16.safetensors, "
                   "diffusion_pytorch_model.fp16.safetensors): which one to load cannot be told; keep only that one "
                   "in the folder (move the others out) or add the full weights as diffusion_pytorch_model.safetensors";
  EXPECT_EQ(error_of([&] { sd::find_weights(d.string()); }), several);
  // A plain file is the weights whatever variants lie beside it.
  touch(d / "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(logged([&] { found = sd::find_weights(d.string()); }), "");
  EXPECT_EQ(fs::path(found).filename(), "diffusion_pytorch_model.safetensors");
  // A sharded variant alone is that variant's weights (its index), as a single variant file is.
  const fs::path s = sd::test::make_temp_dir("sd-fw-variant");
  touch(s / "diffusion_pytorch_model.safetensors.index.fp16.json");
  touch(s / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors");
  touch(s / "diffusion_pytorch_model.fp16-00002-of-00002.safetensors");
  EXPECT_EQ(logged([&] { found = sd::find_weights(s.string()); }),
            "info " + s.string() + ": no plain .safetensors weight file; loading the 'fp16' variant "
                                   "diffusion_pytorch_model.safetensors.index.fp16.json\n");
  EXPECT_EQ(found, (s / "diffusion_pytorch_model.safetensors.index.fp16.json").string());
  // ... and counts as one of the variants when there are several.
  touch(s / "diffusion_pytorch_model.bf16.safetensors");
  EXPECT_EQ(error_of([&] { sd::find_weights(s.string()); }),
            s.string() + ": no plain .safetensors weight file and 2 variants (diffusion_pytorch_model.bf16.safetensors"
                         ", diffusion_pytorch_model.safetensors.index.fp16.json): which one to load cannot be told; "
                         "keep only that one in the folder (move the others out) or add the full weights as "
                         "diffusion_pytorch_model.safetensors");
  std::error_code ec;
  fs::remove_all(d, ec);
  fs::remove_all(s, ec);
}

// A variant asked for (--variant, load_pipeline(variant=)): its file; else, as diffusers, the plain weights (logged);
// never another variant, and never the plain file in place of the asked variant saved sharded.
TEST(FindWeights, AskedVariant) {
  const fs::path d = sd::test::make_temp_dir("sd-fw-asked");
  touch(d / "diffusion_pytorch_model.safetensors");
  touch(d / "diffusion_pytorch_model.fp16.safetensors");
  std::string found;
  EXPECT_EQ(logged([&] { found = sd::find_weights(d.string(), "fp16"); }), "");
  EXPECT_EQ(found, (d / "diffusion_pytorch_model.fp16.safetensors").string());
  EXPECT_EQ(logged([&] { found = sd::find_weights(d.string(), "bf16"); }),
            "info " + d.string() + ": no 'bf16' variant weight file (diffusion_pytorch_model.bf16.safetensors); "
                                   "loading the plain diffusion_pytorch_model.safetensors\n");
  EXPECT_EQ(found, (d / "diffusion_pytorch_model.safetensors").string());
  // Only another variant: refused, naming the folder, the variant and what is there.
  fs::remove(d / "diffusion_pytorch_model.safetensors");
  EXPECT_EQ(error_of([&] { sd::find_weights(d.string(), "bf16"); }),
            d.string() + ": variant 'bf16' asked but there is no diffusion_pytorch_model.bf16.safetensors "
                         "and no plain weight file to fall back on; found: diffusion_pytorch_model.fp16.safetensors");
  // The asked variant sharded, beside a plain file: its index.
  const fs::path s = sd::test::make_temp_dir("sd-fw-asked");
  touch(s / "model.safetensors");
  touch(s / "model.safetensors.index.fp16.json");
  touch(s / "model.fp16-00001-of-00002.safetensors");
  EXPECT_EQ(sd::find_weights(s.string(), "fp16"), (s / "model.safetensors.index.fp16.json").string());
  EXPECT_EQ(fs::path(sd::find_weights(s.string())).filename(), "model.safetensors");
  EXPECT_TRUE(sd::has_variant_weights(s.string(), "fp16"));
  EXPECT_FALSE(sd::has_variant_weights(s.string(), "fp1"));
  EXPECT_FALSE(sd::has_variant_weights(s.string(), "bf16"));
  EXPECT_TRUE(sd::has_variant_weights(d.string(), "fp16"));
  EXPECT_EQ(sd::weight_files(s.string()), (std::vector<std::string>{"model.fp16-00001-of-00002.safetensors",
                                                                     "model.safetensors",
                                                                     "model.safetensors.index.fp16.json"}));
  // Its shards without the index: refused naming the index, never the plain file in the variant's place.
  fs::remove(s / "model.safetensors.index.fp16.json");
  EXPECT_EQ(error_of([&] { sd::find_weights(s.string(), "fp16"); }),
            s.string() + ": shards of a sharded checkpoint (model.fp16-00001-of-00002.safetensors) but not their index "
                         "model.safetensors.index.fp16.json: download it too (it names the shard of every tensor)");
  std::error_code ec;
  fs::remove_all(d, ec);
  fs::remove_all(s, ec);
}

TEST(ModelFolder, CheckVariant) {
  const fs::path d = sd::test::make_temp_dir("sd-mf-variant");
  touch(d / "model_index.json", kIndex);
  touch(d / "unet" / "diffusion_pytorch_model.safetensors");
  touch(d / "text_encoder" / "model.safetensors");
  touch(d / "vae" / "config.json");
  touch(d / "scheduler" / "scheduler_config.json");
  const auto f = sd::ModelFolder::open(d.string());
  const std::string msg = error_of([&] { f.check_variant("fp16"); });
  EXPECT_EQ(msg, "variant 'fp16': no component folder of " + d.string() + " has 'fp16' weights "
                 "(<stem>.fp16.safetensors); found text_encoder/: model.safetensors; unet/: "
                 "diffusion_pytorch_model.safetensors. Load it without a variant, or name the variant its files have");
  touch(d / "vae" / "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_NO_THROW(f.check_variant("fp16"));
  EXPECT_NO_THROW(sd::check_variant_name("non_ema-2"));
  EXPECT_EQ(error_of([&] { sd::check_variant_name("fp16.safetensors"); }),
            "variant 'fp16.safetensors': expected the name of a weight-file variant such as fp16 (letters, digits, "
            "'_' or '-'; it is the NAME of <stem>.NAME.safetensors)");
  std::error_code ec;
  fs::remove_all(d, ec);
}

// Only the files find_weights loads count as a variant's: not the extension of a plain file (model.safetensors is no
// variant 'safetensors', pytorch_model.bin none 'bin'), and not a pickle's variant (pytorch_model.fp16.bin is never
// loaded): either would pass the check and load every plain file, ignoring the variant asked for.
TEST(ModelFolder, CheckVariantCountsOnlyTheFilesTheLoaderTakes) {
  const fs::path d = sd::test::make_temp_dir("sd-mf-variant-ext");
  touch(d / "model_index.json", kIndex);
  touch(d / "unet" / "diffusion_pytorch_model.safetensors");
  touch(d / "unet" / "diffusion_pytorch_model.fp16.bin");
  touch(d / "text_encoder" / "model.safetensors");
  touch(d / "text_encoder" / "pytorch_model.bin");
  touch(d / "vae" / "config.json");
  touch(d / "scheduler" / "scheduler_config.json");
  const auto f = sd::ModelFolder::open(d.string());
  const std::string found = "; found text_encoder/: model.safetensors, pytorch_model.bin; unet/: "
                            "diffusion_pytorch_model.fp16.bin, diffusion_pytorch_model.safetensors. Load it without a "
                            "variant, or name the variant its files have";
  for (const std::string v : {"safetensors", "bin", "fp16"}) {
    SCOPED_TRACE(v);
    EXPECT_FALSE(sd::has_variant_weights((d / "unet").string(), v));
    EXPECT_FALSE(sd::has_variant_weights((d / "text_encoder").string(), v));
    EXPECT_EQ(error_of([&] { f.check_variant(v); }), "variant '" + v + "': no component folder of " + d.string() +
                                                         " has '" + v + "' weights (<stem>." + v + ".safetensors)" +
                                                         found);
  }
  // The shard and index forms the loader recognises still count.
  touch(d / "vae" / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors");
  EXPECT_TRUE(sd::has_variant_weights((d / "vae").string(), "fp16"));
  fs::remove(d / "vae" / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors");
  touch(d / "vae" / "diffusion_pytorch_model.safetensors.index.fp16.json");
  EXPECT_TRUE(sd::has_variant_weights((d / "vae").string(), "fp16"));
  EXPECT_NO_THROW(f.check_variant("fp16"));
  std::error_code ec;
  fs::remove_all(d, ec);
}

TEST(ConfigReader, DefaultsTypesAndErrors) {
  auto j = nlohmann::json::parse(R"({"a": 3, "b": 2.5, "c": true, "d": "x", "e": [1, 2], "f": null, "g": 4.0,
                                     "h": [1, "two"], "_class_name": "X", "unknown": 1})");
  sd::ConfigReader r(j, "dir/config.json");
  EXPECT_EQ(r.get_int("a", 0), 3);
  EXPECT_EQ(r.get_int("missing", 7), 7);
  EXPECT_EQ(r.get_int("f", 9), 9);  // null = absent = default
  EXPECT_EQ(r.get_int("g", 0), 4);  // 4.0 is an integer
  EXPECT_DOUBLE_EQ(r.get_double("b", 0), 2.5);
  EXPECT_DOUBLE_EQ(r.get_double("a", 0), 3.0);
  EXPECT_TRUE(r.get_bool("c", false));
  EXPECT_EQ(r.get_string("d", ""), "x");
  EXPECT_EQ(r.get_int_list("e", {}), (std::vector<int>{1, 2}));
  EXPECT_EQ(r.get_int_or_list("a", 0, 3), (std::vector<int>{3, 3, 3}));
  EXPECT_EQ(r.get_int_or_list("e", 0, 2), (std::vector<int>{1, 2}));
  auto expect = [&](auto fn, const std::string& frag) {
    const std::string m = error_of(fn);
    EXPECT_NE(m.find("dir/config.json"), std::string::npos) << m;
    EXPECT_NE(m.find(frag), std::string::npos) << m;
  };
  expect([&] { r.get_int("b", 0); }, "field 'b': expected an integer, found 2.5");
  expect([&] { r.get_bool("a", false); }, "field 'a': expected true or false");
  expect([&] { r.get_string("a", ""); }, "field 'a': expected a string");
  expect([&] { r.get_int_list("h", {}); }, "field 'h': expected a list of integers");
  expect([&] { r.get_int_or_list("e", 0, 3); }, "a list of 3 integers");
  expect([&] { r.get_double("d", 0); }, "field 'd': expected a number");
  expect([&] { r.require_unsupported_absent("a"); }, "'a' = 3 is not supported");
  EXPECT_NO_THROW(r.require_unsupported_absent("f"));
  EXPECT_NE(error_of([] { sd::ConfigReader(nlohmann::json::array(), "x.json"); }).find("JSON object"),
            std::string::npos);
}

TEST(ReadJsonFile, MissingAndMalformed) {
  EXPECT_NE(error_of([] { sd::read_json_file("/nonexistent/config.json"); }).find("cannot open"), std::string::npos);
  const fs::path d = sd::test::make_temp_dir("sd-json");
  touch(d / "config.json", "{\"a\": ");
  const std::string m = error_of([&] { sd::read_json_file((d / "config.json").string()); });
  EXPECT_NE(m.find("config.json: not valid JSON"), std::string::npos) << m;
}

}  // namespace
