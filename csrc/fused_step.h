// nestedfn native: one multi-tensor primitive for an elementwise optimizer step (CPU only).
//
// FusedUpdate reads every leaf where it lies, runs the whole update of one optimizer (Adam or
// AdamW, Lion, momentum, or a CMS tier's chunk accumulation) in one pass over memory on
// several threads, and writes the new leaves, each into a donated input buffer when MLX's own
// donation test (array::is_donatable) allows it.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace nestedfn {

namespace mx = mlx::core;

enum Algo : int { ADAM = 0, LION = 1, MOMENTUM = 2, ACCUM = 3 };

// The scalars of one step (``_native.Hyper``), each rounded as the eager step rounds it.
struct Hyper {
  Algo algo = ADAM;
  double b1 = 0.9;    // Adam/Lion b1; momentum: decay
  double b2 = 0.999;  // Adam/Lion b2
  double eps = 1e-8;
  double c1 = 1.0;  // Adam: 1 / (1 - b1^t)
  double c2 = 1.0;  // Adam: 1 / sqrt(1 - b2^t)
  bool nesterov = false;
  bool has_wd = false;  // decoupled weight decay: u += wd * p
  double wd = 0.0;
  double neg_lr = -1e-3;    // u *= -lr
  double post = 1.0;        // then u *= post (nested_adam's global schedule)
  bool with_acc = false;    // g := (acc + g) / f: a CMS tier's chunk; acc' = 0
  double f = 1.0;
};

int n_states(Algo algo);

struct Job;  // fused_step.cpp

// What a FusedUpdate hands its TakeOutputs groups: every new leaf's buffer, and who runs the
// kernel: main (evaluating the groups) joins the token's task after its last group if that
// task started while main was busy (two threads, none to wake), else the task uses the pool.
struct Stash {
  std::vector<std::optional<mx::array>> out;
  size_t groups = 0;
  std::atomic<size_t> groups_done{0};
  std::atomic<int> meet{0};  // 1: the kernel runs and main joins it; 2: main is done
  std::shared_ptr<Job> job;
  std::vector<mx::array> keep;  // what the kernel reads and writes, alive until it is done
};

// The whole update of one step over n leaves.  Its only output is a one-byte token; the new
// leaves are TakeOutputs arrays of it.  (MLX's multi-output primitives make every output hold
// every input and every sibling: for a 336-leaf LoRA tree, 1008 outputs and 1344 inputs, more
// work than the update itself.)  Operands already computed when the step is built are held
// here instead of being graph inputs, so MLX's evaluator neither visits nor hashes them.
class FusedUpdate : public mx::Primitive {
 public:
  FusedUpdate(mx::Stream stream, Hyper h, int n, std::vector<mx::Dtype> dtypes,
              std::shared_ptr<Stash> stash, std::vector<std::optional<mx::array>> held,
              std::vector<int> input_of)
      : mx::Primitive(stream), h_(h), n_(n), dtypes_(std::move(dtypes)), stash_(std::move(stash)),
        held_(std::move(held)), input_of_(std::move(input_of)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("nestedfn: the native step has no GPU eval");
  }
  const char* name() const override { return "NestedfnFusedUpdate"; }

 private:
  Hyper h_;
  int n_;                          // leaves
  std::vector<mx::Dtype> dtypes_;  // of the new leaves, in result order
  std::shared_ptr<Stash> stash_;
  // per operand slot (params, grads, states, accs): the operand when held, else
  // input_of_[slot] is its index among the graph inputs
  std::vector<std::optional<mx::array>> held_;
  std::vector<int> input_of_;
};

// New leaves [begin, end) of a FusedUpdate (its only input is the token).
class TakeOutputs : public mx::Primitive {
 public:
  TakeOutputs(mx::Stream stream, std::shared_ptr<Stash> stash, size_t begin, size_t end)
      : mx::Primitive(stream), stash_(std::move(stash)), begin_(begin), end_(end) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("nestedfn: the native step has no GPU eval");
  }
  const char* name() const override { return "NestedfnTakeOutputs"; }

 private:
  std::shared_ptr<Stash> stash_;
  size_t begin_, end_;
};

// The new leaves: params' (absent for ACCUM), one list per state (Adam: m, v; Lion: m;
// momentum: trace), then acc' (with_acc or ACCUM), concatenated in that order.  Lazy: computed
// when MLX evaluates them, on a CPU stream.  Throws std::invalid_argument naming the leaf.
std::vector<mx::array> fused_update(const std::vector<mx::array>& params,
                                    const std::vector<mx::array>& grads,
                                    const std::vector<std::vector<mx::array>>& states,
                                    const std::vector<mx::array>& accs, const Hyper& h);

// The same update computed now (the inputs evaluated first), into fresh buffers: no MLX graph
// work per array (the cheaper way on trees of many tiny arrays), but no donation either.
std::vector<mx::array> fused_apply(const std::vector<mx::array>& params,
                                   const std::vector<mx::array>& grads,
                                   const std::vector<std::vector<mx::array>>& states,
                                   const std::vector<mx::array>& accs, const Hyper& h);

}  // namespace nestedfn
