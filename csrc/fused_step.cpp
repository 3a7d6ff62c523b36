// nestedfn native: the CPU eval of FusedUpdate (see fused_step.h).
//
// Arithmetic: every operation of nestedfn's eager step is done in float and rounded to the
// dtype the eager op returns, in the eager order (no FMA contraction: -ffp-contract=off),
// so results are bit-identical to ``apply_gradients``.  For float32 leaves the roundings
// are no-ops and the loops vectorise (-fno-math-errno lets sqrt vectorise).
#include "fused_step.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <unistd.h>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <type_traits>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace nestedfn {

// One multi-threaded piece of work: f(0..n-1), the items taken in order from a shared counter
// by every thread that drains it.
struct Job {
  size_t n = 0;
  std::function<void(size_t)> fn;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};

  void drain() {
    size_t mine = 0;
    for (;;) {
      const size_t k = next.fetch_add(1, std::memory_order_relaxed);
      if (k >= n) {
        break;
      }
      fn(k);
      ++mine;
    }
    if (mine > 0) {
      done.fetch_add(mine, std::memory_order_acq_rel);
    }
  }

  // until every item is done, also those other threads took
  void wait_done() const {
    while (done.load(std::memory_order_acquire) < n) {
      std::this_thread::yield();
    }
  }
};


