#pragma once
// A UNet compiled ahead of time by PyTorch's AOTInductor (scripts/compile-unet.py): Inductor's fused kernels for one
// call shape, in a package (.pt2) that libtorch >= 2.11 loads from C++. The row count is fixed or a range (a dynamic
// size: one package for serve's batched streams, whose rows vary with the clients waiting). It replaces the engine's
// UNet for the calls of that shape (LoadOptions::compiled_unet, `--compiled-unet FILE`); the engine's own UNet runs
// every other call.
//
// The package holds code only. Its weights are the engine's: at load, and again whenever the UNet's weights are
// replaced (a LoRA re-fused), each of the loaded UNet's tensors is handed to it under its name (diffusers' state-dict
// key, ours too) without a copy, and Inductor's constants folded from weights are folded again from them. So LoRAs,
// single-file checkpoints and every conversion of the loader apply, and the compiled UNet computes with exactly the
// weights the engine's UNet holds.
//
// Load checks, each a FormatError naming the package and what differs: its metadata (streamdiffusion.*) says a UNet
// package of this format, for the models' device type and dtype; its UNet config equals the loaded UNet's in every
// field that shapes the computation; it has exactly the loaded UNet's weights, each with the same shape, dtype and
// strides (on CUDA the engine's 4-d weights are channels-last, and so are the script's).
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

namespace sd {

class UNet2DConditionModelImpl;
struct UNet2DConditionConfig;

// What a package's metadata says (scripts/compile-unet.py writes it).
struct CompiledUNetInfo {
  std::string device;                  // "cpu" / "cuda"
  c10::ScalarType dtype = c10::kFloat;
  std::vector<int64_t> sample;         // [rows, C, h, w] of the example it was compiled with
  bool sample_channels_last = false;   // the layout the compiled code reads its sample in
  std::vector<int64_t> context;        // [rows, tokens, D]
  // The row counts it takes (streamdiffusion.rows "MIN-MAX"; packages without it: sample[0] only).
  int64_t rows_min = 1, rows_max = 1;
  struct Weight {
    std::vector<int64_t> shape, strides;
    c10::ScalarType dtype = c10::kFloat;
  };
  std::map<std::string, Weight> weights;  // by diffusers key
  std::string config_json;                // the UNet config it was compiled from (diffusers' config dict)
  std::string torch_version;              // of the compiling PyTorch (the engine's must match)
  std::string mode;                       // Inductor's mode (default / max-autotune); "" if not recorded
};

// Parses the streamdiffusion.* entries of a package's metadata; FormatError naming `path` and the entry.
CompiledUNetInfo parse_compiled_unet_metadata(const std::map<std::string, std::string>& metadata,
                                              const std::string& path);

// A package's metadata read from its file (AOTInductor builds; InvalidArgument elsewhere, or for a missing file;
// FormatError for a file that is not a UNet package of this format), without loading its code.
CompiledUNetInfo read_compiled_unet_info(const std::string& path);

// The load checks against the loaded UNet (see above), FormatError naming `path`: device type and dtype, the config,
// then the weights (missing / extra names, shape, dtype, strides; the first few differences are listed).
void check_compiled_unet(const CompiledUNetInfo& info, const UNet2DConditionConfig& config,
                         const std::vector<std::pair<std::string, torch::Tensor>>& weights, c10::Device device,
                         c10::ScalarType dtype, const std::string& path);

// `dims` (the package's sample or context) with the first dimension written as its row range where it is one:
// "[1-32, 4, 64, 64]"; "[1, 4, 64, 64]" for a package of fixed rows.
std::string compiled_unet_dims(const CompiledUNetInfo& info, const std::vector<int64_t>& dims);

// Why a call's inputs do not fit the package ("" when they do): sample [rows, C, h, w] in the dtype on the device with
// rows in [rows_min, rows_max], timesteps [rows] (or one for all), encoder_hidden_states [rows, tokens, D].
std::string compiled_unet_mismatch(const CompiledUNetInfo& info, const torch::Tensor& sample,
                                   const torch::Tensor& timesteps, const torch::Tensor& encoder_hidden_states);

// Whether this build can load AOTInductor packages (libtorch >= 2.11), and why not.
bool compiled_unet_available();
std::string compiled_unet_unavailable_reason();

class CompiledUNet {
 public:
  // Loads the package at `path`, checks it against `unet` (on `device`, in `dtype`) and hands it the weights.
  // InvalidArgument where this build cannot load packages; FormatError for a package that does not fit.
  static std::unique_ptr<CompiledUNet> load(const std::string& path, UNet2DConditionModelImpl& unet,
                                            c10::Device device, c10::ScalarType dtype);
  ~CompiledUNet();
  CompiledUNet(const CompiledUNet&) = delete;
  CompiledUNet& operator=(const CompiledUNet&) = delete;

  // compiled_unet_mismatch() for this package.
  std::string mismatch(const torch::Tensor& sample, const torch::Tensor& timesteps,
                       const torch::Tensor& encoder_hidden_states) const;
  // The noise prediction [rows, C, h, w] for inputs that fit (mismatch() == ""; else InvalidArgument), on the current
  // stream of the device (a CUDA graph being captured records it).
  torch::Tensor run(const torch::Tensor& sample, const torch::Tensor& timesteps,
                    const torch::Tensor& encoder_hidden_states) const;
  // Hands the UNet's current weights to the package again (after they were replaced); checks them as load() does.
  void load_weights();
  const CompiledUNetInfo& info() const { return info_; }
  const std::string& path() const { return path_; }

 private:
  struct Impl;
  // Hands these (checked) weights to the package and runs it once, folding its constants from them.
  void hand_over(const std::vector<std::pair<std::string, torch::Tensor>>& weights);
  CompiledUNet(std::string path, CompiledUNetInfo info, UNet2DConditionModelImpl& unet, c10::Device device,
               c10::ScalarType dtype, std::unique_ptr<Impl> impl);
  std::string path_;
  CompiledUNetInfo info_;
  UNet2DConditionModelImpl& unet_;
  c10::Device device_;
  c10::ScalarType dtype_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sd
