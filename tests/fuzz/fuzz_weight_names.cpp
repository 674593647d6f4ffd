// Fuzz target for the torch-free weight-file parsers (io/shard_index.h): parse_weight_file_name, which reads every
// file name of a downloaded model folder, and parse_shard_index, the text of a sharded checkpoint's index. The input is
// both a file name and an index text.
//   a name: what it is said to be must spell the name back (a single file is exactly <stem>[.<variant>].safetensors,
//     an index <stem>.safetensors.index[.<variant>].json or the older <stem>.safetensors.<variant>.index.json, a shard
//     <stem>[.<variant>]-N-of-M.safetensors or the older <stem>-N-of-M.<variant>.safetensors), with a non-empty stem
//     and variant free of dots;
//   an index: accepted, it maps non-empty tensor names to plain .safetensors names of its folder (no separator, no
//     NUL) and lists each shard once, sorted; refused, a FormatError naming the index first.
// Anything else (another exception, a crash, a sanitizer report) is a finding. The standalone driver (CTest
// fuzz.weight_names_100k) also checks that names built from the grammar parse to exactly what built them.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "io/shard_index.h"

namespace {

void fail(const char* what, const std::string& input) {
  std::fprintf(stderr, "%s: \"%s\"\n", what, input.c_str());
  std::abort();
}

bool digits(const std::string& s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
}

// "-N-of-M" with N and M decimal.
bool shard_numbers(const std::string& s) {
  if (s.size() < 7 || s[0] != '-') return false;
  const size_t of = s.find("-of-", 1);
  return of != std::string::npos && digits(s.substr(1, of - 1)) && digits(s.substr(of + 4));
}

bool starts(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

void check_name(const std::string& name) {
  const sd::WeightFileName w = sd::parse_weight_file_name(name);
  using K = sd::WeightFileName;
  if (w.kind == K::kNone) return;
  if (w.kind == K::kPickle) {
    if (!(ends(name, ".bin") || ends(name, ".ckpt") || ends(name, ".pt") || ends(name, ".pth") || ends(name, ".pkl")) ||
        !starts(name, w.stem))
      fail("a pickle that is not one", name);
    return;
  }
  if (w.stem.empty()) fail("an empty stem", name);
  if (w.variant.find('.') != std::string::npos) fail("a variant with a dot", name);
  if (w.legacy && w.variant.empty()) fail("an older variant placement without a variant", name);
  const std::string v = w.variant.empty() ? "" : "." + w.variant;
  switch (w.kind) {
    case K::kSingle:
      if (w.legacy || w.stem.find('.') != std::string::npos || name != w.stem + v + ".safetensors")
        fail("a single file that does not spell its name", name);
      break;
    case K::kIndex:
      if (name != (w.legacy ? w.stem + ".safetensors" + v + ".index.json"
                            : w.stem + ".safetensors.index" + v + ".json"))
        fail("an index that does not spell its name", name);
      break;
    case K::kShard: {
      if (w.stem.find('.') != std::string::npos || !ends(name, ".safetensors"))
        fail("a shard with a dotted stem", name);
      const std::string head = w.legacy ? w.stem : w.stem + v;
      const std::string tail = w.legacy ? v + ".safetensors" : ".safetensors";
      if (!starts(name, head) || name.size() < head.size() + tail.size() || !ends(name, tail) ||
          !shard_numbers(name.substr(head.size(), name.size() - head.size() - tail.size())))
        fail("a shard that does not spell its name", name);
      break;
    }
    default:
      fail("an unknown kind", name);
  }
  // is_shard_index_name is the same reading.
  if (sd::is_shard_index_name(name) != (w.kind == K::kIndex)) fail("is_shard_index_name disagrees", name);
}

const char* kIndexPath = "fuzz/m.safetensors.index.json";

// True when accepted.
bool check_index(const std::string& text) {
  sd::ShardIndex idx;
  try {
    idx = sd::parse_shard_index(text, kIndexPath);
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, kIndexPath);
    return false;
  }
  if (idx.weight_map.empty()) fail("an accepted index without tensors", text);
  std::set<std::string> shards;
  for (const auto& [tensor, shard] : idx.weight_map) {
    if (tensor.empty()) fail("an accepted empty tensor name", text);
    if (shard.find_first_of(std::string("/\\\0", 3)) != std::string::npos || shard.size() <= 12 ||
        !ends(shard, ".safetensors"))
      fail("an accepted shard name that is not a plain .safetensors name", text);
    shards.insert(shard);
  }
  if (std::vector<std::string>(shards.begin(), shards.end()) != idx.shards)
    fail("shards not listed once, sorted", text);
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string s = sd::fuzz::bytes(data, size);
  check_name(s);
  check_index(s);
  return 0;
}

#ifdef SD_FUZZ_STANDALONE_MAIN
#include "fuzz_driver.h"

namespace {

template <size_t N>
const char* pick(const char* const (&a)[N], std::mt19937_64& rng) {
  return a[rng() % N];
}

const char* const kStems[] = {"diffusion_pytorch_model", "model", "a", "pytorch_lora_weights", "x_y", "v-1"};
const char* const kVariants[] = {"", "", "fp16", "ema", "bf16", "v1-0", "non_ema"};
const char* const kNumbers[] = {"00001", "00002", "1", "0", "99999"};
const char* const kShardValues[] = {"\"a-00001-of-00002.safetensors\"", "\"b.safetensors\"", "\".safetensors\"",
                                    "\"../a.safetensors\"", "\"a/b.safetensors\"", "\"a\\\\b.safetensors\"",
                                    "\"a.bin\"", "\"\"", "\"a\\u0000.safetensors\"", "1", "null", "[]", "{}",
                                    "\"..\"", "\"x.safetensors \""};
const char* const kTensors[] = {"\"x\"", "\"down_blocks.0.resnets.0.conv1.weight\"", "\"\"", "\"y\"", "\"x\""};
const char* const kPickles[] = {".bin", ".ckpt", ".pt", ".pth", ".pkl"};
const char* const kMeta[] = {"{\"total_size\": 1234}", "{}", "null", "1", "\"s\"", "{\"a\": [1, {\"b\": null}]}"};

struct Built {
  sd::WeightFileName w;
  std::string name;
};

Built build_name(std::mt19937_64& rng) {
  Built b;
  b.w.stem = pick(kStems, rng);
  b.w.variant = pick(kVariants, rng);
  const std::string v = b.w.variant.empty() ? "" : "." + b.w.variant;
  const std::string n = std::string("-") + pick(kNumbers, rng) + "-of-" + pick(kNumbers, rng);
  switch (rng() % 4) {
    case 0:
      b.w.kind = sd::WeightFileName::kSingle;
      b.name = b.w.stem + v + ".safetensors";
      break;
    case 1:
      b.w.kind = sd::WeightFileName::kIndex;
      b.w.legacy = !v.empty() && rng() % 2;
      b.name = b.w.legacy ? b.w.stem + ".safetensors" + v + ".index.json"
                          : b.w.stem + ".safetensors.index" + v + ".json";
      break;
    case 2:
      b.w.kind = sd::WeightFileName::kShard;
      b.w.legacy = !v.empty() && rng() % 2;
      b.name = b.w.legacy ? b.w.stem + n + v + ".safetensors" : b.w.stem + v + n + ".safetensors";
      break;
    default:
      b.w.kind = sd::WeightFileName::kPickle;
      b.w.variant.clear();
      b.name = b.w.stem + v + pick(kPickles, rng);
  }
  return b;
}

std::string build_index(std::mt19937_64& rng) {
  std::string doc = "{";
  if (rng() % 2) doc += std::string("\"metadata\": ") + pick(kMeta, rng) + ", ";
  doc += "\"weight_map\": {";
  const int n = static_cast<int>(rng() % 5);
  for (int i = 0; i < n; ++i) doc += std::string(i ? ", " : "") + pick(kTensors, rng) + ": " + pick(kShardValues, rng);
  return doc + "}}";
}

}  // namespace

int main(int argc, char** argv) {
  auto [iterations, rng] = sd::fuzz::driver_args(argc, argv);
  const auto mutate = [&rng = rng](const std::string& s) {
    return sd::fuzz::mutate_text(s, rng, ".-/\\\"{}0x", {".", "-of-"});
  };
  long named = 0, accepted = 0;
  for (long i = 0; i < iterations; ++i) {
    // A name from the grammar parses to exactly what built it; then mutated, only the invariants hold.
    const Built b = build_name(rng);
    const sd::WeightFileName w = sd::parse_weight_file_name(b.name);
    if (w.kind != b.w.kind || w.stem != b.w.stem || w.variant != b.w.variant || w.legacy != b.w.legacy)
      fail("a well-formed name read as something else", b.name);
    const std::string name = mutate(b.name);
    check_name(name);
    named += sd::parse_weight_file_name(name).kind != sd::WeightFileName::kNone;
    accepted += check_index(mutate(build_index(rng)));
  }
  std::printf("fuzz_weight_names_random: %ld executions, mutated names read as weight files: %ld, indexes accepted: "
              "%ld, rejected: %ld, no crash\n",
              iterations, named, accepted, iterations - accepted);
  // Both outcomes of both parsers must be reached.
  return named > 0 && named < iterations && accepted > 0 && accepted < iterations ? 0 : 1;
}
#endif
