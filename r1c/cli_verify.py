"""`r1c verify BUNDLE`: re-hash every byte of a bundle against the sha256 its manifest recorded at build.

A load (`r1c run`, `r1c.runtime.load`) checks only sizes and sampled-block fingerprints, which is what keeps
opening a 690 GB bundle fast; this is the full check, with a progress bar over the bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--progress/--no-progress", default=True, help="A progress bar over the bytes on stderr.")
def verify_cmd(bundle: Path, progress: bool) -> None:
    """Check every file of BUNDLE against the sha256 in its manifest (exit 1 on the first mismatch)."""
    from r1c.manifest import verify_bundle

    m = verify_bundle(bundle, progress=progress and sys.stderr.isatty())
    total = sum((bundle / rel).stat().st_size for rel in m.files)
    click.echo(f"verified {bundle}: {len(m.files)} files, {total} bytes match their sha256")
