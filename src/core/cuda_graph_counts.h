#pragma once
// GraphCache::run with the call's captures, replays and failures added to a caller's counters (StreamStats,
// MultiStreamStats: any struct with graph_captures, graph_replays and graph_failures), also when the call throws: a
// capture that failed and an eager run after it that failed too (out of memory) still counts its failure.
#include <string>
#include <vector>

#include "core/cuda_graph.h"

namespace sd {

template <class Stats>
std::vector<at::Tensor> run_counted(GraphCache& cache, const std::string& name, const std::vector<at::Tensor>& inputs,
                                    const GraphCache::Fn& fn, Stats& stats) {
  struct Count {
    GraphCache& cache;
    Stats& stats;
    const GraphCache::Counts before;
    ~Count() {
      const GraphCache::Counts after = cache.counts();
      stats.graph_captures += after.captures - before.captures;
      stats.graph_replays += after.replays - before.replays;
      stats.graph_failures += after.failures - before.failures;
    }
  } count{cache, stats, cache.counts()};
  return cache.run(name, inputs, fn);
}

}  // namespace sd
