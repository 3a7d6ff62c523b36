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

NB_MODULE(_native, m) {
  using nestedfn::Hyper;
  m.doc() = "nestedfn's multi-tensor fused optimizer step (CPU), an MLX extension";
  // the MLX this module was compiled against: nestedfn.fast.native refuses the module under
  // any other MLX (MLX's C++ ABI is not stable across releases)
  m.attr("MLX_VERSION") = NF_STR(MLX_VERSION_MAJOR) "." NF_STR(MLX_VERSION_MINOR) "." NF_STR(
      MLX_VERSION_PATCH);
  nb::enum_<nestedfn::Algo>(m, "Algo")
      .value("ADAM", nestedfn::ADAM)
      .value("LION", nestedfn::LION)
      .value("MOMENTUM", nestedfn::MOMENTUM)
      .value("ACCUM", nestedfn::ACCUM);
  nb::class_<Hyper>(m, "Hyper", "The scalars of one step (csrc/fused_step.h).")
      .def(nb::init<>())
      .def_rw("algo", &Hyper::algo)
      .def_rw("b1", &Hyper::b1)
      .def_rw("b2", &Hyper::b2)
      .def_rw("eps", &Hyper::eps)
      .def_rw("c1", &Hyper::c1)
      .def_rw("c2", &Hyper::c2)
      .def_rw("nesterov", &Hyper::nesterov)
      .def_rw("has_wd", &Hyper::has_wd)
      .def_rw("wd", &Hyper::wd)
      .def_rw("neg_lr", &Hyper::neg_lr)
      .def_rw("post", &Hyper::post)
      .def_rw("with_acc", &Hyper::with_acc)
      .def_rw("f", &Hyper::f);
  m.def(
      "fused_update",
      [](const std::vector<mlx::core::array>& params, const std::vector<mlx::core::array>& grads,
         const std::vector<std::vector<mlx::core::array>>& states,
         const std::vector<mlx::core::array>& accs, const Hyper& h, bool lazy) {
        if (!lazy) {
          nb::gil_scoped_release release;
          return nestedfn::fused_apply(params, grads, states, accs, h);
        }
        return nestedfn::fused_update(params, grads, states, accs, h);
      },
      "params"_a, "grads"_a, "states"_a, "accs"_a, "hyper"_a, "lazy"_a = true,
      "The new leaves of one optimizer step over many arrays (csrc/fused_step.h): lazy (an "
      "MLX graph, donating buffers) or computed now.");
}
