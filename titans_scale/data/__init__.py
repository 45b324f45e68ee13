"""Data: tokenizers, the embedded corpus, token shards, Megatron indexed datasets, the resumable
loader, packing, blends, recall tasks (docs/data.md)."""

from titans_scale.data.blend import BlendLoader
from titans_scale.data.loader import TokenLoader
from titans_scale.data.shards import ShardIndex, open_shards, prepare_corpus
from titans_scale.data.sources import IndexedSource, open_source
from titans_scale.data.synthetic import RecallSample, mqar_sample, needle_sample, recall_batch
from titans_scale.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "prepare_corpus", "open_shards", "ShardIndex",
           "TokenLoader", "BlendLoader", "open_source", "IndexedSource", "RecallSample", "needle_sample",
           "mqar_sample", "recall_batch"]
