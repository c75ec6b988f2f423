"""Training pieces: config, data, tokenizers, optimizer, the train step, checkpoints, metrics."""
