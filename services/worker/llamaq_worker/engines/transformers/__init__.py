"""llamaq's own continuous batching over transformers (CPU development, the reference engine); imports torch."""

from .engine import TransformersEngine

__all__ = ["TransformersEngine"]
