"""r1c.runtime.capi: the C ABI for C and C++ services — include/r1c/r1c.h (the C header), include/r1c/r1c.hpp
(a header-only C++ RAII wrapper), src/r1c.c (libr1c: an embedded CPython that runs r1c's scheduler), bridge.py
(the Python side of each call), build.py (CMake, driven by `r1c capi`)."""
