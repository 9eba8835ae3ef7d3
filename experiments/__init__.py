"""Research beside the product, not in it: probes, the quality study and its staged recipes.

Run from the repository root (`python -m experiments.quality ...`); nothing in `stts_vllm` or
`server` imports this package. What each experiment is for and what it found:
experiments/README.md.
"""
