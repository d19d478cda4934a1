"""The paper pipelines (entity_tracking, variable_binding) and the scripts that re-measure the docs' numbers."""
