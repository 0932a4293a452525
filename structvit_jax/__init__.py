"""structvit_jax: Structural Vision Transformers (StructViT, CVPR 2024) in JAX/Flax."""

__version__ = "0.1.0"
