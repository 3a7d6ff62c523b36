// nestedfn native: the CPU eval of FusedUpdate (see fused_step.h).
//
// Arithmetic: every operation of nestedfn's eager step is done in float and rounded to the
// dtype the eager op returns, in the eager order (no FMA contraction: -ffp-contract=off), so
// results are bit-identical to ``apply_gradients``.  For float32 leaves the roundings are
// no-ops and the loops vectorise (-fno-math-errno lets sqrt vectorise).
#include "fused_step.h"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

namespace nestedfn {

// One multi-threaded piece of work: fn(0..n-1), the items taken in order from a shared
// counter by every thread that drains it.
struct Job {
  size_t n = 0;
  std::function<void(size_t)> fn;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};

  void drain() {
    size_t mine = 0;
    for (size_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n; ++mine) {
      fn(k);
    }
    if (mine > 0) {
      done.fetch_add(mine, std::memory_order_acq_rel);
    }
  }
  void wait_done() const {  // until every item is done, also those other threads took
    while (done.load(std::memory_order_acquire) < n) {
      std::this_thread::yield();
    }
  }
};

namespace {

using bf16 = mx::bfloat16_t;
using f16 = mx::float16_t;

#define NF_INLINE inline __attribute__((always_inline))
// iteration i reads and writes element i only (also when an output is a donated input
// buffer); without this GCC 12 gives up on the loops
#define NF_IVDEP _Pragma("GCC ivdep")

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
  const void *p = nullptr, *g = nullptr, *s0 = nullptr, *s1 = nullptr;
  const float* acc = nullptr;
  void *po = nullptr, *s0o = nullptr, *s1o = nullptr;
  float* acco = nullptr;
};

using Kernel = void (*)(const Leaf&, const Hyper&, size_t, size_t);

