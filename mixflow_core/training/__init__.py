"""Training: the fit loop, checkpoints and the resume policy, run directories, named profiles."""
