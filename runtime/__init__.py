"""r1c.runtime: load an engine bundle and serve batched prefill/decode (`load`, `Engine`)."""

from r1c.runtime.engine import Engine, load

__all__ = ["Engine", "load"]
