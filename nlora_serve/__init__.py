"""nlora-serve: serve many NLoRA / IntTune adapters on one shared base LLM."""

__version__ = "0.1.0"
