"""Training on top of the pipeline: recovery adapters per level (distilled from the full model) and the TLM's
two heads (from the compiled LLM's own answers)."""
