#pragma once
// A bounded multi-producer / multi-consumer queue between two stage threads of the stream runtime.
//
// Overflow policy when a push finds the queue full:
//  * Block      — the producer waits for room (lossless file -> file streaming: back-pressure, nothing is lost);
//  * DropOldest — the oldest queued item is discarded and counted (live sources: the consumer always gets the most
//                 recent item, "latest frame wins"; the producer never waits).
// Shutdown: close() lets consumers drain what is queued and then pop() returns nullopt (end of stream);
// cancel() wakes every waiter at once, discards what is queued and makes push()/pop() fail from then on.
// What a dropped item carries that must outlive it (a frame's new image prompt, which only some frames bring) moves to
// the item queued after it through set_carry().
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>

#include "core/error.h"

namespace sd {

enum class OverflowPolicy { Block, DropOldest };

template <typename T>
class BoundedQueue {
 public:
  BoundedQueue(size_t capacity, OverflowPolicy policy) : capacity_(capacity), policy_(policy) {
    if (capacity == 0) throw InvalidArgument("BoundedQueue: capacity must be at least 1");
  }
  BoundedQueue(const BoundedQueue&) = delete;
  BoundedQueue& operator=(const BoundedQueue&) = delete;

  // Returns false when the queue was closed or cancelled (the item is not queued).
  bool push(T item) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (policy_ == OverflowPolicy::Block)
      not_full_.wait(lock, [&] { return items_.size() < capacity_ || closed_ || cancelled_; });
    if (closed_ || cancelled_) return false;
    while (items_.size() >= capacity_) {
      T old = std::move(items_.front());
      items_.pop_front();
      ++dropped_;
      if (carry_) carry_(old, items_.empty() ? item : items_.front());
    }
    items_.push_back(std::move(item));
    ++pushed_;
    not_empty_.notify_one();
    return true;
  }

  // DropOldest: called with each dropped item and its successor (the next queued item, or the one being pushed), under
  // the queue's lock, so it must be quick and must not touch the queue. Set it before the queue is used.
  using Carry = std::function<void(T& dropped, T& successor)>;
  void set_carry(Carry carry) {
    std::lock_guard<std::mutex> l(mutex_);
    carry_ = std::move(carry);
  }

  // Waits for an item. nullopt: closed and drained, or cancelled.
  std::optional<T> pop() {
    std::unique_lock<std::mutex> lock(mutex_);
    not_empty_.wait(lock, [&] { return !items_.empty() || closed_ || cancelled_; });
    return take(lock);
  }

  // As pop(), but gives up after `timeout` (nullopt; check closed()/cancelled() to tell why).
  template <typename Rep, typename Period>
  std::optional<T> pop_for(std::chrono::duration<Rep, Period> timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    not_empty_.wait_for(lock, timeout, [&] { return !items_.empty() || closed_ || cancelled_; });
    return take(lock);
  }

  // No more pushes; consumers drain the remaining items.
  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
    not_empty_.notify_all();
    not_full_.notify_all();
  }

  // Abort: drop the queued items (they are not counted as dropped) and wake everybody.
  void cancel() {
    std::lock_guard<std::mutex> lock(mutex_);
    cancelled_ = true;
    discarded_ += static_cast<int64_t>(items_.size());
    items_.clear();
    not_empty_.notify_all();
    not_full_.notify_all();
  }

  bool closed() const { std::lock_guard<std::mutex> l(mutex_); return closed_; }
  bool cancelled() const { std::lock_guard<std::mutex> l(mutex_); return cancelled_; }
  size_t size() const { std::lock_guard<std::mutex> l(mutex_); return items_.size(); }
  size_t capacity() const { return capacity_; }
  OverflowPolicy policy() const { return policy_; }
  int64_t dropped() const { std::lock_guard<std::mutex> l(mutex_); return dropped_; }      // overflow drops
  int64_t discarded() const { std::lock_guard<std::mutex> l(mutex_); return discarded_; }  // lost to cancel()
  int64_t pushed() const { std::lock_guard<std::mutex> l(mutex_); return pushed_; }

 private:
  std::optional<T> take(std::unique_lock<std::mutex>&) {
    if (cancelled_ || items_.empty()) return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    not_full_.notify_one();
    return item;
  }

  const size_t capacity_;
  const OverflowPolicy policy_;
  mutable std::mutex mutex_;
  std::condition_variable not_empty_, not_full_;
  std::deque<T> items_;
  Carry carry_;
  bool closed_ = false, cancelled_ = false;
  int64_t dropped_ = 0, discarded_ = 0, pushed_ = 0;
};

}  // namespace sd
