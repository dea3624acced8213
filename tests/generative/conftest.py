"""Fixtures of the generator tests: the tiny Stable-Diffusion-shaped diffusers folder (tests/support/tiny_sd.py)."""
from tests.support.tiny_sd import tiny_sd  # noqa: F401 - a fixture, shared by the modules of this folder
