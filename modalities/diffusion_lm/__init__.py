"""Masked discrete diffusion LMs: DiT backbone, schedules, SUBS, ancestral samplers, teachers, DiDi-Instruct.

Submodules are imported on use (`from modalities.diffusion_lm.dit import DiT`); this package stays light.
"""
