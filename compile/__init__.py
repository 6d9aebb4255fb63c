"""The offline pipeline, one module per step, in data-flow order:

ingest -> importance -> reorder -> levels -> (recovery) -> artifact, driven by `elastify`;
`reference` is the torch oracle every later stage is checked against; `quality` measures each level.
"""
