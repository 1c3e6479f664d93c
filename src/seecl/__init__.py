"""seecl: continual fine-tuning of LLMs with a Sequential Ensemble of Experts and baselines."""

__version__ = "0.1.0"
