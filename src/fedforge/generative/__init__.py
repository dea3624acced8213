"""Generator interface and back-ends (built-in, diffusers, StyleGAN pickles)."""
