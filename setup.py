"""Build script: the metadata lives in pyproject.toml; this file adds the compiled parts.

- ``torchcore._core``: the cffi-built C core (csrc/tc_match.c, the match core; csrc/tc_sys.c,
  the timerfd and inotify calls of the loop);
- ``torchcore/_gate``: a small program a prepared run waits in for its second
  (csrc/tc_gate.c), built next to the extension module by the same compiler.
"""
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

GATE_SOURCE = os.path.join("csrc", "tc_gate.c")


class BuildExtAndGate(build_ext):
    def run(self):
        super().run()
        self.build_gate()

    def build_gate(self):
        compiler = self.compiler
        if compiler is None or isinstance(compiler, str):
            from setuptools._distutils.ccompiler import new_compiler
            from setuptools._distutils.sysconfig import customize_compiler

            compiler = new_compiler(compiler=compiler)
            customize_compiler(compiler)
        if self.inplace or getattr(self, "editable_mode", False):
            package_dir = "torchcore"
        else:
            package_dir = os.path.join(self.build_lib, "torchcore")
        flags = ["-O2", "-Wall", "-Wextra"] + os.environ.get("TC_EXTRA_CFLAGS", "").split()
        objects = compiler.compile([GATE_SOURCE], output_dir=self.build_temp, extra_postargs=flags)
        compiler.link_executable(objects, "_gate", output_dir=package_dir,
                                 extra_postargs=os.environ.get("TC_EXTRA_LDFLAGS", "").split())


setup(cffi_modules=["csrc/build_core.py:ffibuilder"], cmdclass={"build_ext": BuildExtAndGate})
