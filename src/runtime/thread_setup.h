#pragma once
// Per-thread settings for the runtime's I/O stage threads.
namespace sd {

// Makes libtorch run this thread's tensor operations single-threaded (its OpenMP thread count, a per-thread setting,
// becomes 1), so that the model thread's OpenMP team is the only one in the process. Concurrent teams on a few cores
// make every team's spinning barriers wait for descheduled workers (measured: a 2-core machine lost throughput and
// the model call's latency spiked by seconds). No effect on other threads; a no-op without OpenMP.
void use_single_threaded_torch_here();

}  // namespace sd
