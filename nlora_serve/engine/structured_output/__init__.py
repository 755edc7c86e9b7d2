"""Structured outputs (vLLM v1's structured_output/): the spec, its grammar compiled, its token masks.

Modules::

    structured.py        the spec (StructuredOutputs), its token masks
    grammar_compiler.py  specs compiled by xgrammar within a timeout, per-tenant slots, their cache
"""
