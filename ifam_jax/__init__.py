"""iFAM in JAX/Flax: two-stage Vision Transformers with hard, input-level attention masks.

Comments cite the official implementation's behaviour as "reference N.M" (its quirks as
"reference 14.N"); docs/paper_map.md maps each to the reference repository's file and the
paper's section, and each formula of the paper to the function that implements it.
"""

__version__ = '0.1.0'