namespace {

using bf16 = mx::bfloat16_t;
using f16 = mx::float16_t;

#define NF_INLINE inline __attribute__((always_inline))

// The kernels are compiled for AVX-512, AVX2 and the baseline, picked at load time (GCC's
// function multi-versioning): the same IEEE operations, in the same order, on wider vectors
// (no FMA: -ffp-contract=off), so every version gives the same bits; on large leaves the
// baseline's 4-wide sqrt and divide, not memory, would bound Adam.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NF_CLONES
#endif

template <class T>
NF_INLINE float rd(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
NF_INLINE float rd<float>(float x) {
  return x;
}

// One leaf's pointers (contiguous, offsets applied).  in: p, g, s0, s1, acc; out: p', s0',
// s1', acc'.
struct Leaf {
  const void* p = nullptr;
  const void* g = nullptr;
  const void* s0 = nullptr;
  const void* s1 = nullptr;
  const float* acc = nullptr;
  void* po = nullptr;
  void* s0o = nullptr;
  void* s1o = nullptr;
  float* acco = nullptr;
};

using Kernel = void (*)(const Leaf&, const Hyper&, size_t, size_t);

// g := (acc + g) / f, rounded as nested's eager chunk (float32 sums), then in P; acc' = 0
template <class P, bool ACC>
NF_INLINE float grad_in(const float* __restrict acc, const P* __restrict g, size_t i, float f) {
  float gi = static_cast<float>(g[i]);
  if constexpr (ACC) {
    float a = acc[i] + gi;  // acc (float32) + g.astype(float32)
    a = a / f;                // f == 1 for reduce="sum": exact
    gi = rd<P>(a);            // chunk.astype(g.dtype)
  }
  return gi;
}

template <class P, bool WD>
NF_INLINE void write_param(P* __restrict po, const P* __restrict p, size_t i, float u, float wd,
                           float nlr, float post) {
  float pi = static_cast<float>(p[i]);
  float uu = rd<P>(u);  // update in the gradient's dtype (== params' dtype)
  if constexpr (WD) {
    uu = rd<P>(uu + rd<P>(wd * pi));
  }
  uu = rd<P>(uu * nlr);
  uu = rd<P>(uu * post);  // post == 1 unless a global schedule: exact
  po[i] = static_cast<P>(pi + uu);
}

template <class P, class M, bool ACC, bool WD>
NF_CLONES
void adam_kernel(const Leaf& L, const Hyper& h, size_t b, size_t e) {
  const P* __restrict p = static_cast<const P*>(L.p);
  const P* __restrict g = static_cast<const P*>(L.g);
  P* __restrict po = static_cast<P*>(L.po);
  const float* __restrict acc = L.acc;
  float* __restrict acco = L.acco;
  const M* __restrict m = static_cast<const M*>(L.s0);
  const M* __restrict v = static_cast<const M*>(L.s1);
  M* __restrict mo = static_cast<M*>(L.s0o);
  M* __restrict vo = static_cast<M*>(L.s1o);
  const float b1 = rd<M>(float(h.b1)), omb1 = rd<M>(float(1.0 - h.b1));
  const float b2 = rd<M>(float(h.b2)), omb2 = rd<M>(float(1.0 - h.b2));
  const float eps = rd<M>(float(h.eps)), c1 = rd<M>(float(h.c1)), c2 = rd<M>(float(h.c2));
  const float wd = rd<P>(float(h.wd)), nlr = rd<P>(float(h.neg_lr));
  const float post = rd<P>(float(h.post)), f = float(h.f);
  // ivdep: iteration i reads and writes element i only (also when an output is a donated
  // input buffer); without it GCC 12 gives up on these loops
#pragma GCC ivdep
  for (size_t i = b; i < e; ++i) {
    const float gs = rd<M>(grad_in<P, ACC>(acc, g, i, f));
    const float m1 = rd<M>(rd<M>(b1 * float(m[i])) + rd<M>(omb1 * gs));
    const float v1 = rd<M>(rd<M>(b2 * float(v[i])) + rd<M>(omb2 * rd<M>(gs * gs)));
    const float den = rd<M>(rd<M>(rd<M>(std::sqrt(v1)) * c2) + eps);
    const float u = rd<M>(rd<M>(m1 * c1) / den);
    write_param<P, WD>(po, p, i, u, wd, nlr, post);
    mo[i] = static_cast<M>(m1);
    vo[i] = static_cast<M>(v1);
    if constexpr (ACC) {
      acco[i] = 0.0f;
    }
  }
}

// float32 leaves and moments: the same arithmetic as adam_kernel<float, float> with the
// (no-op) roundings left out, written so that GCC vectorises it
template <bool ACC, bool WD>
NF_CLONES
void adam_kernel_f32(const Leaf& L, const Hyper& h, size_t b, size_t e) {
  const float* __restrict p = static_cast<const float*>(L.p);
  const float* __restrict g = static_cast<const float*>(L.g);
  const float* __restrict m = static_cast<const float*>(L.s0);
  const float* __restrict v = static_cast<const float*>(L.s1);
  const float* __restrict acc = L.acc;
  float* __restrict po = static_cast<float*>(L.po);
  float* __restrict mo = static_cast<float*>(L.s0o);
  float* __restrict vo = static_cast<float*>(L.s1o);
  float* __restrict acco = L.acco;
  const float b1 = float(h.b1), omb1 = float(1.0 - h.b1);
  const float b2 = float(h.b2), omb2 = float(1.0 - h.b2);
  const float eps = float(h.eps), c1 = float(h.c1), c2 = float(h.c2);
  const float wd = float(h.wd), nlr = float(h.neg_lr), post = float(h.post), f = float(h.f);
  // ivdep: iteration i reads and writes element i only (also when an output is a donated
  // input buffer); without it GCC 12 gives up on these loops
#pragma GCC ivdep
  for (size_t i = b; i < e; ++i) {
    float gs = g[i];
    if constexpr (ACC) {
      gs = (acc[i] + gs) / f;
      acco[i] = 0.0f;
    }
    const float m1 = b1 * m[i] + omb1 * gs;
    const float v1 = b2 * v[i] + omb2 * (gs * gs);
    float u = (m1 * c1) / (std::sqrt(v1) * c2 + eps);
    if constexpr (WD) {
      u = u + wd * p[i];
    }
    u = (u * nlr) * post;
    po[i] = p[i] + u;
    mo[i] = m1;
    vo[i] = v1;
  }
}

template <class P, class M, bool ACC, bool WD>
NF_CLONES
void lion_kernel(const Leaf& L, const Hyper& h, size_t b, size_t e) {
  const P* __restrict p = static_cast<const P*>(L.p);
  const P* __restrict g = static_cast<const P*>(L.g);
  P* __restrict po = static_cast<P*>(L.po);
  const float* __restrict acc = L.acc;
  float* __restrict acco = L.acco;
  const M* __restrict m = static_cast<const M*>(L.s0);
  M* __restrict mo = static_cast<M*>(L.s0o);
  const float b1 = rd<M>(float(h.b1)), omb1 = rd<M>(float(1.0 - h.b1));
  const float b2 = rd<M>(float(h.b2)), omb2 = rd<M>(float(1.0 - h.b2));
  const float wd = rd<P>(float(h.wd)), nlr = rd<P>(float(h.neg_lr));
  const float post = rd<P>(float(h.post)), f = float(h.f);
  // ivdep: iteration i reads and writes element i only (also when an output is a donated
  // input buffer); without it GCC 12 gives up on these loops
#pragma GCC ivdep
  for (size_t i = b; i < e; ++i) {
    const float gs = rd<M>(grad_in<P, ACC>(acc, g, i, f));
    const float mi = float(m[i]);
    const float c = rd<M>(rd<M>(b1 * mi) + rd<M>(omb1 * gs));
    const float u = float(c > 0.0f) - float(c < 0.0f);  // MLX's sign (0 for NaN)
    write_param<P, WD>(po, p, i, u, wd, nlr, post);
    mo[i] = static_cast<M>(rd<M>(rd<M>(b2 * mi) + rd<M>(omb2 * gs)));
    if constexpr (ACC) {
      acco[i] = 0.0f;
    }
  }
}

template <class P, class M, bool ACC, bool WD>
NF_CLONES
void momentum_kernel(const Leaf& L, const Hyper& h, size_t b, size_t e) {
  const P* __restrict p = static_cast<const P*>(L.p);
  const P* __restrict g = static_cast<const P*>(L.g);
  P* __restrict po = static_cast<P*>(L.po);
  const float* __restrict acc = L.acc;
  float* __restrict acco = L.acco;
  const M* __restrict t = static_cast<const M*>(L.s0);
  M* __restrict to = static_cast<M*>(L.s0o);
  const float decay = rd<M>(float(h.b1));
  const float wd = rd<P>(float(h.wd)), nlr = rd<P>(float(h.neg_lr));
  const float post = rd<P>(float(h.post)), f = float(h.f);
  const bool nesterov = h.nesterov;
  // ivdep: iteration i reads and writes element i only (also when an output is a donated
  // input buffer); without it GCC 12 gives up on these loops
#pragma GCC ivdep
  for (size_t i = b; i < e; ++i) {
    const float gs = rd<M>(grad_in<P, ACC>(acc, g, i, f));
    const float t1 = rd<M>(gs + rd<M>(decay * float(t[i])));
    const float u = nesterov ? rd<M>(gs + rd<M>(decay * t1)) : t1;
    write_param<P, WD>(po, p, i, u, wd, nlr, post);
    to[i] = static_cast<M>(t1);
    if constexpr (ACC) {
      acco[i] = 0.0f;
    }
  }
}

// acc' = acc + g.astype(float32): a slow tier between its updates
template <class P>
NF_CLONES
void accum_kernel(const Leaf& L, const Hyper&, size_t b, size_t e) {
  const P* __restrict g = static_cast<const P*>(L.g);
  const float* __restrict a = L.acc;
  float* __restrict ao = L.acco;
  // ivdep: iteration i reads and writes element i only (also when an output is a donated
  // input buffer); without it GCC 12 gives up on these loops
#pragma GCC ivdep
  for (size_t i = b; i < e; ++i) {
    ao[i] = a[i] + static_cast<float>(g[i]);
  }
}

template <class P, class M, bool ACC, bool WD>
Kernel pick_algo(int algo) {
  switch (algo) {
    case ADAM:
      if constexpr (std::is_same_v<P, float> && std::is_same_v<M, float>) {
        return adam_kernel_f32<ACC, WD>;
      } else {
        return adam_kernel<P, M, ACC, WD>;
      }
    case LION:
      return lion_kernel<P, M, ACC, WD>;
    case MOMENTUM:
      return momentum_kernel<P, M, ACC, WD>;
    default:
      return accum_kernel<P>;
  }
}

template <class P, class M>
Kernel pick_flags(const Hyper& h) {
  if (h.with_acc) {
    return h.has_wd ? pick_algo<P, M, true, true>(h.algo) : pick_algo<P, M, true, false>(h.algo);
  }
  return h.has_wd ? pick_algo<P, M, false, true>(h.algo) : pick_algo<P, M, false, false>(h.algo);
}

Kernel pick(const Hyper& h, mx::Dtype p, mx::Dtype m) {
  if (p == mx::float32) {
    return pick_flags<float, float>(h);
  }
  if (p == mx::bfloat16) {
    return m == mx::float32 ? pick_flags<bf16, float>(h) : pick_flags<bf16, bf16>(h);
  }
  return m == mx::float32 ? pick_flags<f16, float>(h) : pick_flags<f16, f16>(h);
}

bool is_float(mx::Dtype d) {
  return d == mx::float32 || d == mx::bfloat16 || d == mx::float16;
}

std::string dtype_name(mx::Dtype d) {
  std::ostringstream os;
  os << d;
  return os.str();
}

[[noreturn]] void bad_leaf(size_t i, const std::string& why) {
  std::ostringstream os;
  os << "leaf " << i << ": " << why;
  throw std::invalid_argument(os.str());
}

// MLX's array holds one shared_ptr to its descriptor and nothing else; its use count is
// what ``array::is_donatable`` reads.  A multi-output primitive's outputs each hold a copy of
// the inputs, so an input nothing else refers to has exactly ``n_outputs`` references.
struct ArrayLayout {
  std::shared_ptr<void> desc;
};
static_assert(sizeof(mx::array) == sizeof(ArrayLayout), "unexpected mlx::core::array layout");

long desc_use_count(const mx::array& a) {
  return reinterpret_cast<const ArrayLayout*>(&a)->desc.use_count();
}

bool plain(const mx::array& a) {
  return a.flags().row_contiguous && a.data_size() == a.size();
}

// A contiguous copy of a strided (broadcast, transposed, sliced) input, in the task.
void strided_copy(const mx::array& src, char* dst) {
  const size_t isz = src.itemsize();
  const char* base = src.data<char>();
  const auto& shape = src.shape();
  const auto& strides = src.strides();
  const int nd = static_cast<int>(shape.size());
  std::vector<int64_t> idx(nd, 0);
  const size_t n = src.size();
  for (size_t k = 0; k < n; ++k) {
    int64_t loc = 0;
    for (int d = 0; d < nd; ++d) {
      loc += idx[d] * strides[d];
    }
    std::memcpy(dst + k * isz, base + loc * static_cast<int64_t>(isz), isz);
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        break;
      }
      idx[d] = 0;
    }
  }
}

