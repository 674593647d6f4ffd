// OSC control (runtime/osc_control.h) without a stream: the message -> control line mapping (every argument type,
// namespaces, bundles, malformed packets), the osc:// spec, and a channel on loopback answering to a reply address
// with its counters adding up.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include <limits>

#include <gtest/gtest.h>

#include "core/error.h"
#include "runtime/control_channel.h"
#include "runtime/control_command.h"
#include "runtime/osc_control.h"
#include "runtime/osc_test_util.h"

namespace sd {
namespace {

using namespace std::chrono_literals;

// A liblo message serialised, as it arrives in a datagram.
std::string serialise(const char* path, lo_message m) {
  size_t size = 0;
  void* buf = lo_message_serialise(m, path, nullptr, &size);
  std::string out(static_cast<const char*>(buf), size);
  std::free(buf);
  lo_message_free(m);
  return out;
}

std::string line_of(const std::string& bytes) { return osc_message_to_line(bytes.data(), bytes.size()).line; }

TEST(OscMapping, MessagesBecomeControlLines) {
  lo_message m = lo_message_new();
  lo_message_add_string(m, "a watercolour fox\non a hill");
  EXPECT_EQ(line_of(serialise("/prompt", m)), "prompt a watercolour fox on a hill") << "line breaks become spaces";

  m = lo_message_new();
  lo_message_add_float(m, 1.4f);
  EXPECT_EQ(line_of(serialise("/streamdiffusion/guidance", m)), "guidance 1.4") << "a namespace; shortest float";

  m = lo_message_new();
  lo_message_add_float(m, 42.0f);
  EXPECT_EQ(line_of(serialise("/seed", m)), "seed 42") << "an integral float (a CHOP value) reads as an integer";

  m = lo_message_new();
  lo_message_add_double(m, 0.1);
  EXPECT_EQ(line_of(serialise("/delta", m)), "delta 0.1");

  m = lo_message_new();
  lo_message_add_int32(m, 20);
  lo_message_add_int32(m, 35);
  EXPECT_EQ(line_of(serialise("/t_index_list", m)), "t_index_list 20 35");

  m = lo_message_new();
  lo_message_add_string(m, "style");
  lo_message_add_float(m, 0.7f);
  EXPECT_EQ(line_of(serialise("/lora", m)), "lora style 0.7");

  m = lo_message_new();
  lo_message_add_true(m);
  EXPECT_EQ(line_of(serialise("/filter", m)), "filter true");
  m = lo_message_new();
  lo_message_add_false(m);
  EXPECT_EQ(line_of(serialise("/filter", m)), "filter false");

  m = lo_message_new();
  lo_message_add_nil(m);
  EXPECT_EQ(line_of(serialise("/image_prompt", m)), "image_prompt none");

  m = lo_message_new();
  lo_message_add_int64(m, 5000000000LL);
  EXPECT_EQ(line_of(serialise("/seed", m)), "seed 5000000000");

  m = lo_message_new();
  EXPECT_EQ(line_of(serialise("/stats", m)), "stats");

  // 8-byte arguments at 4-byte offsets (after an int32): read byte-wise, the values intact (fuzz_osc: reading them
  // through liblo's 8-byte-aligned lo_arg was a misaligned access); a char and a symbol.
  m = lo_message_new();
  lo_message_add_int32(m, -7);
  lo_message_add_int64(m, -5000000001LL);
  lo_message_add_double(m, 2.5);
  lo_message_add_char(m, 'x');
  lo_message_add_symbol(m, "sym");
  EXPECT_EQ(line_of(serialise("/a", m)), "a -7 -5000000001 2.5 x sym");
  m = lo_message_new();
  lo_message_add_char(m, '\n');  // fuzz_osc: a line break as a char argument
  lo_message_add_char(m, 'y');
  EXPECT_EQ(line_of(serialise("/a", m)), "a   y");

  // Floats that are no integer's: NaN and infinities as text (the control parser then refuses them), huge values in
  // exponent form (fuzz_osc: NaN went through an undefined float-to-integer conversion).
  m = lo_message_new();
  lo_message_add_float(m, std::numeric_limits<float>::quiet_NaN());
  lo_message_add_double(m, -std::numeric_limits<double>::infinity());
  lo_message_add_double(m, 1e300);
  EXPECT_EQ(line_of(serialise("/guidance", m)), "guidance nan -inf 1e+300");
  EXPECT_THROW(parse_control_command("guidance nan"), InvalidArgument);

  // Every line above is a command the parser takes (the mapping adds no syntax of its own).
  for (const char* l : {"prompt a watercolour fox on a hill", "guidance 1.4", "seed 42", "delta 0.1",
                        "t_index_list 20 35", "lora style 0.7", "filter true", "image_prompt none", "stats"})
    EXPECT_NO_THROW(parse_control_command(l)) << l;
}

TEST(OscMapping, AnAddressWithALineBreakIsRefused) {
  // fuzz_osc: "/prompt\nquit" made a control line with a line break in it.
  lo_message m = lo_message_new();
  lo_message_add_string(m, "x");
  const std::string bytes = serialise("/prompt\nquit", m);
  try {
    osc_message_to_line(bytes.data(), bytes.size());
    ADD_FAILURE() << "an address with a line break was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("OSC address has a control character (byte 10)"), std::string::npos)
        << e.what();
  }
}

TEST(OscMapping, ArgumentsWithoutATextFormAndMalformedBytesAreRefused) {
  lo_message m = lo_message_new();
  const char data[4] = {1, 2, 3, 4};
  lo_blob b = lo_blob_new(4, data);
  lo_message_add_blob(m, b);
  const std::string blob = serialise("/prompt", m);
  lo_blob_free(b);
  try {
    osc_message_to_line(blob.data(), blob.size());
    ADD_FAILURE() << "a blob was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("argument 1 has type 'b', which has no text form"), std::string::npos)
        << e.what();
  }
  const std::string garbage = "hello world!";
  EXPECT_THROW(osc_message_to_line(garbage.data(), garbage.size()), InvalidArgument);
  m = lo_message_new();
  lo_message_add_string(m, "a long prompt text");
  const std::string whole = serialise("/prompt", m);
  EXPECT_THROW(osc_message_to_line(whole.data(), whole.size() - 4), InvalidArgument) << "truncated";
  m = lo_message_new();
  const std::string root = serialise("/", m);
  EXPECT_THROW(osc_message_to_line(root.data(), root.size()), InvalidArgument) << "no command in the address";
}

TEST(OscMapping, BundlesAreTakenApartNestedToo) {
  lo_bundle outer = lo_bundle_new(LO_TT_IMMEDIATE);
  lo_bundle inner = lo_bundle_new(LO_TT_IMMEDIATE);
  lo_message a = lo_message_new();
  lo_message_add_string(a, "a cat");
  lo_message g = lo_message_new();
  lo_message_add_float(g, 1.5f);
  lo_message s = lo_message_new();
  lo_message_add_int32(s, 3);
  lo_bundle_add_message(outer, "/prompt", a);
  lo_bundle_add_message(inner, "/guidance", g);
  lo_bundle_add_message(inner, "/seed", s);
  lo_bundle_add_bundle(outer, inner);
  size_t size = 0;
  void* buf = lo_bundle_serialise(outer, nullptr, &size);
  const std::string bytes(static_cast<const char*>(buf), size);
  std::free(buf);
  lo_bundle_free_recursive(outer);

  std::vector<std::string> lines;
  for (const auto& [off, n] : osc_packet_messages(bytes.data(), bytes.size()))
    lines.push_back(line_of(bytes.substr(off, n)));
  EXPECT_EQ(lines, (std::vector<std::string>{"prompt a cat", "guidance 1.5", "seed 3"}));

  std::string bad = bytes;
  bad[19] = 100;  // the first element's size now runs past the end
  EXPECT_THROW(osc_packet_messages(bad.data(), bad.size()), InvalidArgument);
  EXPECT_THROW(osc_packet_messages(bytes.data(), 12), InvalidArgument) << "shorter than its header";
}

TEST(OscSpecTest, ParsesAddressesAndReplyTargets) {
  OscSpec s = parse_osc_spec("osc://127.0.0.1:9000");
  EXPECT_EQ(s.host, "127.0.0.1");
  EXPECT_EQ(s.port, 9000);
  EXPECT_EQ(s.reply, OscSpec::Reply::None);
  s = parse_osc_spec("osc://:9000?reply=osc://192.168.1.5:9001");
  EXPECT_EQ(s.host, "127.0.0.1") << "no host = loopback only";
  EXPECT_EQ(s.reply, OscSpec::Reply::Fixed);
  EXPECT_EQ(s.reply_host, "192.168.1.5");
  EXPECT_EQ(s.reply_port, 9001);
  s = parse_osc_spec("osc.udp://0.0.0.0:7000/?reply=sender");
  EXPECT_EQ(s.host, "0.0.0.0");
  EXPECT_EQ(s.reply, OscSpec::Reply::Sender);
  s = parse_osc_spec("osc://[::1]:9000");
  EXPECT_EQ(s.host, "::1");
  for (const auto& [bad, what] : std::vector<std::pair<std::string, std::string>>{
           {"osc://127.0.0.1", "expected osc://HOST:PORT"},
           {"osc://127.0.0.1:port", "the port must be a number in [0, 65535], got 'port'"},
           {"osc://127.0.0.1:70000", "the port must be a number"},
           {"osc://127.0.0.1:9000?replies=sender", "the only parameter is reply="},
           {"osc://127.0.0.1:9000?reply=127.0.0.1:9001", "reply= expects osc://HOST:PORT or sender"},
           {"osc://127.0.0.1:9000?reply=osc://127.0.0.1:0", "the reply port cannot be 0"}}) {
    try {
      parse_osc_spec(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << bad << ": " << e.what();
    }
  }
}

// A channel whose handler answers like the runtime does; replies go to a listener.
struct Recorder {
  std::mutex m;
  std::vector<std::string> lines;
  void add(const ControlCommand& c, const ControlChannel::Reply& r) {
    {
      std::lock_guard<std::mutex> lock(m);
      lines.push_back(c.line);
    }
    if (r) r("ok: '" + c.line + "' applied before frame 0");
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(m);
    return lines.size();
  }
};

TEST(OscChannel, AnswersToTheReplyAddressAndCountsEverything) {
  test::ReplyListener listener;
  Recorder rec;
  ControlChannel ch("osc://127.0.0.1:0?reply=osc://127.0.0.1:" + std::to_string(listener.port()),
                    [&](ControlCommand c, ControlChannel::Reply r) { rec.add(c, r); });
  ASSERT_GT(ch.osc_port(), 0);
  EXPECT_NE(ch.describe().find("osc udp 127.0.0.1:" + std::to_string(ch.osc_port())), std::string::npos);
  test::OscSender send(ch.osc_port());

  lo_send(send.get(), "/guidance", "f", 1.5f);
  EXPECT_EQ(listener.next(), "/streamdiffusion/ok 'guidance 1.5' applied before frame 0");
  lo_send(send.get(), "/bogus", "i", 1);
  EXPECT_NE(listener.next().find("/streamdiffusion/error unknown command 'bogus'"), std::string::npos);
  lo_send(send.get(), "/guidance", "s", "strong");
  EXPECT_NE(listener.next().find("/streamdiffusion/error 'guidance' expects a number, got 'strong'"), std::string::npos);
  lo_send(send.get(), "/help", "");
  EXPECT_NE(listener.next().find("/streamdiffusion/status commands: prompt"), std::string::npos);
  send.raw(ch.osc_port(), "not osc at all");
  EXPECT_NE(listener.next().find("/streamdiffusion/error not an OSC message"), std::string::npos);

  // /reply none: silence; /reply PORT: the sender's host at that port (the listener) again.
  lo_send(send.get(), "/reply", "s", "none");
  lo_send(send.get(), "/seed", "i", 4);
  EXPECT_EQ(listener.next(300ms), "") << "no replies after /reply none";
  lo_send(send.get(), "/reply", "i", listener.port());
  EXPECT_EQ(listener.next(), "/streamdiffusion/ok replies go here");
  lo_send(send.get(), "/reply", "s", "nowhere");
  EXPECT_NE(listener.next().find("/streamdiffusion/error /reply:"), std::string::npos);
  lo_send(send.get(), "/prompt", "s", "a red fox");
  EXPECT_EQ(listener.next(), "/streamdiffusion/ok 'prompt a red fox' applied before frame 0");

  ch.stop();
  EXPECT_EQ(rec.lines, (std::vector<std::string>{"guidance 1.5", "seed 4", "prompt a red fox"}));
  const auto st = ch.stats();
  EXPECT_EQ(st["received"], 10);
  EXPECT_EQ(st["bad"], 4) << st.dump();  // /bogus, guidance strong, the garbage, /reply nowhere
  EXPECT_EQ(st["answered"], 3) << st.dump();  // help, /reply none, /reply PORT
  EXPECT_EQ(st["posted"], 3);
  EXPECT_EQ(st["received"].get<int64_t>(),
            st["bad"].get<int64_t>() + st["answered"].get<int64_t>() + st["posted"].get<int64_t>());
}

TEST(OscChannel, OscChannelsAreLastValueWinsAndBadSpecsAreRefused) {
  EXPECT_TRUE(ControlChannel::last_value_wins("osc://127.0.0.1:9000"));
  EXPECT_FALSE(ControlChannel::last_value_wins("unix:/tmp/x"));
  EXPECT_FALSE(ControlChannel::last_value_wins("stdin"));
  auto noop = [](ControlCommand, ControlChannel::Reply) {};
  EXPECT_THROW(ControlChannel("osc://127.0.0.1:notaport", noop), InvalidArgument);
  // A port in use is an error naming it.
  ControlChannel first("osc://127.0.0.1:0", noop);
  try {
    ControlChannel second("osc://127.0.0.1:" + std::to_string(first.osc_port()), noop);
    ADD_FAILURE() << "bound the same port twice";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot listen on udp 127.0.0.1:" + std::to_string(first.osc_port())),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace sd
