#pragma once
// SD_CLONES: compile a hot loop for several x86-64 levels (AVX-512, AVX2, baseline) and pick one at load
// (target_clones), for the hand-written kernels (softmax_rows, int8's quantizer). Off under ASan, whose
// instrumentation GCC does not clone, and with other compilers.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SD_CLONES
#endif
