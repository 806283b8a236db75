"""Performance benchmarks: `python -m dvlx.bench {loss,data}`. They print ratios measured in the same run."""
