"""Generator interface and back-ends (built-in, diffusers, StyleGAN pickles).

Importing this package registers every back-end; heavy optional libraries (diffusers, NVlabs' dnnlib) are only
imported when a back-end that needs them is loaded.
"""
from .base import GENERATORS, Generator, GeneratorError, as_generator, load_generator
from . import builtin  # noqa: F401,E402  (registers builtin)

__all__ = ["GENERATORS", "Generator", "GeneratorError", "as_generator", "load_generator"]
