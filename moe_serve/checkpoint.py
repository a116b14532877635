"""Lazy reader of Hugging Face safetensors checkpoints: only the tensors a service asks for.

A worker materialises only its own experts and the router only the gate weights; other weights
(attention, embeddings) are never read. Both the per-expert layout that `save_pretrained` writes
(`experts.M.w1/w2/w3.weight`, or `gate_proj/up_proj/down_proj` in Qwen/DeepSeek files) and the
fused layout (`experts.gate_up_proj` [E, 2*d_ff, d], `experts.down_proj` [E, d, d_ff]) are read;
sharded checkpoints are found through `model.safetensors.index.json`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moe_serve.errors import ConfigurationError
from moe_serve.model_spec import MoEModelSpec, load_config, spec_from_config

INDEX_FILE = "model.safetensors.index.json"
_GATE_NAME = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.gate\.weight$")
# (gate, up, down) projection names of one expert, per naming convention
_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: y = down(silu(gate(x)) * up(x)).

    gate_up: [2*d_ff, d]; rows [0, d_ff) are the gate projection (w1), rows [d_ff, 2*d_ff) the
        up projection (w3), the fused layout transformers uses.
    down: [d, d_ff] (w2).
    """

    gate_up: torch.Tensor
    down: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


@dataclass(frozen=True)
class _LayerLayout:
    prefix: str  # e.g. "model.layers.3.block_sparse_moe"
    fused: bool
    names: tuple[str, str, str] | None  # per-expert (gate, up, down) names when not fused


class Checkpoint:
    """A checkpoint directory opened lazily: config parsed, tensor headers indexed, no weights read."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        self.config: dict[str, Any] = load_config(self.directory)
        self._file_of = self._index_weight_files()
        self._handles: dict[str, Any] = {}
        base = spec_from_config(self.config, self.directory)
        self._layouts = self._resolve_layouts(base)
        self.spec: MoEModelSpec = replace(base, moe_layers=tuple(sorted(self._layouts)))

    # ------------------------------------------------------------------ public API

    @property
    def name(self) -> str:
        return self.directory.name

    def gate_weight(self, layer: int) -> torch.Tensor:
        """Router weight of one MoE layer: [E, d]."""
        return self._read(f"{self._layout(layer).prefix}.gate.weight")

    def expert_weights(self, layer: int, expert: int) -> ExpertWeights:
        """The weights of one expert, read from disk now (nothing else is materialised)."""
        layout = self._layout(layer)
        if not 0 <= expert < self.spec.num_experts:
            raise ConfigurationError(f"expert {expert} out of range [0, {self.spec.num_experts})")
        if layout.fused:
            gate_up = self._read_slice(f"{layout.prefix}.experts.gate_up_proj", expert)
            down = self._read_slice(f"{layout.prefix}.experts.down_proj", expert)
        else:
            assert layout.names is not None
            gate_name, up_name, down_name = (f"{layout.prefix}.experts.{expert}.{n}.weight" for n in layout.names)
            gate_up = torch.cat([self._read(gate_name), self._read(up_name)], dim=0)
            # safetensors hands out views of its memory map; own the bytes so close() can unmap them
            down = self._read(down_name).clone()
        d, d_ff = self.spec.hidden_size, self.spec.expert_intermediate_size
        if tuple(gate_up.shape) != (2 * d_ff, d) or tuple(down.shape) != (d, d_ff):
            raise ConfigurationError(
                f"layer {layer} expert {expert}: weight shapes {tuple(gate_up.shape)} / {tuple(down.shape)} "
                f"do not match config.json (hidden_size={d}, intermediate_size={d_ff})"
            )
        return ExpertWeights(gate_up=gate_up, down=down)

    def close(self) -> None:
        """Release the memory maps of the weight files (tensors returned so far stay valid)."""
        self._handles.clear()

    def fingerprint(self) -> str:
        """A short identifier of these weights: config plus the names and sizes of the weight files."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for file_name in sorted(set(self._file_of.values())):
            digest.update(f"{file_name}:{(self.directory / file_name).stat().st_size}".encode())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ internals

    def _index_weight_files(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigurationError(f"{index} has no weight_map")
            return dict(weight_map)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConfigurationError(f"{self.directory} has no *.safetensors weights (and no {INDEX_FILE})")
        file_of: dict[str, str] = {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                file_of.update(dict.fromkeys(handle.keys(), path.name))
        return file_of

    def _resolve_layouts(self, spec: MoEModelSpec) -> dict[int, _LayerLayout]:
        layouts: dict[int, _LayerLayout] = {}
        for name in self._file_of:
            match = _GATE_NAME.match(name)
            if match is None:
                continue
            layer, prefix = int(match.group(1)), name[: -len(".gate.weight")]
            layouts[layer] = self._layer_layout(prefix, spec.num_experts)
        if not layouts:
            raise ConfigurationError(f"{self.directory}: no MoE layer found (no *.gate.weight router weights)")
        return layouts

    def _layer_layout(self, prefix: str, num_experts: int) -> _LayerLayout:
        if f"{prefix}.experts.gate_up_proj" in self._file_of and f"{prefix}.experts.down_proj" in self._file_of:
            return _LayerLayout(prefix=prefix, fused=True, names=None)
        for names in _PER_EXPERT_NAMES:
            wanted = [f"{prefix}.experts.{e}.{n}.weight" for e in range(num_experts) for n in names]
            if all(w in self._file_of for w in wanted):
                return _LayerLayout(prefix=prefix, fused=False, names=names)
        raise ConfigurationError(f"{self.directory}: {prefix} has a router but not all {num_experts} experts' weights")

    def _layout(self, layer: int) -> _LayerLayout:
        layout = self._layouts.get(layer)
        if layout is None:
            raise ConfigurationError(f"layer {layer} has no MoE block; MoE layers: {sorted(self._layouts)}")
        return layout

    def _handle(self, name: str) -> Any:
        file_name = self._file_of[name]
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(self.directory / file_name, framework="pt")
        return self._handles[file_name]

    def _read(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ConfigurationError(f"{self.directory}: tensor {name!r} not found")
        return self._handle(name).get_tensor(name)

    def _read_slice(self, name: str, index: int) -> torch.Tensor:
        # get_slice reads only the requested expert's rows from the file; clone() owns them
        return self._handle(name).get_slice(name)[index].clone()
