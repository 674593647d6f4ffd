// safetensors reader/writer: round trips, zero-copy, and every class of corruption named in the error.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"

namespace {

using sd::FormatError;
using sd::SafeTensorsFile;
namespace fs = std::filesystem;

std::string u64le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file image from a raw JSON header and `data_bytes` bytes of data.
std::string raw_file(const std::string& json, size_t data_bytes) { return u64le(json.size()) + json + std::string(data_bytes, '\0'); }

// Expects FormatError whose message contains every fragment.
void expect_error(const std::string& bytes, std::vector<std::string> fragments) {
  try {
    SafeTensorsFile::from_bytes(bytes, "bad.safetensors");
    FAIL() << "expected an error containing '" << fragments[0] << "'";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
    for (const auto& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "missing '" << f << "' in: " << msg;
  }
}

class SafeTensorsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = sd::test::make_temp_dir("sd-st"); }
  std::string dir_;
};

TEST_F(SafeTensorsTest, RoundTripAllDtypesAndMetadata) {
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"f32", torch::randn({3, 5})},
      {"f64", torch::randn({2}, torch::kFloat64)},
      {"f16", torch::randn({4, 1, 2}).to(torch::kHalf)},
      {"bf16", torch::randn({7}).to(torch::kBFloat16)},
      {"i64", torch::arange(10, torch::kInt64)},
      {"i32", torch::arange(3, torch::kInt32)},
      {"i16", torch::arange(3).to(torch::kInt16)},
      {"i8", torch::arange(-3, 3).to(torch::kInt8)},
      {"u8", torch::arange(250, 256).to(torch::kUInt8)},
      {"bool", torch::tensor({true, false, true})},
      {"empty", torch::zeros({0, 4})},
      {"scalar", torch::tensor(3.5f)},
  };
  const std::string path = dir_ + "/all.safetensors";
  sd::save_safetensors(path, ts, {{"format", "pt"}, {"note", "round trip"}});
  auto f = SafeTensorsFile::open(path);
  EXPECT_EQ(f.tensors().size(), ts.size());
  EXPECT_EQ(f.metadata().at("note"), "round trip");
  for (const auto& [name, t] : ts) {
    auto got = f.get(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(got.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(got, t)) << name;
  }
}

TEST_F(SafeTensorsTest, AlignedTensorsAliasTheMappingAndOutliveTheFileObject) {
  const std::string path = dir_ + "/a.safetensors";
  auto ref = torch::randn({64, 64});
  sd::save_safetensors(path, std::vector<std::pair<std::string, torch::Tensor>>{{"w", ref}});
  torch::Tensor t, t2;
  {
    auto f = SafeTensorsFile::open(path);
    t = f.get("w");
    t2 = f.get("w");
    // Both views point at the same mapped bytes: no copy was made.
    EXPECT_EQ(t.data_ptr(), t2.data_ptr());
  }
  // The file object is gone; the tensors keep the mapping alive.
  EXPECT_TRUE(torch::equal(t, ref));
  t.mul_(2);  // copy-on-write private mapping: writable, does not touch the file
  auto again = SafeTensorsFile::open(path).get("w");
  EXPECT_TRUE(torch::equal(again, ref));
}

// Resident kB of the mapping that holds address `p` (/proc/self/smaps), -1 where it cannot be read.
long long mapping_rss_kb(const void* p) {
  std::ifstream f("/proc/self/smaps");
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::string line;
  bool in = false;
  while (std::getline(f, line)) {
    unsigned long long b = 0, e = 0;
    if (std::sscanf(line.c_str(), "%llx-%llx ", &b, &e) == 2) {
      in = a >= b && a < e;
    } else if (in && line.rfind("Rss:", 0) == 0) {
      return std::atoll(line.c_str() + 4);
    }
  }
  return -1;
}

