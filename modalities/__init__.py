"""One package per modality; they never import each other."""
