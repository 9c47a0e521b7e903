"""What a model costs: `quality` (perplexity, and KL divergence and top-1 agreement against the
model it came from) and `speed` (TTFT, prefill, decode, latency percentiles and memory of a
bundle's runtimes, beside the peers)."""
