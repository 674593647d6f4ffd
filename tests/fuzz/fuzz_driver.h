#pragma once
// Shared by the randomized-mutation drivers (SD_FUZZ_STANDALONE_MAIN: `<target>_random ITERATIONS SEED`, run by CTest
// as fuzz.*): the command line and the text mutation the grammar-built inputs go through.
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace sd::fuzz {

struct DriverArgs {
  long iterations = 100000;
  std::mt19937_64 rng{1};
};

inline DriverArgs driver_args(int argc, char** argv) {
  DriverArgs a;
  if (argc > 1) a.iterations = std::atol(argv[1]);
  if (argc > 2) a.rng.seed(std::strtoul(argv[2], nullptr, 10));
  return a;
}

// Up to two edits of `s`: a byte replaced (by one of `bytes`; by any byte when it is empty), a cut, one of `pieces`
// inserted, 1-4 bytes erased.
inline std::string mutate_text(std::string s, std::mt19937_64& rng, const std::string& bytes,
                               const std::vector<std::string>& pieces) {
  const int rounds = static_cast<int>(rng() % 3);
  for (int r = 0; r < rounds && !s.empty(); ++r) {
    switch (rng() % 4) {
      case 0: s[rng() % s.size()] = bytes.empty() ? static_cast<char>(rng()) : bytes[rng() % bytes.size()]; break;
      case 1: s.resize(rng() % s.size()); break;
      case 2: s.insert(rng() % s.size(), pieces[rng() % pieces.size()]); break;
      case 3: s.erase(rng() % s.size(), 1 + rng() % 4); break;
    }
  }
  return s;
}

}  // namespace sd::fuzz
