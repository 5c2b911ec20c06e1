"""Models: vision towers by family (backbones/vision), MLP projector, causal LM, their composition, masks, noise, freezing."""
