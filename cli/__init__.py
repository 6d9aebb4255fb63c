"""ElastiLM-TVM: one reordered LLM whose every prefix of heads and FFN neurons is a usable sub-model.

Subpackages follow the data: `elastilm.compile` (offline pipeline), `elastilm.elastic_ops` (prefix-width
operators), `elastilm.runtime` (load, plan, generate), `elastilm.targets` (target presets as data).
"""

__version__ = "0.1.0"


class ElastiLMError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""
