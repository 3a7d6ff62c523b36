// nestedfn native: a tree structure walked in C++ (the native step's leaf getters and
// builders).
//
// ``TreeSpec(encoded)`` holds one ``nestedfn.tree.TreeDef`` (encoded by
// ``nestedfn.fast.native._encode``); ``leaves(tree)`` returns the leaves of a tree of exactly
// that structure (node types, dict keys in order, lengths, NamedTuple classes) in flatten
// order, or None for any other tree, and ``build(leaves)`` the tree of that structure over
// ``leaves``.  They do what ``nestedfn.tree.codegen``'s generated ``leaf_getter(td,
// check_leaves=False)`` and ``tree_builder(td)`` do, without a bytecode per node: on a tree of
// 300 one-key dicts the Python versions took most of a native step's time.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace nb = nanobind;

namespace nestedfn {

namespace {

enum Kind : int { LEAF = 0, NONE = 1, DICT = 2, LIST = 3, TUPLE = 4, NAMEDTUPLE = 5 };

struct Node {
  Kind kind = LEAF;
  std::vector<nb::object> keys;  // DICT
  nb::object cls;                // NAMEDTUPLE
  std::vector<Node> children;
};

// encoded: None (a leaf), ("none",), ("dict", keys, children), ("list", children),
// ("tuple", children), ("nt", cls, children)
Node decode(nb::handle e) {
  Node n;
  if (e.is_none()) {
    return n;
  }
  nb::tuple t = nb::cast<nb::tuple>(e);
  std::string tag = nb::cast<std::string>(t[0]);
  nb::handle kids;
  if (tag == "none") {
    n.kind = NONE;
    return n;
  } else if (tag == "dict") {
    n.kind = DICT;
    for (nb::handle k : nb::cast<nb::tuple>(t[1])) {
      n.keys.push_back(nb::borrow(k));
    }
    kids = t[2];
  } else if (tag == "list") {
    n.kind = LIST;
    kids = t[1];
  } else if (tag == "tuple") {
    n.kind = TUPLE;
    kids = t[1];
  } else if (tag == "nt") {
    n.kind = NAMEDTUPLE;
    n.cls = nb::borrow(t[1]);
    kids = t[2];
  } else {
    throw std::invalid_argument("TreeSpec: unknown node " + tag);
  }
  for (nb::handle c : nb::cast<nb::tuple>(kids)) {
    n.children.push_back(decode(c));
  }
  if (n.kind == DICT && n.keys.size() != n.children.size()) {
    throw std::invalid_argument("TreeSpec: a dict node's keys and children differ in number");
  }
  return n;
}

// Appends the leaves of ``t`` to ``out``; false when ``t`` is not shaped as ``n``.
bool collect(const Node& n, PyObject* t, PyObject* out) {
  switch (n.kind) {
    case LEAF:
      return PyList_Append(out, t) == 0;
    case NONE:
      return t == Py_None;
    case DICT: {
      if (!PyDict_CheckExact(t) ||
          PyDict_GET_SIZE(t) != static_cast<Py_ssize_t>(n.keys.size())) {
        return false;
      }
      Py_ssize_t pos = 0;
      PyObject *key, *value;
      size_t i = 0;
      while (PyDict_Next(t, &pos, &key, &value)) {  // insertion order: the keys' order
        PyObject* want = n.keys[i].ptr();
        if (key != want) {
          const int eq = PyObject_RichCompareBool(key, want, Py_EQ);
          if (eq != 1) {
            if (eq < 0) {
              PyErr_Clear();
            }
            return false;
          }
        }
        if (!collect(n.children[i], value, out)) {
          return false;
        }
        ++i;
      }
      return true;
    }
    case LIST: {
      if (!PyList_CheckExact(t) ||
          PyList_GET_SIZE(t) != static_cast<Py_ssize_t>(n.children.size())) {
        return false;
      }
      for (size_t i = 0; i < n.children.size(); ++i) {
        if (!collect(n.children[i], PyList_GET_ITEM(t, i), out)) {
          return false;
        }
      }
      return true;
    }
    case TUPLE:
    case NAMEDTUPLE: {
      if (n.kind == TUPLE ? !PyTuple_CheckExact(t)
                          : reinterpret_cast<PyObject*>(Py_TYPE(t)) != n.cls.ptr()) {
        return false;
      }
      if (PyTuple_GET_SIZE(t) != static_cast<Py_ssize_t>(n.children.size())) {
        return false;
      }
      for (size_t i = 0; i < n.children.size(); ++i) {
        if (!collect(n.children[i], PyTuple_GET_ITEM(t, i), out)) {
          return false;
        }
      }
      return true;
    }
  }
  return false;
}

// A new reference to the tree of shape ``n`` over leaves[pos...]; nullptr with a Python
// error set on failure.
PyObject* make(const Node& n, PyObject* leaves, Py_ssize_t& pos) {
  switch (n.kind) {
    case LEAF: {
      PyObject* x = PyList_GET_ITEM(leaves, pos++);
      Py_INCREF(x);
      return x;
    }
    case NONE:
      Py_RETURN_NONE;
    case DICT: {
      PyObject* d = PyDict_New();
      if (d == nullptr) {
        return nullptr;
      }
      for (size_t i = 0; i < n.children.size(); ++i) {
        PyObject* v = make(n.children[i], leaves, pos);
        if (v == nullptr || PyDict_SetItem(d, n.keys[i].ptr(), v) != 0) {
          Py_XDECREF(v);
          Py_DECREF(d);
          return nullptr;
        }
        Py_DECREF(v);
      }
      return d;
    }
    case LIST: {
      PyObject* l = PyList_New(static_cast<Py_ssize_t>(n.children.size()));
      if (l == nullptr) {
        return nullptr;
      }
      for (size_t i = 0; i < n.children.size(); ++i) {
        PyObject* v = make(n.children[i], leaves, pos);
        if (v == nullptr) {
          Py_DECREF(l);
          return nullptr;
        }
        PyList_SET_ITEM(l, i, v);
      }
      return l;
    }
    case TUPLE:
    case NAMEDTUPLE: {
      PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(n.children.size()));
      if (t == nullptr) {
        return nullptr;
      }
      for (size_t i = 0; i < n.children.size(); ++i) {
        PyObject* v = make(n.children[i], leaves, pos);
        if (v == nullptr) {
          Py_DECREF(t);
          return nullptr;
        }
        PyTuple_SET_ITEM(t, i, v);
      }
      if (n.kind == TUPLE) {
        return t;
      }
      PyObject* nt = PyObject_Call(n.cls.ptr(), t, nullptr);  // cls(*children)
      Py_DECREF(t);
      return nt;
    }
  }
  return nullptr;
}

size_t count_leaves(const Node& n) {
  if (n.kind == LEAF) {
    return 1;
  }
  size_t k = 0;
  for (auto& c : n.children) {
    k += count_leaves(c);
  }
  return k;
}

class TreeSpec {
 public:
  explicit TreeSpec(nb::handle encoded) : root_(decode(encoded)), n_(count_leaves(root_)) {}

