from setuptools import find_packages, setup

setup(
    name="pagedlm",
    version="0.1.0",
    description="Offline batch inference for LLMs with a paged KV cache and continuous batching",
    packages=find_packages(include=["pagedlm", "pagedlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "numpy",
        "tqdm",
        "gguf>=0.10",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["pagedlm=pagedlm.__main__:main"]},
)
