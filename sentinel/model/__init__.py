"""Stage-partitioned Llama-style decoder, byte tokenizer and corpora.

decoder.py is the whole model in one file; stages.py slices it into pipeline stages; corpus.py and
synthetic.py provide data (a text file by path, or a generated default that needs no download).
"""

from sentinel.model.config import ModelConfig
from sentinel.model.corpus import CorpusError, TextCorpus, load_corpus
from sentinel.model.decoder import Decoder
from sentinel.model.stages import (
    StageModule,
    build_full_model,
    build_stage,
    merge_stage_states,
    stage_parameters_count,
)
from sentinel.model.synthetic import generate_corpus
from sentinel.model.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "CorpusError",
    "Decoder",
    "ModelConfig",
    "StageModule",
    "TextCorpus",
    "build_full_model",
    "build_stage",
    "generate_corpus",
    "load_corpus",
    "merge_stage_states",
    "stage_parameters_count",
]
