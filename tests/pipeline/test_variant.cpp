// LoadOptions::variant (diffusers' from_pretrained(variant="fp16")) on copies of the fixture tiny-sd15 whose component
// folders also hold "<stem>.fp16.safetensors" files with other weights (the plain ones times 0.9, saved in fp16):
// the variant loads those files, bit for bit as a folder whose plain files they are; without it the plain files load;
// components without the variant fall back to their plain weights, as diffusers does; what cannot be loaded is refused
// naming the folder, the variant and the files found.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/cli_run.h"
#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/rng.h"
#include "pipeline/stream_diffusion.h"
#include "stream_outputs.h"

#ifdef SD_TEST_HAVE_OPENCV
#include "pipeline/cli_images.h"
#endif

namespace sd {
namespace {

namespace fs = std::filesystem;

constexpr const char* kModel = "models/tiny-sd15";
const std::string kCn = "controlnet/models/tiny-controlnet-sd15";

// The weights of `plain` times 0.9, in fp16: another model, and a file in the dtype the loader converts from.
void write_fp16_variant(const std::string& plain, const std::string& out) {
  std::map<std::string, torch::Tensor> w;
  {
    const auto f = SafeTensorsFile::open(plain);
    for (const auto& k : f.keys()) {
      const auto t = f.get(k);
      w[k] = t.is_floating_point() ? (t.to(torch::kFloat) * 0.9).to(torch::kHalf) : t.clone();
    }
  }
  save_safetensors(out, w);
}

std::shared_ptr<const DiffusionModels> load(const std::string& path, const std::string& variant,
                                            const std::string& taesd = "") {
  LoadOptions o;
  o.threads = -1;
  o.variant = variant;
  o.taesd = taesd;
  return load_pipeline(path, o);
}

// Two txt2img frames and one img2img frame: text encoder, UNet and the autoencoder's both halves run.
std::vector<torch::Tensor> frames(const DiffusionModels& m) {
  std::vector<torch::Tensor> out;
  StreamConfig c;
  c.width = c.height = 64;
  c.t_index_list = {0, 32};
  c.cfg_type = CfgType::None;
  {
    StreamDiffusion s(std::shared_ptr<const DiffusionModels>(&m, [](const DiffusionModels*) {}), c);
    s.prepare("a red apple", "");
    out.push_back(s.txt2img());
    out.push_back(s.txt2img());
  }
  c.t_index_list = {32, 45};
  c.cfg_type = CfgType::Self;
  StreamDiffusion s(std::shared_ptr<const DiffusionModels>(&m, [](const DiffusionModels*) {}), c);
  s.prepare("a red apple", "");
  out.push_back(s.img2img(torch::linspace(-1, 1, 3 * 64 * 64).reshape({3, 64, 64})));
  return out;
}

using test::max_diff;

class Variant : public ::testing::Test {
 protected:
  // Components given an fp16 variant in `variants_` (all four weight folders of the fixture).
  const std::vector<std::pair<std::string, std::string>> kFiles = {
      {"unet", "diffusion_pytorch_model"}, {"text_encoder", "model"}, {"vae", "diffusion_pytorch_model"},
      {"taesd", "diffusion_pytorch_model"}};

