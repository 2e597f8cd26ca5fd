"""Build hook for the optional compiled inner loops of function recovery; everything else is in pyproject.toml.

``optional=True``: where no C compiler or Python headers exist the install still succeeds and
earmark decodes with its pure-Python loop (same features, slower; see
src/earmark/extract/_native.c for why the extension exists).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "earmark.extract._native",
            sources=["src/earmark/extract/_native.c"],
            depends=[
                "src/earmark/extract/_native_analysis.h",
                "src/earmark/extract/_native_body.h",
                "src/earmark/extract/_native_coverage.h",
                "src/earmark/extract/_native_explore.h",
                "src/earmark/extract/_native_memo.h",
                "src/earmark/extract/_native_minhash.h",
                "src/earmark/extract/_native_rows.h",
                "src/earmark/extract/_native_strings.h",
            ],
            optional=True,
        )
    ]
)
