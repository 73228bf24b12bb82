"""Packaging of delve; the metadata lives here, pyproject.toml only names the build backend."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = next(
    line.split('"')[1] for line in (HERE / "delve" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="delve",
    version=VERSION,
    description="Live layer saturation and spectral analysis of PyTorch models during training",
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    author="delve developers",
    license="MIT",
    url="https://github.com/delve-team/delve",
    packages=find_packages(include=["delve", "delve.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "pandas>=1.5",
        "matplotlib>=3.6",
        "tensorboardX>=2.6",
        "tqdm>=4.64",
    ],
    extras_require={
        "lightning": ["lightning>=2.1"],
        "hf": ["transformers>=4.41", "accelerate>=0.26"],
        "keras": ["keras>=3.0"],
        "wandb": ["wandb>=0.16"],
        # The MLflow client without its UI server; SQLAlchemy and Alembic give it local SQLite stores
        # (MLflow's default store is sqlite:///mlflow.db). `pip install mlflow` adds the UI.
        "mlflow": ["mlflow-skinny>=2.10", "sqlalchemy>=1.4", "alembic>=1.11"],
        "examples": ["scikit-learn>=1.2"],
    },
    entry_points={"console_scripts": ["delve=delve.__main__:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
