"""The data layer: prompts, desiderata and their encoding (the face is lib.data_gen)."""
