"""Evaluation: caption metrics (pycocoevalcap), VQA metrics, and result tables."""
