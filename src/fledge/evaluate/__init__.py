"""Evaluation: validation loss and perplexity, corpus baselines, task validity metrics."""