// g := (acc + g) / f, rounded as nested's eager chunk (float32 sums), then in P; acc' = 0
template <class P, bool ACC>
NF_INLINE float grad_in(const float* __restrict acc, const P* __restrict g, size_t i, float f) {
  float gi = static_cast<float>(g[i]);
  if constexpr (ACC) {
    gi = rd<P>((acc[i] + gi) / f);  // (acc + g.astype(float32)) / f, then .astype(g.dtype)
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
NF_IVDEP
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
NF_IVDEP
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
NF_IVDEP
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
NF_IVDEP
  for (size_t i = b; i < e; ++i) {
    ao[i] = a[i] + static_cast<float>(g[i]);
  }
}

template <class P, class M, bool ACC, bool WD>
Kernel pick_algo(Algo algo) {
  switch (algo) {
    case ADAM:
      return adam_kernel<P, M, ACC, WD>;
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
  return (std::ostringstream() << d).str();
}

[[noreturn]] void bad_leaf(size_t i, const std::string& why) {
  throw std::invalid_argument("leaf " + std::to_string(i) + ": " + why);
}

bool plain(const mx::array& a) {
  return a.flags().row_contiguous && a.data_size() == a.size();
}

// A contiguous copy of a strided (broadcast, transposed, sliced) operand.
void strided_copy(const mx::array& src, char* dst) {
  const size_t isz = src.itemsize();
  const char* base = src.data<char>();
  const auto& shape = src.shape();
  const auto& strides = src.strides();
  const int nd = static_cast<int>(shape.size());
  std::vector<int64_t> idx(nd, 0);
  for (size_t k = 0; k < src.size(); ++k) {
    int64_t loc = 0;
    for (int d = 0; d < nd; ++d) {
      loc += idx[d] * strides[d];
    }
    std::memcpy(dst + k * isz, base + loc * static_cast<int64_t>(isz), isz);
    for (int d = nd - 1; d >= 0 && ++idx[d] == shape[d]; --d) {
      idx[d] = 0;
    }
  }
}

using Strided = std::vector<std::pair<size_t, mx::array>>;  // (slot, operand)

// The operands' data pointers; a strided operand's is null, and it is listed in ``strided``.
std::vector<const void*> data_ptrs(const std::vector<const mx::array*>& ops, Strided& strided) {
  std::vector<const void*> in(ops.size());
  for (size_t k = 0; k < ops.size(); ++k) {
    if (plain(*ops[k])) {
      in[k] = ops[k]->data<void>();
    } else {
      strided.emplace_back(k, *ops[k]);
    }
  }
  return in;
}

// Point ``in`` at contiguous copies (in ``temps``) of the strided operands, once computed.
void copy_strided(std::vector<const void*>& in, const Strided& strided,
                  std::vector<std::unique_ptr<char[]>>& temps) {
  for (const auto& [slot, x] : strided) {
    temps.emplace_back(new char[std::max<size_t>(x.nbytes(), 1)]);
    strided_copy(x, temps.back().get());
    in[slot] = temps.back().get();
  }
}

constexpr size_t CHUNK = size_t(1) << 16;  // elements per work item

// New leaves per TakeOutputs group: at most TAKE_GROUPS groups per kernel, of at least
// TAKE_MIN leaves.  Each group is one task on the stream, and MLX's evaluator stops the main
// thread once about a hundred tasks are queued; fewer, larger groups cost siblings.
constexpr size_t TAKE_GROUPS = 96, TAKE_MIN = 4;

// A small persistent pool of workers that sleep on a condition variable between jobs.
class Pool {
 public:
  // Run ``job`` on the caller and nt - 1 workers; returns once every item is done (also
  // those another thread took).
  void run(size_t nt, const std::shared_ptr<Job>& job) {
    if (nt <= 1) {
      job->drain();
      job->wait_done();
      return;
    }
    std::lock_guard<std::mutex> serial(run_mutex_);  // one job at a time
    const size_t workers = std::min(nt, job->n) - 1;
    while (threads_.size() < workers) {
      const size_t id = threads_.size();
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();
    }
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

// A step laid out for the kernels: per leaf its kernel, its size and its pointers.  Operand
// slots: params (absent for ACCUM), grads, states, accs; new leaves in fused_update's order.
struct Plan {
  std::vector<Kernel> kernels;
  std::vector<size_t> sizes;
  std::vector<Leaf> leaves;
};

Plan plan_for(const Hyper& h, size_t n, const std::vector<const mx::array*>& ops) {
  const size_t ns = n_states(h.algo), ig = h.algo == ACCUM ? 0 : n, is = ig + n;
  Plan plan{std::vector<Kernel>(n), std::vector<size_t>(n), {}};
  for (size_t i = 0; i < n; ++i) {
    const mx::array& g = *ops[ig + i];
    plan.kernels[i] = pick(h, g.dtype(), ns > 0 ? ops[is + i]->dtype() : g.dtype());
    plan.sizes[i] = g.size();
  }
  return plan;
}

// Every leaf's pointers: operands ``in`` in slot order, new leaves ``out`` in result order.
void set_leaves(Plan& plan, const Hyper& h, const std::vector<const void*>& in,
                const std::vector<void*>& out) {
  const size_t n = plan.sizes.size(), ns = n_states(h.algo);
  const bool accum = h.algo == ACCUM;
  const size_t ig = accum ? 0 : n, is = ig + n, ia = is + ns * n, np = accum ? 0 : n;
  plan.leaves.assign(n, Leaf{});
  for (size_t i = 0; i < n; ++i) {
    Leaf& L = plan.leaves[i];
    L.g = in[ig + i];
    if (!accum) {
      L.p = in[i];
      L.po = out[i];
    }
    if (ns > 0) {
      L.s0 = in[is + i];
      L.s0o = out[np + i];
    }
    if (ns > 1) {
      L.s1 = in[is + n + i];
      L.s1o = out[np + n + i];
    }
    if (accum || h.with_acc) {
      L.acc = static_cast<const float*>(in[ia + i]);
      L.acco = static_cast<float*>(out[np + ns * n + i]);
    }
  }
}

// Run every leaf's kernel over chunks of CHUNK elements on every core, at most a thread per
// 32K elements of work.  Returns whether MLX's main thread joins
// the kernel (see Stash).
bool run_plan(const Plan& plan, const Hyper& h, Stash* stash = nullptr) {
  struct Item {
    size_t leaf, b, e;
  };
  std::vector<Item> items;
  size_t total = 0;
  for (size_t i = 0; i < plan.sizes.size(); ++i) {
    for (size_t b = 0; b < plan.sizes[i]; b += CHUNK) {
      items.push_back({i, b, std::min(plan.sizes[i], b + CHUNK)});
    }
    total += plan.sizes[i];
  }
  size_t nt = std::max(1u, std::thread::hardware_concurrency());
  nt = std::min({nt, std::max<size_t>(1, total >> 15), items.size()});
  auto job = std::make_shared<Job>();
  job->n = items.size();
  job->fn = [&](size_t k) {
    const Item& it = items[k];
    plan.kernels[it.leaf](plan.leaves[it.leaf], h, it.b, it.e);
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

// The operands in slot order, checked; the new leaves' dtypes in result order.
std::vector<const mx::array*> operands(const std::vector<mx::array>& params,
                                       const std::vector<mx::array>& grads,
                                       const std::vector<std::vector<mx::array>>& states,
                                       const std::vector<mx::array>& accs, const Hyper& h,
                                       std::vector<mx::Dtype>& dtypes) {
  const bool accum = h.algo == ACCUM, has_acc = accum || h.with_acc;
  const size_t n = grads.size();
  bool ok = states.size() == static_cast<size_t>(n_states(h.algo)) &&
            params.size() == (accum ? 0 : n) && accs.size() == (has_acc ? n : 0);
  for (auto& st : states) {
    ok = ok && st.size() == n;
  }
  if (!ok) {
    throw std::invalid_argument("fused_update: lists of different lengths");
  }
  std::vector<const mx::array*> ops;
  for (auto& p : params) {
    ops.push_back(&p);
    dtypes.push_back(p.dtype());
  }
  for (auto& g : grads) {
    ops.push_back(&g);
  }
  for (auto& st : states) {
    for (auto& x : st) {
      ops.push_back(&x);
      dtypes.push_back(x.dtype());
    }
  }
  for (auto& a : accs) {
    ops.push_back(&a);
    dtypes.push_back(mx::float32);
  }
  for (size_t i = 0; i < n; ++i) {
    const auto& g = grads[i];
    if (!is_float(g.dtype())) {
      bad_leaf(i, "gradient dtype " + dtype_name(g.dtype()) + " is not a float type");
    }
    if (!accum && params[i].shape() != g.shape()) {
      bad_leaf(i, "gradient shape differs from the parameter's");
    }
    if (!accum && params[i].dtype() != g.dtype()) {
      bad_leaf(i, "gradient dtype " + dtype_name(g.dtype()) + " differs from the parameter's " +
                      dtype_name(params[i].dtype()));
    }
    for (auto& st : states) {
      if (st[i].shape() != g.shape()) {
        bad_leaf(i, "optimizer state shape differs from the parameter's");
      }
      if (st[i].dtype() != states[0][i].dtype() ||
          (st[i].dtype() != g.dtype() && st[i].dtype() != mx::float32)) {
        bad_leaf(i, "optimizer state dtype " + dtype_name(st[i].dtype()) +
                        " is neither the parameter's nor float32");
      }
    }
    if (has_acc && (accs[i].shape() != g.shape() || accs[i].dtype() != mx::float32)) {
      bad_leaf(i, "accumulator is not float32 of the gradient's shape");
    }
  }
  return ops;
}

// The operand slot whose buffer new leaf o may take (params, states, accs: past the grads).
size_t source_slot(size_t o, size_t n, bool accum) {
  return accum ? n + o : (o < n ? o : o + n);
}

}  // namespace

int n_states(Algo algo) {
  return algo == ADAM ? 2 : (algo == ACCUM ? 0 : 1);
}

std::vector<mx::array> fused_update(const std::vector<mx::array>& params,
                                    const std::vector<mx::array>& grads,
                                    const std::vector<std::vector<mx::array>>& states,
                                    const std::vector<mx::array>& accs, const Hyper& h) {
  std::vector<mx::Dtype> dtypes;
  const auto ops = operands(params, grads, states, accs, h, dtypes);
  const size_t n = grads.size();
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
  std::vector<mx::Shape> shapes;
  for (size_t o = 0; o < dtypes.size(); ++o) {
    shapes.push_back(ops[source_slot(o, n, h.algo == ACCUM)]->shape());
  }
  const mx::Stream stream = mx::default_stream(mx::Device::cpu);
  auto stash = std::make_shared<Stash>();
  stash->out.resize(shapes.size());
  auto prim = std::make_shared<FusedUpdate>(stream, h, static_cast<int>(n), dtypes, stash,
                                            std::move(held), std::move(input_of));
  auto token = mx::array(mx::Shape{}, mx::bool_, std::move(prim), std::move(inputs));
  const size_t n_out = shapes.size(), k = std::max<size_t>((n_out + TAKE_GROUPS - 1) / TAKE_GROUPS, TAKE_MIN);
  stash->groups = (n_out + k - 1) / k;
  std::vector<mx::array> result;
  result.reserve(n_out);
  for (size_t b = 0; b < n_out; b += k) {
    const size_t e = std::min(n_out, b + k);
    auto outs = mx::array::make_arrays(
        std::vector<mx::Shape>(shapes.begin() + b, shapes.begin() + e),
        std::vector<mx::Dtype>(dtypes.begin() + b, dtypes.begin() + e),
        std::make_shared<TakeOutputs>(stream, stash, b, e), {token});
    std::move(outs.begin(), outs.end(), std::back_inserter(result));
  }
  return result;
}

std::vector<mx::array> fused_apply(const std::vector<mx::array>& params,
                                   const std::vector<mx::array>& grads,
                                   const std::vector<std::vector<mx::array>>& states,
                                   const std::vector<mx::array>& accs, const Hyper& h) {
  std::vector<mx::Dtype> dtypes;
  const auto ops = operands(params, grads, states, accs, h, dtypes);
  std::vector<mx::array> pending;
  for (auto* x : ops) {
    if (x->is_tracer()) {
      throw std::invalid_argument("fused_apply: traced inputs (inside mx.compile): not eager");
    }
    if (x->status() == mx::array::Status::unscheduled) {
      pending.push_back(*x);
    }
  }
  mx::eval(pending);
  for (auto* x : ops) {
    const_cast<mx::array*>(x)->wait();
  }
  std::vector<mx::array> out;
  std::vector<void*> out_ptr;
  for (size_t o = 0; o < dtypes.size(); ++o) {
    const auto& like = *ops[source_slot(o, grads.size(), h.algo == ACCUM)];
    out.emplace_back(mx::allocator::malloc(like.size() * mx::size_of(dtypes[o])), like.shape(),
                     dtypes[o]);
    out_ptr.push_back(out.back().data<void>());
  }
  Strided strided;
  std::vector<const void*> in = data_ptrs(ops, strided);
  std::vector<std::unique_ptr<char[]>> temps;
  copy_strided(in, strided, temps);
  Plan plan = plan_for(h, grads.size(), ops);
  set_leaves(plan, h, in, out_ptr);
  run_plan(plan, h);
  return out;
}

void FusedUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  outputs[0].set_data(mx::allocator::malloc(1));  // the token
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(outputs[0]);
  // What the task needs alive: every held operand (moved out of the primitive) and the fresh
  // buffers (a new leaf could be dropped before the task has run).  keep is reserved, so the
  // addresses of its arrays hold.
  std::vector<mx::array>& keep = stash_->keep;
  keep.reserve(held_.size() + dtypes_.size());
  std::vector<const mx::array*> ops(held_.size());
  for (size_t k = 0; k < held_.size(); ++k) {
    if (held_[k]) {
      keep.push_back(std::move(*held_[k]));
      held_[k].reset();
      ops[k] = &keep.back();
    } else {
      ops[k] = &inputs[input_of_[k]];
    }
  }
  // new leaf o takes its operand's buffer when MLX's donation test allows it (nothing else
  // refers to the operand or shares its buffer: the caller dropped the previous state)
  std::vector<void*> out_ptr(dtypes_.size());
  for (size_t o = 0; o < dtypes_.size(); ++o) {
    const auto& in = *ops[source_slot(o, n_, h_.algo == ACCUM)];
    const size_t nbytes = in.size() * mx::size_of(dtypes_[o]);
    auto& slot = stash_->out[o];
    if (plain(in) && in.dtype() == dtypes_[o] && in.is_donatable() && in.nbytes() == nbytes) {
      slot.emplace(in);
    } else {
      slot.emplace(mx::allocator::malloc(nbytes), in.shape(), dtypes_[o]);
      keep.push_back(*slot);
    }
    out_ptr[o] = slot->data<void>();
  }
  Strided strided;
  std::vector<const void*> in = data_ptrs(ops, strided);
  encoder.dispatch([stash = stash_, h = h_, plan = plan_for(h_, n_, ops), in = std::move(in),
                    out_ptr = std::move(out_ptr), strided = std::move(strided)]() mutable {
    std::vector<std::unique_ptr<char[]>> temps;
    copy_strided(in, strided, temps);
    set_leaves(plan, h, in, out_ptr);
    if (!run_plan(plan, h, stash.get())) {
      std::vector<mx::array>().swap(stash->keep);
    }  // else main releases them once it has joined: this thread has MLX's tail work left
  });
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
      // the kernel started while main was busy: join it, then release what it kept alive
      // here rather than on the stream's thread, which still has this eval's group tasks
      stash_->job->drain();
      stash_->job->wait_done();
      std::vector<mx::array>().swap(stash_->keep);
    }
  }
}

}  // namespace nestedfn
