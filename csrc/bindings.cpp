// nestedfn native: Python bindings (nanobind, in MLX's nanobind domain so that
// mlx.core.array objects pass straight through).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "fused_step.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

#define NF_STR2(x) #x
#define NF_STR(x) NF_STR2(x)

namespace nestedfn {
void bind_tree_spec(nb::module_& m);  // tree_spec.cpp
}

NB_MODULE(_native, m) {
  m.doc() = "nestedfn's multi-tensor fused optimizer step (CPU), an MLX extension";
  // the MLX this module was compiled against; nestedfn.native refuses to use the module
  // under any other MLX (the C++ ABI is not stable across MLX releases)
  m.attr("MLX_VERSION") = NF_STR(MLX_VERSION_MAJOR) "." NF_STR(MLX_VERSION_MINOR) "." NF_STR(
      MLX_VERSION_PATCH);
  m.attr("ADAM") = int(nestedfn::ADAM);
  m.attr("LION") = int(nestedfn::LION);
  m.attr("MOMENTUM") = int(nestedfn::MOMENTUM);
  m.attr("ACCUM") = int(nestedfn::ACCUM);
  nestedfn::bind_tree_spec(m);
  m.def("early_starts", &nestedfn::early_starts,
        "How many kernels started as soon as the caller dropped the previous state (tests).");
  m.def(
      "fused_update",
      [](const std::vector<mlx::core::array>& params,
         const std::vector<mlx::core::array>& grads,
         const std::vector<std::vector<mlx::core::array>>& states,
         const std::vector<mlx::core::array>& accs,
         int algo,
         double b1,
         double b2,
         double eps,
         double c1,
         double c2,
         bool nesterov,
         bool has_wd,
         double wd,
         double neg_lr,
         bool has_post,
         double post,
         bool with_acc,
         double f,
         int threads,
         bool lazy) {
        nestedfn::Hyper h;
        h.algo = algo;
        h.b1 = b1;
        h.b2 = b2;
        h.eps = eps;
        h.c1 = c1;
        h.c2 = c2;
        h.nesterov = nesterov;
        h.has_wd = has_wd;
        h.wd = wd;
        h.neg_lr = neg_lr;
        h.has_post = has_post;
        h.post = has_post ? post : 1.0;
        h.with_acc = with_acc;
        h.f = with_acc ? f : 1.0;
        h.threads = threads;
        if (!lazy) {
          nb::gil_scoped_release release;
          return nestedfn::fused_apply(params, grads, states, accs, h);
        }
        return nestedfn::fused_update(params, grads, states, accs, h, mlx::core::Device::cpu);
      },
      "params"_a, "grads"_a, "states"_a, "accs"_a, "algo"_a, "b1"_a, "b2"_a, "eps"_a, "c1"_a,
      "c2"_a, "nesterov"_a, "has_wd"_a, "wd"_a, "neg_lr"_a, "has_post"_a, "post"_a,
      "with_acc"_a, "f"_a, "threads"_a, "lazy"_a = true,
      "The new leaves of one optimizer step over many arrays (see csrc/fused_step.h).");
}
