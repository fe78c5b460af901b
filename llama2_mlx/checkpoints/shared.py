"""One frozen base in memory for every model built on it.

Rejection sampling holds a policy and a reward model; when the reward model was
trained (with LoRA) on the policy's base checkpoint, both run over the same
base arrays through ``lora.twin``, so a 7B pair needs about 13 GiB rather than
26. rs-loop's fresh policy of each iteration is a twin too: no reload from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llama2_mlx.io.hub import PathLike, reference, resolve


@dataclass
class SharedBase:
    """A loaded base checkpoint (``model`` without adapters, ``tokenizer``) and where
    it came from (``ref`` as given, ``folder`` on disk, ``dtype`` it was cast to)."""

    ref: str
    folder: Path
    dtype: Optional[str]
    model: object
    tokenizer: object

    @classmethod
    def load(cls, path_or_repo: PathLike, dtype: Optional[str] = None) -> "SharedBase":
        from llama2_mlx.checkpoints.load import load

        folder = resolve(path_or_repo).resolve()
        model, tokenizer = load(folder, dtype=dtype)
        return cls(str(path_or_repo), folder, dtype, model, tokenizer)

    def serves(self, path_or_repo: PathLike, dtype: Optional[str] = None) -> bool:
        """Whether ``path_or_repo`` loaded with ``dtype`` is this base."""
        return dtype == self.dtype and reference(path_or_repo) in (
            reference(self.ref), str(self.folder))

    def shared_by(self, module) -> bool:
        """Whether ``module`` runs on this base's arrays (rather than a copy of them)."""
        from mlx.utils import tree_flatten

        ours = {id(v) for _, v in tree_flatten(self.model.parameters())}
        return any(id(v) in ours for _, v in tree_flatten(module.parameters()))

    def policy(self, adapter_path: Optional[PathLike] = None):
        """``(model, tokenizer)``: a twin of the base (shared weights), with the LoRA
        adapters of ``adapter_path`` applied to the twin only."""
        from llama2_mlx.models.lora import load_adapters, twin

        model = twin(self.model)
        if adapter_path is not None:
            load_adapters(model, adapter_path)
        return model, self.tokenizer
