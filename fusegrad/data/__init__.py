"""Data: tokenizers, pretokenized shards read by memory map, the embedded corpus, and `prepare`."""
from fusegrad.data.corpus import documents as corpus_documents  # noqa: F401
from fusegrad.data.prepare import prepare  # noqa: F401
from fusegrad.data.shards import (TokenDataset, list_shards, read_meta, read_shard, rng_from_state,  # noqa: F401
                                  rng_state, shard_name, write_shard)
from fusegrad.data.tokenizer import (BPETokenizer, ByteTokenizer, Llama2cTokenizer, SentencePieceTokenizer,  # noqa: F401
                                     Tokenizer, load_tokenizer, read_tokenizer_bin, write_tokenizer_bin)
