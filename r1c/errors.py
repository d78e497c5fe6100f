"""One exception root for every stage; the CLI turns any of them into one line and a non-zero exit."""

from __future__ import annotations


class R1CError(Exception):
    """Base of every error r1c raises on bad input or a failed stage.

    Exit codes of the CLI: 1 for every R1CError but RegressionError (3); 2 for a command line click
    cannot parse; 130 on SIGINT, 143 on SIGTERM.
    """

    exit_code = 1


class ConfigError(R1CError):
    """A model config that r1c cannot read or does not support."""


class CheckpointError(R1CError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class ExportError(R1CError):
    """The PyTorch model could not be lowered to ONNX."""


class PassError(R1CError):
    """A graph pass failed; the message names the pass and the node."""


class BuildError(R1CError):
    """An engine bundle could not be built for the requested target."""


class BundleError(R1CError):
    """A bundle that is missing, corrupt, or does not match this library, target or device."""


class RuntimeInputError(R1CError):
    """Bad input to the runtime (token ids out of range, empty prompts, ...)."""


class BenchError(R1CError):
    """A benchmark could not run (bad options, a baseline file that cannot be read, ...)."""


class RegressionError(BenchError):
    """The regression gate failed: slower than the baseline beyond the tolerance and the noise.

    The only error with exit code 3, so that a CI gate can tell a regression from a typo.
    """

    exit_code = 3


class MissingExtraError(R1CError):
    """A command needs an optional dependency group (a pip extra) that is not installed."""


def require_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Raise `MissingExtraError` naming the missing modules and the install command when any of `modules` (import
    names) cannot be found; imports nothing. `extra` is the pyproject.toml optional-dependency group."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                                f"pip install -e '.[{extra}]' in the repository (or bash scripts/install.sh --{extra})")
