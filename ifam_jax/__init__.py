"""iFAM in JAX/Flax: two-stage Vision Transformers with hard, input-level attention masks."""

__version__ = '0.1.0'
