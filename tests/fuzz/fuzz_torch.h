#pragma once
// Included by the targets that link libtorch: one intra-op thread (a fuzz input is tiny; a thread pool per tensor
// op only costs time, and a 2-core machine shared with builds makes its spin-waits very slow).
#include <ATen/Parallel.h>

namespace sd::fuzz {
inline const bool kOneTorchThread = (at::set_num_threads(1), true);
}  // namespace sd::fuzz
