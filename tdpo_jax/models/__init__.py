"""The project's networks (UNet, VAE, CLIP) and model loading: diffusers-format pipelines (Flax
msgpack or PyTorch safetensors), tiny builder.

Shape legend: see `pipeline.py` (latents NCHW, images NHWC in [0,1], text (B, 77, D)).
"""
from tdpo_jax.models import convert
from tdpo_jax.models import image_encoder
from tdpo_jax.models import pipeline
from tdpo_jax.models.image_encoder import ImageEncoder, embed_images, preprocess_images
from tdpo_jax.models.pipeline import (ModelLoadError, Pipeline, decode_latents, encode_text,
                                      load_pipeline, resolve_model_spec, tokenize, unet_eps)
