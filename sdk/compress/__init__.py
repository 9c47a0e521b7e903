"""Compression of a model core, one module per technique: `quantize` (RTN and GPTQ, by tensor
group), `gptq`, `prune` (masks and structured pruning), `low_rank` (SVD factorization),
`distill` (training a compressed or draft student), with `calibration` (the data and the
block-by-block pass they share) and `apply` (a plan applied in order). Every function changes
the model in place and refuses bad input before it changes anything."""
