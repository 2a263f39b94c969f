"""Activation capture during pipeline calls, the sharded on-disk store, collection and prompt files."""
from .capture import Capture, CaptureBatch, capture_activations
from .collect import CollectConfig, collect, store_dirname
from .prompts import PromptFileError, PromptRow, PromptSet, load_prompts
from .store import ActivationStore, RecordMeta, RecordTable, StoreError, StoreWriter

__all__ = ["ActivationStore", "Capture", "CaptureBatch", "CollectConfig", "PromptFileError", "PromptRow", "PromptSet",
           "RecordMeta", "RecordTable", "StoreError", "StoreWriter", "capture_activations", "collect",
           "load_prompts", "store_dirname"]
