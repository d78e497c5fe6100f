"""r1c: an export and optimization toolchain for DeepSeek-R1-class Mixture-of-Experts models.

Stages live in `r1c.exporter`, `r1c.passes`, `r1c.plugins` and `r1c.runtime`; the CLI is `r1c.cli`.
"""

__version__ = "0.1.0"
