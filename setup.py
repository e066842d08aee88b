"""The one thing pyproject.toml cannot declare without an experimental table: the tap's C
write path (vib/_fast_writes.c), built as the extension vib._fast_writes."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vib._fast_writes",
            sources=["vib/_fast_writes.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)
