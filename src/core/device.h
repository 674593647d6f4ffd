#pragma once
// Device, dtype and thread selection shared by every layer.
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace sd {

// "fp32" | "float32" | "bf16" | "bfloat16" | "fp16" | "float16" -> dtype; anything else throws InvalidArgument.
c10::ScalarType parse_dtype(const std::string& name);
std::string dtype_name(c10::ScalarType t);  // "fp32", "bf16", "fp16", or c10's name for others

// "cpu" | "cuda" | "cuda:N"; cuda without a CUDA build/device is a clear error.
c10::Device parse_device(const std::string& name);

// Sets libtorch's intra-op thread count (0 = number of cores) and returns what is in force. libtorch as packaged
// here defaults to 1 thread, so every entry point calls this explicitly.
int set_threads(int n);
int hardware_threads();

}  // namespace sd
