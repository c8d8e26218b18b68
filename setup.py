"""Build script: everything is in setup.cfg, except the optional compiled build.

``pip install .`` installs chatproxy as pure Python.  With
``CHATPROXY_COMPILE=1`` in the environment, the data-path modules listed in
chatproxy/compiled.py are compiled with Cython as well (a C compiler and the
Python headers are needed then; Debian: build-essential python3-dev).
build_backend.py adds Cython to the build requirements then; it is imported
only when the extension modules are built.
"""

import os
import runpy

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BUILD = runpy.run_path(os.path.join("chatproxy", "compiled.py"))


class CythonizeThenBuild(build_ext):
    """build_ext that first turns the listed .py modules into C with Cython
    (when it runs: setuptools also finalizes this command just to learn about
    the build, before Cython is installed)."""

    def run(self) -> None:
        if self.extensions:
            from Cython.Build import cythonize  # with CHATPROXY_COMPILE=1 and no Cython: an error, not a pure build

            converted = cythonize(list(self.extensions), compiler_directives=dict(BUILD["DIRECTIVES"]),
                                  build_dir=os.path.join("build", "cython"), nthreads=os.cpu_count() or 1,
                                  quiet=True)
            sources = {extension.name: extension.sources for extension in converted}
            for extension in self.extensions:
                extension.sources = sources[extension.name]
            if self.parallel is None:
                self.parallel = os.cpu_count() or 1
        super().run()


def extensions() -> list[Extension]:
    """The extension modules of the compiled build; none unless asked for."""
    if os.environ.get("CHATPROXY_COMPILE", "") != "1":
        return []
    return [Extension(name, [name.replace(".", os.sep) + ".py"]) for name in BUILD["MODULES"]]


setup(ext_modules=extensions(), cmdclass={"build_ext": CythonizeThenBuild})
