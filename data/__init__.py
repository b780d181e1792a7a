"""mnemo data: sources -> global document order -> tokenize -> pack -> batches, with exact resume.

Knows nothing of the model. See data/README.md for the design.
"""
from data.config import DataConfig, SourceConfig
from data.entropy import unigram_entropy
from data.loader import Loader, all_rank_states, build_loader, skipped_totals
from data.sources import DataError
from data.tokenizer import ByteTokenizer, SentencePieceTokenizer, check_vocab, load_tokenizer

__all__ = ["DataConfig", "SourceConfig", "build_loader", "Loader", "all_rank_states", "load_tokenizer",
           "unigram_entropy", "skipped_totals", "ByteTokenizer", "SentencePieceTokenizer", "check_vocab", "DataError"]
