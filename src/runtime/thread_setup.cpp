#include "runtime/thread_setup.h"

#include <dlfcn.h>

#include <ATen/Parallel.h>

namespace sd {

void use_single_threaded_torch_here() {
  // libtorch sets each thread's OpenMP thread count lazily, on its first parallel operation; do that now so it does
  // not overwrite the setting below later.
  at::internal::lazy_init_num_threads();
  // omp_set_num_threads changes only the calling thread's ICV. Looked up at run time: libgomp comes with libtorch,
  // and the runtime does not link OpenMP itself.
  using SetNumThreads = void (*)(int);
  static const auto set_num_threads = reinterpret_cast<SetNumThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set_num_threads) set_num_threads(1);
}

}  // namespace sd
