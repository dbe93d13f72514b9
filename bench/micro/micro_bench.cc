// Allocator micro-benchmarks.  Linked only against libc, pthread and Google
// Benchmark: the allocator under test is swapped in at run time with
// LD_PRELOAD (see bench/run_micro.py).  Every benchmark reports
// items_per_second, one item being one malloc+free pair, so ns/op is
// 1e9 / items_per_second.
#include <benchmark/benchmark.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

// malloc + free of one size, the block touched so it is really used.
void BM_MallocFree(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    void* p = std::malloc(size);
    benchmark::DoNotOptimize(p);
    static_cast<volatile char*>(p)[0] = 1;
    std::free(p);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_MallocFree)->Arg(16)->Arg(64)->Arg(256)->Arg(1024)->Arg(4096)->Arg(32768)->Arg(262144);

// Allocate 1000 objects of mixed small sizes (8..512 B, fixed pseudo-random
// sequence), then free them all in allocation order.
constexpr int kBatch = 1000;

std::array<std::size_t, kBatch> MixedSizes() {
  std::array<std::size_t, kBatch> sizes{};
  std::uint32_t x = 12345;
  for (auto& s : sizes) {
    x = x * 1664525u + 1013904223u;  // LCG: deterministic across runs
    s = 8 + (x >> 8) % 505;
  }
  return sizes;
}

void BM_BatchMixed1000(benchmark::State& state) {
  const auto sizes = MixedSizes();
  std::array<void*, kBatch> ptrs{};
  for (auto _ : state) {
    for (int i = 0; i < kBatch; ++i) {
      ptrs[i] = std::malloc(sizes[i]);
      static_cast<volatile char*>(ptrs[i])[0] = 1;
    }
    benchmark::DoNotOptimize(ptrs.data());
    for (void* p : ptrs) std::free(p);
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_BatchMixed1000);

// Scaling: every thread allocates 100 small objects and frees them, in a
// loop. With 2 threads on 2 cores, items/s should double if nothing is shared.
void BM_ThreadsBatch100(benchmark::State& state) {
  std::array<void*, 100> ptrs{};
  for (auto _ : state) {
    for (std::size_t i = 0; i < ptrs.size(); ++i) {
      ptrs[i] = std::malloc(16 + (i % 8) * 16);
      static_cast<volatile char*>(ptrs[i])[0] = 1;
    }
    benchmark::DoNotOptimize(ptrs.data());
    for (void* p : ptrs) std::free(p);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(ptrs.size()));
}
BENCHMARK(BM_ThreadsBatch100)->Threads(1)->Threads(2)->UseRealTime();

// Single-producer single-consumer lock-free ring of pointers.
class Ring {
 public:
  bool Push(void* p) {
    const auto t = tail_.load(std::memory_order_relaxed);
    if (t - head_.load(std::memory_order_acquire) == kSize) return false;
    slots_[t % kSize] = p;
    tail_.store(t + 1, std::memory_order_release);
    return true;
  }
  void* Pop() {
    const auto h = head_.load(std::memory_order_relaxed);
    if (h == tail_.load(std::memory_order_acquire)) return nullptr;
    void* p = slots_[h % kSize];
    head_.store(h + 1, std::memory_order_release);
    return p;
  }

 private:
  static constexpr std::size_t kSize = 4096;
  std::array<void*, kSize> slots_{};
  alignas(64) std::atomic<std::size_t> head_{0};
  alignas(64) std::atomic<std::size_t> tail_{0};
};

// The benchmark thread mallocs, a second thread frees: every free is a
// cross-thread (remote) free.  Wall time, since two threads do the work.
void BM_CrossThreadFree(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  Ring ring;
  std::atomic<bool> done{false};
  std::thread consumer([&] {
    for (;;) {
      if (void* p = ring.Pop()) {
        std::free(p);
      } else if (done.load(std::memory_order_acquire)) {
        while (void* q = ring.Pop()) std::free(q);
        return;
      } else {
        std::this_thread::yield();
      }
    }
  });
  for (auto _ : state) {
    void* p = std::malloc(size);
    static_cast<volatile char*>(p)[0] = 1;
    while (!ring.Push(p)) std::this_thread::yield();
  }
  done.store(true, std::memory_order_release);
  consumer.join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CrossThreadFree)->Arg(64)->Arg(1024)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
