"""r1c.runtime.server: `r1c serve`, the OpenAI-compatible HTTP server over `r1c.runtime.serving.ServingEngine`
(app.py: routes, streaming, disconnects; protocol.py: the wire format; metrics.py: Prometheus; commands.py: the
CLI commands serve, capi and bench-serving)."""
