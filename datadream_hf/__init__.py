"""datadream_hf: DataDream (ECCV'24, few-shot guided dataset generation) for diffusers, datasets and transformers."""

__version__ = "0.1.0"
