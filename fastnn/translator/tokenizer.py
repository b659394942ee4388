"""SentencePiece subword models, one per language, trained on the training split and stored inside the
checkpoint (as serialized model bytes) so a checkpoint alone is enough to translate."""
from __future__ import annotations

import io
import logging
import re

import sentencepiece as spm

log = logging.getLogger("fastnn.translator")

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, sentences, vocab_size: int, model_type: str = "unigram",
              character_coverage: float = 1.0) -> "Tokenizer":
        """Trains on an iterable of sentences. `vocab_size` is an upper bound: a small corpus may support
        fewer pieces, and then it gets fewer rather than an error."""
        sentences = list(sentences)
        try:
            return cls._train(sentences, vocab_size, model_type, character_coverage)
        except RuntimeError as e:
            # Korean text easily has more distinct characters than a small vocabulary: every character that
            # `character_coverage` keeps needs a piece. Grow the vocabulary to fit rather than fail.
            m = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
            if not m:
                raise
            need = int(m.group(1)) + 64
            log.warning("tokenizer: vocab_size %d < %d characters to cover; using %d", vocab_size, need - 64, need)
            return cls._train(sentences, need, model_type, character_coverage)

    @classmethod
    def _train(cls, sentences, vocab_size, model_type, character_coverage) -> "Tokenizer":
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, hard_vocab_limit=False,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, minloglevel=2,
            # Digits one piece each: numbers, dates and prices are then copied digit by digit.
            split_digits=True, num_threads=1, input_sentence_size=200000, shuffle_input_sentence=True,
        )
        return cls(buf.getvalue())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS])

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)
