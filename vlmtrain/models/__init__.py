"""Models: SigLIP vision tower, MLP projector, Qwen2 LM, their composition, masks, noise and freezing."""
