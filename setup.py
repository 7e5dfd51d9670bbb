"""Build hook for the Cython extensions (metadata lives in pyproject.toml)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("libdrv.wire", ["libdrv/wire.pyx"]),
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}))
