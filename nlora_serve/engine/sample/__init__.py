"""Sampling (vLLM v1's sample/): a step's logits to tokens and log-probabilities on the device, read
back once.

Modules::

    sampling.py          SamplingParams and the batched sampler
    token_masks.py       allowed_token_ids and bad_words masks
    prompt_logprobs.py   prompt log-probabilities: which prompt positions a step scores, their read-back
    step_output.py       sampling on the device and the step's one read-back (SampledStep)
"""
