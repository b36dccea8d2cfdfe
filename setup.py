"""unimm_jax: JAX/Flax unified multimodal tokenizers and the LLMs built on them."""
import setuptools

setuptools.setup(
    name="unimm_jax",
    version="0.1.0",
    description="Unified multimodal visual tokenizers and autoregressive LLMs in JAX/Flax.",
    packages=setuptools.find_packages(include=["unimm_jax", "unimm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array_record>=0.7",
        "tensorflow-datasets>=4.9.9",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "einops>=0.8",
        "chex>=0.1.90",
        "absl-py",
        "numpy",
        # clu.metric_writers writes TensorBoard summaries through TensorFlow.
        "tensorflow-cpu>=2.18",
        "tensorboard",
        "pillow",
        "safetensors",
        "ml_dtypes",  # bfloat16 tensors of HF checkpoints
        "tokenizers>=0.20",  # tokenizer.json of HF LLM checkpoints
        "jinja2>=3.1.6",  # chat templates of HF tokenizers (rendered as transformers does)
        "scikit-image>=0.24",
        "matplotlib",  # notebooks
    ],
    extras_require={
        # pytest-xdist: launch/test.sh runs the suite on two workers (one per CI core).
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
        # Parity tests against PyTorch references. Pinned: 2.13.0 is the CPU build on
        # this project's machines; an unpinned torch pulls a multi-GB CUDA build.
        # transformers writes the tiny HF checkpoints the import tests load and compare against.
        # vector-quantize-pytorch: the residual VQ the RVQ lookup is compared with (test, bench).
        "torch": ["torch==2.13.0", "transformers>=5.0", "vector-quantize-pytorch>=1.32.0"],
    },
)
