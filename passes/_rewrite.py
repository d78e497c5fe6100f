"""The one adapter between onnxscript's rewrite rules and the onnx_ir pass interface.

A fusion or lowering pass lists its rules; this base class applies them to the main graph only (the
model-local function bodies of r1c ops are a contract with the plugins, so rules never rewrite them)
and, when logging is at INFO, reports for each rule that matched nowhere in full the best partial
match and why it failed (`MatchResult.fail` reasons), so `r1c optimize -v` says why a fusion did not fire.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRule, RewriteRuleSet

logger = logging.getLogger(__name__)
MIN_REPORTED_NODES = 4
_RULE_SETS: dict[type, RewriteRuleSet] = {}


class RulesPass(ir.passes.InPlacePass):
    """Applies `rules()` to the main graph; `self.count` is the number of rewrites of the last call."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    @abc.abstractmethod
    def rules(self) -> Sequence[RewriteRule]:
        """The rewrite rules of this pass, most specific first."""

    def after_rewrites(self, model: ir.Model) -> None:
        """Called when at least one rule fired (e.g. to attach function bodies)."""

    def rule_set(self) -> RewriteRuleSet:
        """`rules()` as a rule set, built once per pass class (building the patterns costs more than matching)."""
        cls = type(self)
        if cls not in _RULE_SETS:
            _RULE_SETS[cls] = RewriteRuleSet(list(self.rules()))
        return _RULE_SETS[cls]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rule_set = self.rule_set()
        functions = dict(model.functions)
        model.functions.clear()  # rules see the main graph only
        try:
            self.count = rule_set.apply_to_model(model)
            if logger.isEnabledFor(logging.INFO):
                self._report_misses(model, rule_set)
        finally:
            model.functions.update(functions)
        if self.count:
            self.after_rewrites(model)
        logger.info("%s: %d rewrite(s)", type(self).__name__, self.count)
        return ir.passes.PassResult(model, self.count > 0)

    def _report_misses(self, model: ir.Model, rule_set: RewriteRuleSet) -> None:
        """Log, per rule, the best match left in the graph that failed, and the reason it failed.

        A full structural match whose check failed is always reported; a partial match only when it
        covered at least MIN_REPORTED_NODES nodes (shorter ones are every Mul in the graph).
        """
        tracer = MatchingTracer()
        rule_set.apply_to_model(model, tracer=tracer)  # with a tracer nothing is rewritten
        for rule, matches in tracer.best_matches_map.items():
            for info in matches[:1]:
                if info.status == MatchStatus.SUCCESS:
                    continue
                nodes = len(info.match_result.nodes)
                if info.status == MatchStatus.NO_MATCH and nodes < MIN_REPORTED_NODES:
                    continue
                logger.info("%s: %s did not fire at %s (%s after %d matched nodes): %s",
                            type(self).__name__, rule, info.root_node.name, info.status.name.lower(), nodes,
                            info.match_result.reason or "pattern mismatch")
