"""The bottom layer: every on-disk format (one module each, with its writer, reader and schema version), the
model config, the width contract between the compiled library and the runtime, and the error type. Imports
nothing above it; nothing here imports torch or TVM at module level."""