constexpr size_t CHUNK = size_t(1) << 16;  // elements per work item

// new leaves per TakeOutputs group: at most TAKE_GROUPS groups per kernel, of at least
// TAKE_MIN leaves.  Each group is one dispatch to the stream, and MLX's evaluator stops the
// main thread once about a hundred dispatches are queued (behind the kernel's task, the
// first of them); fewer, larger groups cost siblings, quadratic in a group's size (MLX's
// evaluator, make_arrays and detach each touch every sibling of every output).  On the LoRA
// tree 32 and 128..256 groups were slower than 64, for Adam and for nested_adam's three
// kernels a step; 96 was 1-10% faster than 64 in four interleaved A/B runs (two sessions).
// With a training step's backward tasks ahead in the queue the evaluator may stop main
// sooner: then the kernel runs on the stream's thread alone until main has caught up.
constexpr size_t TAKE_GROUPS = 96, TAKE_MIN = 4;

// A small persistent pool of workers that sleep on a condition variable between jobs.
class Pool {
 public:
  // Run ``job`` on the caller and nt - 1 workers; returns once every item is done (also
  // those another thread took).
  void run(size_t nt, const std::shared_ptr<Job>& job) {
    const size_t n = job->n;
    if (n == 0) {
      return;
    }
    if (nt <= 1) {
      job->drain();
      job->wait_done();
      return;
    }
    std::lock_guard<std::mutex> serial(run_mutex_);  // one job at a time
    const size_t workers = std::min(nt, n) - 1;
    ensure(workers);
    {
      std::lock_guard<std::mutex> lk(m_);
      current_ = job;
      wanted_ = workers;
      ++generation_;
    }
    if (workers > 0) {
      cv_.notify_all();
    }
    job->drain();
    job->wait_done();
    std::lock_guard<std::mutex> lk(m_);
    current_.reset();
  }

