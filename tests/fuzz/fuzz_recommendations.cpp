// Fuzz target for streamdiffusion.json (a model folder's recommended settings: untrusted, it comes with downloaded
// models). Every input must either parse into settings whose invariants hold or throw sd::FormatError naming the
// file; any other exception (a raw nlohmann error), crash, leak or UB report is a bug.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "core/error.h"
#include "pipeline/model_defaults.h"

namespace {

void check_one(const uint8_t* data, size_t size) {
  sd::ModelDefaults d;
  try {
    sd::apply_recommendations_json(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json", d);
  } catch (const sd::FormatError& e) {
    if (std::string(e.what()).rfind("fuzz.json: ", 0) != 0) {
      std::fprintf(stderr, "error does not name the file: %s\n", e.what());
      std::abort();
    }
    return;
  }
  const bool size_ok = (d.native_width == 0 && d.native_height == 0) ||
                       (d.native_width >= 8 && d.native_width <= 4096 && d.native_width % 8 == 0 &&
                        d.native_height >= 8 && d.native_height <= 4096 && d.native_height % 8 == 0);
  const int64_t steps = d.num_inference_steps.value_or(50);
  bool ok = size_ok && steps >= 1 && steps <= 1000;
  for (const auto* m : {&d.txt2img, &d.img2img}) {
    if (m->t_index_list) {
      ok = ok && !m->t_index_list->empty();
      for (int64_t t : *m->t_index_list) ok = ok && t >= 0 && t < steps;
    }
    if (m->guidance) ok = ok && std::isfinite(*m->guidance) && *m->guidance >= 0 && *m->guidance <= 20;
    if (m->delta) ok = ok && std::isfinite(*m->delta) && *m->delta >= 0 && *m->delta <= 10;
    if (m->cfg_type)
      ok = ok && (*m->cfg_type == "none" || *m->cfg_type == "full" || *m->cfg_type == "self" ||
                  *m->cfg_type == "initialize");
  }
  if (d.cpu_dtype) ok = ok && (*d.cpu_dtype == "fp32" || *d.cpu_dtype == "bf16");
  if (d.cpu_threads) ok = ok && *d.cpu_threads >= 1 && *d.cpu_threads <= 1024;
  if (!ok) {
    std::fprintf(stderr, "accepted settings break an invariant: %.*s\n", static_cast<int>(size), data);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_one(data, size);
  return 0;
}

#ifdef SD_FUZZ_STANDALONE_MAIN
#include <iterator>
#include <vector>

#include "fuzz_driver.h"

namespace {

// Valid documents built from the grammar, then mutated: most inputs reach the field checks, not just the JSON parser.
const char* kValues[] = {"0", "1", "-1", "8", "64", "4096", "4104", "1000", "1001", "9223372036854775807", "1e308",
                         "-0.0", "2.5", "20", "20.000001", "NaN", "null", "true", "\"64x64\"", "\"8x4096\"",
                         "\"0x0\"", "\"64x\"", "\"x64\"", "\"64x64x64\"", "\"-8x8\"", "\"99999999999999999999x8\"",
                         "[64, 64]", "[64]", "[64, 64, 64]", "[\"a\", 1]", "[0, 16, 32, 45]", "[]", "[49]", "[50]",
                         "\"none\"", "\"self\"", "\"fp32\"", "\"bf16\"", "\"fp16\"", "\"sometimes\"", "{}", "{\"cfg_type\": \"full\"}", "\"\\u0000\""};
const char* kKeys[] = {"size", "num_inference_steps", "t_index_list", "cfg_type", "guidance", "delta", "note",
                       "txt2img", "img2img", "cpu_dtype", "cpu_threads", "sise", ""};

std::string value(std::mt19937_64& rng, int depth) {
  if (depth < 2 && rng() % 5 == 0) {
    std::string o = "{";
    const int n = static_cast<int>(rng() % 4);
    for (int i = 0; i < n; ++i)
      o += (i ? ", \"" : "\"") + std::string(kKeys[rng() % (sizeof(kKeys) / sizeof(kKeys[0]))]) + "\": " +
           value(rng, depth + 1);
    return o + "}";
  }
  return kValues[rng() % (sizeof(kValues) / sizeof(kValues[0]))];
}

}  // namespace

int main(int argc, char** argv) {
  auto [iterations, rng] = sd::fuzz::driver_args(argc, argv);
  const std::vector<std::string> pieces(std::begin(kValues), std::end(kValues));
  long accepted = 0;
  for (long i = 0; i < iterations; ++i) {
    std::string doc = "{";
    const int n = static_cast<int>(rng() % 6);
    for (int k = 0; k < n; ++k)
      doc += (k ? ", \"" : "\"") + std::string(kKeys[rng() % (sizeof(kKeys) / sizeof(kKeys[0]))]) + "\": " +
             value(rng, 0);
    doc = sd::fuzz::mutate_text(doc + "}", rng, "", pieces);
    sd::ModelDefaults d;
    try {
      sd::apply_recommendations_json(doc, "fuzz.json", d);
      ++accepted;
    } catch (const sd::FormatError&) {
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(doc.data()), doc.size());
  }
  std::printf("fuzz_recommendations_random: %ld executions, %ld accepted, %ld rejected, no crash\n", iterations,
              accepted, iterations - accepted);
  return accepted > 0 && accepted < iterations ? 0 : 1;  // both paths must be reached
}
#endif
