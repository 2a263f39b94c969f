"""A small CLIP-format BPE vocabulary for ShapesCanvas, trained here from the caption words.

It loads as a stock `transformers.CLIPTokenizer` (vocab.json + merges.txt, CLIP's byte-level
alphabet, `</w>` word ends, <|startoftext|>/<|endoftext|>), so the pipeline is a genuine
StableDiffusionPipeline; every caption word is one token, and unseen words fall back to
byte-level pieces instead of an unknown token.
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ..models.clip_bpe import bytes_to_unicode
from .config import vocabulary_words

MAX_LENGTH = 16


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Train BPE merges until every word is a single token; lay the vocab out as CLIP does."""
    words = words or vocabulary_words()
    alphabet = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>")
    tok.train_from_iterator(words, trainer=trainer)
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    seen = set(vocab_list)
    for m in merges:
        t = m.replace(" ", "")
        if t not in seen:
            vocab_list.append(t)
            seen.add(t)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def build_tokenizer(max_length: int = MAX_LENGTH):
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok.model_max_length = max_length
    return tok
