#pragma once
// The refusal of pickled checkpoints, for the layers below the pipeline (defined in io/model_folder.cpp; the same
// function pipeline/diffusion_models.h declares for the CLI).
#include <string>

namespace sd {

// FormatError for pickled checkpoints (.ckpt, .bin, .pt, .pth, .pkl): why they are refused and the one-line
// conversion. No-op for other names.
void refuse_pickle(const std::string& path);

}  // namespace sd