TEST_F(SafeTensorsTest, ATensorsPagesLeaveTheMappingWithItsLastAliasWhileOtherTensorsLive) {
  const std::string path = dir_ + "/two.safetensors";
  const auto ref_a = torch::randn({512, 512}), ref_b = torch::randn({512, 512});  // 1 MiB each
  sd::save_safetensors(path, std::vector<std::pair<std::string, torch::Tensor>>{{"a", ref_a}, {"b", ref_b}});
  torch::Tensor a, a2, b;
  {
    auto f = SafeTensorsFile::open(path);
    a = f.get("a");
    a2 = f.get("a");  // the same bytes twice
    b = f.get("b");
  }
  ASSERT_EQ(a.data_ptr(), a2.data_ptr());
  a.mul_(2);  // copy-on-write pages, seen through both aliases
  EXPECT_TRUE(torch::equal(b, ref_b));
  const long long both = mapping_rss_kb(b.data_ptr());
  if (both < 0) GTEST_SKIP() << "no /proc/self/smaps";
  EXPECT_GE(both, 2 * 1024 - 8) << "both tensors were touched";
  a = torch::Tensor();
  // a2 still aliases the bytes: nothing was given back and the modified values are intact.
  EXPECT_TRUE(torch::equal(a2, ref_a * 2));
  EXPECT_GE(mapping_rss_kb(b.data_ptr()), 2 * 1024 - 8);
  a2 = torch::Tensor();
  const long long after = mapping_rss_kb(b.data_ptr());
  EXPECT_LE(after, 1024 + 16) << "a's pages stayed resident after its last alias died (" << both << " kB before)";
  EXPECT_TRUE(torch::equal(b, ref_b));
}

TEST_F(SafeTensorsTest, UnalignedTensorIsCopied) {
  // A 1-byte tensor first puts the following f32 tensor at an odd offset.
  std::string json = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  while ((8 + json.size()) % 8) json += ' ';
  std::string bytes = u64le(json.size()) + json;
  bytes.push_back('\x07');
  float vals[2] = {1.5f, -2.0f};
  bytes.append(reinterpret_cast<const char*>(vals), 8);
  auto f = SafeTensorsFile::from_bytes(bytes, "x");
  auto b = f.get("b");
  EXPECT_FLOAT_EQ(b[0].item<float>(), 1.5f);
  EXPECT_FLOAT_EQ(b[1].item<float>(), -2.0f);
  EXPECT_EQ(f.get("a")[0].item<uint8_t>(), 7);
}

TEST(SafeTensorsCorrupt, TruncatedBelowLengthField) { expect_error(std::string("\x10\x00\x00", 3), {"truncated"}); }

TEST(SafeTensorsCorrupt, HeaderLongerThanFile) {
  expect_error(u64le(1000) + "{}", {"truncated", "1000"});
}

TEST(SafeTensorsCorrupt, HugeHeaderLength) {
  expect_error(u64le(1ull << 40) + "{}", {"exceeds the limit"});
}

TEST(SafeTensorsCorrupt, HeaderNotJson) { expect_error(raw_file("{not json", 0), {"not valid JSON"}); }

TEST(SafeTensorsCorrupt, HeaderNotObject) { expect_error(raw_file("[1,2]", 0), {"JSON object"}); }

TEST(SafeTensorsCorrupt, UnknownDtype) {
  expect_error(raw_file(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", 1), {"'w'", "unknown dtype 'F8'"});
}

TEST(SafeTensorsCorrupt, NegativeShape) {
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), {"'w'", "non-negative"});
}

TEST(SafeTensorsCorrupt, OffsetsOutOfRange) {
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
               {"'w'", "outside the data region of 8 bytes"});
}

TEST(SafeTensorsCorrupt, OffsetsReversed) {
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 8), {"'w'", "end before begin"});
}

TEST(SafeTensorsCorrupt, OverlappingTensors) {
  expect_error(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
               {"'b'", "overlap"});
}

TEST(SafeTensorsCorrupt, ShapeDtypeByteLengthMismatch) {
  expect_error(raw_file(R"({"w":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}})", 4),
               {"'w'", "byte length 4 does not match shape [3]", "F16"});
}

TEST(SafeTensorsCorrupt, MissingFields) {
  expect_error(raw_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4), {"'w'", "dtype"});
  expect_error(raw_file(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4), {"'w'", "shape"});
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[1]}})", 4), {"'w'", "data_offsets"});
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,-4]}})", 4), {"'w'", "data_offsets"});
}

