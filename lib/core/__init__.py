"""The lowest layer above lib.types: architectures, components, tokenizers, model handles and the NDIF backend."""
