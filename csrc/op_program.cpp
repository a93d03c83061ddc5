// OpProgram: a recorded sequence of op calls (pagedlm/worker/step_graph.py) replayed through the
// dispatcher without Python between them. Each call is an operator and its boxed arguments; a
// replay copies the arguments (tensor references, not data) and calls the operator's kernel, as
// Python's call would after parsing them (~2 us a call that this saves).

#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/custom_class.h>

#include <string>
#include <vector>

namespace pagedlm {
namespace {

// Releases the GIL, where the calling thread holds it, while the kernels run.
class GilRelease {
 public:
  GilRelease() : state_(PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

struct OpProgram : torch::CustomClassHolder {
  // Appends a call of `name` (e.g. "pagedlm::rms_norm") at `overload` ("" for the default) with
  // every argument of its schema, in order. A Python int given for a float argument becomes a float.
  void add(const std::string& name, const std::string& overload, std::vector<c10::IValue> args) {
    c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& schema = op.schema();
    TORCH_CHECK(args.size() == schema.arguments().size(), name, " takes ", schema.arguments().size(),
                " arguments, got ", args.size());
    TORCH_CHECK(schema.returns().empty(), name, " returns values; a program runs ops that only write their arguments");
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i].isInt() && schema.arguments()[i].type()->kind() == c10::TypeKind::FloatType) {
        args[i] = static_cast<double>(args[i].toInt());
      }
    }
    ops_.push_back(op);
    stacks_.push_back(std::move(args));
  }

  void run() {
    GilRelease release;
    for (size_t i = 0; i < ops_.size(); ++i) {
      torch::jit::Stack stack = stacks_[i];
      ops_[i].callBoxed(stack);
    }
  }

  int64_t size() const { return static_cast<int64_t>(ops_.size()); }

  std::vector<c10::OperatorHandle> ops_;
  std::vector<torch::jit::Stack> stacks_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagedlm, m) {
  m.class_<OpProgram>("OpProgram")
      .def(torch::init<>())
      .def("add", &OpProgram::add)
      .def("run", &OpProgram::run)
      .def("__len__", &OpProgram::size);
}

}  // namespace pagedlm
