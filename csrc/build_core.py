"""cffi builder (API mode) for the C match core: ``torchcore._core``.

The declarations handed to cffi are the part of ``tc_match.h`` between the
``CDEF-BEGIN`` and ``CDEF-END`` markers, so the header stays the one API.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def read_cdef(path):
    """Return the text of the header between its CDEF-BEGIN and CDEF-END lines."""
    with open(path) as header:
        lines = header.read().splitlines()
    start = next(i for i, line in enumerate(lines) if "CDEF-BEGIN" in line)
    end = next(i for i, line in enumerate(lines) if "CDEF-END" in line)
    return "\n".join(lines[start + 1:end])


ffibuilder = FFI()
ffibuilder.cdef(read_cdef(os.path.join(HERE, "tc_match.h")))
ffibuilder.set_source(
    "torchcore._core",
    '#include "tc_match.h"',
    sources=[os.path.relpath(os.path.join(HERE, "tc_match.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra"] + os.environ.get("TC_EXTRA_CFLAGS", "").split(),
    extra_link_args=os.environ.get("TC_EXTRA_LDFLAGS", "").split(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
