"""The newcomer's path: the README's "Using it" block works as written with what the quickstart installs;
`inspect` and `passes` answer without torch; `-v` is readable; every command ends with one summary line.

The README block runs in one fresh Python process (`r1c` in-process, from an empty directory), which then
reports which modules got imported: none of the test, kernel, TensorRT or bench extras may be needed.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from clitools import cli

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("transformers", "matplotlib", "triton", "tensorrt", "tensorrt_rtx", "pytest", "mypy",
          "onnxruntime_extensions")


def readme_commands() -> list[str]:
    """The `r1c ...` lines of the README's "Using it" bash block, comments removed, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith("r1c ")]


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    return block.group(1)


_RUNNER = textwrap.dedent('''
    import json, shlex, sys
    from click.testing import CliRunner
    from r1c.cli import main
    results = []
    for line in json.loads(sys.argv[1]):
        r = CliRunner().invoke(main, shlex.split(line)[1:])
        results.append({"line": line, "code": r.exit_code, "out": r.stdout, "err": r.stderr,
                        "exception": None if r.exception is None or isinstance(r.exception, SystemExit)
                        else repr(r.exception)})
    exec(sys.argv[2])
    print(json.dumps({"results": results, "tokens": tokens, "logits_shape": list(logits.shape),
                      "imported": sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[3]))}))
''')


def test_readme_commands_work_with_the_main_install_only(tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0].startswith("r1c export") and len(commands) >= 8
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(commands), readme_python(),
                           json.dumps(EXTRAS)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in report["results"]:
        gate = "--baseline" in r["line"]  # the same bundle measured twice: 0, or 3 if this machine drifted
        assert r["code"] in ((0, 3) if gate else (0,)) and r["exception"] is None, r
        if gate:
            assert "Regression gate against" in r["out"], r
    verbs = {"export": "exported ", "build": "built ", "optimize": "optimized "}
    for r in report["results"]:
        verb = verbs.get(shlex.split(r["line"])[1])
        if verb:  # one summary line: what was written, its size, the time
            assert re.fullmatch(rf"{verb}\S+.*: .+ \(\d+\.\d (KiB|MiB|GiB)\) in \d+\.\d s\n", r["out"]), r["out"]
    assert report["logits_shape"][0] == 1 and len(report["tokens"]) == 2
    assert report["imported"] == [], report["imported"]
    assert (tmp_path / "out" / "logits.npy").is_file() and (tmp_path / "out" / "now.json").is_file()


def test_install_script_keeps_extras_for_the_test_command() -> None:
    install = (ROOT / "scripts" / "install.sh").read_text()
    extras = re.findall(r'EXTRAS="\[([^\]]*)\]"', install)
    assert 'EXTRAS=""' in install and len(extras) == 2  # the main job installs no extra; --test and --serve theirs
    assert {"test", "kernels", "tensorrt-rtx", "serve"} <= set(extras[0].split(",")) and extras[1] == "serve"
    assert "bash scripts/install.sh\n" in (ROOT / "scripts" / "quickstart.sh").read_text()
    assert "bash scripts/install.sh --test\n" in (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_inspect_and_passes_answer_without_torch(tmp_path: Path) -> None:
    from foreign_models import toy_model

    model = toy_model(tmp_path / "m.onnx", cache=False)
    probe = textwrap.dedent(f'''
        import sys
        from click.testing import CliRunner
        from r1c.cli import main
        for args in (["passes"], ["passes", "--target", "tensorrt"], ["inspect", {str(model)!r}],
                     ["inspect", {str(model)!r}, "--json"]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0 and r.stdout, (args, r.stdout, r.stderr, r.exception)
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    ''')
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_cli_start_imports_no_numpy() -> None:
    """`r1c --help` (and so every command's start) imports neither numpy nor the engine: the heavy modules load
    inside the commands that use them (`r1c.targets` holds what the options' help needs; `r1c.runtime` loads
    `load`/`Engine` on first use)."""
    probe = textwrap.dedent('''
        import sys
        from click.testing import CliRunner
        from r1c.cli import main
        r = CliRunner().invoke(main, ["--help"])
        assert r.exit_code == 0 and "build" in r.stdout, r.stdout
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "torch", "onnx", "onnxruntime")
                     or m == "r1c.runtime.engine"))
    ''')
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_verbose_is_readable(tmp_path: Path) -> None:
    from foreign_models import toy_model

    code, _out, err = cli("-v", "optimize", toy_model(tmp_path / "m.onnx", cache=True), "-o", tmp_path / "o")
    assert code == 0, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(re.match(r"(info|warning) [\w.]+: ", line) for line in lines), lines
    assert any("fold_constants" in line for line in lines)  # each pass is named


def test_a_library_exception_is_one_line_unless_vv() -> None:
    from r1c.cli import _Formatter

    try:
        raise RuntimeError("adapter failed\n  at converter.cc:55")
    except RuntimeError:
        record = logging.LogRecord("onnxscript.version_converter", logging.WARNING, __file__, 1, "conversion failed",
                                   None, sys.exc_info())
    short = _Formatter(tracebacks=False).format(record)
    assert short.count("\n") == 1 and "Traceback" not in short and "at converter.cc:55" in short
    record.exc_text = None
    assert "Traceback" in _Formatter(tracebacks=True).format(record)


def test_readme_block_does_not_collide_with_the_quickstart_outputs() -> None:
    """"Right after `bash scripts/quickstart.sh`": the block's outputs must not be the quickstart's (an export or
    build onto an existing output is refused)."""
    quick = re.search(r"out=\$\{1:-([^}]+)\}", (ROOT / "scripts" / "quickstart.sh").read_text())
    assert quick is not None
    written = [shlex.split(c)[shlex.split(c).index("-o") + 1] for c in readme_commands() if " -o " in c]
    assert written and all(not Path(w).is_relative_to(quick.group(1)) for w in written), (quick.group(1), written)
    assert Path(quick.group(1)) != Path("out")


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from clitools import error_line

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, _out, err = cli("serve", tmp_path / "b.bundle", "--port", "0")
    line = error_line(code, err)
    assert "r1c serve needs the 'serve' extra (uvicorn not installed)" in line and "pip install -e '.[serve]'" in line


def test_help_names_every_target_and_the_rtx_default_arch() -> None:
    """`r1c --help` lists every build target; `r1c build --help` states what --arch defaults to for tensorrt-rtx
    (the constant the build uses, so the help cannot drift from it)."""
    from r1c.manifest import TARGETS
    from r1c.targets import DEFAULT_RTX_COMPUTE_CAPABILITY

    code, out, _ = cli("--help")
    assert code == 0
    line = next(line for line in out.splitlines() if "# --target" in line)
    listed = {t.replace("(default)", "").strip() for t in line.split("# --target", 1)[1].split("|")}
    assert listed == set(TARGETS), line
    code, out, _ = cli("build", "--help")
    assert code == 0
    arch = " ".join(out[out.index("--arch"):].split())
    assert f"default {DEFAULT_RTX_COMPUTE_CAPABILITY.lower()}" in arch.split("--threads")[0], arch
