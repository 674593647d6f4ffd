#pragma once
// "[320, 4, 3, 3]": a tensor shape for error messages.
#include <string>

#include <c10/util/ArrayRef.h>

namespace sd {

inline std::string shape_str(c10::IntArrayRef shape) {
  std::string o = "[";
  for (size_t i = 0; i < shape.size(); ++i) o += (i ? ", " : "") + std::to_string(shape[i]);
  return o + "]";
}

}  // namespace sd
