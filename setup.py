"""tdpo_jax: TDPO-R (ICML 2024) reinforcement-learning fine-tuning of diffusion models in JAX/Flax."""
import setuptools

# Exact pins (DESIGN §6): loose ranges made pip build old tokenizers from source and fail.
INSTALL_REQUIRES = [
    "jax[cpu]==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    # The CLIP / BERT tokenizers and model configs. No Flax model class of transformers (v5 has
    # none) or diffusers is used: the networks are tdpo_jax.models' own (DESIGN §6).
    "transformers==5.24.0",
    "huggingface-hub==2.4.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",  # python -m tdpo_jax.plot
]

setuptools.setup(
    name="tdpo_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["tdpo_jax", "tdpo_jax.*"]),
    package_data={"tdpo_jax": ["prompts/*.txt", "models/tiny_tokenizer/*",
                               "shapes/assets/*.msgpack", "shapes/assets/pipeline/*/*",
                               "shapes/assets/pipeline/*.json"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    # torch is only for parity tests against the PyTorch reference implementations; never a
    # runtime requirement. 2.13.0 is a CPU wheel (a range would pull a multi-GB CUDA build).
    # diffusers (PyTorch UNet2DConditionModel / AutoencoderKL) likewise: the reference of the
    # model parity tests only.
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0",
                             "diffusers==0.42.1"],
                    # gs:// workdirs: etils.epath's GCS filesystem and orbax's bucket check.
                    "gcs": ["gcsfs==2026.10.1", "google-cloud-storage==3.17.1"]},
)
