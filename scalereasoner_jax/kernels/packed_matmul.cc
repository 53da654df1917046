// y[M, N] = x[M, K] @ W[K, N] for the few rows of a decoding step, with W packed as panels
// P[N / 32][K][32] (see packed_matmul.py). Each panel is one contiguous stream from memory, so the
// product runs at the machine's memory bandwidth; with W row-major, a 32-column slice is a strided
// walk that the hardware prefetchers do not follow, and the product costs the streaming plus its
// arithmetic. Panels are handed out to the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "packed_matmul needs AVX-512F"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;     // columns per panel: two 16-float vectors
constexpr int kRowBlock = 12;      // rows per pass over a panel: 24 accumulators in registers
constexpr int64_t kPrefetch = 64;  // panel rows requested ahead of the loads
// Below this many weight bytes a call runs on the calling thread alone: waking a helper costs more.
constexpr int64_t kParallelBytes = 256 << 10;

// Rows [0, R) of x against one panel, into y's 32 columns of the panel (y's row stride n).
template <int R>
void RowBlock(const float* x, int64_t k_dim, const float* panel, float* y, int64_t n) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    const float* ahead = panel + std::min(k + kPrefetch, k_dim - 1) * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k_dim + k]);
      lo[r] = _mm512_fmadd_ps(xr, w0, lo[r]);
      hi[r] = _mm512_fmadd_ps(xr, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * n, lo[r]);
    _mm512_storeu_ps(y + r * n + 16, hi[r]);
  }
}

using RowBlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t);

template <int... R>
constexpr auto MakeRowBlocks(std::integer_sequence<int, R...>) {
  return std::array<RowBlockFn, sizeof...(R)>{&RowBlock<R + 1>...};
}
constexpr auto kRowBlocks = MakeRowBlocks(std::make_integer_sequence<int, kRowBlock>{});

void Panels(const float* x, int64_t m, int64_t k_dim, const float* packed, float* y, int64_t n,
            int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const float* panel = packed + p * k_dim * kPanel;
    for (int64_t r = 0; r < m; r += kRowBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, m - r));
      kRowBlocks[rows - 1](x + r * k_dim, k_dim, panel, y + r * n + p * kPanel, n);
    }
  }
}

// Chunks of work shared by the calling thread and XLA's intra-op pool through an atomic counter. The
// caller works too and then waits only for chunks already taken, so a helper the pool starts late
// finds nothing left (no deadlock when every pool thread is itself inside a kernel).
template <typename F>
void Parallel(ffi::ThreadPool& pool, int64_t chunks, F body) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, chunks, body] {
    for (int64_t c; (c = counters->next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      body(c);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule(decltype(run)(run));
  run();
  while (counters->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

// Rows [first, last) of W (K, N) into the panels: each row is read once, in order, and written as
// N / 32 full 128-byte blocks, with streaming stores where aligned (the next reader of the panels
// streams them from memory anyway; caching them would only evict other data).
void PackRows(const float* w, float* packed, int64_t k_dim, int64_t n, int64_t first, int64_t last) {
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % 64 == 0;
  for (int64_t k = first; k < last; ++k) {
    const float* row = w + k * n;
    float* out = packed + k * kPanel;
    for (int64_t p = 0; p < n / kPanel; ++p, row += kPanel, out += k_dim * kPanel) {
      const __m512 lo = _mm512_loadu_ps(row), hi = _mm512_loadu_ps(row + 16);
      if (aligned) {
        _mm512_stream_ps(out, lo);
        _mm512_stream_ps(out + 16, hi);
      } else {
        _mm512_storeu_ps(out, lo);
        _mm512_storeu_ps(out + 16, hi);
      }
    }
  }
  _mm_sfence();
}

// ``packed`` is the result aliased to the last operand (the previous panels, donated): writing into
// memory already mapped skips the page faults of a fresh 100 MB-scale buffer, which cost more than
// the packing itself.
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> /*into*/,
                    ffi::ResultBuffer<ffi::F32> packed) {
  const auto wd = w.dimensions();
  const auto pd = packed->dimensions();
  if (wd.size() != 2 || pd.size() != 3 || pd[2] != kPanel || pd[1] != wd[0] || pd[0] * kPanel != wd[1]) {
    return ffi::Error::InvalidArgument("pack: expected W (K, N) and packed (N / 32, K, 32)");
  }
  const int64_t k_dim = wd[0], n = wd[1];
  const int64_t rows = k_dim * n * 4 < kParallelBytes ? k_dim : 16;  // one chunk: the caller alone
  const float* src = w.typed_data();
  float* dst = packed->typed_data();
  Parallel(pool, (k_dim + rows - 1) / rows, [=](int64_t c) {
    PackRows(src, dst, k_dim, n, c * rows, std::min(c * rows + rows, k_dim));
  });
  return ffi::Error::Success();
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> packed,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || yd.size() != 2 || pd[2] != kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: expected x (M, K), packed (N / 32, K, 32), y (M, N)");
  }
  if (pd[1] != xd[1] || yd[0] != xd[0] || yd[1] != pd[0] * kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: x, packed and y disagree on M, K or N");
  }
  const float* xs = x.typed_data();
  const float* ps = packed.typed_data();
  float* ys = y->typed_data();
  const int64_t m = xd[0], k_dim = xd[1], n = yd[1], panels = pd[0];
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // A few chunks per thread balance the load; small weights are one chunk, for the caller alone.
  const int64_t chunk = k_dim * n * 4 < kParallelBytes ? panels : std::max<int64_t>(1, panels / (4 * threads));
  Parallel(pool, (panels + chunk - 1) / chunk, [=](int64_t c) {
    Panels(xs, m, k_dim, ps, ys, n, c * chunk, std::min(c * chunk + chunk, panels));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalereasonerPack, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalereasonerPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
