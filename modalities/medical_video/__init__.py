"""Medical video VLMs (MedGRPO, arXiv:2512.06581): video pipeline, Qwen2.5-VL policy and sampler, MedVidBench data.

Submodules are imported explicitly (`modalities.medical_video.video`, `.policy`, `.sampler`, `.data`, ...), so
importing the package stays light (no decord, qwen-vl-utils or transformers import here).
"""
