"""Generation: AR prompting and sampling, semantic tokens, the flow-matching schedule and denoising."""
