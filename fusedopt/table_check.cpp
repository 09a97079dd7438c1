// The check that a tensor table is not stale, in one pass over its tensors: each is still a
// strided tensor of the same Python type, dtype, device, shape, strides and conjugate/negative
// bits, and (for every tensor but the grads) at the same data pointer; grads that moved must not
// overlap the memory the kernel writes. check_grads_of reads each grad from its param itself (no
// Python list of grads to build first). `python -m fusedopt.native` builds it; PythonTableCheck
// in fusedopt/plan.py is the same check in Python.
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
  int64_t bytes = 0;
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
  recorded.bytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
}

enum Comparison { kSame = 0, kChanged = 1, kMoved = 2, kNoGrad = 3 };

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
  // `fixed`: tensors that must stay where they are; `grads`: tensors that may move, but not into
  // the written memory [written_starts[i], written_ends[i]) (sorted, disjoint).
  TableCheck(const py::list& fixed, const py::list& grads, std::vector<int64_t> written_starts,
             std::vector<int64_t> written_ends)
      : written_starts_(std::move(written_starts)), written_ends_(std::move(written_ends)) {
    fixed_.resize(PyList_GET_SIZE(fixed.ptr()));
    grads_.resize(PyList_GET_SIZE(grads.ptr()));
    for (size_t i = 0; i < fixed_.size(); ++i) {
      record(PyList_GET_ITEM(fixed.ptr(), i), fixed_[i]);
    }
    for (size_t i = 0; i < grads_.size(); ++i) {
      record(PyList_GET_ITEM(grads.ptr(), i), grads_[i]);
    }
  }

  // 0: every tensor as recorded; 2: only grads moved (their new addresses are recorded and
  // written into grad_row, an int64 host tensor); 1: anything else.
  int check(const py::list& fixed, const py::list& grads, at::Tensor& grad_row) {
    PyObject* grads_now = grads.ptr();
    if (static_cast<size_t>(PyList_GET_SIZE(grads_now)) != grads_.size()) {
      return kChanged;
    }
    return check_with(fixed, grad_row, [grads_now](size_t i) {
      return py::reinterpret_borrow<py::object>(PyList_GET_ITEM(grads_now, i));
    });
  }

  // check() with each grad read from its param (params[i].grad) instead of a Python list of
  // grads: one pass less over memory that the kernel's last launch has pushed out of cache.
  // 3: a param has no grad (the caller then looks at the grads itself).
  int check_grads_of(const py::list& fixed, const py::list& params, at::Tensor& grad_row) {
    PyObject* params_now = params.ptr();
    if (static_cast<size_t>(PyList_GET_SIZE(params_now)) != grads_.size()) {
      return kChanged;
    }
    return check_with(fixed, grad_row, [params_now](size_t i) {
      PyObject* param = PyList_GET_ITEM(params_now, i);
      if (!THPVariable_Check(param)) {
        return py::object(py::none());  // not a tensor: compare() finds the grad changed
      }
      const at::Tensor& grad = THPVariable_Unpack(param).grad();
      return grad.defined() ? py::reinterpret_steal<py::object>(THPVariable_Wrap(grad)) : py::object();
    });
  }

 private:
  // The check, with grads_[i]'s tensor now given by grad_at(i) (an empty object: none).
  template <typename GradAt>
  int check_with(const py::list& fixed, at::Tensor& grad_row, GradAt grad_at) {
    PyObject* fixed_now = fixed.ptr();
    if (static_cast<size_t>(PyList_GET_SIZE(fixed_now)) != fixed_.size()) {
      return kChanged;
    }
    for (size_t i = 0; i < fixed_.size(); ++i) {
      if (compare(PyList_GET_ITEM(fixed_now, i), fixed_[i]) != kSame) {
        return kChanged;
      }
    }
    std::vector<py::object> grads_now(grads_.size());
    bool moved = false;
    for (size_t i = 0; i < grads_.size(); ++i) {
      grads_now[i] = grad_at(i);
      if (!grads_now[i]) {
        return kNoGrad;
      }
      Comparison comparison = compare(grads_now[i].ptr(), grads_[i]);
      if (comparison == kChanged) {
        return kChanged;
      }
      moved |= comparison == kMoved;
    }
    if (!moved) {
      return kSame;
    }
    std::vector<int64_t> addresses(grads_.size());
    for (size_t i = 0; i < grads_.size(); ++i) {
      addresses[i] = address_of(THPVariable_Unpack(grads_now[i].ptr()));
      if (into_written_memory(addresses[i], addresses[i] + grads_[i].bytes)) {
        return kChanged;
      }
    }
    TORCH_CHECK(grad_row.scalar_type() == at::kLong && grad_row.is_contiguous() &&
                    grad_row.numel() == static_cast<int64_t>(grads_.size()),
                "TableCheck: grad_row must be a contiguous int64 tensor of one element per grad");
    int64_t* row = grad_row.data_ptr<int64_t>();
    for (size_t i = 0; i < grads_.size(); ++i) {
      row[i] = addresses[i];
      grads_[i].address = addresses[i];
    }
    return kMoved;
  }

  // Whether [start, end) overlaps a written span: the one starting last before `end` must end
  // before `start`.
  bool into_written_memory(int64_t start, int64_t end) const {
    if (end <= start) {
      return false;
    }
    auto after = std::lower_bound(written_starts_.begin(), written_starts_.end(), end);
    if (after == written_starts_.begin()) {
      return false;
    }
    return written_ends_[after - written_starts_.begin() - 1] > start;
  }

  std::vector<Recorded> fixed_;
  std::vector<Recorded> grads_;
  std::vector<int64_t> written_starts_;
  std::vector<int64_t> written_ends_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<TableCheck>(m, "TableCheck")
      .def(py::init<const py::list&, const py::list&, std::vector<int64_t>, std::vector<int64_t>>())
      .def("check", &TableCheck::check)
      .def("check_grads_of", &TableCheck::check_grads_of);
}
