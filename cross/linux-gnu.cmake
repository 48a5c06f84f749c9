# CMake toolchain for cross-building llama.cpp (through llama-cpp-sys-2) with Debian's
# cross compilers; cross/build.sh sets TRACEFLEET_CROSS_GNU (the GNU triple, e.g.
# aarch64-linux-gnu) and TRACEFLEET_CROSS_PROCESSOR (aarch64, armv7l). Read from the
# environment so that CMake's own try_compile runs see the same values.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR $ENV{TRACEFLEET_CROSS_PROCESSOR})
set(CMAKE_C_COMPILER $ENV{TRACEFLEET_CROSS_GNU}-gcc)
set(CMAKE_CXX_COMPILER $ENV{TRACEFLEET_CROSS_GNU}-g++)
set(CMAKE_FIND_ROOT_PATH /usr/$ENV{TRACEFLEET_CROSS_GNU})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
