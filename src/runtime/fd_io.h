#pragma once
// Reads and writes on file descriptors (pipes, stdin/stdout, sockets) that give up when a stop flag is raised, so a
// stage thread blocked on a pipe whose other end is idle can still be joined. Waits use poll() in short slices.
#include <atomic>
#include <cstddef>
#include <string>

namespace sd {

enum class IoStatus { Ok, Eof, Stopped };

// Reads exactly `n` bytes unless the stream ends (Eof; `*got` says how many arrived) or `stop` is raised (Stopped).
// Throws sd::Error naming `what` on a read error.
IoStatus read_full(int fd, void* buf, size_t n, const std::atomic<bool>& stop, const std::string& what,
                   size_t* got = nullptr);
// Writes all `n` bytes unless `stop` is raised (Stopped). Throws sd::Error naming `what` when the reader has gone
// (EPIPE) or on another write error.
IoStatus write_full(int fd, const void* buf, size_t n, const std::atomic<bool>& stop, const std::string& what);
// Waits until `fd` is readable (true) or `timeout_ms` passed / `stop` was raised (false).
bool wait_readable(int fd, int timeout_ms);

}  // namespace sd
