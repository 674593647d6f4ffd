// Control-channel commands (runtime/control_command.h: stdin, a FIFO or a Unix socket of `stream`): every line must
// either parse into a command whose fields are in range or throw sd::InvalidArgument saying what was expected.
#include <cmath>
#include <cstdint>

#include "fuzz_util.h"
#include "runtime/control_command.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto c = sd::parse_control_command(sd::fuzz::bytes(data, size));
    if (!c) return 0;
    using K = sd::ControlCommand::Kind;
    bool ok = true;
    switch (c->kind) {
      case K::Guidance:
      case K::Delta:
      case K::FilterThreshold:
      case K::Lora:
      case K::IpAdapterScale:
      case K::ControlnetScale: ok = std::isfinite(c->number); break;
      case K::TIndexList:
        ok = !c->t_index_list.empty();
        for (int64_t t : c->t_index_list) ok = ok && t >= 0;
        break;
      case K::ControlPreprocessor:
        ok = c->index >= 0 && !c->text.empty();
        break;
      case K::DeepCache: ok = c->index >= 1; break;
      case K::ControlnetGuidance:
        ok = c->index >= 0 && c->number >= 0.0 && c->end <= 1.0 && c->number < c->end;
        break;
      default: break;
    }
    if (!ok) {
      std::fprintf(stderr, "accepted command breaks an invariant: %s\n", c->line.c_str());
      std::abort();
    }
  } catch (const sd::InvalidArgument&) {
  }
  return 0;
}
