"""Ray-free library code: config, data, losses, metrics and the training loop."""
