"""Backbones of several families: vision towers (vision/), each behind one interface."""
