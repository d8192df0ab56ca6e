"""Errors raised for bad user input. Each message names the file, tensor or field at fault."""


class HcnrError(ValueError):
    """Base class of the errors hcnr-jax raises for bad input."""


class CheckpointError(HcnrError):
    """A checkpoint (config, safetensors, GGUF, adapter) cannot be read or does not fit the model."""


class DataError(HcnrError):
    """A data file (JSONL samples, benchmark files) is missing, empty or malformed."""
