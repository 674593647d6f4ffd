#include <iostream>

#include <torch/torch.h>

#include "apps/cli/commands.h"
#include "core/device.h"
#include "models/compiled_unet.h"
#include "models/int8.h"

namespace {
sd::cli::Runner setup_version(CLI::App& app) {
  return [] {
    std::cout << "streamdiffusion.cpp 0.1.0 (libtorch " << TORCH_VERSION << ", " << sd::hardware_threads()
              << " cores, CUDA " << (torch::cuda::is_available() ? "available" : "not available") << ")\n"
              << "CPU SIMD " << sd::cpu_simd_level() << ", --dtype auto = " << sd::dtype_name(sd::auto_dtype(c10::kCPU))
              << " on the CPU, int8: "
              << (sd::int8::available() ? std::string("available") : "unavailable: " + sd::int8::unavailable_reason())
              << "\n"
              << "compiled UNet (--compiled-unet, AOTInductor): "
              << (sd::compiled_unet_available() ? std::string("available")
                                                : "unavailable: " + sd::compiled_unet_unavailable_reason())
              << "\n";
    return 0;
  };
}
REGISTER_COMMAND("version", "print the version and the libtorch build in use", 100, setup_version);
}  // namespace
