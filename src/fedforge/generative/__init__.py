"""Generator interface and back-ends (built-in, diffusers, StyleGAN pickles).

The registry ``GENERATORS`` names the modules of the back-ends and imports them on first use; heavy optional
libraries (diffusers, NVlabs' dnnlib) are only imported when a back-end that needs them is loaded.
"""
from .base import GENERATORS, Generator, GeneratorError, as_generator, load_generator

__all__ = ["GENERATORS", "Generator", "GeneratorError", "as_generator", "load_generator"]
