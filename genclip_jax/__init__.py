"""genclip_jax: CLIP-based zero-shot anomaly detection (AnomalyCLIP, GenCLIP) in JAX/Flax."""

__version__ = "0.1.0"