TEST(SafeTensorsCorrupt, ShapesWhoseElementCountOverflowsAreRefused) {
  // 2^32 x 2^32 wraps to 0 elements, which once matched the empty byte range; 2^62 x 4 x F32 passes the element
  // count but not the byte length; 2^33 x 2^31 x 0 is empty only by a wrapped product.
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
               {"'w'", "shape [4294967296,4294967296] overflows"});
  expect_error(raw_file(R"({"w":{"dtype":"F32","shape":[4,4611686018427387904],"data_offsets":[0,0]}})", 0),
               {"'w'", "overflows"});
  expect_error(raw_file(R"({"w":{"dtype":"U8","shape":[8589934592,2147483648,0],"data_offsets":[0,0]}})", 0),
               {"'w'", "overflows"});
  expect_error(raw_file(R"({"w":{"dtype":"U8","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0),
               {"'w'", "overflows"});
}

TEST(SafeTensorsCorrupt, MetadataMustBeStrings) {
  expect_error(raw_file(R"({"__metadata__":{"a":1}})", 0), {"__metadata__"});
}

TEST(SafeTensorsCorrupt, EmptyTensorsAreValid) {
  auto f = SafeTensorsFile::from_bytes(raw_file(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}})", 0), "e");
  EXPECT_EQ(f.get("e").numel(), 0);
  EXPECT_EQ(f.get("e").sizes(), (std::vector<int64_t>{0, 3}));
}

TEST(SafeTensorsCorrupt, MissingKeyNamed) {
  auto f = SafeTensorsFile::from_bytes(raw_file("{}", 0), "empty.safetensors");
  try {
    f.get("nope");
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'nope'"), std::string::npos);
  }
}