 private:
  void ensure(size_t workers) {
    while (threads_.size() < workers) {
      const size_t id = threads_.size();
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();
    }
  }
  void loop(size_t id) {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= wanted_) {
          continue;
        }
        job = current_;
      }
      if (job) {
        job->drain();
      }
    }
  }
  std::mutex run_mutex_, m_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::shared_ptr<Job> current_;
  size_t wanted_ = 0;
  uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached workers may outlive main
  return *p;
}

// Run every leaf's kernel over chunks of CHUNK elements, on up to h.threads threads (0: all
// cores), a thread per MiB-sized share of the work at most.
// Returns whether MLX's main thread joins the kernel (see Stash).
bool run_leaves(const std::vector<Leaf>& leaves, const std::vector<Kernel>& kernels,
                const std::vector<size_t>& sizes, const Hyper& h, Stash* stash = nullptr,
                size_t per_thread = size_t(1) << 15) {
  const size_t n = leaves.size();
  // work items: chunks of leaves, taken by threads in order
  struct Item {
    size_t leaf, b, e;
  };
  std::vector<Item> items;
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    for (size_t b = 0; b < sizes[i]; b += CHUNK) {
      items.push_back({i, b, std::min(sizes[i], b + CHUNK)});
    }
    total += sizes[i];
  }
  size_t nt = h.threads > 0 ? static_cast<size_t>(h.threads)
                            : std::max(1u, std::thread::hardware_concurrency());
  nt = std::min(nt, std::max<size_t>(1, total / per_thread));
  nt = std::min(nt, items.size());
  auto job = std::make_shared<Job>();
  job->n = items.size();
  job->fn = [&](size_t k) {
    const Item& it = items[k];
    kernels[it.leaf](leaves[it.leaf], h, it.b, it.e);
  };
  bool main_joins = false;
  if (stash != nullptr && nt > 1) {
    stash->job = job;
    int neither = 0;
    if (stash->meet.compare_exchange_strong(neither, 1, std::memory_order_acq_rel)) {
      nt = 1;  // main is still evaluating TakeOutputs groups: it joins after its last one
      main_joins = true;
    }
  }
  pool().run(nt, job);
  return main_joins;
}


}  // namespace

void watch_early(std::weak_ptr<FusedUpdate> prim, std::shared_ptr<Stash> stash);  // below

