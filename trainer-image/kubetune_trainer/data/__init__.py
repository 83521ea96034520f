"""Training data: reading, format detection, templates, masking, filters, splits, mixtures, packing.

See docs/data.md. The finetuner uses only the names exported here.
"""

from kubetune_trainer.data.augment import back_translate, paraphrase, replace_synonyms
from kubetune_trainer.data.collate import PadToLongestCollator, make_collator
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.formats import FALLBACK_CHAT_TEMPLATE, chat_template_for, format_prompt
from kubetune_trainer.data.materialise import (
    DataInput,
    augmentation_synonyms_file,
    local_augmentation,
    local_source,
    materialise,
)
from kubetune_trainer.data.options import DataOptions, DataSource
from kubetune_trainer.data.pipeline import Example, PreparedData, TokenizedDataset, prepare_datasets
from kubetune_trainer.data.stats import DataStats, SourceStats
from kubetune_trainer.data.tokenize import IGNORE_INDEX, encode_prompt

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "DataError",
    "DataInput",
    "DataOptions",
    "DataSource",
    "DataStats",
    "Example",
    "PadToLongestCollator",
    "PreparedData",
    "SourceStats",
    "TokenizedDataset",
    "augmentation_synonyms_file",
    "back_translate",
    "chat_template_for",
    "encode_prompt",
    "format_prompt",
    "local_augmentation",
    "local_source",
    "make_collator",
    "materialise",
    "paraphrase",
    "prepare_datasets",
    "replace_synonyms",
]
