"""Read a Hugging Face checkpoint's MoE tensors: each process only its own.

Tensors are read lazily with safetensors' `safe_open`, file by file, and copied
out; the files are closed afterwards, so a worker's memory holds its experts and
nothing else. Missing keys and wrong shapes fail with the key, file and shapes.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from moe_serve.config import ModelConfig, RoutingConfig
from moe_serve.families import CheckpointError, Layout, read_layout
from moe_serve.weights.source import ExpertWeights

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def weight_map(directory: Path) -> dict[str, str]:
    """Tensor key -> file name, from the index file or from the safetensors headers.

    The index's file names are hostile until checked (`checked_file_name`): each must be a
    plain file name inside `directory`.
    """
    index = directory / INDEX_FILE
    if index.exists():
        try:
            files = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"model.checkpoint: {str(index)!r} is not an index with a 'weight_map' "
                f"mapping ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(files, dict):
            raise CheckpointError(
                f"model.checkpoint: 'weight_map' of {str(index)!r} is a "
                f"{type(files).__name__}; expected a mapping of tensor key -> file name"
            )
        return {str(key): checked_file_name(directory, index, key, f) for key, f in files.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model.checkpoint: no *.safetensors files in {str(directory)!r}")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), f.name))
    return out


def checked_file_name(directory: Path, index: Path, key: str, name: object) -> str:
    """`name` if it is a plain file name that stays inside `directory`, else CheckpointError
    naming the index file and the key.

    Refused: separators ('/', '\\'), '.', '..', absolute paths, NUL, empty names; and
    anything whose normalised path is not a direct child of `directory`. Symbolic links
    inside the directory are followed as they are (Hugging Face's cache makes every file of
    a snapshot one): who may write the directory already decides what it serves; the index
    alone must not reach files outside it.
    """
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or Path(name).is_absolute()
        or Path(os.path.normpath(directory / name)).parent != Path(os.path.normpath(directory))
    )
    if bad or not isinstance(name, str):  # (the second test narrows name for the checker)
        raise CheckpointError(
            f"model.checkpoint: {str(index)!r} weight_map[{key!r}] = {name!r}: expected a "
            f"plain file name inside {str(directory)!r} (no path separators, no '..', not "
            "absolute)"
        )
    return name


class CheckpointReader:
    """Reads named tensors from a safetensors directory, checking their shapes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = weight_map(directory)

    def read(
        self, keys: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, torch.Tensor]:
        """Our name -> tensor for each (name, key); one open per file touched."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for name, key in keys.items():
            if key not in self.files:
                raise CheckpointError(
                    f"model.checkpoint: tensor {key!r} is missing from {str(self.directory)!r}"
                )
            by_file[self.files[key]].append((name, key))
        out: dict[str, torch.Tensor] = {}
        for file, items in by_file.items():
            with safe_open(self.directory / file, framework="pt") as handle:
                for name, key in items:
                    out[name] = handle.get_tensor(key)
                    want = shapes.get(name)
                    if want is not None and tuple(out[name].shape) != want:
                        raise CheckpointError(
                            f"model.checkpoint: tensor {key!r} in {file} has shape "
                            f"{list(out[name].shape)}; expected {list(want)}"
                        )
        return out

    def nbytes(self, keys: Sequence[str]) -> int:
        """Bytes of the named tensors, from the headers alone."""
        total = 0
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        for file, names in by_file.items():
            with safe_open(self.directory / file, framework="pt") as handle:
                for key in names:
                    sl = handle.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _ITEMSIZE[sl.get_dtype()]
        return total


_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "F8_E4M3": 1, "U8": 1}


class CheckpointWeights:
    """WeightSource over a Hugging Face checkpoint directory."""

    def __init__(self, model: ModelConfig, routing: RoutingConfig) -> None:
        assert model.checkpoint is not None, "CheckpointWeights needs model.checkpoint"
        self.model, self.routing = model, routing
        self.layout: Layout = read_layout(model.checkpoint)
        self.reader = CheckpointReader(Path(model.checkpoint))

    def router(self, layer: int) -> torch.Tensor:
        m = self.model
        key = self.layout.router_key(layer)
        return self.reader.read({"w": key}, {"w": (m.num_experts, m.hidden_size)})["w"]

    def correction_bias(self, layer: int) -> torch.Tensor | None:
        if not self.routing.correction_bias:
            return None
        key = self.layout.correction_bias_key(layer)
        return self.reader.read({"b": key}, {"b": (self.model.num_experts,)})["b"]

    def _glu_shapes(self, ffn: int) -> dict[str, tuple[int, ...]]:
        H = self.model.hidden_size
        return {"gate": (ffn, H), "up": (ffn, H), "down": (H, ffn)}

    def experts(self, layer: int, ids: Sequence[int]) -> list[ExpertWeights]:
        keys = {
            (e, name): key for e in ids for name, key in self.layout.expert_keys(layer, e).items()
        }
        shapes = self._glu_shapes(self.model.expert_ffn_size)
        flat = self.reader.read(
            {f"{e}/{name}": key for (e, name), key in keys.items()},
            {f"{e}/{name}": shapes[name] for (e, name) in keys},
        )
        return [{name: flat[f"{e}/{name}"] for name in shapes} for e in ids]

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes of one routed expert on disk."""
        return self.reader.nbytes(list(self.layout.expert_keys(layer, expert).values()))

    def shared_expert(self, layer: int) -> ExpertWeights | None:
        m = self.model
        if not m.shared_expert_ffn_size:
            return None
        keys = self.layout.shared_keys(layer)
        shapes = self._glu_shapes(m.shared_expert_ffn_size)
        if m.shared_expert_gate:
            keys["shared_gate"] = self.layout.shared_gate_key(layer)
            shapes["shared_gate"] = (1, m.hidden_size)
        return self.reader.read(keys, shapes)