namespace {

std::atomic<uint64_t> early_count{0};

bool early_start_enabled() {
  // NESTEDFN_NATIVE_EARLY=0 turns it off (nestedfn.fast.native's docstring)
  static const bool on = [] {
    const char* v = std::getenv("NESTEDFN_NATIVE_EARLY");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

}  // namespace

int n_states(int algo) {
  switch (algo) {
    case ADAM:
      return 2;
    case LION:
    case MOMENTUM:
      return 1;
    default:
      return 0;
  }
}

void validate(const std::vector<mx::array>& params, const std::vector<mx::array>& grads,
              const std::vector<std::vector<mx::array>>& states,
              const std::vector<mx::array>& accs, const Hyper& h) {
  const bool accum = h.algo == ACCUM;
  const size_t n = grads.size();
  const int ns = n_states(h.algo);
  const bool has_acc = accum || h.with_acc;
  for (size_t i = 0; i < n; ++i) {
    const auto& g = grads[i];
    if (!is_float(g.dtype())) {
      bad_leaf(i, "gradient dtype " + dtype_name(g.dtype()) + " is not a float type");
    }
    if (!accum) {
      const auto& p = params[i];
      if (p.shape() != g.shape()) {
        bad_leaf(i, "gradient shape differs from the parameter's");
      }
      if (p.dtype() != g.dtype()) {
        bad_leaf(i, "gradient dtype " + dtype_name(g.dtype()) + " differs from the parameter's " +
                        dtype_name(p.dtype()));
      }
      for (int k = 0; k < ns; ++k) {
        const auto& st = states[k][i];
        if (st.shape() != g.shape()) {
          bad_leaf(i, "optimizer state shape differs from the parameter's");
        }
        if (st.dtype() != states[0][i].dtype() ||
            (st.dtype() != p.dtype() && st.dtype() != mx::float32)) {
          bad_leaf(i, "optimizer state dtype " + dtype_name(st.dtype()) +
                          " is neither the parameter's nor float32");
        }
      }
    }
    if (has_acc) {
      if (accs[i].shape() != g.shape() || accs[i].dtype() != mx::float32) {
        bad_leaf(i, "accumulator is not float32 of the gradient's shape");
      }
    }
  }
}

std::vector<mx::array> fused_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<mx::array>& accs,
    const Hyper& h,
    mx::StreamOrDevice s) {
  if (h.algo < ADAM || h.algo > ACCUM) {
    throw std::invalid_argument("fused_update: unknown algorithm");
  }
  const bool accum = h.algo == ACCUM;
  const size_t n = grads.size();
  const int ns = n_states(h.algo);
  if (static_cast<int>(states.size()) != ns) {
    throw std::invalid_argument("fused_update: wrong number of state lists");
  }
  if (!accum && params.size() != n) {
    throw std::invalid_argument("fused_update: params and grads differ in length");
  }
  for (auto& st : states) {
    if (st.size() != n) {
      throw std::invalid_argument("fused_update: a state list differs in length from grads");
    }
  }
  const bool has_acc = accum || h.with_acc;
  if (has_acc ? accs.size() != n : !accs.empty()) {
    throw std::invalid_argument("fused_update: accumulators do not match grads");
  }
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("fused_update: only CPU streams are supported");
  }
  validate(params, grads, states, accs, h);
  if (n == 0) {
    return {};
  }
  // operands in slot order; the new leaves' shapes and dtypes in result order
  std::vector<const mx::array*> ops;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  ops.reserve((2 + ns + 1) * n);
  if (!accum) {
    for (auto& p : params) {
      ops.push_back(&p);
      shapes.push_back(p.shape());
      dtypes.push_back(p.dtype());
    }
  }
  for (auto& g : grads) {
    ops.push_back(&g);
  }
  for (auto& st : states) {
    for (auto& x : st) {
      ops.push_back(&x);
      shapes.push_back(x.shape());
      dtypes.push_back(x.dtype());
    }
  }
  if (has_acc) {
    for (auto& a : accs) {
      ops.push_back(&a);
      shapes.push_back(a.shape());
      dtypes.push_back(mx::float32);
    }
  }
  // computed operands are held by the primitive, the others are graph inputs
  std::vector<mx::array> inputs;
  std::vector<std::optional<mx::array>> held(ops.size());
  std::vector<int> input_of(ops.size(), -1);
  for (size_t k = 0; k < ops.size(); ++k) {
    auto& x = const_cast<mx::array&>(*ops[k]);
    if (x.status() != mx::array::Status::unscheduled && !x.is_tracer() && x.is_available()) {
      held[k].emplace(x);
    } else {
      input_of[k] = static_cast<int>(inputs.size());
      inputs.push_back(x);
    }
  }
  auto stash = std::make_shared<Stash>();
  stash->out.resize(shapes.size());
  const bool early = inputs.empty() && early_start_enabled();
  auto prim = std::make_shared<FusedUpdate>(stream, h, static_cast<int>(n), dtypes, stash,
                                            std::move(held), std::move(input_of));
  std::weak_ptr<FusedUpdate> weak = prim;
  auto token = mx::array(mx::Shape{}, mx::bool_, std::move(prim), std::move(inputs));
  // groups of new leaves: at most TAKE_GROUPS of them, of at least TAKE_MIN leaves
  const size_t n_out = shapes.size();
  const size_t k = std::max<size_t>((n_out + TAKE_GROUPS - 1) / TAKE_GROUPS, TAKE_MIN);
  stash->groups = (n_out + k - 1) / k;
  if (early) {
    watch_early(std::move(weak), stash);
  }
  std::vector<mx::array> result;
  result.reserve(n_out);
  for (size_t b = 0; b < n_out; b += k) {
    const size_t e = std::min(n_out, b + k);
    std::vector<mx::Shape> gs(std::make_move_iterator(shapes.begin() + b),
                              std::make_move_iterator(shapes.begin() + e));
    std::vector<mx::Dtype> gd(dtypes.begin() + b, dtypes.begin() + e);
    auto outs = mx::array::make_arrays(
        std::move(gs), gd, std::make_shared<TakeOutputs>(stream, stash, b, e), {token});
    for (auto& x : outs) {
      result.push_back(std::move(x));
    }
  }
  return result;
}

