"""The vLLM-backed engine (DESIGN §8): the same Engine interface on vLLM's AsyncLLM."""
