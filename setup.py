"""Build hook for the Cython extensions (metadata lives in pyproject.toml)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("libdrv.wire", ["libdrv/wire.pyx"]),
    Extension("libdrv._rsdrv", ["libdrv/_rsdrv.pyx"], include_dirs=["kmod/include/uapi"]),
    Extension("libdrv._loop", ["libdrv/_loop.pyx"]),
    Extension("libdrv.netshm", ["libdrv/netshm.pyx"], include_dirs=["libdrv"]),
    Extension("libdrv.blkshm", ["libdrv/blkshm.pyx"], include_dirs=["libdrv"]),
    Extension("libdrv.chrshm", ["libdrv/chrshm.pyx"], include_dirs=["libdrv"]),
    Extension("drivers.e1000._rings", ["drivers/e1000/_rings.pyx"], include_dirs=["libdrv"]),
    Extension("drivers.ahci._port", ["drivers/ahci/_port.pyx"], include_dirs=["libdrv"]),
    Extension("drivers.serial16550._path", ["drivers/serial16550/_path.pyx"],
              include_dirs=["libdrv", "kmod/include/uapi"]),
    Extension("frontends._ttyio", ["frontends/_ttyio.pyx"], include_dirs=["libdrv"]),
    Extension("frontends._netio", ["frontends/_netio.pyx"], include_dirs=["libdrv"]),
    Extension("frontends._nbdio", ["frontends/_nbdio.pyx"], include_dirs=["libdrv"]),
    Extension("frontends._cuseio", ["frontends/_cuseio.pyx"], include_dirs=["libdrv"]),
    Extension("frontends._console_feed", ["frontends/_console_feed.pyx"]),
    Extension("drivers.vga._cells", ["drivers/vga/_cells.pyx"]),
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}))