std::vector<mx::array> fused_apply(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<mx::array>& accs,
    const Hyper& h) {
  if (h.algo < ADAM || h.algo > ACCUM) {
    throw std::invalid_argument("fused_apply: unknown algorithm");
  }
  const bool accum = h.algo == ACCUM;
  const size_t n = grads.size();
  const int ns = n_states(h.algo);
  const bool has_acc = accum || h.with_acc;
  if (static_cast<int>(states.size()) != ns || (!accum && params.size() != n) ||
      (has_acc ? accs.size() != n : !accs.empty())) {
    throw std::invalid_argument("fused_apply: lists of different lengths");
  }
  for (auto& st : states) {
    if (st.size() != n) {
      throw std::invalid_argument("fused_apply: a state list differs in length from grads");
    }
  }
  validate(params, grads, states, accs, h);
  auto traced = [](const std::vector<mx::array>& v) {
    return std::any_of(v.begin(), v.end(), [](const mx::array& x) { return x.is_tracer(); });
  };
  if (traced(params) || traced(grads) || traced(accs) ||
      std::any_of(states.begin(), states.end(), traced)) {
    throw std::invalid_argument("fused_apply: traced inputs (inside mx.compile): not eager");
  }
  // every input evaluated and available
  std::vector<mx::array> pending;
  auto need = [&](const mx::array& x) {
    if (x.status() == mx::array::Status::unscheduled) {
      pending.push_back(x);
    }
  };
  for (auto& x : params) need(x);
  for (auto& x : grads) need(x);
  for (auto& st : states) for (auto& x : st) need(x);
  for (auto& x : accs) need(x);
  if (!pending.empty()) {
    mx::eval(pending);
  }
  auto ready = [](const mx::array& x) {
    if (!x.is_available()) {
      const_cast<mx::array&>(x).wait();
    }
  };
  for (auto& x : params) ready(x);
  for (auto& x : grads) ready(x);
  for (auto& st : states) for (auto& x : st) ready(x);
  for (auto& x : accs) ready(x);

  std::vector<mx::array> out;
  out.reserve((accum ? 0 : n) + ns * n + (has_acc ? n : 0));
  auto fresh = [&](const mx::array& like, mx::Dtype dt) {
    out.emplace_back(mx::allocator::malloc(like.size() * mx::size_of(dt)), like.shape(), dt);
  };
  if (!accum) for (auto& x : params) fresh(x, x.dtype());
  for (auto& st : states) for (auto& x : st) fresh(x, x.dtype());
  if (has_acc) for (auto& x : accs) fresh(x, mx::float32);

  std::vector<std::unique_ptr<char[]>> temps;
  auto ptr = [&](const mx::array& x) -> const void* {
    if (plain(x)) {
      return x.data<void>();
    }
    temps.emplace_back(new char[std::max<size_t>(x.nbytes(), 1)]);
    strided_copy(x, temps.back().get());
    return temps.back().get();
  };
  const size_t np = accum ? 0 : n;
  std::vector<Leaf> leaves(n);
  std::vector<Kernel> kernels(n);
  std::vector<size_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    Leaf& L = leaves[i];
    L.g = ptr(grads[i]);
    kernels[i] = pick(h, grads[i].dtype(), ns > 0 ? states[0][i].dtype() : grads[i].dtype());
    sizes[i] = grads[i].size();
    if (!accum) {
      L.p = ptr(params[i]);
      L.po = out[i].data<void>();
    }
    if (ns > 0) {
      L.s0 = ptr(states[0][i]);
      L.s0o = out[np + i].data<void>();
    }
    if (ns > 1) {
      L.s1 = ptr(states[1][i]);
      L.s1o = out[np + n + i].data<void>();
    }
    if (has_acc) {
      L.acc = static_cast<const float*>(ptr(accs[i]));
      L.acco = out[np + ns * n + i].data<float>();
    }
  }
  run_leaves(leaves, kernels, sizes, h);
  return out;
}

void FusedUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("nestedfn FusedUpdate has no GPU eval (use the packed path)");
}

void TakeOutputs::eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>& outputs) {
  for (size_t j = 0; j < outputs.size(); ++j) {
    auto& held = stash_->out[begin_ + j];
    if (!held) {
      throw std::runtime_error("nestedfn TakeOutputs: its FusedUpdate was not evaluated");
    }
    outputs[j].copy_shared_buffer(*held);
    held.reset();
  }
  if (stash_->groups_done.fetch_add(1, std::memory_order_acq_rel) + 1 == stash_->groups) {
    int neither = 0;
    if (!stash_->meet.compare_exchange_strong(neither, 2, std::memory_order_acq_rel) &&
        neither == 1) {
      // the kernel started while we were busy: join it, then release what it kept alive
      // (a thousand arrays on a LoRA tree) here rather than on the stream's thread, which
      // still has this eval's group tasks to run
      Job& job = *stash_->job;
      job.drain();
      job.wait_done();
      std::vector<mx::array>().swap(stash_->keep);
    }
  }

}

void TakeOutputs::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("nestedfn TakeOutputs has no GPU eval (use the packed path)");
}

