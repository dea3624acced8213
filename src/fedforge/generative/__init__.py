"""Generator interface and back-ends (built-in, diffusers, StyleGAN pickles).

Importing this package registers every back-end; heavy optional libraries (diffusers, NVlabs' dnnlib) are only
imported when a back-end that needs them is loaded.
"""
from .base import GENERATORS, Generator, GeneratorError, as_generator, load_generator
from . import builtin, diffusion, stylegan  # noqa: F401,E402  (register the back-ends; their heavy imports are lazy)

__all__ = ["GENERATORS", "Generator", "GeneratorError", "as_generator", "load_generator"]
