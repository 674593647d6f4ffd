// Precompiled header for every engine translation unit: libtorch's headers cost ~20 s per TU otherwise.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>
