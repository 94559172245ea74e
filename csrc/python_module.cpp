// Makes the shared library importable as `bsam_fast._C`; importing it runs the static
// TORCH_LIBRARY registrations in ops.cpp and the kernels. No Python functions live here:
// the module holds `torch_version`, the torch it was built against (setup.py passes it as
// BSAM_TORCH_VERSION), which bsam_fast/_ops.py compares with the torch loaded, and
// `cpu_kernels`, the instruction set whose CPU kernels this process uses (kernels.h).
#include <Python.h>

#include "cpu/kernels.h"

#ifndef BSAM_TORCH_VERSION
#define BSAM_TORCH_VERSION "unknown"
#endif

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && (PyModule_AddStringConstant(m, "torch_version", BSAM_TORCH_VERSION) != 0 ||
                       PyModule_AddStringConstant(m, "cpu_kernels", bsam::cpu_kernels().name) != 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
