"""Data: shard writing, streaming, sample processing and collation."""
