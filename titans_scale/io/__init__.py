"""Low-level file I/O every layer shares (it imports nothing from titans_scale but errors):

  atomic.py     a file or a folder appears whole or not at all (temp + fsync + rename)
  manifest.py   sizes and SHA-256 of a folder's files, written last and verified on load
  commit.py     the checkpoint commit: the `latest` pointer, pruning, the crash-test kill points
  safe_load.py  reading torch/DCP checkpoints without unpickling arbitrary objects

Modules are imported one by one (`from titans_scale.io.atomic import ...`) so that a small
atomic write does not import torch.
"""
