"""`microtune bench`: methods × tasks × seeds on one model, data and protocol.

- `config`: the TOML bench file (`bench/configs/*.toml`) → `BenchConfig`, and its cells.
- `runner`: runs the cells as `python -m microtune.bench.worker` subprocesses, several at
  once, skipping finished ones (each cell's JSON record is written atomically when done).
- `worker`: one cell: trains through `api.train`, then measures inference, step ÷ forward and
  padding, and writes the record.
- `timing`: interleaved timing (medians with spread), padded-token fraction, versions, hardware.
- `tune`: each method's learning rate from a grid, on a slice carved out of the training set.
- `report`: records → report.md and PNG plots.
- `reproduce`: a finished cell trained again from its record's command, scores compared.
"""
