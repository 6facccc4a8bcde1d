"""Protein-sequence rewards: CPU sequence metrics (`metrics`) and ESMFold pLDDT on a GPU (`plddt`)."""
