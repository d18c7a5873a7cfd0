// Decoding kernels for a CPU, as XLA FFI custom calls (dsjax/cpu_kernels.py builds and
// registers them). A decode step is a pass over the weights with a few rows of activations;
// XLA:CPU runs such few-row products below the machine's memory bandwidth.
//
// DsjaxGatherSwiglu: the gather dispatch's routed experts (dsjax/moe.py:experts_gather),
//   y[n] = sum_j c[n, j] * W2[e]^T (silu(W1[e]^T x[n]) * W3[e]^T x[n]),  e = idx[n, j]
//
// x [N, D], c [N, K] and idx [N, K] (int32) as the router gives them, w1 and w3 [E, D, F],
// w2 [E, F, D], y [N, D], all float32 and row-major. XLA:CPU also copies a dynamically
// indexed expert (w1[e]) into a new buffer before its dot. Here each chosen expert's three
// matrices are read in place, once per step, row by row, whatever the number of token
// copies routed to it: the rows of W1[e] and W3[e] stream past the copies' accumulators
// (in L1), then those of W2[e]. (Splitting an expert's columns between threads, or
// unrolling over rows, measured slower here: strided reads.) The
// distinct chosen experts are the work items, shared by the calling thread and XLA's
// intra-op thread pool; each writes its copies' rows of a [N*K, D] buffer, which the
// calling thread sums with the router weights in order j = 0..K-1 (deterministic).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Plan {
  const float* x;
  const float* w1;
  const float* w3;
  const float* w2;
  int64_t K, D, F;
  std::vector<int32_t> expert;  // the distinct chosen experts, ascending
  std::vector<int64_t> start;   // copies of expert[g]: order[start[g] .. start[g + 1])
  std::vector<int64_t> order;   // copy ids n * K + j, sorted by expert
  std::vector<float> ys;        // [N * K, D]: each copy's expert output
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void RunExpert(Plan& p, int64_t g) {
  const int64_t D = p.D, F = p.F, e = p.expert[g];
  const int64_t first = p.start[g], rows = p.start[g + 1] - first;
  const float* __restrict w1 = p.w1 + e * D * F;
  const float* __restrict w3 = p.w3 + e * D * F;
  const float* __restrict w2 = p.w2 + e * F * D;
  thread_local std::vector<float> scratch;
  scratch.assign(2 * rows * F, 0.0f);
  float* __restrict h1 = scratch.data();
  float* __restrict h3 = h1 + rows * F;
  for (int64_t d = 0; d < D; ++d) {
    const float* __restrict a = w1 + d * F;
    const float* __restrict b = w3 + d * F;
    for (int64_t r = 0; r < rows; ++r) {
      const float xv = p.x[(p.order[first + r] / p.K) * D + d];
      float* __restrict u = h1 + r * F;
      float* __restrict v = h3 + r * F;
      for (int64_t f = 0; f < F; ++f) {
        u[f] += xv * a[f];
        v[f] += xv * b[f];
      }
    }
  }
  for (int64_t i = 0; i < rows * F; ++i) {
    const float u = h1[i];
    h1[i] = u / (1.0f + std::exp(-u)) * h3[i];
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict y = p.ys.data() + p.order[first + r] * D;
    std::fill(y, y + D, 0.0f);
  }
  for (int64_t f = 0; f < F; ++f) {
    const float* __restrict w = w2 + f * D;
    for (int64_t r = 0; r < rows; ++r) {
      const float hv = h1[r * F + f];
      float* __restrict y = p.ys.data() + p.order[first + r] * D;
      for (int64_t d = 0; d < D; ++d) y[d] += hv * w[d];
    }
  }
}

void Work(Plan& p) {
  const int64_t n = static_cast<int64_t>(p.expert.size());
  for (int64_t g = p.next.fetch_add(1); g < n; g = p.next.fetch_add(1)) {
    RunExpert(p, g);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error GatherSwiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c,
                        ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                        ffi::Buffer<ffi::F32> w2, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), cd = c.dimensions(), id = idx.dimensions();
  auto d1 = w1.dimensions(), d3 = w3.dimensions(), d2 = w2.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || id.size() != 2 || d1.size() != 3 || d3.size() != 3 ||
      d2.size() != 3)
    return ffi::Error::InvalidArgument("gather_swiglu: x, c, idx must be 2-D and w1, w3, w2 3-D");
  const int64_t N = xd[0], D = xd[1], K = id[1], E = d1[0], F = d1[2];
  if (cd[0] != N || cd[1] != K || id[0] != N || d1[1] != D || d3[0] != E || d3[1] != D ||
      d3[2] != F || d2[0] != E || d2[1] != F || d2[2] != D)
    return ffi::Error::InvalidArgument("gather_swiglu: shapes disagree (x [N,D], c and idx [N,K], "
                                       "w1 and w3 [E,D,F], w2 [E,F,D])");
  const int32_t* ids = idx.typed_data();
  for (int64_t i = 0; i < N * K; ++i)
    if (ids[i] < 0 || ids[i] >= E)
      return ffi::Error::InvalidArgument("gather_swiglu: an expert index is outside [0, E)");

  auto plan = std::make_shared<Plan>();
  Plan& p = *plan;
  p.x = x.typed_data();
  p.w1 = w1.typed_data();
  p.w3 = w3.typed_data();
  p.w2 = w2.typed_data();
  p.K = K;
  p.D = D;
  p.F = F;
  std::vector<int64_t> count(E + 1, 0);  // a counting sort of the copies by expert (stable)
  for (int64_t i = 0; i < N * K; ++i) ++count[ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) {
    if (count[e + 1] > 0) {
      p.expert.push_back(static_cast<int32_t>(e));
      p.start.push_back(count[e]);
    }
    count[e + 1] += count[e];
  }
  p.start.push_back(N * K);
  p.order.resize(N * K);
  for (int64_t i = 0; i < N * K; ++i) p.order[count[ids[i]]++] = i;
  p.ys.resize(N * K * D);

  const int64_t items = static_cast<int64_t>(p.expert.size());
  // Helpers hold the plan: one that starts after the work is gone touches nothing freed.
  // With the calling thread, as many workers as the pool has threads (one more, on a
  // 2-core machine, made batch-1 calls about 12% slower: three threads on two cores).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([plan] { Work(*plan); });
  Work(p);
  while (p.done.load(std::memory_order_acquire) < items) std::this_thread::yield();

  const float* cw = c.typed_data();
  float* out = y->typed_data();
  for (int64_t n = 0; n < N; ++n) {
    float* o = out + n * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t j = 0; j < K; ++j) {
      const float w = cw[n * K + j];
      const float* s = p.ys.data() + (n * K + j) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * s[d];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxGatherSwiglu, GatherSwiglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
