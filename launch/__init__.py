"""Launch helpers: they build torchrun / sbatch commands and scripts; they never import the trainer."""
