"""ElastiLM-TVM: one reordered LLM whose every prefix of heads and FFN neurons is a usable sub-model.

The repository root is the package `elastilm`: `elastilm.<folder>.<module>` is the file `<folder>/<module>.py`.
Layers, bottom to top (README "Layout"; checked by import-linter in CI): formats -> elastic_ops -> targets ->
compile -> runtime_py -> evaluate -> train -> cli.

The public API is importable from here; each name is loaded on first use (so that `import elastilm` stays cheap
and a reader sees below which file a name comes from).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from elastilm.formats.errors import ElastiLMError

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "elastify": "elastilm.compile.elastify",
    "ElastifyOptions": "elastilm.compile.elastify",
    "build": "elastilm.compile.build",
    "package": "elastilm.compile.package",
    "ElasticEngine": "elastilm.runtime_py.engine",
    "Orchestrator": "elastilm.runtime_py.orchestrator",
    "Request": "elastilm.runtime_py.orchestrator",
    "Answer": "elastilm.runtime_py.orchestrator",
    "SLO": "elastilm.runtime_py.planner",
    "Sampling": "elastilm.runtime_py.sampling",
    "profile": "elastilm.runtime_py.profile",
    "serve": "elastilm.runtime_py.serve",
}

__all__ = [
    "ElastiLMError",
    "__version__",
    "elastify",
    "ElastifyOptions",
    "build",
    "package",
    "ElasticEngine",
    "Orchestrator",
    "Request",
    "Answer",
    "SLO",
    "Sampling",
    "profile",
    "serve",
]

if TYPE_CHECKING:  # for editors and type checkers; at run time `__getattr__` imports on first use
    from elastilm.compile.build import build
    from elastilm.compile.elastify import ElastifyOptions, elastify
    from elastilm.compile.package import package
    from elastilm.runtime_py.engine import ElasticEngine
    from elastilm.runtime_py.orchestrator import Answer, Orchestrator, Request
    from elastilm.runtime_py.planner import SLO
    from elastilm.runtime_py.profile import profile
    from elastilm.runtime_py.sampling import Sampling
    from elastilm.runtime_py.serve import serve


assert set(__all__) == {"ElastiLMError", "__version__", *_PUBLIC}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'elastilm' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
