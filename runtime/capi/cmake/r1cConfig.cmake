# find_package(r1c) -> the imported target r1c::r1c (libr1c.so, include/r1c/r1c.h and r1c.hpp).
include("${CMAKE_CURRENT_LIST_DIR}/r1cTargets.cmake")
