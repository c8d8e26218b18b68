"""Build script: everything is in setup.cfg, except the optional compiled build.

``pip install .`` installs chatproxy as pure Python.  With
``CHATPROXY_COMPILE=1`` in the environment, the data-path modules listed in
chatproxy/compiled.py are compiled with Cython as well (a C compiler and the
Python headers are needed then; Debian: build-essential python3-dev).
"""

import os
import runpy

from setuptools import Extension, setup


def extensions() -> list[Extension]:
    """The extension modules of the compiled build; none unless asked for."""
    if os.environ.get("CHATPROXY_COMPILE", "") != "1":
        return []
    if os.environ.get("CHATPROXY_ASKING_BUILD_REQUIRES") == "1":
        return []  # build_backend.py is only asking what the build needs (it adds Cython)
    from Cython.Build import cythonize  # with CHATPROXY_COMPILE=1 and no Cython: an ImportError, not a pure build

    build = runpy.run_path(os.path.join("chatproxy", "compiled.py"))
    modules = [Extension(name, [name.replace(".", os.sep) + ".py"]) for name in build["MODULES"]]
    return cythonize(modules, compiler_directives=dict(build["DIRECTIVES"]), build_dir=os.path.join("build", "cython"),
                     nthreads=os.cpu_count() or 1, quiet=True)


setup(ext_modules=extensions(), options={"build_ext": {"parallel": os.cpu_count() or 1}})
