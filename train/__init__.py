"""Training: config, loop, optimizer groups, checkpoints, metrics, distributed layout."""
