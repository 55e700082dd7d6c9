"""Caracal: causal language models with spectral (Multi-Head Fourier) mixing, and the baselines to compare."""

__version__ = "0.1.0"
