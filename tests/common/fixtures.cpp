#include "common/fixtures.h"

#include "core/device.h"
#include "core/error.h"

#include <cstdlib>
#include <filesystem>
#include <set>
#include <sstream>

namespace fs = std::filesystem;

namespace sd::test {

std::string fixtures_root() {
  if (const char* env = std::getenv("SD_FIXTURES"); env && *env) return env;
  return SD_DEFAULT_FIXTURES;
}

c10::Device test_device() {
  const char* env = std::getenv("SD_TEST_DEVICE");
  try {
    return sd::parse_device(env && *env ? env : "cpu");
  } catch (const std::exception& e) {
    throw sd::InvalidArgument(std::string("SD_TEST_DEVICE: ") + e.what());
  }
}

c10::ScalarType test_dtype() {
  const char* env = std::getenv("SD_TEST_DTYPE");
  try {
    return sd::parse_dtype(env && *env ? env : "fp32");
  } catch (const std::exception& e) {
    throw sd::InvalidArgument(std::string("SD_TEST_DTYPE: ") + e.what());
  }
}

double time_scale() {
  const char* v = std::getenv("SD_TEST_TIME_SCALE");
  const double s = v ? std::atof(v) : 1.0;
  return s >= 1.0 ? s : 1.0;
}

std::string fixture_path(const std::string& rel) { return (fs::path(fixtures_root()) / rel).string(); }

bool fixture_exists(const std::string& rel) {
  std::error_code ec;
  return fs::exists(fixture_path(rel), ec);
}

std::vector<std::string> fixture_models() {
  std::vector<std::string> out;
  std::error_code ec;
  const fs::path dir = fs::path(fixtures_root()) / "models";
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_directory() && fs::exists(e.path() / "model_index.json")) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

void PrintTo(const ComponentGoldenCase& c, std::ostream* os) { *os << c.model << "/" << c.name; }

std::vector<ComponentGoldenCase> component_golden_cases(const std::string& component) {
  std::vector<ComponentGoldenCase> out;
  for (const auto& m : fixture_models()) {
    const std::string rel = "modules/" + m + "/" + component + ".safetensors";
    if (!fixture_exists("models/" + m + "/" + component) || !fixture_exists(rel)) continue;
    try {
      std::set<std::string> cases;
      for (const auto& k : SafeTensorsFile::open(fixture_path(rel)).keys()) {
        const auto dot = k.find('.');
        if (dot == std::string::npos) throw FormatError(rel, "key '" + k + "' is not '<case>.<tensor>'");
        cases.insert(k.substr(0, dot));
      }
      if (cases.empty()) throw FormatError(rel, "no cases");
      for (const auto& c : cases) out.push_back({m, c, ""});
    } catch (const std::exception& e) {
      out.push_back({m, "unreadable", e.what()});
    }
  }
  return out;
}

::testing::AssertionResult tensors_close(const torch::Tensor& actual, const torch::Tensor& ref, double atol,
                                         double rtol, const std::string& what) {
  if (!actual.sizes().equals(ref.sizes())) {
    std::ostringstream o;
    o << what << ": shape " << actual.sizes() << " != reference " << ref.sizes();
    return ::testing::AssertionFailure() << o.str();
  }
  auto a = actual.detach().to(torch::kCPU, torch::kDouble);
  auto r = ref.detach().to(torch::kCPU, torch::kDouble);
  if (a.numel() == 0) return ::testing::AssertionSuccess();
  if (!torch::isfinite(a).all().item<bool>() && torch::isfinite(r).all().item<bool>())
    return ::testing::AssertionFailure() << what << ": non-finite values in the result";
  auto diff = (a - r).abs();
  const double max_ref = r.abs().max().item<double>();
  const double max_err = diff.max().item<double>();
  const double bound = atol + rtol * max_ref;
  std::ostringstream o;
  o << what << ": max abs err " << max_err << " (bound " << bound << " = " << atol << " + " << rtol << " * "
    << max_ref << ")";
  if (max_err <= bound) return ::testing::AssertionSuccess() << o.str();
  const int64_t idx = diff.reshape(-1).argmax().item<int64_t>();
  o << " at flat index " << idx << ": got " << a.reshape(-1)[idx].item<double>() << ", expected "
    << r.reshape(-1)[idx].item<double>();
  return ::testing::AssertionFailure() << o.str();
}

std::string test_name(std::string s) {
  for (auto& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

std::string make_temp_dir(const std::string& prefix) {
  std::string tmpl = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
  return buf.data();
}

}  // namespace sd::test
