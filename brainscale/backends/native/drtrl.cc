// The native CPU D-RTRL kernel (XLA FFI): one pass over a compact param-dim trace.
//
// Built on first use by brainscale/backends/native/build.py with the machine's C++ compiler
// against the XLA FFI headers that ship with jaxlib. Layout (the Pallas kernel's, see
// brainscale/backends/pallas/drtrl.py):
//
//   eps   (B, I, O, k)   float32 or bfloat16, the trace (stacked states last)
//   J     (B, O, k, k)   J[b,n,i,j] = dh_{n,i}^t / dh_{n,j}^{t-1}
//   df    (B, O, k)      dh_{n,i}^t / dy_n^t
//   x     (B, I)         the op input
//   c     (I, O)         dW_eff/dW, read when has_c (else a (1, 1) placeholder)
//   delta (B, O, k)      dL^t / dh_{n,i}^t
//   gacc  (I, O)         running weight gradient, read when accumulate
//
//   update:  eps'[b,a,n,i] = sum_j J[b,n,i,j] eps[b,a,n,j] + x[b,a] c[a,n] df[b,n,i]
//   grad:    g[a,n] = (gacc[a,n] +) sum_b sum_i delta[b,n,i] eps'[b,a,n,i]
//
// Four D-RTRL handlers: step (update + grad from the new values while they are in
// registers: the trace is read once and written once, in place when the caller aliases eps
// to the output), update only, grad only, and decay-add, eps' = J eps + cur with a full
// current term (a window's advance, brainscale/backends/drtrl_window.py). Work is split over
// rows a of the input dimension (each row of g has one owner, so the batch sum needs no
// atomics and is deterministic) and run on XLA's intra-op thread pool; the calling thread
// takes rows too. A bfloat16 trace is read into float32, updated and contracted in float32
// (the contraction reads the new values before rounding) and stored rounded to nearest even.
//
// A fifth handler, outer-accumulate, adds the rank-R product x^T s (times c) into a weight
// gradient in place: the per-step ES-D-RTRL gradient of a dense MatMulOp
// (brainscale/backends/native/rules.py, NativeIORule); a sixth does that for several
// weights in one call (all of a step's).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Args {
  const void* eps;             // float or bf16 (uint16_t), see `bf16`
  const float* J;
  const float* df;
  const float* x;
  const float* c;
  const float* delta;
  const float* gacc;
  void* eps_out;
  float* g_out;
  int64_t B, I, O, k;
  bool update, grad, has_c, accumulate;
  const float* cur = nullptr;   // decay-add: the current term (B, I, O, k) replaces x c df
  bool bf16 = false;           // the trace's storage: bfloat16 (else float32)
};

