"""Relax/TIR operators that read only an active prefix of full-width weight buffers (prefix matmul, elastic
attention, LoRA-on-prefix) and their per-target schedules."""