  void SetUp() override {
    if (!test::fixture_exists(kModel)) GTEST_SKIP() << "fixture absent";
    tmp_ = test::make_temp_dir("sd-variant");
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  std::string copy_model(const std::string& name) const {
    const std::string m = tmp_ + "/" + name;
    fs::copy(test::fixture_path(kModel), m, fs::copy_options::recursive);
    return m;
  }
  // The fixture plus "<stem>.fp16.safetensors" beside the plain file of each of `components`.
  std::string with_variants(const std::string& name, const std::vector<std::string>& components) const {
    const std::string m = copy_model(name);
    for (const auto& [dir, stem] : kFiles)
      if (std::find(components.begin(), components.end(), dir) != components.end()) {
        const std::string base = m + "/" + dir + "/" + stem;
        write_fp16_variant(base + ".safetensors", base + ".fp16.safetensors");
      }
    return m;
  }
  // The fixture with the plain file of each of `components` replaced by the variant files of `variants`: the model
  // the variant is.
  std::string as_plain(const std::string& name, const std::string& variants,
                       const std::vector<std::string>& components) const {
    const std::string m = copy_model(name);
    for (const auto& [dir, stem] : kFiles)
      if (std::find(components.begin(), components.end(), dir) != components.end())
        fs::copy_file(variants + "/" + dir + "/" + stem + ".fp16.safetensors",
                      m + "/" + dir + "/" + stem + ".safetensors", fs::copy_options::overwrite_existing);
    return m;
  }
  std::string tmp_;
};

TEST_F(Variant, Fp16FilesLoadWhenAskedAndThePlainFilesWithout) {
  const std::vector<std::string> all = {"unet", "text_encoder", "vae", "taesd"};
  const std::string m = with_variants("both", all);
  const std::string ref = as_plain("ref", m, all);
  for (const std::string taesd : {"", "none"}) {  // TAESD (the fixture's default), then the AutoencoderKL
    SCOPED_TRACE("taesd '" + taesd + "'");
    const auto asked = load(m, "fp16", taesd);
    EXPECT_EQ(asked->variant(), "fp16");
    EXPECT_NE(asked->describe().find(", variant fp16, fp32, cpu)"), std::string::npos) << asked->describe();
    const auto fa = frames(*asked);
    EXPECT_EQ(max_diff(fa, frames(*load(ref, "", taesd))), 0.0);
    const auto plain = frames(*load(m, "", taesd));
    EXPECT_EQ(max_diff(plain, frames(*load(test::fixture_path(kModel), "", taesd))), 0.0);
    EXPECT_GT(max_diff(fa, plain), 1e-3);
  }
}

// diffusers passes the variant only to the components that have it; the others load their plain weights.
TEST_F(Variant, ComponentsWithoutTheVariantLoadTheirPlainWeights) {
  const std::string m = with_variants("unet-only", {"unet"});
  const auto fa = frames(*load(m, "fp16"));
  EXPECT_EQ(max_diff(fa, frames(*load(as_plain("ref", m, {"unet"}), ""))), 0.0);
  EXPECT_GT(max_diff(fa, frames(*load(m, ""))), 1e-3);
}

// As diffusers' DiffusionPipeline.from_pretrained ("no such modeling files are available"), with the files found.
TEST_F(Variant, AVariantNoComponentHasIsRefusedNamingTheFiles) {
  const std::string m = with_variants("both", {"unet"});
  EXPECT_EQ(test::error_of<InvalidArgument>([&] { load(m, "bf16"); }),
            "variant 'bf16': no component folder of " + m + " has 'bf16' weights (<stem>.bf16.safetensors); found "
            "text_encoder/: model.safetensors; unet/: diffusion_pytorch_model.fp16.safetensors, "
            "diffusion_pytorch_model.safetensors; vae/: diffusion_pytorch_model.safetensors. Load it without "
            "a variant, or name the variant its files have");
}

// A component with neither the asked variant nor plain weights (only another variant) is refused by folder: taking
// the other variant would load what was not asked for.
TEST_F(Variant, AComponentWithNeitherTheVariantNorPlainWeightsIsRefused) {
  const std::string m = with_variants("mixed", {"text_encoder"});
  fs::rename(m + "/unet/diffusion_pytorch_model.safetensors", m + "/unet/diffusion_pytorch_model.bf16.safetensors");
  EXPECT_EQ(test::error_of<FormatError>([&] { load(m, "fp16"); }),
            m + "/unet: variant 'fp16' asked but there is no diffusion_pytorch_model.fp16.safetensors "
                "and no plain weight file to fall back on; found: diffusion_pytorch_model.bf16.safetensors");
}

TEST_F(Variant, SingleFilesAndNamesThatAreNotPlainAreRefused) {
  const std::string single = "single_file/tiny-sd15.safetensors";
  if (test::fixture_exists(single)) {
    const std::string f = test::fixture_path(single);
    EXPECT_EQ(test::error_of<InvalidArgument>([&] { load(f, "fp16"); }),
              "variant 'fp16' is for diffusers model folders (it picks <stem>.fp16.safetensors in each component "
              "folder); " + f + " is a single-file checkpoint: load it without a variant");
  }
  EXPECT_EQ(test::error_of<InvalidArgument>([&] { load(test::fixture_path(kModel), "fp16/../x"); }),
            "variant 'fp16/../x': expected the name of a weight-file variant such as fp16 (letters, digits, '_' or "
            "'-'; it is the NAME of <stem>.NAME.safetensors)");
}

// A ControlNet folder loaded for a model set takes the set's variant (and its plain weights without one).
TEST_F(Variant, ControlNetFoldersLoadTheModelsVariant) {
  if (!test::fixture_exists(kCn + "/config.json")) GTEST_SKIP() << "no ControlNet fixtures";
  const std::string cn = tmp_ + "/cn", cn_ref = tmp_ + "/cn-ref";
  fs::copy(test::fixture_path(kCn), cn, fs::copy_options::recursive);
  fs::copy(test::fixture_path(kCn), cn_ref, fs::copy_options::recursive);
  write_fp16_variant(cn + "/diffusion_pytorch_model.safetensors", cn + "/diffusion_pytorch_model.fp16.safetensors");
  fs::copy_file(cn + "/diffusion_pytorch_model.fp16.safetensors", cn_ref + "/diffusion_pytorch_model.safetensors",
                fs::copy_options::overwrite_existing);
  const std::string m = with_variants("model", {"unet"});
  const auto with = load(m, "fp16"), without = load(m, "");
  const auto sample = torch::linspace(-1, 1, 4 * 8 * 8).reshape({1, 4, 8, 8});
  const auto t = torch::tensor({500}, torch::kLong);
  const auto ehs = with->encode_prompt("a cat");
  const auto image = torch::linspace(0, 1, 3 * 64 * 64).reshape({1, 3, 64, 64});
  const auto mid = [&](const std::string& path, const DiffusionModels& models) {
    return ControlNet::load(path, models)->residuals(sample, t, ehs, {}, image, 1.0).mid;
  };
  const auto asked = mid(cn, *with);
  EXPECT_TRUE(torch::equal(asked, mid(cn_ref, *with)));
  EXPECT_TRUE(torch::equal(mid(cn, *without), mid(test::fixture_path(kCn), *without)));
  EXPECT_GT((asked - mid(cn, *without)).abs().max().item<double>(), 1e-4);
}

// A ControlNet folder takes the model set's variant, under the same rule as a component: without that variant it
// loads its plain weights; with only other variants it is refused, the message saying the variant is the model's.
TEST_F(Variant, ControlNetFoldersWithoutTheModelsVariant) {
  if (!test::fixture_exists(kCn + "/config.json")) GTEST_SKIP() << "no ControlNet fixtures";
  const std::string cn = tmp_ + "/cn", only = tmp_ + "/cn-fp16-only";
  fs::copy(test::fixture_path(kCn), cn, fs::copy_options::recursive);
  write_fp16_variant(cn + "/diffusion_pytorch_model.safetensors", cn + "/diffusion_pytorch_model.fp16.safetensors");
  fs::copy(cn, only, fs::copy_options::recursive);
  fs::remove(only + "/diffusion_pytorch_model.safetensors");
  const std::string m = with_variants("model", {"unet"});
  fs::rename(m + "/unet/diffusion_pytorch_model.fp16.safetensors",
             m + "/unet/diffusion_pytorch_model.bf16.safetensors");
  const auto bf16 = load(m, "bf16");
  const auto sample = torch::linspace(-1, 1, 4 * 8 * 8).reshape({1, 4, 8, 8});
  const auto t = torch::tensor({500}, torch::kLong);
  const auto ehs = bf16->encode_prompt("a cat");
  const auto image = torch::linspace(0, 1, 3 * 64 * 64).reshape({1, 3, 64, 64});
  const auto mid = [&](const std::string& path) {
    return ControlNet::load(path, *bf16)->residuals(sample, t, ehs, {}, image, 1.0).mid;
  };
  EXPECT_TRUE(torch::equal(mid(cn), mid(test::fixture_path(kCn))));
  EXPECT_EQ(test::error_of<FormatError>([&] { ControlNet::load(only, *bf16); }),
            only + ": variant 'bf16' asked but there is no diffusion_pytorch_model.bf16.safetensors and no plain "
                   "weight file to fall back on; found: diffusion_pytorch_model.fp16.safetensors (the variant "
                   "'bf16' is the model's (--variant, load_pipeline(variant=)); ControlNet folders load it when they "
                   "have it, else their plain weights)");
  // Without a variant, the folder's only variant is its weights, as a component's.
  EXPECT_NO_THROW(ControlNet::load(only, *load(m, "")));
}

#if defined(SD_CLI_PATH) && defined(SD_TEST_HAVE_OPENCV)

test::RunResult cli(const std::string& args) { return test::run_command(std::string(SD_CLI_PATH) + " " + args); }
using test::q;

// `txt2img --variant fp16` and the settings-file key `variant` (written by --dump-config, read back by --config).
TEST_F(Variant, CliTxt2ImgAndItsSettingsFile) {
  const std::string m = with_variants("both", {"unet", "text_encoder"});
  const std::string ref = as_plain("ref", m, {"unet", "text_encoder"});
  const std::string args = " --prompt 'a red apple' --size 64x64 --threads 1 --dtype fp32 -o ";
  const auto png = [&](const std::string& model, const std::string& extra, const std::string& name) {
    const auto r = cli("txt2img --model " + q(model) + extra + args + q(tmp_ + "/" + name));
    EXPECT_EQ(r.status, 0) << r.output;
    return test::read_png_rgb(tmp_ + "/" + name);
  };
  const auto asked = png(m, " --variant fp16", "asked.png");
  ASSERT_TRUE(asked.defined());
  EXPECT_EQ(test::max_pixel_diff(asked, png(ref, "", "ref.png")), 0);
  const auto plain = png(m, "", "plain.png");
  EXPECT_EQ(test::max_pixel_diff(plain, png(test::fixture_path(kModel), "", "fixture.png")), 0);
  EXPECT_GT(test::max_pixel_diff(asked, plain), 2);

  const auto dump = cli("txt2img --model " + q(m) + " --variant fp16 --prompt 'a red apple' --size 64x64 --threads 1 "
                        "--dtype fp32 --dump-config");
  ASSERT_EQ(dump.status, 0) << dump.output;
  EXPECT_NE(dump.output.find("\nvariant: \"fp16\"\n"), std::string::npos) << dump.output;
  const std::string file = tmp_ + "/settings.yaml";
  std::ofstream(file) << dump.output;
  const auto r = cli("txt2img --config-file " + q(file) + " -o " + q(tmp_ + "/from-file.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(test::max_pixel_diff(asked, test::read_png_rgb(tmp_ + "/from-file.png")), 0);
  // Unset, the key is a comment: the plain files.
  const auto unset = cli("txt2img --model " + q(m) + " --dump-config");
  EXPECT_NE(unset.output.find("\n# variant:\n"), std::string::npos) << unset.output;
}

// Every command that loads a model folder takes --variant: those that load report the variant's files; a variant for
// a single file or a name that is not plain is a usage error (exit 2) before anything loads.
TEST_F(Variant, CliCommandsTakeItAndRefuseWhatCannotBe) {
  const std::string m = with_variants("both", {"unet"});
  auto r = cli("info --model " + q(m) + " --variant fp16");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(", diffusion_pytorch_model.fp16.safetensors\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(", model.safetensors\n"), std::string::npos) << r.output;  // no variant: plain
  r = cli("info --model " + q(m) + " --variant bf16");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("error: variant 'bf16': no component folder of " + m + " has 'bf16' weights"),
            std::string::npos) << r.output;
  r = cli("bench --model " + q(m) + " --variant fp16 --sections e2e --sizes 64 --dtypes fp32 --frames 1 --iters 1 "
          "--warmup 0 --threads 1");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(", variant fp16, fp32, cpu)"), std::string::npos) << r.output;
  for (const std::string cmd : {"txt2img -o x.png", "img2img -i x.png -o y.png", "stream -i none", "serve"}) {
    SCOPED_TRACE(cmd);
    r = cli(cmd + " --model " + q(m) + " --variant fp16 --dump-config");
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("\nvariant: \"fp16\"\n"), std::string::npos) << r.output;
    r = cli(cmd + " --model " + q(m) + " --variant fp16.safetensors");
    EXPECT_EQ(r.status, 2) << r.output;
    EXPECT_NE(r.output.find("--variant: 'fp16.safetensors' is not a variant name: expected e.g. fp16 (letters, digits, "
                            "'_' or '-'; the NAME of <stem>.NAME.safetensors)"),
              std::string::npos)
        << r.output;
  }
  const std::string single = "single_file/tiny-sd15.safetensors";
  if (!test::fixture_exists(single)) return;
  const std::string f = test::fixture_path(single);
  for (const std::string cmd : {"txt2img -o x.png", "serve", "info", "bench --sections e2e"}) {
    SCOPED_TRACE(cmd);
    r = cli(cmd + " --model " + q(f) + " --variant fp16");
    EXPECT_EQ(r.status, 2) << r.output;
    EXPECT_NE(r.output.find("--variant: fp16: variants are for diffusers model folders (<stem>.fp16.safetensors in "
                            "each component folder); --model " + f + " is a single-file checkpoint: drop --variant"),
              std::string::npos)
        << r.output;
  }
}

// `bench --variant fp16` on a folder holding only variants (fp16 and bf16, no plain files) reads the fp16 files, as
// txt2img loads them: the architecture it inspects first must not take the plain files (there are none, and two
// variants cannot be told apart).
TEST_F(Variant, CliBenchOnAFolderOfOnlyVariants) {
  const std::string m = with_variants("only-variants", {"unet", "text_encoder", "vae", "taesd"});
  for (const auto& [dir, stem] : kFiles)
    fs::rename(m + "/" + dir + "/" + stem + ".safetensors", m + "/" + dir + "/" + stem + ".bf16.safetensors");
  const auto r = cli("bench --model " + q(m) + " --variant fp16 --sections e2e --sizes 64 --dtypes fp32 --frames 1 "
                     "--iters 1 --warmup 0 --threads 1");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(", variant fp16, fp32, cpu)"), std::string::npos) << r.output;
}

#endif  // SD_CLI_PATH && SD_TEST_HAVE_OPENCV

}  // namespace
}  // namespace sd
