"""Lazy reader of Hugging Face safetensors checkpoints: only the tensors a service asks for.

A worker materialises only its own experts and the router only the router weights; other
weights (attention, embeddings) are never read. Where each family keeps its routers is declared by
the family (`moe_serve/layer/families/`); the expert, shared-expert and bias names below are read
the same way for every family. Read layouts:
- decoder MoE blocks `model.layers.N.{block_sparse_moe|mlp|feed_forward}` (Mixtral, Qwen-MoE,
  DeepSeek-V3, LFM2-MoE), with per-expert files (`experts.M.w1/w3/w2` or
  `experts.M.gate_proj/up_proj/down_proj`) or the fused `experts.gate_up_proj` [E, 2*d_ff, d] /
  `experts.down_proj` [E, d, d_ff]; Granite-MoE's `block_sparse_moe.router.layer` with fused
  `input_linear` / `output_linear`; shared experts (`shared_expert`, `shared_experts`), the
  shared-expert gate and the selection bias (DeepSeek's, ERNIE's, LFM2's); Jamba's `feed_forward`
  blocks with their router at `feed_forward.router`;
- Switch Transformers' `{encoder|decoder}.block.N.layer.M.mlp` with `router.classifier` and
  `experts.expert_J.wi/wo`.
Sharded checkpoints are found through `model.safetensors.index.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moe_serve.hub import checkpoint_name
from moe_serve.layer.families import family_of, spec_from_config
from moe_serve.model_spec import ExpertKind, MoEModelSpec, load_config
from moe_serve.runtime.errors import ConfigurationError

INDEX_FILE = "model.safetensors.index.json"
# per-expert projection names, (gate, up, down) for SwiGLU experts and (wi, wo) for dense ones
_SWIGLU_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
_SHARED_PREFIXES = ("shared_expert", "shared_experts")
# fused [E, 2*d_ff, d] ([gate; up]) and [E, d, d_ff] tensors, relative to the block's prefix
_FUSED_NAMES = (("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight"))


@dataclass(frozen=True)
class ExpertWeights:
    """One expert FFN.

    swiglu: y = down(act(x @ up[:d_ff].T) * (x @ up[d_ff:].T)), `up` = [gate; up] fused [2*d_ff, d]
        as transformers holds it; dense: y = down(act(x @ up.T)), `up` = wi [d_ff, d].
    down: [d, d_ff].
    """

    kind: ExpertKind
    up: torch.Tensor
    down: torch.Tensor
    activation: str = "silu"

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + self.down.nbytes


@dataclass(frozen=True)
class RouterWeights:
    """Everything the router of one MoE layer needs.

    gate: [E, d]; gate_bias: [E] (Switch with router_bias); selection_bias: [E] (DeepSeek's and
    ERNIE-4.5's e_score_correction_bias, used to pick experts only); shared_gate: [1, d] (Qwen2's
    shared_expert_gate).
    """

    gate: torch.Tensor
    gate_bias: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None


@dataclass(frozen=True)
class _LayerLayout:
    prefix: str  # e.g. "model.layers.3.mlp" or "encoder.block.1.layer.1.mlp"
    router_prefix: str  # "<prefix>.gate", "<prefix>.router.layer" or "<prefix>.router.classifier"
    fused_names: tuple[str, str] | None  # full names of the fused (gate_up, down) tensors, when fused
    expert_names: tuple[str, ...]  # per-expert name patterns with {e}, when not fused
    shared_names: tuple[str, ...] | None


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
        return checkpoint_name(self.directory)

    def router_weights(self, layer: int) -> RouterWeights:
        """The router of one MoE layer (read now)."""
        layout = self._layout(layer)
        optional = {
            "gate_bias": (f"{layout.router_prefix}.bias",),
            # DeepSeek-V3 keeps the selection bias on its router, MiniMax-M2 on the block, ERNIE-4.5 in
            # moe_statics ([1, E]) on the router (transformers) or the block (Baidu's files), LFM2-MoE
            # on the block as expert_bias
            "selection_bias": (
                *(
                    f"{p}.e_score_correction_bias"
                    for p in (
                        layout.router_prefix,
                        layout.prefix,
                        f"{layout.router_prefix}.moe_statics",
                        f"{layout.prefix}.moe_statics",
                    )
                ),
                f"{layout.prefix}.expert_bias",
            ),
            "shared_gate": (f"{layout.prefix}.shared_expert_gate.weight",),
        }
        read = {field: self._read_first(names) for field, names in optional.items()}
        if read["selection_bias"] is not None:
            read["selection_bias"] = read["selection_bias"].reshape(-1)
        return RouterWeights(gate=self._read(f"{layout.router_prefix}.weight"), **read)

    def expert_weights(self, layer: int, expert: int) -> ExpertWeights:
        """The weights of one expert (the shared expert is id E), read from disk now."""
        spec, layout = self.spec, self._layout(layer)
        if not 0 <= expert < spec.num_placed_experts:
            raise ConfigurationError(f"expert {expert} out of range [0, {spec.num_placed_experts})")
        shape = spec.expert_shape(expert)
        if expert == spec.shared_expert_id:
            assert layout.shared_names is not None
            names = layout.shared_names
        else:
            names = tuple(pattern.format(e=expert) for pattern in layout.expert_names)
        if expert != spec.shared_expert_id and layout.fused_names is not None:
            up, down = (self._read_slice(name, expert) for name in layout.fused_names)
        elif shape.kind == "swiglu":
            up = torch.cat([self._read(names[0]), self._read(names[1])], dim=0)
            # safetensors hands out views of its memory map; own the bytes so close() can unmap them
            down = self._read(names[2]).clone()
        else:
            up, down = self._read(names[0]).clone(), self._read(names[1]).clone()
        width = shape.intermediate_size * (2 if shape.kind == "swiglu" else 1)
        if tuple(up.shape) != (width, spec.hidden_size) or tuple(down.shape) != (
            spec.hidden_size,
            shape.intermediate_size,
        ):
            raise ConfigurationError(
                f"layer {layer} expert {expert}: weight shapes {tuple(up.shape)} / {tuple(down.shape)} do not match "
                f"config.json (hidden size {spec.hidden_size}, expert width {shape.intermediate_size})"
            )
        return ExpertWeights(kind=shape.kind, up=up, down=down, activation=shape.activation)

    def close(self) -> None:
        """Release the memory maps of the weight files (tensors returned so far stay valid)."""
        self._handles.clear()

    def fingerprint(self) -> str:
        """A short identifier of these weights: config plus the names and sizes of the weight files."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for file_name in sorted(set(self._file_of.values())):
            digest.update(f"{file_name}:{(self.directory / file_name).stat().st_size}".encode())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ layout discovery

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
        # the family says where its routers are (moe_serve/layer/families/)
        patterns = family_of(spec.model_type, self.directory).router_patterns
        for name in self._file_of:
            for pattern in patterns:
                if located := pattern.locate(name, spec):
                    layer, prefix, router_prefix = located
                    layouts[layer] = self._layer_layout(spec, prefix, router_prefix)
                    break
        if not layouts:
            raise ConfigurationError(f"{self.directory}: no MoE layer found (no router weights)")
        return layouts

    def _layer_layout(self, spec: MoEModelSpec, prefix: str, router_prefix: str) -> _LayerLayout:
        shared = self._shared_names(spec, prefix)
        for gate_up, down in _FUSED_NAMES:
            fused = (f"{prefix}.{gate_up}", f"{prefix}.{down}")
            if all(name in self._file_of for name in fused):
                return _LayerLayout(prefix, router_prefix, fused_names=fused, expert_names=(), shared_names=shared)
        candidates = (
            [tuple(f"{prefix}.experts.{{e}}.{n}.weight" for n in names) for names in _SWIGLU_NAMES]
            if spec.expert.kind == "swiglu"
            else [tuple(f"{prefix}.experts.expert_{{e}}.{n}.weight" for n in ("wi", "wo"))]
        )
        for patterns in candidates:
            wanted = [pattern.format(e=e) for e in range(spec.num_experts) for pattern in patterns]
            if all(name in self._file_of for name in wanted):
                return _LayerLayout(prefix, router_prefix, fused_names=None, expert_names=patterns, shared_names=shared)
        raise ConfigurationError(
            f"{self.directory}: {prefix} has a router but not all {spec.num_experts} experts' weights"
        )

    def _shared_names(self, spec: MoEModelSpec, prefix: str) -> tuple[str, ...] | None:
        if spec.shared_expert is None:
            return None
        for shared in _SHARED_PREFIXES:
            names = tuple(f"{prefix}.{shared}.{n}.weight" for n in _SWIGLU_NAMES[1])
            if all(name in self._file_of for name in names):
                return names
        raise ConfigurationError(f"{self.directory}: config.json declares a shared expert but {prefix} has none")

    def _layout(self, layer: int) -> _LayerLayout:
        layout = self._layouts.get(layer)
        if layout is None:
            raise ConfigurationError(f"layer {layer} has no MoE block; MoE layers: {sorted(self._layouts)}")
        return layout

    # ------------------------------------------------------------------ reading

    def _handle(self, name: str) -> Any:
        file_name = self._file_of[name]
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(self.directory / file_name, framework="pt")
        return self._handles[file_name]

    def _read(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ConfigurationError(f"{self.directory}: tensor {name!r} not found")
        return self._handle(name).get_tensor(name)

    def _read_first(self, names: tuple[str, ...]) -> torch.Tensor | None:
        """The first of `names` the checkpoint has, or None when it has none of them."""
        name = next((name for name in names if name in self._file_of), None)
        return None if name is None else self._read(name)

    def _read_slice(self, name: str, index: int) -> torch.Tensor:
        # get_slice reads only the requested expert's rows from the file; clone() owns them
        return self._handle(name).get_slice(name)[index].clone()