  nb::object leaves(nb::handle tree) const {
    nb::list out;
    if (!collect(root_, tree.ptr(), out.ptr())) {
      if (PyErr_Occurred()) {
        throw nb::python_error();
      }
      return nb::none();
    }
    return out;
  }

  nb::object build(nb::handle leaves) const {
    if (!PyList_CheckExact(leaves.ptr()) ||
        PyList_GET_SIZE(leaves.ptr()) != static_cast<Py_ssize_t>(n_)) {
      throw std::invalid_argument("TreeSpec.build: a list of exactly num_leaves leaves");
    }
    Py_ssize_t pos = 0;
    PyObject* t = make(root_, leaves.ptr(), pos);
    if (t == nullptr) {
      throw nb::python_error();
    }
    return nb::steal(t);
  }

  size_t num_leaves() const {
    return n_;
  }

 private:
  Node root_;
  size_t n_;
};

}  // namespace

void bind_tree_spec(nb::module_& m) {
  nb::class_<TreeSpec>(m, "TreeSpec",
                       "One tree structure, walked in C++ (see csrc/tree_spec.cpp).")
      .def(nb::init<nb::handle>(), nb::arg("encoded").none())
      .def("leaves", &TreeSpec::leaves, nb::arg("tree").none(),
           "The leaves of ``tree`` in flatten order, or None when it is shaped otherwise.")
      .def("build", &TreeSpec::build, nb::arg("leaves"),
           "The tree of this structure over ``leaves`` (a list of num_leaves).")
      .def_prop_ro("num_leaves", &TreeSpec::num_leaves);
}

}  // namespace nestedfn
