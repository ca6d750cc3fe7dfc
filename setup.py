"""Packaging for influenciae (import path ``deel.influenciae``)."""
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "deel" / "influenciae" / "version.py").read_text(encoding="utf-8"), VERSION)  # pylint: disable=exec-used

setup(
    name="influenciae",
    version=VERSION["__version__"],
    description="Influence functions and data attribution for TensorFlow / Keras 3 models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_namespace_packages(include=["deel.*"]),
    python_requires=">=3.9",
    install_requires=["tensorflow>=2.16", "numpy", "matplotlib"],
    extras_require={
        "tests": ["pytest", "scikit-learn", "scipy", "pylint", "mkdocs>=1.6,<2", "mkdocs-material>=9.5",
                  "mkdocstrings[python]>=1.0", "django-static-mathjax>=3.2.2,<4", "nbclient", "nbformat",
                  "ipykernel"],
        "demo": ["scikit-learn"],
        # django-static-mathjax: MathJax 3 (no Django needed), published with the site by docs/hooks/offline_mathjax.py
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=1.0",
                 "django-static-mathjax>=3.2.2,<4"],
    },
    entry_points={"console_scripts": ["influenciae-benchmark = deel.influenciae.benchmark.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
