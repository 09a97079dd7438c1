// The check that a tensor table is not stale, in one pass over its tensors: each is still a
// strided tensor of the same Python type, dtype, device, shape, strides and conjugate/negative
// bits, and (for every tensor but the grads) at the same data pointer. fusedopt/native.py builds
// it on first use; fusedopt/plan.py has the same check in Python.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

struct Recorded {
  PyTypeObject* type = nullptr;
  int64_t address = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device = c10::Device(c10::kCPU);
  bool conj = false;
  bool neg = false;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

int64_t address_of(const at::Tensor& tensor) {
  return reinterpret_cast<int64_t>(tensor.data_ptr());
}

void record(PyObject* object, Recorded& recorded) {
  TORCH_CHECK(THPVariable_Check(object), "TableCheck takes tensors");
  const at::Tensor& tensor = THPVariable_Unpack(object);
  TORCH_CHECK(tensor.layout() == c10::kStrided && tensor.has_storage(), "TableCheck takes strided tensors with storage");
  recorded.type = Py_TYPE(object);
  recorded.address = address_of(tensor);
  recorded.dtype = tensor.scalar_type();
  recorded.device = tensor.device();
  recorded.conj = tensor.is_conj();
  recorded.neg = tensor.is_neg();
  recorded.sizes = tensor.sizes().vec();
  recorded.strides = tensor.strides().vec();
}

enum Comparison { kSame = 0, kChanged = 1, kMoved = 2 };

// kSame: as recorded; kMoved: the same layout at another address; kChanged: anything else.
Comparison compare(PyObject* object, const Recorded& recorded) {
  if (Py_TYPE(object) != recorded.type || !THPVariable_Check(object)) {
    return kChanged;
  }
  const at::Tensor& tensor = THPVariable_Unpack(object);
  if (tensor.layout() != c10::kStrided || !tensor.has_storage() || tensor.scalar_type() != recorded.dtype ||
      tensor.device() != recorded.device || tensor.is_conj() != recorded.conj || tensor.is_neg() != recorded.neg ||
      tensor.sizes() != c10::IntArrayRef(recorded.sizes) || tensor.strides() != c10::IntArrayRef(recorded.strides)) {
    return kChanged;
  }
  return address_of(tensor) == recorded.address ? kSame : kMoved;
}

}  // namespace

class TableCheck {
 public:
  // `fixed`: tensors that must stay where they are; `grads`: tensors that may move.
  TableCheck(const py::list& fixed, const py::list& grads) {
    fixed_.resize(PyList_GET_SIZE(fixed.ptr()));
    grads_.resize(PyList_GET_SIZE(grads.ptr()));
    for (size_t i = 0; i < fixed_.size(); ++i) {
      record(PyList_GET_ITEM(fixed.ptr(), i), fixed_[i]);
    }
    for (size_t i = 0; i < grads_.size(); ++i) {
      record(PyList_GET_ITEM(grads.ptr(), i), grads_[i]);
    }
  }

  // 0: every tensor as recorded; 2: only grads moved (their new addresses are recorded);
  // 1: anything else.
  int check(const py::list& fixed, const py::list& grads) {
    PyObject* fixed_now = fixed.ptr();
    PyObject* grads_now = grads.ptr();
    if (static_cast<size_t>(PyList_GET_SIZE(fixed_now)) != fixed_.size() ||
        static_cast<size_t>(PyList_GET_SIZE(grads_now)) != grads_.size()) {
      return kChanged;
    }
    for (size_t i = 0; i < fixed_.size(); ++i) {
      if (compare(PyList_GET_ITEM(fixed_now, i), fixed_[i]) != kSame) {
        return kChanged;
      }
    }
    bool moved = false;
    for (size_t i = 0; i < grads_.size(); ++i) {
      Comparison comparison = compare(PyList_GET_ITEM(grads_now, i), grads_[i]);
      if (comparison == kChanged) {
        return kChanged;
      }
      moved |= comparison == kMoved;
    }
    if (moved) {
      for (size_t i = 0; i < grads_.size(); ++i) {
        grads_[i].address = address_of(THPVariable_Unpack(PyList_GET_ITEM(grads_now, i)));
      }
    }
    return moved ? kMoved : kSame;
  }

 private:
  std::vector<Recorded> fixed_;
  std::vector<Recorded> grads_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<TableCheck>(m, "TableCheck")
      .def(py::init<const py::list&, const py::list&>())
      .def("check", &TableCheck::check);
}
