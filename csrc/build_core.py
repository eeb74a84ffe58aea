"""cffi builder (API mode) for the C core: ``torchcore._core``.

Two parts: the match core (``tc_match.h``) and the loop's Linux descriptors (``tc_sys.h``:
a timerfd that hears wall-clock steps, inotify).  The declarations handed to cffi are the
part of each header between its ``CDEF-BEGIN`` and ``CDEF-END`` markers, so the headers
stay the one API.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = ("tc_match.h", "tc_sys.h")
SOURCES = ("tc_match.c", "tc_sys.c")


def read_cdef(path):
    """Return the text of the header between its CDEF-BEGIN and CDEF-END lines."""
    with open(path) as header:
        lines = header.read().splitlines()
    start = next(i for i, line in enumerate(lines) if "CDEF-BEGIN" in line)
    end = next(i for i, line in enumerate(lines) if "CDEF-END" in line)
    return "\n".join(lines[start + 1:end])


ffibuilder = FFI()
ffibuilder.cdef("\n".join(read_cdef(os.path.join(HERE, name)) for name in HEADERS))
ffibuilder.set_source(
    "torchcore._core",
    "".join(f'#include "{name}"\n' for name in HEADERS),
    sources=[os.path.relpath(os.path.join(HERE, name)) for name in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra"] + os.environ.get("TC_EXTRA_CFLAGS", "").split(),
    extra_link_args=os.environ.get("TC_EXTRA_LDFLAGS", "").split(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
