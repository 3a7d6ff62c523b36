// nestedfn native: one multi-tensor primitive for an elementwise optimizer step.
//
// FusedUpdate reads every leaf where it lies (no gather, no packing), runs the whole
// update of one optimizer (Adam/AdamW, Lion, momentum, or the Continuum Memory System's
// chunk accumulation) in one pass over memory, on several threads, and writes new leaves,
// reusing a donated input buffer for each output when MLX allows it.  Only a CPU eval is
// provided: the GPU evals throw, and nestedfn's Python side never builds the primitive
// off the CPU.
#pragma once

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

class FusedUpdate : public mx::Primitive {
 public:
  FusedUpdate(mx::Stream stream, Hyper h, int n) : mx::Primitive(stream), h_(h), n_(n) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "NestedfnFusedUpdate";
  }

 private:
  Hyper h_;
  int n_;  // leaves
};

// The new leaves: params' (absent for ACCUM), one list per state (Adam: m, v; Lion: m;
// momentum: trace), then acc' when with_acc or ACCUM; all concatenated in that order.
// Throws std::invalid_argument naming the leaf index and what is wrong.
std::vector<mx::array> fused_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<mx::array>& accs,
    const Hyper& h,
    mx::StreamOrDevice s = {});

// fused_update over groups of at most ``max_leaves`` leaves, one primitive per group (MLX's
// multi-output primitives cost outputs x (inputs + outputs) to build and evaluate), the
// groups spread over ``streams`` (CPU streams, each run by its own thread) by their sizes.
// Same result layout as fused_update.
std::vector<mx::array> fused_step(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<mx::array>& accs,
    const Hyper& h,
    int max_leaves,
    const std::vector<mx::Stream>& streams);

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
