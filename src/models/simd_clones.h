#pragma once
// SD_CLONES: compile a hot loop for several x86-64 levels (AVX-512, AVX2, baseline) and pick one at load
// (target_clones), for the hand-written kernels (softmax_rows, int8's quantizer). Off under ASan, whose
// instrumentation GCC does not clone, under TSan, where the clones' ifunc resolver is instrumented and runs while the
// dynamic loader relocates the executable, before the TSan runtime is initialised (every SD_SANITIZE=thread
// executable linking sd_models crashed at load), and with other compilers.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
#define SD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SD_CLONES
#endif
