"""r1c.runtime: load an engine bundle and serve batched prefill/decode (`load`, `Engine`).

`load` and `Engine` are imported on first use (PEP 562 `__getattr__`), so importing a submodule (the CLI's
`r1c.runtime.bench.cli`, `r1c.runtime.server.commands`) does not load numpy and the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r1c.runtime.engine import Engine, load

__all__ = ["Engine", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from r1c.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
