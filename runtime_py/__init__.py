"""The thin serving runtime: load a bundle locally or over TVM RPC, KV cache, prefill/decode at a level."""
