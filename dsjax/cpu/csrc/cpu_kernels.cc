// CPU kernels as XLA FFI custom calls (dsjax/cpu_kernels.py builds and registers them).
// Three for decoding: a decode step is a pass over the weights with a few rows of
// activations, and XLA:CPU runs such few-row products below the machine's memory
// bandwidth (and absorbed attention over the latent cache as a dozen small ops,
// DsjaxLatentAttention further down). Two for training and prefill, further down:
// DsjaxBlockedSwiglu{Fwd,Bwd}, the blocked dispatch's expert GEMMs, which XLA:CPU runs as
// a loop of small dots, and DsjaxAttention{Fwd,Bwd}, softmax attention with a head of keys
// and values per query head, which it runs as small batched products.
//
// DsjaxGatherSwiglu: the gather dispatch's routed experts (dsjax/moe.py:experts_gather),
// and the layer's shared experts with them when given,
//   y[n] = sum_j c[n, j] * W2[e]^T (silu(W1[e]^T x[n]) * W3[e]^T x[n]),  e = idx[n, j]
//          + S2^T (silu(S1^T x[n]) * S3^T x[n])
//
// x [N, D], c [N, K] and idx [N, K] (int32) as the router gives them, w1 and w3 [E, D, F],
// w2 [E, F, D], s1 and s3 [D, Fs], s2 [Fs, D] (Fs = 0: no shared experts), y [N, D], all
// float32 and row-major. XLA:CPU copies a dynamically indexed expert (w1[e]) into a new
// buffer before its dot. Here each chosen expert's three matrices are read in place, once
// per step, row by row, whatever the number of token copies routed to it: the rows of
// W1[e] and W3[e] stream past the copies' accumulators (in L1), then those of W2[e].
// (Splitting an expert's columns between threads, or unrolling over rows, measured slower
// here: strided reads.) The distinct chosen experts, and the shared experts, are the work
// items, shared by the calling thread and XLA's intra-op thread pool; each writes its own
// rows of a buffer, which the calling thread sums with the router weights in order
// j = 0..K-1 (deterministic).
//
// DsjaxRowsDot: y [M, N] = x [M, K] @ wt [N, K]^T, the few-row products of a decode step
// (projections, dense MLPs, the output head) with the weight given transposed
// (dsjax/model.py:decode_weights makes those copies once per `generate` call). Each output
// is a dot product of an x row with a wt row, both contiguous: a tile of 2 x rows by 4 wt
// rows keeps 8 accumulators in registers, no broadcasts, and the 4 wt rows (read from
// memory for the first 2 x rows, as 4 streams) serve the others from L1. With the weights
// cold (not in cache, as in a decode step), XLA:CPU ran [8, K] x [K, N] at 3.6-6.9 GB/s of
// weights on two cores, this form at 9.4-13.8 GB/s (one row: 29.7 and 34.5 GB/s); at 8
// rows each weight costs 8 FMAs, so two cores are near their FMA rate. (The axpy form over
// [K, N] rows measured 5-10 GB/s: each FMA then needs a broadcast.) Blocks of wt rows are
// the work items, shared as above.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
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
  const float* s1;  // the shared experts' SwiGLU, run on every token as one more work item
  const float* s3;
  const float* s2;
  int64_t K, D, F, Fs;
  std::vector<int32_t> expert;  // the distinct chosen experts, ascending
  std::vector<int64_t> start;   // copies of expert[g]: order[start[g] .. start[g + 1])
  std::vector<int64_t> order;   // copy ids n * K + j, sorted by expert
  std::vector<int64_t> token;   // order[i] / K: the token of each sorted copy
  std::vector<int64_t> iota;    // 0 .. N-1: the shared experts' rows
  std::vector<float> ys;        // [N * K, D]: each copy's expert output
  std::vector<float> shared;    // [N, D]: the shared experts' output
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// rows of x (tokens token[0..rows)) through the SwiGLU w2^T (silu(w1^T x) * w3^T x), with
// w1 and w3 [D, F] and w2 [F, D]; row r's output goes to out + slot[r] * D.
void Swiglu(const Plan& p, const float* __restrict w1, const float* __restrict w3,
            const float* __restrict w2, int64_t F, int64_t rows, const int64_t* token,
            const int64_t* slot, float* out) {
  const int64_t D = p.D;
  thread_local std::vector<float> scratch;
  scratch.assign(2 * rows * F, 0.0f);
  float* __restrict h1 = scratch.data();
  float* __restrict h3 = h1 + rows * F;
  for (int64_t d = 0; d < D; ++d) {
    const float* __restrict a = w1 + d * F;
    const float* __restrict b = w3 + d * F;
    for (int64_t r = 0; r < rows; ++r) {
      const float xv = p.x[token[r] * D + d];
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
    float* __restrict y = out + slot[r] * D;
    std::fill(y, y + D, 0.0f);
  }
  for (int64_t f = 0; f < F; ++f) {
    const float* __restrict w = w2 + f * D;
    for (int64_t r = 0; r < rows; ++r) {
      const float hv = h1[r * F + f];
      float* __restrict y = out + slot[r] * D;
      for (int64_t d = 0; d < D; ++d) y[d] += hv * w[d];
    }
  }
}

// Item g < G: the copies of chosen expert g; item G (with shared experts): every token.
void RunItem(Plan& p, int64_t g) {
  const int64_t G = static_cast<int64_t>(p.expert.size());
  if (g == G) {
    const int64_t N = static_cast<int64_t>(p.iota.size());
    Swiglu(p, p.s1, p.s3, p.s2, p.Fs, N, p.iota.data(), p.iota.data(), p.shared.data());
    return;
  }
  const int64_t D = p.D, F = p.F, e = p.expert[g], first = p.start[g];
  Swiglu(p, p.w1 + e * D * F, p.w3 + e * D * F, p.w2 + e * F * D, F, p.start[g + 1] - first,
         p.token.data() + first, p.order.data() + first, p.ys.data());
}

// Item order: the shared experts (every token, the most work) first, so that no worker
// starts them last while the others sit idle; then the chosen experts.
void Work(Plan& p, int64_t n) {
  const int64_t G = static_cast<int64_t>(p.expert.size());
  for (int64_t i = p.next.fetch_add(1); i < n; i = p.next.fetch_add(1)) {
    const int64_t g = n > G ? (i == 0 ? G : i - 1) : i;
    RunItem(p, g);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error GatherSwiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c,
                        ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                        ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> s3,
                        ffi::Buffer<ffi::F32> s2, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), cd = c.dimensions(), id = idx.dimensions();
  auto d1 = w1.dimensions(), d3 = w3.dimensions(), d2 = w2.dimensions();
  auto e1 = s1.dimensions(), e3 = s3.dimensions(), e2 = s2.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || id.size() != 2 || d1.size() != 3 || d3.size() != 3 ||
      d2.size() != 3)
    return ffi::Error::InvalidArgument("gather_swiglu: x, c, idx must be 2-D and w1, w3, w2 3-D");
  const int64_t N = xd[0], D = xd[1], K = id[1], E = d1[0], F = d1[2];
  if (cd[0] != N || cd[1] != K || id[0] != N || d1[1] != D || d3[0] != E || d3[1] != D ||
      d3[2] != F || d2[0] != E || d2[1] != F || d2[2] != D)
    return ffi::Error::InvalidArgument("gather_swiglu: shapes disagree (x [N,D], c and idx [N,K], "
                                       "w1 and w3 [E,D,F], w2 [E,F,D])");
  if (e1.size() != 2 || e3.size() != 2 || e2.size() != 2 || e1[0] != D || e3[0] != D || e2[1] != D ||
      e3[1] != e1[1] || e2[0] != e1[1])
    return ffi::Error::InvalidArgument("gather_swiglu: the shared experts must be s1 and s3 [D,Fs], "
                                       "s2 [Fs,D] (Fs = 0: none)");
  const int64_t Fs = e1[1];
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
  p.s1 = s1.typed_data();
  p.s3 = s3.typed_data();
  p.s2 = s2.typed_data();
  p.Fs = Fs;
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
  p.token.resize(N * K);
  for (int64_t i = 0; i < N * K; ++i) p.token[i] = p.order[i] / K;
  p.ys.resize(N * K * D);
  if (Fs > 0) {
    p.iota.resize(N);
    for (int64_t n = 0; n < N; ++n) p.iota[n] = n;
    p.shared.resize(N * D);
  }

  const int64_t items = static_cast<int64_t>(p.expert.size()) + (Fs > 0 && N > 0 ? 1 : 0);
  // Helpers hold the plan: one that starts after the work is gone touches nothing freed.
  // With the calling thread, as many workers as the pool has threads (one more, on a
  // 2-core machine, made batch-1 calls about 12% slower: three threads on two cores).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([plan, items] { Work(*plan, items); });
  Work(p, items);
  while (p.done.load(std::memory_order_acquire) < items) std::this_thread::yield();

  const float* cw = c.typed_data();
  float* out = y->typed_data();
  for (int64_t n = 0; n < N; ++n) {
    float* o = out + n * D;
    if (Fs > 0)
      std::copy(p.shared.data() + n * D, p.shared.data() + (n + 1) * D, o);
    else
      std::fill(o, o + D, 0.0f);
    for (int64_t j = 0; j < K; ++j) {
      const float w = cw[n * K + j];
      const float* s = p.ys.data() + (n * K + j) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * s[d];
    }
  }
  return ffi::Error::Success();
}

