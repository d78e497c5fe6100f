"""pytest plugin `r1c_latency`: latency regression tests against stored baselines.

Enable it with the `pytest11` entry point (`r1c_latency = "r1c.runtime.bench.pytest_plugin"`), or with
`-p r1c.runtime.bench.pytest_plugin`, or `pytest_plugins = ["r1c.runtime.bench.pytest_plugin"]` in the root conftest.py.

    def test_decode_latency(r1c_latency, engine):
        r1c_latency.check_generate("decode", engine, batch=1, prompt_len=32, new_tokens=16)

    def test_tokenize_latency(r1c_latency):
        r1c_latency.check("tokenize", lambda: tokenize(TEXT), repeat=30)

`pytest --r1c-update-baselines` records the samples (raw, every repetition) as the new baseline; a plain run
compares with them by the benchmark's rule (`r1c.runtime.bench.stats.GATE_RULE`): a check fails only when the
95% bootstrap interval of median(now) / median(baseline) lies wholly above 1 + max_regression. A check with no
baseline, or a baseline recorded on another host, is skipped with the reason.

Baselines live in `<test file's dir>/latency_baselines/<test file stem>.json` (`--r1c-baselines DIR` or the
`r1c_latency_baselines` ini option to move them), keyed by test name and check name.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from r1c.runtime.bench.stats import GATE_RULE, RatioCI, is_regression, parse_fraction, ratio_of_medians

STORE_SCHEMA = "r1c-latency-baselines/1"
DEFAULT_MAX_REGRESSION = "10%"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("r1c-latency", "r1c latency regression tests")
    group.addoption("--r1c-update-baselines", action="store_true", default=False,
                    help="Record the latency baselines of the tests that run (overwrite the stored ones).")
    group.addoption("--r1c-baselines", default=None, metavar="DIR",
                    help="Directory of the latency baseline files [default: latency_baselines/ beside each test "
                         "file].")
    group.addoption("--r1c-max-regression", default=None, metavar="TOL",
                    help=f"Tolerated slowdown, e.g. 10% or 0.1 [default: {DEFAULT_MAX_REGRESSION}]. {GATE_RULE}.")
    parser.addini("r1c_latency_baselines", "Directory of the latency baseline files (relative to rootdir).",
                  default="")
    parser.addini("r1c_latency_max_regression", "Tolerated slowdown of latency checks.",
                  default=DEFAULT_MAX_REGRESSION)


def _host() -> dict[str, Any]:
    from r1c.runtime.bench.report import host_info

    h = host_info()
    return {"machine": h["machine"], "processor": h["processor"], "cpus": h["cpus"]}


@dataclasses.dataclass
class _Outcome:
    key: str
    metric: str
    verdict: str  # recorded | ok | REGRESSED | skipped
    ci: RatioCI | None = None


class _Store:
    """One JSON file of baselines; updates are merged into it at the end of the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = self._read()
        self.updates: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            d = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise pytest.UsageError(f"r1c latency baselines {self.path} are not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or d.get("schema") != STORE_SCHEMA:
            raise pytest.UsageError(f"r1c latency baselines {self.path}: not a {STORE_SCHEMA} file")
        entries: dict[str, Any] = d.get("entries", {})
        return entries

    def write(self) -> None:
        if not self.updates:
            return
        entries = {**self._read(), **self.updates}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps({"schema": STORE_SCHEMA, "rule": GATE_RULE, "entries": dict(sorted(entries.items()))},
                                  indent=1) + "\n")
        tmp.replace(self.path)


class _State:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.update: bool = bool(config.getoption("--r1c-update-baselines"))
        self.stores: dict[Path, _Store] = {}
        self.outcomes: list[_Outcome] = []
        text = config.getoption("--r1c-max-regression") or config.getini("r1c_latency_max_regression")
        try:
            self.max_regression = parse_fraction(str(text))
        except Exception as e:
            raise pytest.UsageError(f"r1c latency: {e}") from None
        option_dir = config.getoption("--r1c-baselines") or config.getini("r1c_latency_baselines")
        self.directory = Path(config.rootpath, option_dir) if option_dir else None

    @functools.cached_property
    def host(self) -> dict[str, Any]:  # lazily: it imports onnxruntime and torch
        return _host()

    def store_for(self, test_file: Path) -> _Store:
        directory = self.directory or test_file.parent / "latency_baselines"
        path = directory / f"{test_file.stem}.json"
        if path not in self.stores:
            self.stores[path] = _Store(path)
        return self.stores[path]


