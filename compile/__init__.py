"""The offline pipeline, one module per step, in data-flow order:

ingest -> importance -> reorder -> levels, driven by `elastify` (writes the elastify folder); `layer_drop` (the
ShortGPT baseline's layers); `export` (the elastic model in Relax) -> `build` per target (with `build_tlm`);
`package` (app bundles). `reference` is the torch oracle every later stage is checked against; `corpus` the
calibration text; `tlm_model` the TLM in torch, which `build_tlm` exports.
"""