// Trace storage: float32, or bfloat16 kept as uint16_t (load: the high half of a float32;
// store: round to nearest even, NaN kept quiet).
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) {
  const uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = uint16_t((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = uint16_t(u >> 16);
}

// Initialise the gradient rows [a0, a1) of g (copy of gacc, or zeros).
void init_rows(const Args& a, int64_t a0, int64_t a1) {
  if (!a.grad) return;
  const int64_t O = a.O;
  float* g = a.g_out + a0 * O;
  const float* src = a.gacc + a0 * O;
  if (!a.accumulate) {
    std::memset(g, 0, sizeof(float) * (a1 - a0) * O);
  } else if (src != g) {
    std::memcpy(g, src, sizeof(float) * (a1 - a0) * O);
  }
}

// One (example, input row) of the trace: O neurons of K states.
//
// `e` and `eo` are the same memory when the update runs in place. They are still declared
// __restrict so that the loop vectorises without overlap checks; that is sound here
// because every store eo[n*K+i] depends on all loads e[n*K+j] of the same neuron and on no
// load of another neuron, so no reordering the compiler may do can move a load of a
// neuron after a store to it.
template <int K, bool C, bool G, typename T>
inline void row_update(const T* __restrict e, T* __restrict eo,
                       const float* __restrict J, const float* __restrict df,
                       const float* __restrict crow, float xa,
                       const float* __restrict d, float* __restrict g, int64_t O) {
  for (int64_t n = 0; n < O; ++n) {
    float z[K];
    for (int j = 0; j < K; ++j) z[j] = ld(e, n * K + j);
    const float u = C ? xa * crow[n] : xa;
    float s = 0.f;
    for (int i = 0; i < K; ++i) {
      float v = u * df[n * K + i];
      for (int j = 0; j < K; ++j) v += J[(n * K + i) * K + j] * z[j];
      st(eo, n * K + i, v);
      if (G) s += d[n * K + i] * v;
    }
    if (G) g[n] += s;
  }
}

// Decay-add (a window's advance, drtrl_window.py): eo = J z + cur, per neuron; the same
// in-place argument as row_update.
template <int K, typename T>
inline void row_decay_add(const T* __restrict e, T* __restrict eo,
                          const float* __restrict J, const float* __restrict cur, int64_t O) {
  for (int64_t n = 0; n < O; ++n) {
    float z[K];
    for (int j = 0; j < K; ++j) z[j] = ld(e, n * K + j);
    for (int i = 0; i < K; ++i) {
      float v = cur[n * K + i];
      for (int j = 0; j < K; ++j) v += J[(n * K + i) * K + j] * z[j];
      st(eo, n * K + i, v);
    }
  }
}

template <int K, typename T>
inline void row_grad(const T* __restrict e, const float* __restrict d,
                     float* __restrict g, int64_t O) {
  for (int64_t n = 0; n < O; ++n) {
    float s = 0.f;
    for (int i = 0; i < K; ++i) s += d[n * K + i] * ld(e, n * K + i);
    g[n] += s;
  }
}

// f(b, r) over rows [a0, a1) of the input dimension in blocks of RB rows; in a block the
// batch is outermost, so one example's rows of the block are contiguous in memory (the
// trace streams through once) while the block's gradient rows stay in the L1 cache.
template <typename F>
void for_rows(const Args& a, int64_t a0, int64_t a1, F&& f) {
  init_rows(a, a0, a1);
  constexpr int64_t RB = 8;
  for (int64_t r0 = a0; r0 < a1; r0 += RB) {
    const int64_t r1 = std::min(a1, r0 + RB);
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t r = r0; r < r1; ++r) f(b, r);
  }
}

// f(b, r, e, eo) over the trace rows of for_rows, with e / eo the row's K-state values in
// the trace and its output (eo null when the call writes no trace).
template <int K, typename T, typename F>
void for_trace_rows(const Args& a, int64_t a0, int64_t a1, F&& f) {
  const T* eps = static_cast<const T*>(a.eps);
  T* eps_out = static_cast<T*>(a.eps_out);
  for_rows(a, a0, a1, [&](int64_t b, int64_t r) {
    const int64_t off = ((b * a.I + r) * a.O) * K;
    f(b, r, eps + off, eps_out ? eps_out + off : nullptr);
  });
}

template <int K, bool C, bool G, typename T>
void rows_update(const Args& a, int64_t a0, int64_t a1) {
  const int64_t I = a.I, O = a.O;
  for_trace_rows<K, T>(a, a0, a1, [&](int64_t b, int64_t r, const T* e, T* eo) {
    row_update<K, C, G, T>(e, eo, a.J + b * O * K * K, a.df + b * O * K,
                           C ? a.c + r * O : nullptr, a.x[b * I + r],
                           G ? a.delta + b * O * K : nullptr, G ? a.g_out + r * O : nullptr, O);
  });
}

template <int K, typename T>
void rows_grad(const Args& a, int64_t a0, int64_t a1) {
  const int64_t O = a.O;
  for_trace_rows<K, T>(a, a0, a1, [&](int64_t b, int64_t r, const T* e, T*) {
    row_grad<K, T>(e, a.delta + b * O * K, a.g_out + r * O, O);
  });
}

template <int K, typename T>
void rows_decay_add(const Args& a, int64_t a0, int64_t a1) {
  const int64_t I = a.I, O = a.O;
  for_trace_rows<K, T>(a, a0, a1, [&](int64_t b, int64_t r, const T* e, T* eo) {
    row_decay_add<K, T>(e, eo, a.J + b * O * K * K, a.cur + ((b * I + r) * O) * K, O);
  });
}

template <int K, typename T>
void rows_fixed(const Args& a, int64_t a0, int64_t a1) {
  if (a.cur) return rows_decay_add<K, T>(a, a0, a1);
  if (!a.update) return rows_grad<K, T>(a, a0, a1);
  if (a.has_c) {
    if (a.grad) return rows_update<K, true, true, T>(a, a0, a1);
    return rows_update<K, true, false, T>(a, a0, a1);
  }
  if (a.grad) return rows_update<K, false, true, T>(a, a0, a1);
  return rows_update<K, false, false, T>(a, a0, a1);
}

template <typename T>
void rows_any(const Args& a, int64_t a0, int64_t a1) {
  const int64_t B = a.B, I = a.I, O = a.O, K = a.k;
  init_rows(a, a0, a1);
  const T* eps = static_cast<const T*>(a.eps);
  T* eps_out = static_cast<T*>(a.eps_out);
  float z[64];
  for (int64_t b = 0; b < B; ++b) {
    const float* db = a.grad ? a.delta + b * O * K : nullptr;
    const float* Jb = a.update ? a.J + b * O * K * K : nullptr;
    const float* dfb = a.update && !a.cur ? a.df + b * O * K : nullptr;
    for (int64_t r = a0; r < a1; ++r) {
      float* g = a.grad ? a.g_out + r * O : nullptr;
      const float* crow = a.has_c ? a.c + r * O : nullptr;
      const T* e = eps + ((b * I + r) * O) * K;
      T* eo = a.update ? eps_out + ((b * I + r) * O) * K : nullptr;
      const float xa = a.update && !a.cur ? a.x[b * I + r] : 0.f;
      const float* cr = a.cur ? a.cur + ((b * I + r) * O) * K : nullptr;
      for (int64_t n = 0; n < O; ++n) {
        for (int64_t j = 0; j < K; ++j) z[j] = ld(e, n * K + j);   // all reads before the writes
        const float u = crow ? xa * crow[n] : xa;
        float s = 0.f;
        for (int64_t i = 0; i < K; ++i) {
          float v = z[i];
          if (a.update) {
            v = cr ? cr[n * K + i] : u * dfb[n * K + i];
            const float* Ji = Jb + (n * K + i) * K;
            for (int64_t j = 0; j < K; ++j) v += Ji[j] * z[j];
            st(eo, n * K + i, v);
          }
          if (db) s += db[n * K + i] * v;
        }
        if (g) g[n] += s;
      }
    }
  }
}

template <typename T>
void run_rows_t(const Args& a, int64_t a0, int64_t a1) {
  switch (a.k) {
    case 1: rows_fixed<1, T>(a, a0, a1); return;
    case 2: rows_fixed<2, T>(a, a0, a1); return;
    case 3: rows_fixed<3, T>(a, a0, a1); return;
    case 4: rows_fixed<4, T>(a, a0, a1); return;
    default: rows_any<T>(a, a0, a1); return;
  }
}

void run_rows(const Args& a, int64_t a0, int64_t a1) {
  if (a.bf16) run_rows_t<uint16_t>(a, a0, a1);
  else run_rows_t<float>(a, a0, a1);
}

// Rows [0, n) are handed out in chunks (multiples of `align`) through an atomic counter;
// the caller waits until every chunk is done, not until every scheduled task has run (a
// task that starts late finds no chunk left and only drops its reference to the shared
// state).
struct Shared {
  std::function<void(int64_t, int64_t)> fn;
  int64_t n = 0, chunk = 1, nchunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    for (;;) {
      const int64_t ci = next.fetch_add(1);
      if (ci >= nchunks) return;
      fn(ci * chunk, std::min(n, (ci + 1) * chunk));
      if (done.fetch_add(1) + 1 == nchunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// fn(r0, r1) over [0, n) on XLA's intra-op pool; inline when the pool has one thread or the
// work (elements touched) is small.
template <typename F>
void parallel_rows(ffi::ThreadPool& pool, int64_t n, int64_t work, int64_t align, F&& fn) {
  if (n == 0) return;
  const int64_t nt = pool.num_threads();
  if (nt <= 1 || work < (int64_t(1) << 16)) {
    fn(int64_t(0), n);
    return;
  }
  auto sh = std::make_shared<Shared>();
  sh->fn = fn;
  sh->n = n;
  // nt workers in all: the calling thread and nt - 1 tasks (one more than the pool has
  // threads oversubscribes the cores: measured 1.2x slower on 2 cores)
  const int64_t parts = std::min<int64_t>((n + align - 1) / align, 4 * nt);
  sh->chunk = ((n + parts - 1) / parts + align - 1) / align * align;
  sh->nchunks = (n + sh->chunk - 1) / sh->chunk;
  for (int64_t t = 1; t < nt && t < sh->nchunks; ++t) {
    pool.Schedule([sh]() { sh->work(); });
  }
  sh->work();
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load() >= sh->nchunks; });
}

void launch(ffi::ThreadPool& pool, const Args& args) {
  parallel_rows(pool, args.I, args.B * args.I * args.O * args.k, 1,
                [&args](int64_t a0, int64_t a1) { run_rows(args, a0, a1); });
}

// Outer-accumulate: g[a, n] = gacc[a, n] + (c[a, n] *) sum_r x[r, a] s[r, n], the rank-R
// update of a weight gradient (ES-D-RTRL per step: x = eps_x, s = sum_i eps_f delta, R = B).
// Register tile: RB rows of g by OC columns, kept in registers over the R terms; the
// gradient is read and written once (XLA's dot + add writes the product and reads it back).
constexpr int OUTER_RB = 6;
constexpr int64_t OUTER_OC = 64;

// One column block of a tile: RB rows by nn <= OUTER_OC columns of g, kept in registers over
// the R terms. FULL: nn == OUTER_OC, a compile-time width the compiler unrolls and
// vectorises; else the last, narrower block (or a weight with fewer outputs).
template <int RB, bool C, bool FULL>
inline void outer_block(const float* __restrict x, const float* __restrict s,
                        const float* __restrict c, const float* __restrict gin,
                        float* __restrict g, int64_t R, int64_t I, int64_t O, int64_t a,
                        int64_t n0, int64_t width) {
  const int64_t nn = FULL ? OUTER_OC : width;
  float acc[RB][OUTER_OC];
  for (int q = 0; q < RB; ++q)
    for (int64_t n = 0; n < nn; ++n) acc[q][n] = C ? 0.f : gin[(a + q) * O + n0 + n];
  for (int64_t r = 0; r < R; ++r) {
    const float* sr = s + r * O + n0;
    const float* xr = x + r * I + a;
    for (int q = 0; q < RB; ++q) {
      const float xa = xr[q];
      for (int64_t n = 0; n < nn; ++n) acc[q][n] += xa * sr[n];
    }
  }
  for (int q = 0; q < RB; ++q)
    for (int64_t n = 0; n < nn; ++n) {
      const int64_t at = (a + q) * O + n0 + n;
      g[at] = C ? gin[at] + c[at] * acc[q][n] : acc[q][n];
    }
}

template <int RB, bool C>
inline void outer_tile(const float* __restrict x, const float* __restrict s,
                       const float* __restrict c, const float* __restrict gin,
                       float* __restrict g, int64_t R, int64_t I, int64_t O, int64_t a) {
  for (int64_t n0 = 0; n0 < O; n0 += OUTER_OC) {
    const int64_t nn = std::min<int64_t>(OUTER_OC, O - n0);
    if (nn == OUTER_OC) outer_block<RB, C, true>(x, s, c, gin, g, R, I, O, a, n0, nn);
    else outer_block<RB, C, false>(x, s, c, gin, g, R, I, O, a, n0, nn);
  }
}

template <bool C>
void outer_rows(const float* x, const float* s, const float* c, const float* gin, float* g,
                int64_t R, int64_t I, int64_t O, int64_t a0, int64_t a1) {
  int64_t a = a0;
  for (; a + OUTER_RB <= a1; a += OUTER_RB) outer_tile<OUTER_RB, C>(x, s, c, gin, g, R, I, O, a);
  for (; a < a1; ++a) outer_tile<1, C>(x, s, c, gin, g, R, I, O, a);
}

ffi::Error check(bool ok, const char* what) {
  if (ok) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

#define RETURN_IF_ERROR(e) \
  do {                     \
    ffi::Error _e = (e);   \
    if (_e.failure()) return _e; \
  } while (0)

ffi::Error shapes(const Args& a, ffi::Span<const int64_t> ed) {
  RETURN_IF_ERROR(check(ed.size() == 4, "eps must be (B, I, O, k)"));
  RETURN_IF_ERROR(check(a.k >= 1 && a.k <= 64, "k must be in 1..64"));
  return ffi::Error::Success();
}

int64_t numel(ffi::Span<const int64_t> d) {
  int64_t n = 1;
  for (auto v : d) n *= v;
  return n;
}

// The update's operands (J, df, x, c) against the trace's (B, I, O, k).
ffi::Error update_shapes(const Args& a, ffi::Buffer<ffi::F32>& J, ffi::Buffer<ffi::F32>& df,
                         ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& c) {
  RETURN_IF_ERROR(check(numel(J.dimensions()) == a.B * a.O * a.k * a.k, "J must be (B, O, k, k)"));
  RETURN_IF_ERROR(check(numel(df.dimensions()) == a.B * a.O * a.k, "df must be (B, O, k)"));
  RETURN_IF_ERROR(check(numel(x.dimensions()) == a.B * a.I, "x must be (B, I)"));
  return check(!a.has_c || numel(c.dimensions()) == a.I * a.O, "c must be (I, O)");
}

// The contraction's operands (delta, gacc, g) against the trace's (B, I, O, k).
ffi::Error grad_shapes(const Args& a, ffi::Buffer<ffi::F32>& delta, ffi::Buffer<ffi::F32>& gacc,
                       ffi::Result<ffi::Buffer<ffi::F32>>& g_out) {
  RETURN_IF_ERROR(check(numel(delta.dimensions()) == a.B * a.O * a.k, "delta must be (B, O, k)"));
  RETURN_IF_ERROR(check(!a.accumulate || numel(gacc.dimensions()) == a.I * a.O,
                        "gacc must be (I, O)"));
  return check(numel(g_out->dimensions()) == a.I * a.O, "g must be (I, O)");
}

// The trace's storage (float32 or bfloat16); eps_out, when given, must match it.
ffi::Error storage(Args& a, ffi::AnyBuffer& eps, ffi::Result<ffi::AnyBuffer>* eps_out) {
  const auto t = eps.element_type();
  RETURN_IF_ERROR(check(t == ffi::DataType::F32 || t == ffi::DataType::BF16,
                        "eps must be float32 or bfloat16"));
  RETURN_IF_ERROR(check(!eps_out || (*eps_out)->element_type() == t,
                        "eps_out must have the dtype of eps"));
  RETURN_IF_ERROR(check(!eps_out || numel((*eps_out)->dimensions()) == numel(eps.dimensions()),
                        "eps_out must have the shape of eps"));
  a.bf16 = t == ffi::DataType::BF16;
  return ffi::Error::Success();
}

ffi::Error StepImpl(ffi::ThreadPool pool, ffi::AnyBuffer eps, ffi::Buffer<ffi::F32> J,
                    ffi::Buffer<ffi::F32> df, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c,
                    ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> gacc,
                    ffi::Result<ffi::AnyBuffer> eps_out, ffi::ResultBuffer<ffi::F32> g_out,
                    int64_t has_c, int64_t accumulate) {
  auto ed = eps.dimensions();
  if (ed.size() != 4) return check(false, "eps must be (B, I, O, k)");
  Args a{eps.untyped_data(), J.typed_data(), df.typed_data(), x.typed_data(), c.typed_data(),
         delta.typed_data(), gacc.typed_data(), eps_out->untyped_data(), g_out->typed_data(),
         ed[0], ed[1], ed[2], ed[3], true, true, has_c != 0, accumulate != 0};
  RETURN_IF_ERROR(storage(a, eps, &eps_out));
  RETURN_IF_ERROR(shapes(a, ed));
  RETURN_IF_ERROR(update_shapes(a, J, df, x, c));
  RETURN_IF_ERROR(grad_shapes(a, delta, gacc, g_out));
  launch(pool, a);
  return ffi::Error::Success();
}

ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::AnyBuffer eps, ffi::Buffer<ffi::F32> J,
                      ffi::Buffer<ffi::F32> df, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> c, ffi::Result<ffi::AnyBuffer> eps_out,
                      int64_t has_c) {
  auto ed = eps.dimensions();
  if (ed.size() != 4) return check(false, "eps must be (B, I, O, k)");
  Args a{eps.untyped_data(), J.typed_data(), df.typed_data(), x.typed_data(), c.typed_data(),
         nullptr, nullptr, eps_out->untyped_data(), nullptr,
         ed[0], ed[1], ed[2], ed[3], true, false, has_c != 0, false};
  RETURN_IF_ERROR(storage(a, eps, &eps_out));
  RETURN_IF_ERROR(shapes(a, ed));
  RETURN_IF_ERROR(update_shapes(a, J, df, x, c));
  launch(pool, a);
  return ffi::Error::Success();
}

ffi::Error GradImpl(ffi::ThreadPool pool, ffi::AnyBuffer eps, ffi::Buffer<ffi::F32> delta,
                    ffi::Buffer<ffi::F32> gacc, ffi::ResultBuffer<ffi::F32> g_out,
                    int64_t accumulate) {
  auto ed = eps.dimensions();
  if (ed.size() != 4) return check(false, "eps must be (B, I, O, k)");
  Args a{eps.untyped_data(), nullptr, nullptr, nullptr, nullptr, delta.typed_data(),
         gacc.typed_data(), nullptr, g_out->typed_data(),
         ed[0], ed[1], ed[2], ed[3], false, true, false, accumulate != 0};
  RETURN_IF_ERROR(storage(a, eps, nullptr));
  RETURN_IF_ERROR(shapes(a, ed));
  RETURN_IF_ERROR(grad_shapes(a, delta, gacc, g_out));
  launch(pool, a);
  return ffi::Error::Success();
}

ffi::Error DecayAddImpl(ffi::ThreadPool pool, ffi::AnyBuffer eps,
                        ffi::Buffer<ffi::F32> J, ffi::Buffer<ffi::F32> cur,
                        ffi::Result<ffi::AnyBuffer> eps_out) {
  auto ed = eps.dimensions();
  if (ed.size() != 4) return check(false, "eps must be (B, I, O, k)");
  Args a{eps.untyped_data(), J.typed_data(), nullptr, nullptr, nullptr, nullptr, nullptr,
         eps_out->untyped_data(), nullptr, ed[0], ed[1], ed[2], ed[3], true, false, false,
         false};
  a.cur = cur.typed_data();
  RETURN_IF_ERROR(storage(a, eps, &eps_out));
  RETURN_IF_ERROR(shapes(a, ed));
  RETURN_IF_ERROR(check(numel(J.dimensions()) == a.B * a.O * a.k * a.k, "J must be (B, O, k, k)"));
  RETURN_IF_ERROR(check(numel(cur.dimensions()) == numel(ed), "cur must be (B, I, O, k)"));
  launch(pool, a);
  return ffi::Error::Success();
}

ffi::Error OuterAccImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> s,
                        ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> gacc,
                        ffi::ResultBuffer<ffi::F32> g_out, int64_t has_c) {
  auto xd = x.dimensions();
  auto sd = s.dimensions();
  auto gd = gacc.dimensions();
  RETURN_IF_ERROR(check(xd.size() == 2 && sd.size() == 2 && gd.size() == 2,
                        "x, s and gacc must be (R, I), (R, O) and (I, O)"));
  const int64_t R = xd[0], I = xd[1], O = sd[1];
  RETURN_IF_ERROR(check(sd[0] == R, "x and s must have the same number of rows R"));
  RETURN_IF_ERROR(check(gd[0] == I && gd[1] == O, "gacc must be (I, O)"));
  RETURN_IF_ERROR(check(numel(g_out->dimensions()) == I * O, "g must be (I, O)"));
  RETURN_IF_ERROR(check(!has_c || numel(c.dimensions()) == I * O, "c must be (I, O)"));
  const float *xp = x.typed_data(), *sp = s.typed_data(), *cp = c.typed_data();
  const float* gin = gacc.typed_data();
  float* g = g_out->typed_data();
  parallel_rows(pool, I, R * I * O, OUTER_RB, [&](int64_t a0, int64_t a1) {
    if (has_c) outer_rows<true>(xp, sp, cp, gin, g, R, I, O, a0, a1);
    else outer_rows<false>(xp, sp, cp, gin, g, R, I, O, a0, a1);
  });
  return ffi::Error::Success();
}

// Outer-accumulate of m weights in one call (the per-step ES-D-RTRL gradients of a step's
// dense ops): one job over all their rows, so XLA's pool wakes its worker once per step, not
// once per weight (a worker starts too late to share one N = 512 weight's ~0.1 ms job:
// measured, two threads no faster than one; three weights of a GRU in one call 1.3x
// faster). Arguments: m groups of (x, s, c, gacc), results: m gradients; has_c per weight.
ffi::Error OuterAccMultiImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                             ffi::RemainingRets rets, ffi::Span<const int64_t> has_c) {
  struct Mat {
    const float *x, *s, *c, *gin;
    float* g;
    int64_t R, I, O, row0;
    bool has_c;
  };
  const int64_t m = has_c.size();
  RETURN_IF_ERROR(check(m >= 1 && int64_t(args.size()) == 4 * m && int64_t(rets.size()) == m,
                        "outer-accumulate (multi): 4 arguments (x, s, c, gacc) and one result "
                        "per weight"));
  std::vector<Mat> mats;
  int64_t rows = 0, work = 0;
  for (int64_t q = 0; q < m; ++q) {
    auto x = args.get<ffi::Buffer<ffi::F32>>(4 * q);
    auto s = args.get<ffi::Buffer<ffi::F32>>(4 * q + 1);
    auto c = args.get<ffi::Buffer<ffi::F32>>(4 * q + 2);
    auto gacc = args.get<ffi::Buffer<ffi::F32>>(4 * q + 3);
    auto g = rets.get<ffi::Buffer<ffi::F32>>(q);
    RETURN_IF_ERROR(check(x.has_value() && s.has_value() && c.has_value() && gacc.has_value() &&
                          g.has_value(), "outer-accumulate (multi): float32 buffers expected"));
    auto xd = x->dimensions();
    auto sd = s->dimensions();
    auto gd = gacc->dimensions();
    RETURN_IF_ERROR(check(xd.size() == 2 && sd.size() == 2 && gd.size() == 2,
                          "x, s and gacc must be (R, I), (R, O) and (I, O)"));
    Mat mt{x->typed_data(), s->typed_data(), c->typed_data(), gacc->typed_data(),
           (*g)->typed_data(), xd[0], xd[1], sd[1], rows, has_c[q] != 0};
    RETURN_IF_ERROR(check(sd[0] == mt.R, "x and s must have the same number of rows R"));
    RETURN_IF_ERROR(check(gd[0] == mt.I && gd[1] == mt.O, "gacc must be (I, O)"));
    RETURN_IF_ERROR(check(numel((*g)->dimensions()) == mt.I * mt.O, "g must be (I, O)"));
    RETURN_IF_ERROR(check(!mt.has_c || numel(c->dimensions()) == mt.I * mt.O,
                          "c must be (I, O)"));
    mats.push_back(mt);
    // each weight's rows start on a multiple of the tile height: chunks (multiples of it)
    // then split a weight only between whole tiles
    rows += (mt.I + OUTER_RB - 1) / OUTER_RB * OUTER_RB;
    work += mt.R * mt.I * mt.O;
  }
  parallel_rows(pool, rows, work, OUTER_RB, [&](int64_t r0, int64_t r1) {
    for (const Mat& mt : mats) {
      const int64_t a0 = std::max(r0, mt.row0) - mt.row0;
      const int64_t a1 = std::min(r1, mt.row0 + mt.I) - mt.row0;
      if (a0 >= a1) continue;
      if (mt.has_c) outer_rows<true>(mt.x, mt.s, mt.c, mt.gin, mt.g, mt.R, mt.I, mt.O, a0, a1);
      else outer_rows<false>(mt.x, mt.s, mt.c, mt.gin, mt.g, mt.R, mt.I, mt.O, a0, a1);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Bindings: the thread pool, the buffers in the order of the Impl's parameters, attributes.
using Buf = ffi::Buffer<ffi::F32>;
using Any = ffi::AnyBuffer;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BrainscaleDrtrlStep, StepImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<Any>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
        .Ret<Any>().Ret<Buf>().Attr<int64_t>("has_c").Attr<int64_t>("accumulate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BrainscaleDrtrlUpdate, UpdateImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<Any>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
        .Ret<Any>().Attr<int64_t>("has_c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BrainscaleDrtrlGrad, GradImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<Any>().Arg<Buf>().Arg<Buf>()
        .Ret<Buf>().Attr<int64_t>("accumulate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BrainscaleDrtrlDecayAdd, DecayAddImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<Any>().Arg<Buf>().Arg<Buf>().Ret<Any>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BrainscaleOuterAcc, OuterAccImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Ret<Buf>().Attr<int64_t>("has_c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BrainscaleOuterAccMulti, OuterAccMultiImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
        .RemainingArgs().RemainingRets().Attr<ffi::Span<const int64_t>>("has_c"));