_STATE = pytest.StashKey[_State]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = _State(config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is not None and state.update:
        for store in state.stores.values():
            store.write()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.outcomes:
        return
    terminalreporter.section("r1c latency")
    for o in state.outcomes:
        ci = f"  {o.ci.ratio:.3f} [{o.ci.low:.3f}, {o.ci.high:.3f}]" if o.ci else ""
        terminalreporter.write_line(f"{o.verdict:<9} {o.key} {o.metric}{ci}")


class LatencyBaseline:
    """The `r1c_latency` fixture: measure something repeatedly and gate it against the stored baseline."""

    def __init__(self, state: _State, store: _Store, test_name: str) -> None:
        self._state = state
        self._store = store
        self._test = test_name

    @property
    def updating(self) -> bool:
        return self._state.update

    def check(self, name: str, fn: Callable[[], object], *, repeat: int = 20, warmup: int = 2,
              max_regression: float | str | None = None) -> RatioCI | None:
        """Time `fn()` `repeat` times (after `warmup` calls) and gate the wall times against the baseline."""
        samples = list(_wall_times(fn, repeat, warmup))
        return self.check_samples(name, {"wall_s": samples}, max_regression=max_regression)["wall_s"]

    def check_generate(self, name: str, generator: Any, *, batch: int = 1, prompt_len: int = 16,
                       new_tokens: int = 8, repeat: int = 10, warmup: int = 2, seed: int = 0,
                       metrics: Sequence[str] = ("ttft_s", "tpot_s", "e2e_s"), vocab_size: int | None = None,
                       max_regression: float | str | None = None) -> dict[str, RatioCI | None]:
        """Time greedy generation (an `r1c.runtime.Engine` or anything with its `generate`) as `r1c bench`
        does, and gate TTFT, TPOT and end-to-end latency against the baseline."""
        from r1c.runtime.bench.runner import Settings, System, Workload, run_bench

        vocab = vocab_size or getattr(generator, "vocab_size", None)
        if vocab is None:
            raise TypeError("check_generate: pass vocab_size= (the generator has no vocab_size)")
        w = Workload(batch, prompt_len, new_tokens)
        (series,) = run_bench([System("r1c", generator, required=True)], [w], int(vocab),
                              Settings(warmup=warmup, repeat=repeat, seed=seed))
        samples = {m: series.samples[m] for m in metrics if series.samples.get(m)}
        return self.check_samples(f"{name}[{w.key}]", samples, max_regression=max_regression)

    def check_samples(self, name: str, samples: dict[str, list[float]], *,
                      max_regression: float | str | None = None) -> dict[str, RatioCI | None]:
        """Gate already-measured samples (metric -> seconds per repetition); records them when updating."""
        key = f"{self._test}::{name}"
        state = self._state
        if state.update:
            self._store.updates[key] = {"samples": samples, "host": state.host,
                                        "recorded": datetime.datetime.now(datetime.timezone.utc)
                                        .isoformat(timespec="seconds")}
            state.outcomes += [_Outcome(key, m, "recorded") for m in samples]
            return dict.fromkeys(samples)
        entry = self._store.entries.get(key)
        if entry is None:
            state.outcomes += [_Outcome(key, m, "skipped") for m in samples]
            pytest.skip(f"no latency baseline for {key} in {self._store.path}; record one with "
                        "`pytest --r1c-update-baselines`")
        if entry.get("host") != state.host:
            state.outcomes += [_Outcome(key, m, "skipped") for m in samples]
            pytest.skip(f"latency baseline for {key} was recorded on another host ({entry.get('host')}); "
                        "re-record it here with `pytest --r1c-update-baselines`")
        tol = (state.max_regression if max_regression is None
               else parse_fraction(max_regression) if isinstance(max_regression, str) else float(max_regression))
        results: dict[str, RatioCI | None] = {}
        failed: list[str] = []
        for metric, values in samples.items():
            base = entry["samples"].get(metric)
            if not base:
                results[metric] = None
                continue
            ci = ratio_of_medians(values, base)
            results[metric] = ci
            bad = is_regression(ci, tol)
            state.outcomes.append(_Outcome(key, metric, "REGRESSED" if bad else "ok", ci))
            if bad:
                failed.append(f"{metric}: {ci.ratio:.2f}x the baseline, 95% CI [{ci.low:.2f}, {ci.high:.2f}]")
        if failed:
            pytest.fail(f"latency regression in {key} beyond {tol:.0%}: " + "; ".join(failed)
                        + f" ({GATE_RULE})", pytrace=False)
        return results


def _wall_times(fn: Callable[[], object], repeat: int, warmup: int) -> Iterator[float]:
    for _ in range(warmup):
        fn()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            yield time.perf_counter() - t0
    finally:
        if was_enabled:
            gc.enable()


@pytest.fixture
def r1c_latency(request: pytest.FixtureRequest) -> LatencyBaseline:
    """Latency checks against stored baselines (`--r1c-update-baselines` records them)."""
    state = request.config.stash[_STATE]
    store = state.store_for(Path(request.node.path))
    return LatencyBaseline(state, store, request.node.name)
