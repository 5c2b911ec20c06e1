"""vlmtrain: train small vision-language models stage by stage with the paper's attention masks."""

__version__ = "0.1.0"
