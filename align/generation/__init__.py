"""Rollout generation on the training model object: latent KV cache, absorbed-MLA decode, batched
sampling with continuous batching, CUDA-graph decode steps."""

from align.generation.cache import CacheError, LatentCache
from align.generation.engine import GenerationEngine, generate
from align.generation.requests import Completion
from align.generation.sampling import SamplingParams

__all__ = ["CacheError", "Completion", "GenerationEngine", "LatentCache", "SamplingParams", "generate"]
