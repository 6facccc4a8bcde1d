"""Image reward models: CLIP score, PickScore, HPSv2, LAION aesthetic head, JPEG compressibility, mixtures.

Every model is a `rewards.base.RewardModel` taking captions and images (PIL images or a float tensor
[N, 3, H, W] in [0, 1]), batched and gradient-free. Heavy backbones (open_clip, transformers) are
imported only when a model is built.
"""
