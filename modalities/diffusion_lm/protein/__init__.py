"""Proteins for masked diffusion: amino-acid tokenizer, FASTA I/O, a FASTA data source, an ESM teacher adapter.

Submodules are imported on use (`esm_teacher` pulls in transformers' ESM; the rest is light).
"""
