"""Training: the trainer and its named stages, the runner (config → finished run), dynamic sampling, the reward
stage, the eval hook and the critic updater."""
