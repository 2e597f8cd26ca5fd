"""Build hook for the optional compiled decode loop; everything else is in pyproject.toml.

``optional=True``: where no C compiler or Python headers exist the install still succeeds and
earmark decodes with its pure-Python loop (same features, slower; see
src/earmark/extract/_decode.c for why the extension exists).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "earmark.extract._decode",
            sources=["src/earmark/extract/_decode.c"],
            optional=True,
        )
    ]
)