TEST_F(SafeTensorsTest, TruncatedRealFileNamesTheTensor) {
  const std::string path = dir_ + "/t.safetensors";
  sd::save_safetensors(path, std::vector<std::pair<std::string, torch::Tensor>>{{"a", torch::ones({8})}, {"b", torch::ones({8})}});
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  bytes.resize(bytes.size() - 5);
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  try {
    SafeTensorsFile::open(path);
    FAIL();
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("'b'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  }
}

TEST(SafeTensorsOpen, MissingFileAndDirectory) {
  EXPECT_THROW(SafeTensorsFile::open("/nonexistent/x.safetensors"), FormatError);
  EXPECT_THROW(SafeTensorsFile::open("/tmp"), FormatError);
}

TEST(SafeTensorsWriter, RejectsDuplicateAndReservedNames) {
  const std::string dir = sd::test::make_temp_dir("sd-stw");
  std::vector<std::pair<std::string, torch::Tensor>> dup = {{"a", torch::ones({1})}, {"a", torch::ones({1})}};
  EXPECT_THROW(sd::save_safetensors(dir + "/d.safetensors", dup), sd::InvalidArgument);
  std::vector<std::pair<std::string, torch::Tensor>> meta = {{"__metadata__", torch::ones({1})}};
  EXPECT_THROW(sd::save_safetensors(dir + "/m.safetensors", meta), sd::InvalidArgument);
}

// A sharded checkpoint (diffusers / transformers save_pretrained with max_shard_size) opens as one file: every tensor
// of every shard the index names, aliasing its own shard's mapping.
class ShardedSafeTensors : public SafeTensorsTest {
 protected:
  void write_index(const std::string& name, const std::string& json) const { std::ofstream(dir_ + "/" + name) << json; }
  std::string error(const std::string& name) const {
    try {
      SafeTensorsFile::open(dir_ + "/" + name);
    } catch (const FormatError& e) {
      return e.what();
    }
    return "no error";
  }
  void SetUp() override {
    SafeTensorsTest::SetUp();
    sd::save_safetensors(dir_ + "/m-00001-of-00002.safetensors",
                         std::vector<std::pair<std::string, torch::Tensor>>{{"a", torch::arange(6).view({2, 3})},
                                                                            {"b", torch::ones({4}).to(torch::kHalf)}});
    sd::save_safetensors(dir_ + "/m-00002-of-00002.safetensors",
                         std::vector<std::pair<std::string, torch::Tensor>>{{"c", torch::full({3}, 2.5)}},
                         {{"format", "pt"}});
  }
};

TEST_F(ShardedSafeTensors, EveryShardsTensorsUnderOneName) {
  write_index("m.safetensors.index.json", R"({"metadata": {"total_size": 68, "note": "x"},
      "weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00001-of-00002.safetensors",
                     "c": "m-00002-of-00002.safetensors"}})");
  const auto f = SafeTensorsFile::open(dir_ + "/m.safetensors.index.json");
  EXPECT_EQ(f.path(), dir_ + "/m.safetensors.index.json");
  EXPECT_EQ(f.files(), (std::vector<std::string>{dir_ + "/m-00001-of-00002.safetensors",
                                                  dir_ + "/m-00002-of-00002.safetensors"}));
  EXPECT_EQ(f.keys(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"note", "x"}, {"total_size", "68"}}));
  EXPECT_EQ(f.file_size(), fs::file_size(f.files()[0]) + fs::file_size(f.files()[1]));
  EXPECT_TRUE(torch::equal(f.get("a"), torch::arange(6).view({2, 3})));
  EXPECT_TRUE(torch::equal(f.get("b"), torch::ones({4}).to(torch::kHalf)));
  EXPECT_TRUE(torch::equal(f.get("c"), torch::full({3}, 2.5)));
  EXPECT_EQ(f.info("c").shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(f.load_all().size(), 3u);
  // The tensors alias their shard's mapping and outlive the file object.
  torch::Tensor c;
  {
    const auto g = SafeTensorsFile::open(dir_ + "/m.safetensors.index.json");
    c = g.get("c");
  }
  EXPECT_EQ(c.sum().item<float>(), 7.5f);
  EXPECT_EQ(error("m.safetensors.index.json").find("no error"), 0u);
  // A variant's index opens the same way, under diffusers' older name too.
  fs::copy_file(dir_ + "/m.safetensors.index.json", dir_ + "/m.safetensors.index.fp16.json");
  EXPECT_EQ(SafeTensorsFile::open(dir_ + "/m.safetensors.index.fp16.json").keys().size(), 3u);
  fs::copy_file(dir_ + "/m.safetensors.index.json", dir_ + "/m.safetensors.fp16.index.json");
  EXPECT_EQ(SafeTensorsFile::open(dir_ + "/m.safetensors.fp16.index.json").keys().size(), 3u);
  // The Hugging Face cache's layout: snapshot files are links to blobs elsewhere.
  fs::create_directories(dir_ + "/blobs");
  fs::create_directories(dir_ + "/snapshot");
  for (const std::string name : {"m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors",
                                 "m.safetensors.index.json"}) {
    fs::rename(dir_ + "/" + name, dir_ + "/blobs/" + name);
    fs::create_symlink("../blobs/" + name, dir_ + "/snapshot/" + name);
  }
  const auto linked = SafeTensorsFile::open(dir_ + "/snapshot/m.safetensors.index.json");
  EXPECT_TRUE(torch::equal(linked.get("a"), torch::arange(6).view({2, 3})));
  EXPECT_EQ(linked.keys().size(), 3u);
}

