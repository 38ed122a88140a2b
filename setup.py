from setuptools import setup

setup(
    name="lcc",
    version="0.1.0",
    description="Learning-based coded computation: learned erasure codes around neural networks",
    python_requires=">=3.9",
    packages=["coders", "base_models", "datasets", "train", "util", "bench", "serve"],
    py_modules=[],
    install_requires=[
        "torch>=2.0,<2.15",
        "torchvision>=0.15,<0.30",
        "numpy>=1.23",
        "tqdm>=4.60",
        "scikit-learn>=1.0",
        "scipy>=1.10",  # coders/spline.py: make_smoothing_spline
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.2"],  # -n 2 --dist loadgroup (README), opt-in
        "plot": ["matplotlib>=3.5"],
        "serve": ["ray[default,serve]==2.60.0", "fastapi>=0.100", "uvicorn>=0.29", "httpx>=0.24",
                  "python-multipart>=0.0.9", "pillow>=9",
                  "starlette>=0.27", "aiohttp>=3.9", "orjson>=3.9",
                  "uvloop>=0.17", "httptools>=0.6"],  # uvicorn's fast event loop and HTTP parser, the load generator's loop
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10"],
    },
    entry_points={"console_scripts": ["lcc-train=train.cli:main", "lcc-serve=serve.cli:main",
                                        "lcc-serve-app=serve.app:main", "lcc-loadgen=serve.loadgen:main"]},
)
