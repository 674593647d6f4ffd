// LoadOptions::compiled_unet through load_pipeline (models/compiled_unet.h): what cannot be combined with a compiled
// UNet is refused by name before any package is read, a build without AOTInductor says why, and a model set without
// one reports no compiled UNet. (The package itself: tests/models/test_compiled_unet.cpp.)
#include <string>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "models/compiled_unet.h"
#include "pipeline/diffusion_models.h"

namespace {

// The InvalidArgument text of loading `model` with `o` and a compiled UNet that does not exist ("" if it loads).
std::string load_error(const std::string& model, sd::LoadOptions o) {
  o.threads = -1;
  o.compiled_unet = "/nonexistent/unet.pt2";
  try {
    sd::load_pipeline(sd::test::fixture_path(model), o);
  } catch (const sd::InvalidArgument& e) {
    return e.what();
  }
  return "";
}

TEST(CompiledUNetLoad, AnIPAdapterIsRefusedByName) {
  const std::string adapter = "ipadapter/models/tiny-ip-adapter-sd15";
  if (!sd::test::fixture_exists("models/tiny-sd15") || !sd::test::fixture_exists(adapter + "/image_encoder"))
    GTEST_SKIP() << "IP-Adapter fixtures not found";
  sd::LoadOptions o;
  o.ip_adapter = sd::test::fixture_path(adapter);
  const std::string e = load_error("models/tiny-sd15", o);
  EXPECT_NE(e.find("--compiled-unet /nonexistent/unet.pt2 cannot be combined with an IP-Adapter"), std::string::npos)
      << e;
}

TEST(CompiledUNetLoad, SdxlIsRefusedByName) {
  if (!sd::test::fixture_exists("sdxl/models/tiny-sdxl")) GTEST_SKIP() << "SDXL fixture not found";
  const std::string e = load_error("sdxl/models/tiny-sdxl", {});
  EXPECT_NE(e.find("SDXL (added conditioning) and LCM guidance-embedding UNets are not supported"), std::string::npos)
      << e;
}

TEST(CompiledUNetLoad, AMissingPackageOrABuildWithoutAOTInductorSaysSo) {
  if (!sd::test::fixture_exists("models/tiny-sd21")) GTEST_SKIP() << "fixture model not found";
  const std::string e = load_error("models/tiny-sd21", {});
  if (sd::compiled_unet_available())
    EXPECT_NE(e.find("compiled UNet /nonexistent/unet.pt2: no such file"), std::string::npos) << e;
  else
    EXPECT_NE(e.find("need libtorch >= 2.11"), std::string::npos) << e;
}

TEST(CompiledUNetLoad, AModelSetWithoutOneReportsNone) {
  if (!sd::test::fixture_exists("models/tiny-sd21")) GTEST_SKIP() << "fixture model not found";
  sd::LoadOptions o;
  o.threads = -1;
  const auto m = sd::load_pipeline(sd::test::fixture_path("models/tiny-sd21"), o);
  m->set_compiled_unet_enabled(true);  // nothing to turn on
  const auto s = m->compiled_unet_stats();
  EXPECT_EQ(s.path, "");
  EXPECT_EQ(s.calls, 0);
  EXPECT_EQ(s.fallbacks, 0);
}

}  // namespace
