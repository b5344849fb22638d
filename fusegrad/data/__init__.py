"""Data: tokenizers, pretokenized shards read by memory map, the embedded corpus, and `prepare`."""
from fusegrad.data.corpus import documents as corpus_documents  # noqa: F401
from fusegrad.data.llama2c_tokenizer import Llama2cTokenizer, read_tokenizer_bin, write_tokenizer_bin  # noqa: F401
from fusegrad.data.prepare import prepare  # noqa: F401
from fusegrad.data.shards import (TokenDataset, list_shards, read_meta, read_shard, rng_from_state,  # noqa: F401
                                  rng_state, shard_name, write_shard)
from fusegrad.data.tokenizer import (BPETokenizer, ByteTokenizer, SentencePieceTokenizer, Tokenizer,  # noqa: F401
                                     load_tokenizer)
