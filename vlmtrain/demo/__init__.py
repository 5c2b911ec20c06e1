"""Synthetic shapes world for `vlmtrain demo`: scenes, their true captions and Q&A, and the corpus files."""
