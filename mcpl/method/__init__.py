"""The MCPL method on a frozen diffusion model: prompts, learned rows, attention, losses, the trainer.

Kept import-light (nothing here is imported eagerly) so that `mcpl --help` and the data
checks never load torch or diffusers.
"""
