"""Build hook: the LD_PRELOAD shim in fallback/ is a plain C shared library (libc only).

It is built as a setuptools Extension so the normal `pip install .` compiles it with the
system compiler; it exports no Python entry point and is only ever loaded via LD_PRELOAD.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildShim(build_ext):
    # The shim is not a Python module: link it without libpython and with -ldl only.
    def get_export_symbols(self, ext):
        return []


setup(
    ext_modules=[
        Extension(
            "nsvpn._preload",
            sources=["fallback/nsvpn_preload.c"],
            extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall", "-Wextra"],
            extra_link_args=["-ldl"],
        )
    ],
    cmdclass={"build_ext": BuildShim},
)
