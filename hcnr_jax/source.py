"""Where a model comes from: one parse of the text every command and `load_pretrained` accept.

A model source is one of

- a Hugging Face model directory (``config.json`` + safetensors),
- a ``.gguf`` file,
- a Hugging Face hub id ``org/name``, optionally ``org/name@revision`` (a branch, tag or commit),
  resolved through ``huggingface_hub``: the local hub cache first, the hub only when the cache lacks
  it and ``HF_HUB_OFFLINE`` is not set,
- any of these followed by PEFT LoRA adapter directories: ``BASE+ADAPTER_DIR[+ADAPTER_DIR...]``,
  merged onto the base left to right.

An existing local path always wins: ``org/name`` that exists relative to the working directory is
that path, never a hub id, and a path containing ``+`` that exists is never split. Splitting a chain
takes the longest existing prefix as the base (``my+model+adapter`` with ``my+model`` a folder), so
only adapter folders must be free of ``+``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hcnr_jax.errors import CheckpointError, HcnrError

# org/name as the hub spells repository ids (letters, digits, '-', '_', '.'), one slash, then an
# optional @revision; anything else (absolute paths, ./x, a/b/c) is a local path.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source: ``base`` (a local path, or a hub repository id when ``hub``), the hub
    ``revision`` (None: the default branch), and the LoRA ``adapters`` merged onto it in order."""

    base: str
    hub: bool = False
    revision: str | None = None
    adapters: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | os.PathLike | ModelSource) -> ModelSource:
        """``text`` as a source (see the module docstring); a `ModelSource` is returned as is."""
        if isinstance(text, ModelSource):
            return text
        text = str(text)
        if not text:
            raise CheckpointError("empty model source; give a model directory, a .gguf file, BASE+ADAPTER_DIR "
                                  "or a hub id org/name")
        if Path(text).exists() or "+" not in text:
            return cls._single(text)
        parts = text.split("+")
        # The longest existing prefix is the base, so a base folder may contain '+'.
        cut = next((i for i in range(len(parts) - 1, 0, -1) if Path("+".join(parts[:i])).exists()), 1)
        base = cls._single("+".join(parts[:cut]))
        adapters = tuple(parts[cut:])
        if not all(adapters):
            raise CheckpointError(f"{text}: an empty adapter in BASE+ADAPTER_DIR")
        return cls(base.base, base.hub, base.revision, adapters)

    @classmethod
    def _single(cls, text: str) -> ModelSource:
        m = _HUB_ID.fullmatch(text)
        if m is None or Path(text).exists():
            return cls(text)
        return cls(m["repo"], hub=True, revision=m["revision"])

    @property
    def base_source(self) -> ModelSource:
        """The base alone, without adapters."""
        return ModelSource(self.base, self.hub, self.revision)

    @property
    def is_gguf(self) -> bool:
        return not self.hub and Path(self.base).suffix == ".gguf"

    def local_paths(self) -> list[Path]:
        """The existing local files and folders this source reads (a hub base is not local)."""
        parts = ([] if self.hub else [self.base]) + list(self.adapters)
        return [Path(p) for p in parts if Path(p).exists()]

    def describe(self, path_name: Callable[[str], str] | None = None) -> str:
        """The source as written back in reports: ``path_name`` (e.g. `hcnr_jax.io.portable_path`)
        applied to each local part; a hub id is kept with its revision."""
        name = path_name or str
        base = f"{self.base}@{self.revision}" if self.hub and self.revision else (self.base if self.hub else name(self.base))
        return "+".join([base, *(name(a) for a in self.adapters)])

    def __str__(self) -> str:
        return self.describe()


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of hub repository ``repo_id`` at ``revision``: from the hub cache when it is
    there, else downloaded, unless ``HF_HUB_OFFLINE`` is set. Neither: a one-line `HcnrError`
    naming the id."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise HcnrError(f"{repo_id}: a hub id needs the huggingface_hub package ({e})") from e
    name = f"{repo_id}@{revision}" if revision else repo_id
    # The environment is read here, not only at huggingface_hub's import, so a caller that sets
    # HF_HUB_OFFLINE later is obeyed too.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached (ValueError: a malformed id)
        if offline:
            raise HcnrError(f"{name}: not a local path, and not in the Hugging Face hub cache "
                            f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so the hub was not asked") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HcnrError(f"{name}: not a local path, not in the Hugging Face hub cache, and the hub could not "
                        f"provide it ({type(e).__name__}: {first})") from None
