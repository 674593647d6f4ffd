// Fuzz target for the safetensors header parser. Every input must either parse into a header whose invariants hold
// or throw sd::FormatError; any other exception, crash, leak or UB report is a bug.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors_header.h"

namespace {

void check_one(const uint8_t* data, size_t size) {
  try {
    auto h = sd::safetensors::parse_header(data, size, "fuzz.safetensors");
    uint64_t prev_end = 0;
    for (const auto& t : h.tensors) {
      if (t.begin < prev_end || t.end < t.begin || t.end > h.data_size ||
          t.numel() * sd::safetensors::dtype_size(t.dtype) != t.end - t.begin || h.data_start + t.end > size) {
        std::fprintf(stderr, "invariant violated for tensor %s\n", t.name.c_str());
        std::abort();
      }
      prev_end = t.end;
    }
  } catch (const sd::FormatError&) {
    // expected for malformed input
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_one(data, size);
  return 0;
}

#ifdef SD_FUZZ_STANDALONE_MAIN
#include "fuzz_driver.h"

namespace {

using sd::safetensors::DType;
using sd::safetensors::TensorInfo;

std::string valid_file(std::mt19937_64& rng) {
  std::vector<TensorInfo> ts;
  const DType dts[] = {DType::F32, DType::F16, DType::BF16, DType::I64, DType::U8, DType::BOOL, DType::F64};
  const int n = static_cast<int>(rng() % 5);
  for (int i = 0; i < n; ++i) {
    TensorInfo t;
    t.name = "layer." + std::to_string(i) + ".weight";
    t.dtype = dts[rng() % 7];
    const int rank = static_cast<int>(rng() % 4);
    for (int r = 0; r < rank; ++r) t.shape.push_back(static_cast<int64_t>(rng() % 4));
    ts.push_back(t);
  }
  std::map<std::string, std::string> meta;
  if (rng() % 2) meta["format"] = "pt";
  std::string out = sd::safetensors::build_header(ts, meta);
  uint64_t total = 0;
  for (const auto& t : ts) total += t.nbytes();
  out.append(total, '\x01');
  return out;
}

const char* kTokens[] = {"{", "}", "[", "]", ",", ":", "\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"",
                         "\"F32\"", "\"X99\"", "-1", "0", "18446744073709551615", "1e308", "null", "true",
                         "\"__metadata__\"", "9223372036854775807", "\\u0000", "\xff\xfe"};

std::string mutate(std::string s, std::mt19937_64& rng) {
  const int rounds = 1 + static_cast<int>(rng() % 4);
  for (int r = 0; r < rounds; ++r) {
    switch (rng() % 8) {
      case 0:  // flip a bit
        if (!s.empty()) s[rng() % s.size()] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1:  // random byte
        if (!s.empty()) s[rng() % s.size()] = static_cast<char>(rng());
        break;
      case 2:  // truncate
        if (!s.empty()) s.resize(rng() % s.size());
        break;
      case 3: {  // splice a JSON token
        const char* tok = kTokens[rng() % (sizeof(kTokens) / sizeof(kTokens[0]))];
        size_t pos = s.empty() ? 0 : rng() % s.size();
        s.insert(pos, tok);
        break;
      }
      case 4: {  // rewrite the length field with something interesting
        const uint64_t vals[] = {0, 1, 7, 8, s.size(), s.size() - 8, s.size() + 1, ~0ull, 100ull << 20,
                                 (100ull << 20) + 1, rng()};
        uint64_t v = vals[rng() % 11];
        if (s.size() >= 8)
          for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
        break;
      }
      case 5: {  // change a digit inside the header
        for (int tries = 0; tries < 8 && !s.empty(); ++tries) {
          size_t pos = rng() % s.size();
          if (s[pos] >= '0' && s[pos] <= '9') {
            s[pos] = static_cast<char>('0' + rng() % 10);
            break;
          }
        }
        break;
      }
      case 6:  // delete a range
        if (s.size() > 2) {
          size_t a = rng() % s.size(), len = 1 + rng() % 8;
          s.erase(a, len);
        }
        break;
      case 7:  // append junk
        s.append(rng() % 16, static_cast<char>(rng()));
        break;
    }
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  auto [iterations, rng] = sd::fuzz::driver_args(argc, argv);
  long parsed_ok = 0;
  for (long i = 0; i < iterations; ++i) {
    std::string input = mutate(valid_file(rng), rng);
    try {
      sd::safetensors::parse_header(reinterpret_cast<const uint8_t*>(input.data()), input.size(), "f");
      ++parsed_ok;
    } catch (const sd::FormatError&) {
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
  }
  std::printf("fuzz_safetensors_random: %ld executions, %ld parsed as valid, %ld rejected, no crash\n", iterations,
              parsed_ok, iterations - parsed_ok);
  return 0;
}
#endif
