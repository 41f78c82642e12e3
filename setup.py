"""fastvq: fused vector-quantization kernels (nearest code, per-code statistics) for VQ tokenizers.

Nothing here is compiled: the Triton kernels and the C++ CPU kernels (kernels/cpu/, with ninja) are JIT-compiled
at first use, so this file imports no torch.
"""

from setuptools import find_packages, setup

EXTRAS = {
    "triton": ["triton>=3.0"],
    "cpu": ["ninja"],  # builds the C++ CPU kernels (kernels/cpu/) at first use; a C++ compiler is also needed
    "models": ["safetensors", "tqdm", "matplotlib", "pillow", "scikit-image", "scipy"],
    "test": ["pytest", "pytest-benchmark", "vector-quantize-pytorch==1.32.0", "import-linter", "faiss-cpu==1.15.1"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="fastvq",
    version="0.1.0",
    description="Fused nearest-code search and EMA codebook statistics for VQ-VAE / VQGAN tokenizers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastvq", "fastvq.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastvq = fastvq.app.cli:main"]},
    license="MIT",
)
