"""mcpl: Multi-Concept Prompt Learning (Jin et al., ICML 2024) on diffusers."""

__version__ = "0.1.0"
