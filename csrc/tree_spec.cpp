// nestedfn native: one tree structure walked in C++ (the native step's leaf getter).
//
// ``TreeSpec(td)`` holds one ``nestedfn.tree.TreeDef`` whose dict nodes are plain dicts;
// ``leaves(tree)`` returns the leaves of a tree of exactly that structure (node types, dict
// keys in order, lengths, NamedTuple classes) in flatten order, or None for any other tree:
// a tenth of the time of the generated Python (``nestedfn.tree.codegen``) on a LoRA tree.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace nb = nanobind;

namespace nestedfn {

namespace {

enum Kind : int { LEAF, NONE, DICT, LIST, TUPLE, NAMEDTUPLE };

struct Node {
  Kind kind = LEAF;
  std::vector<nb::object> keys;  // DICT
  nb::object cls;                // NAMEDTUPLE
  std::vector<Node> children;
};

Node decode(nb::handle td) {
  Node n;
  const std::string kind = nb::cast<std::string>(td.attr("kind"));
  const nb::object meta = td.attr("meta");
  if (kind == "leaf") {
    return n;
  }
  if (kind == "dict") {
    for (nb::handle k : nb::cast<nb::tuple>(meta)) {
      n.keys.push_back(nb::borrow(k));
    }
  }
  n.kind = kind == "none"    ? NONE
           : kind == "dict"  ? DICT
           : kind == "list"  ? LIST
           : kind == "tuple" ? TUPLE
                             : NAMEDTUPLE;
  n.cls = meta;
  for (nb::handle c : td.attr("children")) {
    n.children.push_back(decode(c));
  }
  return n;
}

// Appends the leaves of ``t`` to ``out``; false when ``t`` is not shaped as ``n``.
bool collect(const Node& n, PyObject* t, PyObject* out) {
  const Py_ssize_t k = static_cast<Py_ssize_t>(n.children.size());
  switch (n.kind) {
    case LEAF:
      return PyList_Append(out, t) == 0;
    case NONE:
      return t == Py_None;
    case DICT: {
      if (!PyDict_CheckExact(t) || PyDict_GET_SIZE(t) != k) {
        return false;
      }
      Py_ssize_t pos = 0, i = 0;
      PyObject *key, *value;
      while (PyDict_Next(t, &pos, &key, &value)) {  // insertion order: the keys' order
        PyObject* want = n.keys[i].ptr();
        if (key != want) {
          const int eq = PyObject_RichCompareBool(key, want, Py_EQ);
          if (eq < 0) {
            PyErr_Clear();
          }
          if (eq != 1) {
            return false;
          }
        }
        if (!collect(n.children[i++], value, out)) {
          return false;
        }
      }
      return true;
    }
    case LIST:
    case TUPLE:
    case NAMEDTUPLE: {
      const bool ok = n.kind == LIST    ? PyList_CheckExact(t)
                      : n.kind == TUPLE ? PyTuple_CheckExact(t)
                                        : reinterpret_cast<PyObject*>(Py_TYPE(t)) == n.cls.ptr();
      if (!ok || PySequence_Fast_GET_SIZE(t) != k) {
        return false;
      }
      for (Py_ssize_t i = 0; i < k; ++i) {
        if (!collect(n.children[i], PySequence_Fast_GET_ITEM(t, i), out)) {
          return false;
        }
      }
      return true;
    }
  }
  return false;
}

class TreeSpec {
 public:
  explicit TreeSpec(nb::handle td) : root_(decode(td)) {}

  nb::object leaves(nb::handle tree) const {
    nb::list out;
    if (collect(root_, tree.ptr(), out.ptr())) {
      return out;
    }
    if (PyErr_Occurred()) {
      throw nb::python_error();
    }
    return nb::none();
  }

 private:
  Node root_;
};

}  // namespace

void bind_tree_spec(nb::module_& m) {
  nb::class_<TreeSpec>(m, "TreeSpec", "One tree structure, walked in C++ (csrc/tree_spec.cpp).")
      .def(nb::init<nb::handle>(), nb::arg("td"))
      .def("leaves", &TreeSpec::leaves, nb::arg("tree").none(),
           "The leaves of ``tree`` in flatten order, or None when it is shaped otherwise.");
}

}  // namespace nestedfn