// ---- DsjaxRowsDot ----

typedef float V8 __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum8(V8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// y[m + r, n[j]] = x[m + r, :] . wt[n[j], :] for r < MR, j < NR.
template <int MR, int NR>
inline void DotTile(const float* __restrict x, const float* __restrict wt, float* __restrict y, int64_t K,
                    int64_t N, int64_t m, const int64_t* n) {
  V8 acc[MR][NR] = {};
  const float* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = wt + n[j] * K;
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    V8 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = Load8(w[j] + k);
    for (int r = 0; r < MR; ++r) {
      const V8 xv = Load8(x + (m + r) * K + k);
      for (int j = 0; j < NR; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) {
      float s = Sum8(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) s += x[(m + r) * K + k] * w[j][k];
      y[(m + r) * N + n[j]] = s;
    }
}

constexpr int64_t kRowsNR = 4;

// Every x row against wt rows [n0, n1). A tile's NR wt rows come from NR segments of the
// range, one each: NR streams from memory at once. (Adjacent rows, one stream, read a
// cold [8, 512] x [512, 16384] at 12 GB/s on two cores against 17 GB/s this way.)
template <int NR>
void DotRows(const float* x, const float* wt, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t seg = (n1 - n0) / NR;
  int64_t n[NR];
  for (int64_t i = 0; i < seg; ++i) {
    for (int j = 0; j < NR; ++j) n[j] = n0 + j * seg + i;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) DotTile<2, NR>(x, wt, y, K, N, m, n);
    if (m < M) DotTile<1, NR>(x, wt, y, K, N, m, n);
  }
  for (int64_t r = n0 + NR * seg; r < n1; ++r)
    for (int64_t m = 0; m < M; ++m) DotTile<1, 1>(x, wt, y, K, N, m, &r);
}

struct RowsPlan {
  const float* x;
  const float* wt;
  float* y;
  int64_t M, K, N, block, items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void RowsWork(RowsPlan& p) {
  for (int64_t i = p.next.fetch_add(1); i < p.items; i = p.next.fetch_add(1)) {
    const int64_t n0 = i * p.block;
    DotRows<kRowsNR>(p.x, p.wt, p.y, p.M, p.K, p.N, n0, std::min(n0 + p.block, p.N));
    p.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error RowsDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wt,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wt.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("rows_dot: x [M,K] and wt [N,K] must be 2-D");
  if (xd[1] != wd[1])
    return ffi::Error::InvalidArgument("rows_dot: x [M,K] and wt [N,K] disagree on K");
  auto plan = std::make_shared<RowsPlan>();
  RowsPlan& p = *plan;
  p.x = x.typed_data();
  p.wt = wt.typed_data();
  p.y = y->typed_data();
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[0];
  // About 4 blocks per worker (balance), each a multiple of the tile's 4 rows and at least
  // 64 KB of weights (a helper's wake-up costs more than a smaller block's work).
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t min_rows = std::max<int64_t>(kRowsNR, (16384 / std::max<int64_t>(p.K, 1)) / kRowsNR * kRowsNR);
  int64_t block = (p.N + 4 * workers - 1) / (4 * workers);
  block = std::max(min_rows, (block + kRowsNR - 1) / kRowsNR * kRowsNR);
  p.block = block;
  p.items = (p.N + block - 1) / block;
  if (p.M == 0 || p.items == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(workers - 1, p.items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([plan] { RowsWork(*plan); });
  RowsWork(p);
  while (p.done.load(std::memory_order_acquire) < p.items) std::this_thread::yield();
  return ffi::Error::Success();
}


// ---- DsjaxBlockedSwiglu (forward and backward) ----
//
// The blocked dispatch's routed experts (dsjax/moe.py:experts_blocked) for training and
// prefill: token copies sorted by expert, each expert's rows padded to whole blocks, so
// expert e holds rows [first[e] * b, (first[e] + count[e]) * b) of xs [P, D]. XLA:CPU runs
// them as a loop of small dots, each split over the threads; here each expert is one work
// item, its rows and weights stay in one core's cache, and the products run through the
// packed, register-tiled GEMM below. On `small`'s experts (2048 tokens, two cores):
// AVX-512 (Zen 4), XLA 86-100 GFLOP/s, this kernel 170-196 (before packing); AVX2 (Zen 3),
// XLA 93 forward and 76 forward + backward, this kernel 112-117 and 109-115, where XLA's
// own [2048, 2048] matmul gives 122.

typedef float V16 __attribute__((vector_size(64)));

inline V16 Load16(const float* p) {
  V16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store16(float* p, V16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// The GEMM's register tile follows the vector registers the build targets (-march=native):
// AVX-512 has 32 of 16 floats, a tile of 12 rows by 2 vectors (24 accumulators); AVX2 and
// SSE have 16 registers (of 8 and 4 floats), a tile of 6 rows by 2 (12 accumulators). (The
// AVX-512 tile built for AVX2 spills its accumulators on every step: 3 GFLOP/s where XLA
// gives 93.)
#if defined(__AVX512F__)
constexpr int kLanes = 16, kMR = 12;
#elif defined(__AVX__)
constexpr int kLanes = 8, kMR = 6;
#else
constexpr int kLanes = 4, kMR = 6;
#endif
constexpr int64_t kNR = 2 * kLanes;  // columns of a register tile and of a packed panel of b
typedef float VW __attribute__((vector_size(4 * kLanes)));

inline VW LoadW(const float* p) {
  VW v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreW(float* p, VW v) { __builtin_memcpy(p, &v, sizeof(v)); }

// c[MR, kLanes * NV] (+)= A(MR, K) b(K, kLanes * NV), both packed: A's column k at
// a + k * MR, b's row k at b + k * kNR. MR x NV accumulators in registers, one broadcast
// of A per row and step.
template <int MR, int NV>
inline void Micro(const float* __restrict a, const float* __restrict b, float* __restrict c, int64_t sc,
                  int64_t K, bool acc) {
  VW t[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) t[r][v] = acc ? LoadW(c + r * sc + kLanes * v) : VW{};
  for (int64_t k = 0; k < K; ++k) {
    VW bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = LoadW(b + k * kNR + kLanes * v);
    const float* ak = a + k * MR;
    for (int r = 0; r < MR; ++r) {
      const float s = ak[r];
      for (int v = 0; v < NV; ++v) t[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) StoreW(c + r * sc + kLanes * v, t[r][v]);
}

// The row panels of an M-row block: kMR rows at a time, then 2, then 1.
template <typename Fn>
inline void RowPanels(int64_t M, Fn fn) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) fn(i, kMR);
  for (; i + 2 <= M; i += 2) fn(i, 2);
  for (; i < M; ++i) fn(i, 1);
}

template <int NV>
inline void Panel(const float* pa, const float* pb, float* c, int64_t sc, int64_t M, int64_t K, bool acc) {
  RowPanels(M, [&](int64_t i, int mr) {
    const float* a = pa + i * K;
    if (mr == kMR)
      Micro<kMR, NV>(a, pb, c + i * sc, sc, K, acc);
    else if (mr == 2)
      Micro<2, NV>(a, pb, c + i * sc, sc, K, acc);
    else
      Micro<1, NV>(a, pb, c + i * sc, sc, K, acc);
  });
}

// c [M, N] (row stride sc) = (acc ? c : 0) + A(M, K) B(K, N), A(i, k) = a[i * sai + k * sak]
// and B(k, n) = b[k * sbk + n * sbn] (each row-major or transposed). K in chunks of KC: the
// chunk's A is copied into row panels ([kc, mr] each, contiguous), then each kNR-column
// (then kLanes-column) panel of b into a contiguous [kc, kNR] buffer, and every row panel
// runs against it. Read in place, the rows of b and of a transposed A (1-2 KB apart) fall
// into a few of L1's sets and evict each other; packed, a transposed operand costs no
// copy of its own. Columns past the last whole vector one at a time.
void Gemm(const float* a, int64_t sai, int64_t sak, const float* b, int64_t sbk, int64_t sbn, float* c,
          int64_t sc, int64_t M, int64_t N, int64_t K, bool acc) {
  if (K == 0) {
    if (!acc)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * sc, c + i * sc + N, 0.0f);
    return;
  }
  constexpr int64_t KC = 256;
  thread_local std::vector<float> packed_a, packed_b;
  packed_a.resize(M * std::min(KC, K));
  packed_b.resize(KC * kNR);
  float* pa = packed_a.data();
  float* pb = packed_b.data();
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const bool add = acc || k0 > 0;
    const float* ak = a + k0 * sak;
    const float* bk = b + k0 * sbk;
    // B's columns [j, j + w) of this chunk into the [kc, kNR] buffer.
    auto pack_b = [&](int64_t j, int64_t w) {
      if (sbn == 1) {
        for (int64_t k = 0; k < kc; ++k) std::copy(bk + k * sbk + j, bk + k * sbk + j + w, pb + k * kNR);
      } else {
        for (int64_t n = 0; n < w; ++n)
          for (int64_t k = 0; k < kc; ++k) pb[k * kNR + n] = bk[k * sbk + (j + n) * sbn];
      }
    };
    RowPanels(M, [&](int64_t i, int mr) {
      float* dst = pa + i * kc;
      if (sak == 1) {  // A row-major: read each row along k
        for (int r = 0; r < mr; ++r) {
          const float* src = ak + (i + r) * sai;
          for (int64_t k = 0; k < kc; ++k) dst[k * mr + r] = src[k];
        }
      } else {  // A transposed: read each column along i
        for (int64_t k = 0; k < kc; ++k)
          for (int r = 0; r < mr; ++r) dst[k * mr + r] = ak[k * sak + (i + r) * sai];
      }
    });
    int64_t j = 0;
    for (; j + kNR <= N; j += kNR) {
      pack_b(j, kNR);
      Panel<2>(pa, pb, c + j, sc, M, kc, add);
    }
    for (; j + kLanes <= N; j += kLanes) {
      pack_b(j, kLanes);
      Panel<1>(pa, pb, c + j, sc, M, kc, add);
    }
    for (; j < N; ++j)
      for (int64_t i = 0; i < M; ++i) {
        float s = add ? c[i * sc + j] : 0.0f;
        for (int64_t k = 0; k < kc; ++k) s += ak[i * sai + k * sak] * bk[k * sbk + j * sbn];
        c[i * sc + j] = s;
      }
  }
}

typedef int32_t V16i __attribute__((vector_size(64)));

// exp on 16 lanes: 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6
// Taylor polynomial (relative error about 2e-7, float32's rounding); x clamped to
// [-87, 88], where 2^n stays a normal float. (std::exp per element took most of the
// experts' time: the compiler does not vectorize it.)
template <typename VF, typename VI>
inline VF ExpV(VF x) {
  const VF hi = VF{} + 88.0f, lo = VF{} - 87.0f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const VF fn = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + (VF{} + 0.5f) - (x < 0 ? VF{} + 1.0f : VF{}), VI), VF);
  const VF r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  VF p = VF{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI n = __builtin_convertvector(fn, VI);
  VF scale;
  const VI bits = (n + 127) << 23;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline V16 Exp16(V16 x) { return ExpV<V16, V16i>(x); }

inline float Sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

inline V16 Sigmoid16(V16 v) { return (V16{} + 1.0f) / ((V16{} + 1.0f) + Exp16(-v)); }

struct BlockedPlan {
  const float *xs, *dys, *a1, *a3, *w1, *w3, *w2;
  float *ys, *o1, *o3, *dxs, *g1, *g3, *g2;
  int64_t P, D, F;
  std::vector<int64_t> expert, row0, rows;  // the experts with rows, the most rows first
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Forward of expert item g: a1 = x W1, a3 = x W3, y = (silu(a1) * a3) W2 on its rows.
void BlockedForward(BlockedPlan& p, int64_t g) {
  const int64_t D = p.D, F = p.F, e = p.expert[g], M = p.rows[g], r0 = p.row0[g];
  const float* x = p.xs + r0 * D;
  float* a1 = p.o1 + r0 * F;
  float* a3 = p.o3 + r0 * F;
  Gemm(x, D, 1, p.w1 + e * D * F, F, 1, a1, F, M, F, D, false);
  Gemm(x, D, 1, p.w3 + e * D * F, F, 1, a3, F, M, F, D, false);
  std::vector<float> h(M * F);
  int64_t i = 0;
  for (; i + 16 <= M * F; i += 16) {
    const V16 v = Load16(a1 + i);
    Store16(h.data() + i, v * Sigmoid16(v) * Load16(a3 + i));
  }
  for (; i < M * F; ++i) h[i] = a1[i] * Sigmoid(a1[i]) * a3[i];
  Gemm(h.data(), F, 1, p.w2 + e * F * D, D, 1, p.ys + r0 * D, D, M, D, F, false);
}

// Backward of expert item g, from the forward's a1, a3 and the output's cotangent dy:
// dh = dy W2^T, da1 = dh a3 silu'(a1), da3 = dh silu(a1), dx = da1 W1^T + da3 W3^T,
// dW1 = x^T da1, dW3 = x^T da3, dW2 = h^T dy (the sums over the expert's rows).
void BlockedBackward(BlockedPlan& p, int64_t g) {
  const int64_t D = p.D, F = p.F, e = p.expert[g], M = p.rows[g], r0 = p.row0[g];
  const float* x = p.xs + r0 * D;
  const float* dy = p.dys + r0 * D;
  const float* a1 = p.a1 + r0 * F;
  const float* a3 = p.a3 + r0 * F;
  std::vector<float> h(M * F), da1(M * F), da3(M * F);
  Gemm(dy, D, 1, p.w2 + e * F * D, 1, D, da1.data(), F, M, F, D, false);  // dh = dy W2^T, into da1
  int64_t i = 0;
  for (; i + 16 <= M * F; i += 16) {
    const V16 a = Load16(a1 + i), b3 = Load16(a3 + i), sig = Sigmoid16(a), silu = a * sig, dh = Load16(da1.data() + i);
    Store16(h.data() + i, silu * b3);
    Store16(da3.data() + i, dh * silu);
    Store16(da1.data() + i, dh * b3 * sig * (1.0f + a * (1.0f - sig)));
  }
  for (; i < M * F; ++i) {
    const float sig = Sigmoid(a1[i]), silu = a1[i] * sig, dh = da1[i];
    h[i] = silu * a3[i];
    da3[i] = dh * silu;
    da1[i] = dh * a3[i] * sig * (1.0f + a1[i] * (1.0f - sig));
  }
  float* dx = p.dxs + r0 * D;
  Gemm(da1.data(), F, 1, p.w1 + e * D * F, 1, F, dx, D, M, D, F, false);  // da1 W1^T
  Gemm(da3.data(), F, 1, p.w3 + e * D * F, 1, F, dx, D, M, D, F, true);
  // x^T as A: A(i = d, k = row) = x[row * D + d].
  Gemm(x, 1, D, da1.data(), F, 1, p.g1 + e * D * F, F, D, F, M, false);
  Gemm(x, 1, D, da3.data(), F, 1, p.g3 + e * D * F, F, D, F, M, false);
  Gemm(h.data(), 1, F, dy, D, 1, p.g2 + e * F * D, D, F, D, M, false);
}

template <bool kBackward>
void BlockedWork(BlockedPlan& p) {
  const int64_t n = static_cast<int64_t>(p.expert.size());
  for (int64_t i = p.next.fetch_add(1); i < n; i = p.next.fetch_add(1)) {
    if (kBackward)
      BlockedBackward(p, i);
    else
      BlockedForward(p, i);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

// Checks the shapes and the block layout, fills the plan's expert items (the most rows
// first, so no worker starts a large expert last) and returns "" or the problem.
std::string PlanBlocks(BlockedPlan& p, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> d1,
                       ffi::Span<const int64_t> d3, ffi::Span<const int64_t> d2, const int32_t* first,
                       const int32_t* count, int64_t E_first, int64_t E_count) {
  if (xd.size() != 3 || d1.size() != 3 || d3.size() != 3 || d2.size() != 3)
    return "xs must be [nb, b, D] and w1, w3, w2 3-D";
  const int64_t nb = xd[0], b = xd[1], D = xd[2], E = d1[0], F = d1[2];
  if (d1[1] != D || d3[0] != E || d3[1] != D || d3[2] != F || d2[0] != E || d2[1] != F || d2[2] != D ||
      E_first != E || E_count != E)
    return "shapes disagree (xs [nb,b,D], first and count [E], w1 and w3 [E,D,F], w2 [E,F,D])";
  p.P = nb * b;
  p.D = D;
  p.F = F;
  std::vector<std::pair<int64_t, int64_t>> order;
  int64_t end = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] < 0 || first[e] < 0 || first[e] + count[e] > nb)
      return "an expert's blocks fall outside xs";
    if (count[e] == 0) continue;
    if (first[e] < end) return "experts' blocks overlap";
    end = first[e] + count[e];
    order.emplace_back(count[e], e);
  }
  std::stable_sort(order.begin(), order.end(), [](auto& l, auto& r) { return l.first > r.first; });
  for (auto& [n, e] : order) {
    p.expert.push_back(e);
    p.row0.push_back(static_cast<int64_t>(first[e]) * b);
    p.rows.push_back(n * b);
  }
  return "";
}

template <bool kBackward>
void RunBlocked(ffi::ThreadPool& pool, std::shared_ptr<BlockedPlan> plan) {
  BlockedPlan& p = *plan;
  const int64_t items = static_cast<int64_t>(p.expert.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([plan] { BlockedWork<kBackward>(*plan); });
  BlockedWork<kBackward>(p);
  while (p.done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// Rows no expert holds (the blocks past the last expert's): zero.
void ZeroUnheld(const BlockedPlan& p, float* out, int64_t width) {
  std::vector<char> held(p.P, 0);
  for (size_t g = 0; g < p.expert.size(); ++g) std::fill(held.begin() + p.row0[g], held.begin() + p.row0[g] + p.rows[g], 1);
  for (int64_t r = 0; r < p.P; ++r)
    if (!held[r]) std::fill(out + r * width, out + (r + 1) * width, 0.0f);
}

ffi::Error BlockedSwigluFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::S32> first,
                            ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                            ffi::Buffer<ffi::F32> w2, ffi::ResultBuffer<ffi::F32> ys,
                            ffi::ResultBuffer<ffi::F32> a1, ffi::ResultBuffer<ffi::F32> a3) {
  auto plan = std::make_shared<BlockedPlan>();
  BlockedPlan& p = *plan;
  std::string err = PlanBlocks(p, xs.dimensions(), w1.dimensions(), w3.dimensions(), w2.dimensions(),
                               first.typed_data(), count.typed_data(), first.element_count(),
                               count.element_count());
  if (!err.empty()) return ffi::Error::InvalidArgument("blocked_swiglu: " + err);
  p.xs = xs.typed_data();
  p.w1 = w1.typed_data();
  p.w3 = w3.typed_data();
  p.w2 = w2.typed_data();
  p.ys = ys->typed_data();
  p.o1 = a1->typed_data();
  p.o3 = a3->typed_data();
  RunBlocked<false>(pool, plan);
  ZeroUnheld(p, p.ys, p.D);
  ZeroUnheld(p, p.o1, p.F);
  ZeroUnheld(p, p.o3, p.F);
  return ffi::Error::Success();
}

ffi::Error BlockedSwigluBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> dys,
                            ffi::Buffer<ffi::F32> a1, ffi::Buffer<ffi::F32> a3, ffi::Buffer<ffi::S32> first,
                            ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> w3,
                            ffi::Buffer<ffi::F32> w2, ffi::ResultBuffer<ffi::F32> dxs,
                            ffi::ResultBuffer<ffi::F32> g1, ffi::ResultBuffer<ffi::F32> g3,
                            ffi::ResultBuffer<ffi::F32> g2) {
  auto plan = std::make_shared<BlockedPlan>();
  BlockedPlan& p = *plan;
  std::string err = PlanBlocks(p, xs.dimensions(), w1.dimensions(), w3.dimensions(), w2.dimensions(),
                               first.typed_data(), count.typed_data(), first.element_count(),
                               count.element_count());
  if (!err.empty()) return ffi::Error::InvalidArgument("blocked_swiglu_bwd: " + err);
  if (dys.element_count() != p.P * p.D || a1.element_count() != p.P * p.F || a3.element_count() != p.P * p.F)
    return ffi::Error::InvalidArgument("blocked_swiglu_bwd: dys must match xs, a1 and a3 be [nb,b,F]");
  p.xs = xs.typed_data();
  p.dys = dys.typed_data();
  p.a1 = a1.typed_data();
  p.a3 = a3.typed_data();
  p.w1 = w1.typed_data();
  p.w3 = w3.typed_data();
  p.w2 = w2.typed_data();
  p.dxs = dxs->typed_data();
  p.g1 = g1->typed_data();
  p.g3 = g3->typed_data();
  p.g2 = g2->typed_data();
  // Experts without rows get zero gradients.
  const int64_t E = w1.dimensions()[0], D = p.D, F = p.F;
  std::vector<char> has(E, 0);
  for (int64_t e : p.expert) has[e] = 1;
  for (int64_t e = 0; e < E; ++e)
    if (!has[e]) {
      std::fill(p.g1 + e * D * F, p.g1 + (e + 1) * D * F, 0.0f);
      std::fill(p.g3 + e * D * F, p.g3 + (e + 1) * D * F, 0.0f);
      std::fill(p.g2 + e * F * D, p.g2 + (e + 1) * F * D, 0.0f);
    }
  RunBlocked<true>(pool, plan);
  ZeroUnheld(p, p.dxs, p.D);
  return ffi::Error::Success();
}


// ---- DsjaxAttention (forward and backward) ----
//
// Softmax attention of training and prefill with a key and value head per query head
// (MLA's expanded form; dsjax/attention.py's blockwise_attention on a CPU in float32):
//   o[b, t, h] = sum_s p[s] v[b, s, h],  p = softmax_s(scale * q[b, t, h] . k[b, s, h]),
// the masked scores set to -1e30 as the dense softmax does. q [B, T, H, K], k [B, S, H, K],
// v [B, S, H, V], mask [B, T, S] (bool), o [B, T, H, V] and lse [B, H, T] (the log-sum-exp
// the backward recomputes the probabilities from). XLA:CPU ran the blockwise form's
// per-block products (contractions of 48 to 192 over [B, H] batches of small matrices) at
// 20-35 GFLOP/s, and the elementwise softmax between them as separate passes. Here each
// (b, h) is one work item, walking its queries in chunks of kAttnRows: the chunk's scores
// [rows, keys] stay in L1/L2, the products run through the packed GEMM above, and keys past
// the last one any row of the chunk sees (a causal mask's upper triangle) are skipped
// (all keys when a row of the chunk sees none, as the dense softmax weighs them alike).
// The backward recomputes each chunk's probabilities from lse and sums the item's dk and
// dv over its chunks (FlashAttention-2's order, one query chunk at a time).

constexpr int64_t kAttnRows = 64;

struct AttnPlan {
  const float *q, *k, *v, *o, *lse, *dout;
  const bool* mask;
  float *out, *lse_out, *dq, *dk, *dv;
  int64_t B, T, S, H, K, V;
  float scale;
  std::vector<int64_t> key_end;  // PlanKeyEnds
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// The last key row t of batch row b sees, or -1 (8 mask bytes at a time from the end).
int64_t LastVisible(const AttnPlan& p, int64_t b, int64_t t) {
  const bool* m = p.mask + (b * p.T + t) * p.S;
  int64_t s = p.S;
  for (; s >= 8; s -= 8) {
    uint64_t word;
    __builtin_memcpy(&word, m + s - 8, 8);
    if (word) break;
  }
  while (s > 0 && !m[s - 1]) --s;
  return s - 1;
}

// For every batch row and query chunk, the keys [0, end) its rows may see: up to the last
// visible one of any row, or all S when a row sees none. The same for every head.
void PlanKeyEnds(AttnPlan& p) {
  const int64_t chunks = (p.T + kAttnRows - 1) / kAttnRows;
  p.key_end.assign(p.B * chunks, 0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t end = 0;
      for (int64_t t = c * kAttnRows; t < std::min(p.T, (c + 1) * kAttnRows); ++t) {
        const int64_t last = LastVisible(p, b, t);
        if (last < 0) {
          end = p.S;
          break;
        }
        end = std::max(end, last + 1);
      }
      p.key_end[b * chunks + c] = end;
    }
}

inline int64_t KeyEnd(const AttnPlan& p, int64_t b, int64_t t0) {
  return p.key_end[b * ((p.T + kAttnRows - 1) / kAttnRows) + t0 / kAttnRows];
}


// A row of a chunk's scores, in place: scaled where the mask attends, -1e30 elsewhere.
typedef int32_t VWi __attribute__((vector_size(4 * kLanes)));
typedef uint8_t VWb __attribute__((vector_size(kLanes)));

// A row of a chunk's scores, in place: scaled where the mask attends, -1e30 elsewhere.
inline void MaskScale(const AttnPlan& p, const bool* m, float* row, int64_t ke) {
  int64_t s = 0;
  const VW neg = VW{} - 1e30f;
  for (; s + kLanes <= ke; s += kLanes) {
    VWb mb;
    __builtin_memcpy(&mb, m + s, sizeof(mb));
    const VWi keep = __builtin_convertvector(mb, VWi) != 0;
    StoreW(row + s, keep ? LoadW(row + s) * p.scale : neg);
  }
  for (; s < ke; ++s) row[s] = m[s] ? row[s] * p.scale : -1e30f;
}

// exp(x - sub) over a row in place; returns the row's sum.
inline float ExpRow(float* row, int64_t ke, float sub) {
  VW acc = {};
  int64_t s = 0;
  for (; s + kLanes <= ke; s += kLanes) {
    const VW e = ExpV<VW, VWi>(LoadW(row + s) - sub);
    StoreW(row + s, e);
    acc += e;
  }
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += acc[i];
  for (; s < ke; ++s) {
    row[s] = std::exp(row[s] - sub);
    sum += row[s];
  }
  return sum;
}

inline float RowMax(const float* row, int64_t ke) {
  VW acc = VW{} - 3e38f;
  int64_t s = 0;
  for (; s + kLanes <= ke; s += kLanes) {
    const VW x = LoadW(row + s);
    acc = x > acc ? x : acc;
  }
  float mx = -3e38f;
  for (int i = 0; i < kLanes; ++i) mx = std::max(mx, acc[i]);
  for (; s < ke; ++s) mx = std::max(mx, row[s]);
  return mx;
}

// The item's keys and values [S, K] and [S, V], contiguous (in the arrays, rows H heads
// apart): the GEMMs' packing then reads them from L2 instead of missing on every row.
void ItemRows(const float* src, int64_t rows, int64_t width, int64_t stride, std::vector<float>& dst) {
  dst.resize(rows * width);
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * stride, src + r * stride + width, dst.data() + r * width);
}

void AttnForward(AttnPlan& p, int64_t item) {
  const int64_t b = item / p.H, h = item % p.H, T = p.T, S = p.S, H = p.H, K = p.K, V = p.V;
  thread_local std::vector<float> kbuf, vbuf;
  ItemRows(p.k + (b * S * H + h) * K, S, K, H * K, kbuf);
  ItemRows(p.v + (b * S * H + h) * V, S, V, H * V, vbuf);
  const float* kb = kbuf.data();
  const float* vb = vbuf.data();
  thread_local std::vector<float> scores;
  float inv[kAttnRows];
  for (int64_t t0 = 0; t0 < T; t0 += kAttnRows) {
    const int64_t n = std::min(kAttnRows, T - t0), ke = KeyEnd(p, b, t0);
    scores.resize(n * ke);
    float* sc = scores.data();
    const float* qc = p.q + ((b * T + t0) * H + h) * K;
    Gemm(qc, H * K, 1, kb, 1, K, sc, ke, n, ke, K, false);  // q k^T
    for (int64_t r = 0; r < n; ++r) {
      float* row = sc + r * ke;
      MaskScale(p, p.mask + (b * T + t0 + r) * S, row, ke);
      const float mx = RowMax(row, ke);
      const float l = ExpRow(row, ke, mx);
      inv[r] = 1.0f / l;
      p.lse_out[(b * H + h) * T + t0 + r] = mx + std::log(l);
    }
    float* oc = p.out + ((b * T + t0) * H + h) * V;
    Gemm(sc, ke, 1, vb, V, 1, oc, H * V, n, V, ke, false);  // exp(s - max) v, then / the row's sum
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < V; ++c) oc[r * H * V + c] *= inv[r];
  }
}

void AttnBackward(AttnPlan& p, int64_t item) {
  const int64_t b = item / p.H, h = item % p.H, T = p.T, S = p.S, H = p.H, K = p.K, V = p.V;
  thread_local std::vector<float> kbuf, vbuf;
  ItemRows(p.k + (b * S * H + h) * K, S, K, H * K, kbuf);
  ItemRows(p.v + (b * S * H + h) * V, S, V, H * V, vbuf);
  const float* kb = kbuf.data();
  const float* vb = vbuf.data();
  thread_local std::vector<float> probs, dscores, dk, dv;
  dk.assign(S * K, 0.0f);
  dv.assign(S * V, 0.0f);
  int64_t touched = 0;  // keys [0, touched) got a gradient
  for (int64_t t0 = 0; t0 < T; t0 += kAttnRows) {
    const int64_t n = std::min(kAttnRows, T - t0), ke = KeyEnd(p, b, t0);
    touched = std::max(touched, ke);
    probs.resize(n * ke);
    dscores.resize(n * ke);
    float* pr = probs.data();
    float* ds = dscores.data();
    const float* qc = p.q + ((b * T + t0) * H + h) * K;
    const float* doc = p.dout + ((b * T + t0) * H + h) * V;
    const float* oc = p.o + ((b * T + t0) * H + h) * V;
    Gemm(qc, H * K, 1, kb, 1, K, pr, ke, n, ke, K, false);     // q k^T
    Gemm(doc, H * V, 1, vb, 1, V, ds, ke, n, ke, V, false);    // do v^T
    for (int64_t r = 0; r < n; ++r) {
      float* row = pr + r * ke;
      MaskScale(p, p.mask + (b * T + t0 + r) * S, row, ke);
      ExpRow(row, ke, p.lse[(b * H + h) * T + t0 + r]);
      float delta = 0.0f;  // do . o
      for (int64_t c = 0; c < V; ++c) delta += doc[r * H * V + c] * oc[r * H * V + c];
      float* drow = ds + r * ke;
      for (int64_t s = 0; s < ke; ++s) drow[s] = row[s] * (drow[s] - delta);
    }
    Gemm(pr, 1, ke, doc, H * V, 1, dv.data(), V, ke, V, n, true);  // dv += p^T do
    Gemm(ds, 1, ke, qc, H * K, 1, dk.data(), K, ke, K, n, true);   // dk += ds^T q (scaled below)
    float* dqc = p.dq + ((b * T + t0) * H + h) * K;
    Gemm(ds, ke, 1, kb, K, 1, dqc, H * K, n, K, ke, false);    // dq = ds k (scaled here)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < K; ++c) dqc[r * H * K + c] *= p.scale;
  }
  for (int64_t s = 0; s < S; ++s) {
    float* dks = p.dk + ((b * S + s) * H + h) * K;
    float* dvs = p.dv + ((b * S + s) * H + h) * V;
    for (int64_t c = 0; c < K; ++c) dks[c] = s < touched ? dk[s * K + c] * p.scale : 0.0f;
    for (int64_t c = 0; c < V; ++c) dvs[c] = s < touched ? dv[s * V + c] : 0.0f;
  }
}

template <bool kBackward>
void AttnWork(AttnPlan& p, int64_t items) {
  for (int64_t i = p.next.fetch_add(1); i < items; i = p.next.fetch_add(1)) {
    if (kBackward)
      AttnBackward(p, i);
    else
      AttnForward(p, i);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

template <bool kBackward>
void RunAttn(ffi::ThreadPool& pool, std::shared_ptr<AttnPlan> plan) {
  AttnPlan& p = *plan;
  const int64_t items = p.B * p.H;
  if (items == 0 || p.T == 0) return;
  PlanKeyEnds(p);
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([plan, items] { AttnWork<kBackward>(*plan, items); });
  AttnWork<kBackward>(p, items);
  while (p.done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

std::string PlanAttn(AttnPlan& p, ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                     ffi::Span<const int64_t> vd, ffi::Span<const int64_t> md) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3)
    return "q, k, v must be 4-D and mask 3-D";
  p.B = qd[0], p.T = qd[1], p.H = qd[2], p.K = qd[3], p.S = kd[1], p.V = vd[3];
  if (kd[0] != p.B || kd[2] != p.H || kd[3] != p.K || vd[0] != p.B || vd[1] != p.S || vd[2] != p.H ||
      md[0] != p.B || md[1] != p.T || md[2] != p.S)
    return "shapes disagree (q [B,T,H,K], k [B,S,H,K], v [B,S,H,V], mask [B,T,S])";
  if (p.S == 0 && p.T > 0) return "no keys";
  return "";
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                        ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  auto plan = std::make_shared<AttnPlan>();
  AttnPlan& p = *plan;
  std::string err = PlanAttn(p, q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions());
  if (!err.empty()) return ffi::Error::InvalidArgument("attention: " + err);
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.mask = mask.typed_data();
  p.scale = scale;
  p.out = o->typed_data();
  p.lse_out = lse->typed_data();
  RunAttn<false>(pool, plan);
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> o,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  auto plan = std::make_shared<AttnPlan>();
  AttnPlan& p = *plan;
  std::string err = PlanAttn(p, q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions());
  if (!err.empty()) return ffi::Error::InvalidArgument("attention_bwd: " + err);
  if (o.element_count() != p.B * p.T * p.H * p.V || dout.element_count() != p.B * p.T * p.H * p.V ||
      lse.element_count() != p.B * p.H * p.T)
    return ffi::Error::InvalidArgument("attention_bwd: o and do must be [B,T,H,V] and lse [B,H,T]");
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.mask = mask.typed_data();
  p.o = o.typed_data();
  p.lse = lse.typed_data();
  p.dout = dout.typed_data();
  p.scale = scale;
  p.dq = dq->typed_data();
  p.dk = dk->typed_data();
  p.dv = dv->typed_data();
  RunAttn<true>(pool, plan);
  return ffi::Error::Success();
}

// ---- DsjaxLatentAttention ----
//
// Absorbed MLA attention of a decode step (dsjax/mla.py:MLA._latent_attention): every query
// head attends to one shared key head [c_kv, k_pe] and value head c_kv,
//   o[b, t, h] = sum_s p[s] c_kv[b, s],  p = softmax_s(scale * (q_lat[b, t, h] . c_kv[b, s]
//                                                              + q_pe[b, t, h] . k_pe[b, s]))
// over the slots s <= pos[b, t] (the decode mask; a row with pos < 0 sees every slot, as
// the dense softmax of an all-masked row does), then W_UV per head: out[b, t, h] =
// o[b, t, h] W[h][:, v0:]. q_lat [B, T, H, C], q_pe [B, T, H, R], c_kv [B, S, C], k_pe
// [B, S, R], pos [B, T] int32, W [H, C, Wd] (wkv_b head-major, W_UV its columns from
// v0), out [B, T, H, Wd - v0], float32. (Folding W_UV into the output projection instead
// reads H x C x D weights a step where W_UV and W_O hold H x V x (C + D): 1.6x on
// `small`, 3.7x on DeepSeek-V3.) XLA:CPU ran
// this as about a dozen ops, two of them batched dots of [H, C] x [C, S] at a few GFLOP/s;
// here each (b, t) is one work item: a cache row is read once for all heads (scores), and
// once more to mix (outputs), with the H heads' accumulators in L1.

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  V8 acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += Load8(a + i) * Load8(b + i);
    acc1 += Load8(a + i + 8) * Load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += Load8(a + i) * Load8(b + i);
  float s = Sum8(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct LatentPlan {
  const float *q_lat, *q_pe, *c_kv, *k_pe, *w;
  const int32_t* pos;
  float* o;
  int64_t B, T, H, S, C, R, Wd, v0, V;
  float scale;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void LatentItem(const LatentPlan& p, int64_t item) {
  const int64_t b = item / p.T, H = p.H, C = p.C, R = p.R;
  const int64_t limit = p.pos[item];
  const int64_t n = limit < 0 ? p.S : std::min<int64_t>(limit + 1, p.S);
  const float* ql = p.q_lat + item * H * C;
  const float* qr = p.q_pe + item * H * R;
  const float* ckv = p.c_kv + b * p.S * C;
  const float* kpe = p.k_pe + b * p.S * R;
  thread_local std::vector<float> o_lat;
  o_lat.assign(H * C, 0.0f);
  float* out = o_lat.data();
  thread_local std::vector<float> scores;
  scores.resize(H * n);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t h = 0; h < H; ++h)
      scores[h * n + s] = (Dot(ql + h * C, ckv + s * C, C) + Dot(qr + h * R, kpe + s * R, R)) * p.scale;
  if (limit < 0)  // every slot masked: the dense softmax weighs them all alike
    std::fill(scores.begin(), scores.end(), 0.0f);
  for (int64_t h = 0; n > 0 && h < H; ++h) {  // softmax (an empty cache, n = 0: o stays 0)
    float* sc = scores.data() + h * n;
    const float inv = 1.0f / ExpRow(sc, n, RowMax(sc, n));
    for (int64_t s = 0; s < n; ++s) sc[s] *= inv;
  }
  for (int64_t s = 0; s < n; ++s) {
    const float* __restrict row = ckv + s * C;
    for (int64_t h = 0; h < H; ++h) {
      const float w = scores[h * n + s];
      float* __restrict acc = out + h * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += w * row[c];
    }
  }
  const int64_t V = p.V;
  for (int64_t h = 0; h < H; ++h) {  // W_UV
    float* __restrict y = p.o + (item * H + h) * V;
    std::fill(y, y + V, 0.0f);
    const float* wh = p.w + h * C * p.Wd + p.v0;
    for (int64_t c = 0; c < C; ++c) {
      const float a = out[h * C + c];
      const float* __restrict wr = wh + c * p.Wd;
      for (int64_t v = 0; v < V; ++v) y[v] += a * wr[v];
    }
  }
}

void LatentWork(LatentPlan& p, int64_t items) {
  for (int64_t i = p.next.fetch_add(1); i < items; i = p.next.fetch_add(1)) {
    LatentItem(p, i);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error LatentAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_lat, ffi::Buffer<ffi::F32> q_pe,
                           ffi::Buffer<ffi::F32> c_kv, ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::S32> pos,
                           ffi::Buffer<ffi::F32> w, float scale, int64_t v0, ffi::ResultBuffer<ffi::F32> o) {
  auto qd = q_lat.dimensions(), rd = q_pe.dimensions(), cd = c_kv.dimensions(), kd = k_pe.dimensions(),
       pd = pos.dimensions(), wd = w.dimensions(), od = o->dimensions();
  if (qd.size() != 4 || rd.size() != 4 || cd.size() != 3 || kd.size() != 3 || pd.size() != 2 || wd.size() != 3)
    return ffi::Error::InvalidArgument("latent_attention: q_lat and q_pe must be 4-D, c_kv, k_pe and w 3-D, pos 2-D");
  const int64_t B = qd[0], T = qd[1], H = qd[2], C = qd[3], S = cd[1], R = kd[2];
  if (rd[0] != B || rd[1] != T || rd[2] != H || rd[3] != R || cd[0] != B || cd[2] != C || kd[0] != B ||
      kd[1] != S || pd[0] != B || pd[1] != T || wd[0] != H || wd[1] != C || v0 < 0 || v0 > wd[2] ||
      od[3] != wd[2] - v0)
    return ffi::Error::InvalidArgument("latent_attention: shapes disagree (q_lat [B,T,H,C], q_pe [B,T,H,R], "
                                       "c_kv [B,S,C], k_pe [B,S,R], pos [B,T], w [H,C,W], out [B,T,H,W-v0])");
  auto plan = std::make_shared<LatentPlan>();
  LatentPlan& p = *plan;
  p.q_lat = q_lat.typed_data();
  p.q_pe = q_pe.typed_data();
  p.c_kv = c_kv.typed_data();
  p.k_pe = k_pe.typed_data();
  p.pos = pos.typed_data();
  p.w = w.typed_data();
  p.o = o->typed_data();
  p.B = B, p.T = T, p.H = H, p.S = S, p.C = C, p.R = R, p.Wd = wd[2], p.v0 = v0, p.V = wd[2] - v0;
  p.scale = scale;
  const int64_t items = B * T;
  if (items == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([plan, items] { LatentWork(*plan, items); });
  LatentWork(p, items);
  while (p.done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  return ffi::Error::Success();
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxRowsDot, RowsDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxGatherSwiglu, GatherSwiglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxBlockedSwigluFwd, BlockedSwigluFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxBlockedSwigluBwd, BlockedSwigluBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxLatentAttention, LatentAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("v0")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjaxAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
