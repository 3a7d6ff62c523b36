// nestedfn native: one multi-tensor primitive for an elementwise optimizer step.
//
// FusedUpdate reads every leaf where it lies (no gather, no packing), runs the whole
// update of one optimizer (Adam/AdamW, Lion, momentum, or the Continuum Memory System's
// chunk accumulation) in one pass over memory, on several threads, and writes new leaves,
// reusing a donated input buffer for each output when MLX allows it.  Only a CPU eval is
// provided: the GPU evals throw, and nestedfn's Python side never builds the primitive
// off the CPU.
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nestedfn {

namespace mx = mlx::core;

enum Algo : int { ADAM = 0, LION = 1, MOMENTUM = 2, ACCUM = 3 };

// Scalars of one step.  Every one is rounded as nestedfn's eager step rounds it: the Python
// double goes to float32, then to the dtype of the array it multiplies (MLX's weak scalars).
struct Hyper {
  int algo = ADAM;
  double b1 = 0.9;    // Adam/Lion b1; momentum: decay
  double b2 = 0.999;  // Adam/Lion b2
  double eps = 1e-8;  // Adam
  double c1 = 1.0;    // Adam: 1 / (1 - b1^t)   (1 without bias correction: exact)
  double c2 = 1.0;    // Adam: 1 / sqrt(1 - b2^t)
  bool nesterov = false;  // momentum
  bool has_wd = false;    // decoupled weight decay: u += wd * p
  double wd = 0.0;
  double neg_lr = -1e-3;  // u *= -lr
  bool has_post = false;  // then u *= post (nested_adam's global schedule)
  double post = 1.0;
  bool with_acc = false;  // g := (acc + g) [/ f]: a CMS chunk, acc' = 0
  bool mean = true;
  double f = 1.0;
  int threads = 0;  // 0: hardware concurrency
};

int n_states(int algo);

struct Job;  // a multi-threaded piece of work (fused_step.cpp)

// Who starts a step's kernel (fused_step.cpp, "the early start")
enum Early : int {
  EARLY_IDLE = 0,     // nobody yet
  EARLY_CLAIMED = 1,  // the watcher is choosing the buffers
  EARLY_RUNNING = 2,  // the watcher runs the kernel
  EARLY_DONE = 3,     // ... and it is done
  EARLY_EVAL = 4,     // the eval reached the FusedUpdate first: it starts the kernel
  EARLY_FAILED = 5,   // the watcher could not prepare it (``error``): the eval throws
};

// What a step's FusedUpdate hands its TakeOutputs groups: the buffer of every new leaf,
// chosen (donated operand or fresh) when the FusedUpdate is evaluated, taken by its group
// when that is evaluated.
struct Stash {
  std::vector<std::optional<mx::array>> out;
  // Who runs the kernel.  MLX's main thread evaluates the token, then every TakeOutputs
  // group; the token's task runs on the stream's thread meanwhile.  Whichever of the two
  // comes second decides: a task that starts while main is still busy runs the kernel on its
  // own thread and main joins it once its last group is done (two cores, no third thread
  // to wake or to wait for a core); a task that starts after that uses a pool worker.  A
  // step whose operands are all computed may instead be started before its eval by the
  // watcher (``early``, fused_step.cpp "the early start"); main joins it the same way.
  size_t groups = 0;
  std::atomic<size_t> groups_done{0};
  std::atomic<int> meet{0};  // 0: neither yet; 1: the kernel is running (job set); 2: main is done
  std::shared_ptr<Job> job;
  // What the kernel reads and writes (held operands, fresh buffers), alive until it is done;
  // released by main when main joins the kernel, else by the kernel's task.
  std::vector<mx::array> keep;
  std::atomic<int> early{EARLY_IDLE};
  std::mutex claim;  // the eval's and the watcher's claims of the step
  std::string error;
};

// The whole update of one step over n leaves.  Its single output is a one-byte token; the
// new leaves are TakeOutputs arrays of that token.  MLX's multi-output primitives make every
// output hold every input and every sibling (outputs x (inputs + outputs) references to
// build, evaluate and detach), which for a 336-leaf LoRA tree (1008 outputs, 1344 inputs)
// cost more than the update itself; a token and groups of new leaves taken from it
// (TakeOutputs, single input) make the graph linear in the leaves and the update one task on
// all cores.
class FusedUpdate : public mx::Primitive {
 public:
  FusedUpdate(mx::Stream stream, Hyper h, int n, std::vector<mx::Dtype> dtypes,
              std::shared_ptr<Stash> stash,
              std::vector<std::optional<mx::array>> held, std::vector<int> input_of)
      : mx::Primitive(stream),
        h_(h),
        n_(n),
        dtypes_(std::move(dtypes)),
        stash_(std::move(stash)),
        held_(std::move(held)),
        input_of_(std::move(input_of)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "NestedfnFusedUpdate";
  }

  // The kernel's task over ``inputs`` (empty when every operand is held), every new leaf's
  // buffer chosen and what the kernel needs alive in the stash.  Called once, by eval_cpu or
  // by the watcher that claimed the step.
  std::function<void()> prepare(const std::vector<mx::array>& inputs);
  // Whether only this primitive refers to every operand a new leaf would take the buffer of.
  bool released() const;

 private:
  Hyper h_;
  int n_;  // leaves
  std::vector<mx::Dtype> dtypes_;  // of the new leaves, in fused_update's result order (each
                                  // shaped as the operand it replaces)
  std::shared_ptr<Stash> stash_;
  // The operands, in slot order (params, grads, states, accs): one already computed when the
  // step was built is held here rather than made a graph input (MLX's evaluator visits,
  // hashes and fences every input: for a LoRA tree ~1000 arrays that need none of it);
  // input_of_[slot] is its index among the inputs otherwise (-1: held).
  std::vector<std::optional<mx::array>> held_;
  std::vector<int> input_of_;
};

// New leaves [begin, end) of a FusedUpdate (its only input is the token), as one
// multi-output primitive: their buffers are the ones the FusedUpdate chose, written by the
// FusedUpdate's task, which runs before this primitive's on the same stream.  Groups keep
// both MLX costs small: siblings (quadratic in a group's size) and scheduled tasks (one per
// group; MLX's evaluator waits for the stream once more than ten tasks are queued).
class TakeOutputs : public mx::Primitive {
 public:
  TakeOutputs(mx::Stream stream, std::shared_ptr<Stash> stash, size_t begin, size_t end)
      : mx::Primitive(stream), stash_(std::move(stash)), begin_(begin), end_(end) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "NestedfnTakeOutputs";
  }

 private:
  std::shared_ptr<Stash> stash_;
  size_t begin_, end_;
};

// The new leaves: params' (absent for ACCUM), one list per state (Adam: m, v; Lion: m;
// momentum: trace), then acc' when with_acc or ACCUM; all concatenated in that order.
// Lazy: computed when MLX evaluates them, on ``s`` (a CPU stream), each new leaf in a
// donated input buffer when nothing else refers to that input any more.
// Throws std::invalid_argument naming the leaf index and what is wrong.
std::vector<mx::array> fused_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<mx::array>& accs,
    const Hyper& h,
    mx::StreamOrDevice s = {});

// How many kernels the watcher started early (before the eval reached them): for tests.
uint64_t early_starts();

// The same update computed now, synchronously (the inputs are evaluated first), on all
// cores: the new leaves come back evaluated, as plain arrays without a graph.  No MLX
// per-array graph work (siblings, eval, detach), but no buffer donation either: the caller
// still refers to the inputs during the call.
std::vector<mx::array> fused_apply(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<mx::array>& accs,
    const Hyper& h);

}  // namespace nestedfn
