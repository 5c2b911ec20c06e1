"""Files an export ships for transformers' trust_remote_code (self-contained: they never import vlmtrain)."""
