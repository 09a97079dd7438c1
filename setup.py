from setuptools import setup

setup(
    name="fusedopt",
    version="0.1.0",
    description="Fused multi-tensor Triton optimizers and learning-rate schedules, drop-in for torch.optim",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["fusedopt", "fusedopt.kernels", "fusedopt.schedules", "fusedopt.cpu"],
    package_dir={"fusedopt": "fusedopt", "fusedopt.kernels": "kernels"},
    package_data={"fusedopt": ["table_check.cpp"]},
    python_requires=">=3.9",
    # torch: the oldest tested (tests/run_versions.sh); Triton only where it has wheels (the GPU
    # kernels): the CPU kernels (numba) and the reference need none of it
    install_requires=["torch>=2.11", "numpy", "numba>=0.59",
                      'triton>=3.6; platform_system == "Linux" and '
                      '(platform_machine == "x86_64" or platform_machine == "aarch64")'],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "matplotlib", "tqdm", "ninja", "lightning",
                 "scikit-learn"],
        "plot": ["matplotlib"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark", "ninja", "scikit-learn"],  # sklearn: the digits data
        "native": ["ninja"],  # python -m fusedopt.native builds the compiled table check
    },
)
