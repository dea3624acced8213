"""Customizable synthetic data from private client context (PCEvolve-style DP evolution, PE, rf, none).

A client with a few private images per class sends only differentially private selections over a generator's
own samples and gets back a task-specific synthetic dataset; see :mod:`fedforge.synth.protocol` for the
protocol and :func:`run_synth` for the whole run. Layer: uses ``data``, ``models``, ``generative`` and ``core``;
nothing below imports it.
"""
from .encoder import Encoder, encoder_from_model, load_checkpoint, load_encoder, save_checkpoint
from .evaluate import DownstreamEvaluator, EvalSettings
from .privacy import PrivacyAccountant, exponential_mechanism_probs, gaussian_sigma
from .protocol import SELECTORS, Candidates, Client, Selection, Server
from .run import SynthConfig, SynthResult, run_synth

__all__ = ["Candidates", "Client", "DownstreamEvaluator", "Encoder", "EvalSettings", "PrivacyAccountant", "SELECTORS",
           "Selection", "Server", "SynthConfig", "SynthResult", "encoder_from_model", "exponential_mechanism_probs",
           "gaussian_sigma", "load_checkpoint", "load_encoder", "run_synth", "save_checkpoint"]
