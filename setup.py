"""Builds the compiled codecs (FastCGI, AMQP); everything else lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastworker._fcgi_codec", ["src/fastworker/_fcgi_codec.pyx"], extra_compile_args=["-O2"]
    ),
    Extension(
        "fastworker._amqp_codec", ["src/fastworker/_amqp_codec.pyx"], extra_compile_args=["-O2"]
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
