#pragma once
// The tiny-sdxl fixture folder as an SDXL single file in Stability's published layout (model.diffusion_model.*,
// first_stage_model.*, conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*), written once per
// test process by write_ldm_single_file (scatter_ldm of the io/ldm_checkpoint tables) into a temporary folder.
// The weights are exactly the folder's, so the folder's goldens apply to it unchanged.
#include <mutex>
#include <string>

#include "common/fixtures.h"
#include "models/random_model.h"

namespace sd::test {

inline const char* kTinySdxl = "sdxl/models/tiny-sdxl";

// "" when the fixture folder is absent.
inline std::string tiny_sdxl_single_file() {
  static std::mutex mu;
  static std::string path;
  std::lock_guard<std::mutex> lock(mu);
  if (!path.empty() || !fixture_exists(std::string(kTinySdxl) + "/model_index.json")) return path;
  const std::string p = make_temp_dir("sd-sdxl-single-file") + "/tiny-sdxl.safetensors";
  write_ldm_single_file(fixture_path(kTinySdxl), p, /*open_clip=*/false, /*seed=*/0);
  path = p;
  return path;
}

}  // namespace sd::test
