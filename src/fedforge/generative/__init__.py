"""Generator interface and back-ends (built-in, diffusers, StyleGAN pickles)."""
from .base import GENERATORS, Generator, GeneratorError, as_generator, load_generator

__all__ = ["GENERATORS", "Generator", "GeneratorError", "as_generator", "load_generator"]