std::function<void()> FusedUpdate::prepare(const std::vector<mx::array>& inputs) {
  const size_t n = static_cast<size_t>(n_);
  const bool accum = h_.algo == ACCUM;
  const int ns = n_states(h_.algo);
  const bool has_acc = accum || h_.with_acc;
  // operand slots
  const size_t ip = 0, ig = accum ? 0 : n, is = ig + n, ia = is + ns * n;
  auto operand = [&](size_t slot) -> const mx::array& {
    return held_[slot] ? *held_[slot] : inputs[input_of_[slot]];
  };
  // new leaf o takes the buffer of operand src(o) when only this primitive refers to it (the
  // caller dropped the previous state) and no one else shares its buffer
  const size_t np = accum ? 0 : n;
  auto& holders = stash_->out;
  const size_t n_out = dtypes_.size();
  std::vector<void*> out_ptr(n_out);
  std::vector<char> donated(n_out, 0);
  size_t fresh = 0;
  for (size_t o = 0; o < n_out; ++o) {
    const size_t src = o < np ? ip + o : (o < np + ns * n ? is + (o - np) : ia + (o - np - ns * n));
    const auto& in = operand(src);
    const size_t nbytes = in.size() * mx::size_of(dtypes_[o]);
    const bool donate = plain(in) && in.dtype() == dtypes_[o] && desc_use_count(in) == 1 &&
                        in.data_shared_ptr().use_count() == 1 &&
                        in.data_shared_ptr()->is_owned() && in.nbytes() == nbytes;
    if (donate) {
      holders[o].emplace(in);
    } else {
      holders[o].emplace(mx::allocator::malloc(nbytes), in.shape(), dtypes_[o]);
    }
    out_ptr[o] = holders[o]->data<void>();
    donated[o] = donate;
    fresh += donate ? 0 : 1;
  }
  // what the task needs alive: every operand (a donated buffer is its operand's) and the
  // fresh buffers (a new leaf could be dropped before the task has run); per leaf its
  // pointers; strided operands are copied by the task first
  size_t n_held = 0;
  for (auto& x : held_) {
    n_held += x ? 1 : 0;
  }
  std::vector<mx::array>& keep = stash_->keep;
  keep.clear();
  keep.reserve(n_held + fresh);
  std::vector<const mx::array*> op(input_of_.size());
  for (size_t k = 0; k < input_of_.size(); ++k) {
    if (input_of_[k] < 0) {
      keep.push_back(std::move(*held_[k]));  // reserved: no reallocation, the address holds
      held_[k].reset();
      op[k] = &keep.back();
    } else {
      op[k] = &inputs[input_of_[k]];
    }
  }
  for (size_t o = 0; o < holders.size(); ++o) {
    if (!donated[o]) {
      keep.push_back(*holders[o]);
    }
  }
  std::vector<size_t> strided;  // slots
  for (size_t k = 0; k < op.size(); ++k) {
    if (!plain(*op[k])) {
      strided.push_back(k);
    }
  }
  std::vector<Kernel> kernels(n);
  std::vector<size_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& g = *op[ig + i];
    kernels[i] = pick(h_, g.dtype(), ns > 0 ? op[is + i]->dtype() : g.dtype());
    sizes[i] = g.size();
  }
  auto ptr = [&](size_t slot) -> const void* { return op[slot]->data<void>(); };
  std::vector<Leaf> leaves(n);
  for (size_t i = 0; i < n; ++i) {
    Leaf& L = leaves[i];
    L.g = ptr(ig + i);
    if (!accum) {
      L.p = ptr(ip + i);
      L.po = out_ptr[i];
    }
    if (ns > 0) {
      L.s0 = ptr(is + i);
      L.s0o = out_ptr[np + i];
    }
    if (ns > 1) {
      L.s1 = ptr(is + n + i);
      L.s1o = out_ptr[np + n + i];
    }
    if (has_acc) {
      L.acc = static_cast<const float*>(ptr(ia + i));
      L.acco = static_cast<float*>(out_ptr[np + ns * n + i]);
    }
  }
  std::vector<mx::array> strided_src;
  for (size_t slot : strided) {
    strided_src.push_back(*op[slot]);
  }

  return [stash = stash_, h = h_, n, accum, ip, ig, is, ia,
                    leaves = std::move(leaves), kernels = std::move(kernels),
                    sizes = std::move(sizes), strided = std::move(strided),
                    strided_src = std::move(strided_src)]() mutable {
    // strided operands: copied into temporaries, the leaves repointed
    std::vector<std::unique_ptr<char[]>> temps;
    for (size_t k = 0; k < strided.size(); ++k) {
      temps.emplace_back(new char[std::max<size_t>(strided_src[k].nbytes(), 1)]);
      strided_copy(strided_src[k], temps.back().get());
      const size_t slot = strided[k];
      const void* q = temps.back().get();
      if (!accum && slot < ig) {
        leaves[slot - ip].p = q;
      } else if (slot < is) {
        leaves[slot - ig].g = q;
      } else if (slot < ia) {
        const size_t j = slot - is;
        if (j < n) {
          leaves[j].s0 = q;
        } else {
          leaves[j - n].s1 = q;
        }
      } else {
        leaves[slot - ia].acc = static_cast<const float*>(q);
      }
    }
    if (!run_leaves(leaves, kernels, sizes, h, stash.get())) {
      std::vector<mx::array>().swap(stash->keep);
    }  // else main releases them once it has joined: this thread has MLX's tail work left
  };
}

bool FusedUpdate::released() const {
  // the operands whose buffers the new leaves would take: params, states, accs
  const size_t n = static_cast<size_t>(n_);
  const bool accum = h_.algo == ACCUM;
  const size_t ig = accum ? 0 : n, is = ig + n;
  for (size_t k = 0; k < held_.size(); ++k) {
    if (k >= ig && k < is) {
      continue;  // a gradient: read only
    }
    const auto& x = held_[k];
    if (!x || desc_use_count(*x) != 1 || x->data_shared_ptr().use_count() != 1) {
      return false;
    }
  }
  return true;
}

void FusedUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  outputs[0].set_data(mx::allocator::malloc(1));  // the token
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(outputs[0]);
  int idle = EARLY_IDLE;
  {
    std::lock_guard<std::mutex> lk(stash_->claim);
    stash_->early.compare_exchange_strong(idle, EARLY_EVAL, std::memory_order_acq_rel);
  }
  if (idle == EARLY_IDLE) {
    encoder.dispatch(prepare(inputs));
    return;
  }
  // the watcher started the kernel when the caller dropped the previous state: wait until it
  // has chosen the buffers; the stream's later tasks wait for the kernel to finish
  int state;
  while ((state = stash_->early.load(std::memory_order_acquire)) == EARLY_CLAIMED) {
    std::this_thread::yield();
  }
  if (state == EARLY_FAILED) {
    throw std::runtime_error("nestedfn FusedUpdate: the kernel could not be prepared: " +
                             stash_->error);
  }
  encoder.dispatch([stash = stash_] {
    stash->early.wait(EARLY_RUNNING, std::memory_order_acquire);
  });
}

// -- the early start ---------------------------------------------------------------------------
//
// A step whose operands are all computed (evaluated gradients) can start its kernel as soon
// as the caller has dropped the previous state (``state = step(state, grads)``), before MLX's
// evaluator has walked the graph up to the FusedUpdate (on a LoRA tree about a millisecond of
// the main thread's time, with a thousand new leaves and their siblings): one watcher thread
// checks, from the end of the call until the eval claims the step (or a few milliseconds),
// whether only the primitive still refers to every operand whose buffer a new leaf would
// take; if so it claims the step, chooses the buffers exactly as eval_cpu would (all donated)
// and runs the kernel, main joining it after its last group as before.  The check is the
// donation test MLX itself uses (nothing else refers to the array or shares its buffer):
// once true it stays true, as no handle to the operand exists anywhere else.
namespace {

class Watcher {
 public:
  void post(std::weak_ptr<FusedUpdate> prim, std::shared_ptr<Stash> stash) {
    {
      std::lock_guard<std::mutex> lk(m_);
      pending_.push_back({std::move(prim), std::move(stash), Clock::now()});
    }
    cv_.notify_one();
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    std::weak_ptr<FusedUpdate> prim;
    std::shared_ptr<Stash> stash;
    Clock::time_point since;
  };
  static constexpr auto PATIENCE = std::chrono::milliseconds(5);

  void loop() {
    std::vector<Entry> mine;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        if (mine.empty()) {
          cv_.wait(lk, [&] { return !pending_.empty(); });
        }
        for (auto& e : pending_) {
          mine.push_back(std::move(e));
        }
        pending_.clear();
      }
      const auto now = Clock::now();
      std::vector<Entry> left;
      for (auto& e : mine) {
        if (e.stash->early.load(std::memory_order_acquire) != EARLY_IDLE) {
          continue;  // the eval claimed it
        }
        auto prim = e.prim.lock();
        if (!prim) {
          continue;  // the step was dropped unevaluated
        }
        std::function<void()> task;
        {
          std::lock_guard<std::mutex> lk(e.stash->claim);
          if (e.stash->early.load(std::memory_order_acquire) == EARLY_IDLE && prim->released()) {
            e.stash->early.store(EARLY_CLAIMED, std::memory_order_release);
            try {
              task = prim->prepare({});
            } catch (const std::exception& ex) {  // out of memory, ...: the eval says so
              e.stash->error = ex.what();
              e.stash->early.store(EARLY_FAILED, std::memory_order_release);
              continue;
            }
          }
        }
        if (task) {
          prim.reset();
          early_count.fetch_add(1, std::memory_order_relaxed);
          e.stash->early.store(EARLY_RUNNING, std::memory_order_release);
          task();
          e.stash->early.store(EARLY_DONE, std::memory_order_release);
          e.stash->early.notify_all();
          continue;
        }
        if (now - e.since < PATIENCE) {
          left.push_back(std::move(e));
        }
      }
      mine.swap(left);
      if (!mine.empty()) {
        std::this_thread::yield();
      }
    }
  }

  std::mutex m_;
  std::condition_variable cv_;
  std::vector<Entry> pending_;
  std::thread thread_{[this] { loop(); }};

 public:
  Watcher() {
    thread_.detach();
  }
};

Watcher& watcher() {
  static Watcher* w = new Watcher();  // never destroyed: its thread is detached
  return *w;
}

}  // namespace

void watch_early(std::weak_ptr<FusedUpdate> prim, std::shared_ptr<Stash> stash) {
  // a forked child has no watcher thread (only the forking thread survives a fork): its
  // steps start at their eval
  static const pid_t parent = getpid();
  if (getpid() == parent) {
    watcher().post(std::move(prim), std::move(stash));
  }
}

uint64_t early_starts() {
  return early_count.load(std::memory_order_relaxed);
}

}  // namespace nestedfn
