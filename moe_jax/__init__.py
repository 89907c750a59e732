"""moe_jax: Mixture-of-Experts transformers in JAX/Flax.

Data path, one module each: routing -> dispatch -> moe_layer -> model -> train (see README.md).
"""

__version__ = "0.1.0"
