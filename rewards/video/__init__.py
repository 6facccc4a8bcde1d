"""Medical video (MedVidBench, MedGRPO arXiv:2512.06581): task names, answer parsers, metrics and RL rewards.

`tasks` names the eight tasks, `parsers` reads answers, `metrics` holds the leaderboard evaluation metrics and
`rl` the (separate) RL reward models; `similarity` holds the swappable sentence-similarity scorers.
"""
