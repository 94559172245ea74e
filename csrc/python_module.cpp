// Makes the shared library importable as `bsam_fast._C`; importing it runs the static
// TORCH_LIBRARY registrations in ops.cpp and the kernels. No Python functions live here.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
