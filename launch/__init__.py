"""Launch helpers: they build torchrun / sbatch commands and scripts. Of the trainer they import only its config,
to validate it (and the parallel layout) before anything is written, submitted or started."""