// As diffusers, every tensor of the named shards loads (the map names the files); a tensor in two shards, one the
// index lists that no shard holds, a missing shard or an index that is not one are refused naming the index.
TEST_F(ShardedSafeTensors, BrokenIndexesAreNamed) {
  const std::string ix = dir_ + "/i.safetensors.index.json";
  write_index("i.safetensors.index.json", R"({"weight_map": {"a": "m-00001-of-00002.safetensors"}})");
  EXPECT_EQ(SafeTensorsFile::open(ix).keys(), (std::vector<std::string>{"a", "b"}));
  write_index("i.safetensors.index.json", R"({"weight_map": {"a": "m-00001-of-00002.safetensors",
                                                             "z": "m-00002-of-00002.safetensors"}})");
  EXPECT_EQ(error("i.safetensors.index.json"),
            ix + ": the index maps tensor 'z' to m-00002-of-00002.safetensors, but no shard holds it (a shard from "
                 "another save?)");
  write_index("i.safetensors.index.json", R"({"weight_map": {"a": "m-00001-of-00002.safetensors",
                                                             "q": "m-00003-of-00003.safetensors"}})");
  EXPECT_EQ(error("i.safetensors.index.json"),
            ix + ": shard m-00003-of-00003.safetensors (holding 'q') is missing: expected " + dir_ +
                "/m-00003-of-00003.safetensors (every file the index names is needed)");
  fs::copy_file(dir_ + "/m-00001-of-00002.safetensors", dir_ + "/copy.safetensors");
  write_index("i.safetensors.index.json", R"({"weight_map": {"a": "m-00001-of-00002.safetensors",
                                                             "b": "copy.safetensors"}})");
  EXPECT_EQ(error("i.safetensors.index.json"),
            ix + ": tensor 'a' is in two files: " + dir_ + "/copy.safetensors and " + dir_ +
                "/m-00001-of-00002.safetensors (which one to load cannot be told)");
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"[1]", "expected a JSON object with a \"weight_map\" (a sharded checkpoint's index), found [1]"},
      {"{\"weight_map\": {}}", "field 'weight_map': expected an object naming the shard of each tensor, found {}"},
      {"{}", "field 'weight_map': expected an object naming the shard of each tensor, found nothing"},
      {R"({"weight_map": {"a": 3}})", "field 'weight_map': tensor 'a': expected a shard file name, found 3"},
      {R"({"weight_map": {"a": "../m-00001-of-00002.safetensors"}})",
       "field 'weight_map': tensor 'a': expected the name of a .safetensors shard in the index's folder (no path), "
       "found \"../m-00001-of-00002.safetensors\""},
      {R"({"weight_map": {"a": "m.bin"}})",
       "field 'weight_map': tensor 'a': expected the name of a .safetensors shard in the index's folder (no path), "
       "found \"m.bin\""},
      {R"({"weight_map": {"": "m-00001-of-00002.safetensors"}})", "field 'weight_map': a tensor with an empty name"},
      {R"({"metadata": [1], "weight_map": {"a": "m-00001-of-00002.safetensors"}})",
       "field 'metadata': expected an object, found [1]"},
  };
  for (const auto& [json, why] : bad) {
    write_index("i.safetensors.index.json", json);
    EXPECT_EQ(error("i.safetensors.index.json"), ix + ": " + why) << json;
  }
  write_index("i.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_EQ(error("i.safetensors.index.json").rfind(ix + ": not valid JSON: ", 0), 0u);
  // Read up to a cap (a real index is ~200 KB), never whole whatever its size.
  write_index("i.safetensors.index.json", std::string((64u << 20) + 1, ' '));
  EXPECT_EQ(error("i.safetensors.index.json"), ix + ": larger than 64 MiB: not a sharded checkpoint's index");
  // A shard that is itself corrupt is named by its own path.
  std::ofstream(dir_ + "/m-00002-of-00002.safetensors", std::ios::trunc) << "xx";
  write_index("i.safetensors.index.json", R"({"weight_map": {"c": "m-00002-of-00002.safetensors"}})");
  EXPECT_EQ(error("i.safetensors.index.json").rfind(dir_ + "/m-00002-of-00002.safetensors: ", 0), 0u)
      << error("i.safetensors.index.json");
}

// Every fixture file must open and every tensor must be readable (the reader against real-world writers).
TEST(SafeTensorsFixtures, EveryFixtureFileParses) {
  namespace fs = std::filesystem;
  const fs::path root = sd::test::fixtures_root();
  if (!fs::exists(root)) GTEST_SKIP() << "no fixture root at " << root;
  int files = 0;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    if (e.path().extension() != ".safetensors") continue;
    auto f = SafeTensorsFile::open(e.path().string());
    for (const auto& t : f.tensors()) EXPECT_EQ(f.get(t.name).numel(), static_cast<int64_t>(t.numel()));
    ++files;
  }
  EXPECT_GT(files, 10);
}

}  // namespace
