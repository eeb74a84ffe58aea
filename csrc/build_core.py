"""cffi builder (API mode) for the C match core: ``torchcore._core``."""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "tc_match.h")) as header:
    ffibuilder.cdef("\n".join(
        line for line in header.read().splitlines() if not line.startswith("#")
        and not line.startswith("/*")))
ffibuilder.set_source(
    "torchcore._core",
    '#include "tc_match.h"',
    sources=[os.path.relpath(os.path.join(HERE, "tc_match.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
