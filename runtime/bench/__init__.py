"""r1c.runtime.bench: the latency benchmark (`r1c bench`), kept apart from the runtime it measures.

- `runner`: workloads, systems, interleaved timing of greedy `generate` calls (TTFT, TPOT, E2E);
- `stats`: percentile summaries, bootstrap intervals on ratios of medians, the regression rule;
- `compare`: ratios between systems and the regression gate against a baseline report;
- `report`: the JSON report, the table and the plot;
- `roofline`: the bytes a decode step reads and the measured memory read bandwidth;
- `peers`: the same weights through other stacks (transformers, stock torch.onnx export);
- `cli`: the `r1c bench` command; `pytest_plugin`: the `r1c_latency` fixture.
Importing this package imports nothing heavy (the pytest plugin loads at every pytest start).
"""
