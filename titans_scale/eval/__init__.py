"""Long-context evaluation: recall suites (needle in a haystack, MQAR) swept over length x
depth, streamed through the model in pieces, reported as JSON and heat maps.

  spec.py       EvalSweepSpec: which suite, lengths, depths, needle format (no torch at import)
  sweep.py      run_sweep: accuracy per (length, depth) cell, with streaming cost recorded
  baselines.py  chance level of a suite and the attention reach of a model
  probe.py      needle_signal: how much an (untrained) model's answer depends on a far needle
  report.py     JSON and the heat-map PNG (matplotlib, Agg)
  compare.py    several runs side by side: table, accuracy vs distance, loss curves
  command.py    `titans-scale eval`
"""
