"""Remote experts for a Hugging Face model: a tiny Mixtral whose MoE blocks are computed by moe-serve.

Builds a tiny random Mixtral with transformers (from a config, nothing downloaded), saves it with
save_pretrained, then loads it twice: one copy stays local, the other has every MoE block replaced
by `moe_serve.client.RemoteMoE` (`patch_model`), which sends the block's hidden states to the
gateway. Greedy generation and the logits of both copies are compared and printed.

Three steps, from the repository root:

    # 1. write the checkpoint (default directory: .moe-serve/tiny-mixtral)
    .venv/bin/python examples/remote_moe_tiny.py save

    # 2. serve it, in another terminal (Ctrl-C stops it); the model is named after the directory
    .venv/bin/moe-serve up --checkpoint .moe-serve/tiny-mixtral --port 8001

    # 3. compare the patched model with the local one
    .venv/bin/python examples/remote_moe_tiny.py compare --url 127.0.0.1:8001

`compare` exits with status 0 when both generate the same tokens and 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_serve.client import GatewayError, ModelMismatch, patch_model

DEFAULT_CHECKPOINT = Path(".moe-serve/tiny-mixtral")
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
    # larger than transformers' 0.02, so the MoE blocks change the output visibly
    "initializer_range": 0.2,
}


def save_tiny_mixtral(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**TINY_CONFIG))
    model.save_pretrained(directory)
    print(f"saved a tiny Mixtral ({TINY_CONFIG['num_hidden_layers']} MoE layers) to {directory}")
    print(f"serve it with:  .venv/bin/moe-serve up --checkpoint {directory} --port 8001")


def load(directory: Path) -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def compare(directory: Path, url: str, new_tokens: int, seed: int) -> int:
    local, remote = load(directory), load(directory)
    try:
        layers = patch_model(remote, url)  # model name: the directory's, as `moe-serve up` names it
    except (GatewayError, ModelMismatch) as error:
        print(f"cannot patch against {url}: {error}", file=sys.stderr)
        print(f"is `moe-serve up --checkpoint {directory}` running there?", file=sys.stderr)
        return 1
    print(f"MoE layers {layers} are now computed by the gateway at {url}")

    prompts = torch.randint(0, TINY_CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(seed))
    options = {
        "attention_mask": torch.ones_like(prompts),
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        logit_difference = (local(prompts).logits - remote(prompts).logits).abs().max().item()
        local_tokens = local.generate(prompts, **options)
        remote_tokens = remote.generate(prompts, **options)
    for row, (local_row, remote_row) in enumerate(zip(local_tokens, remote_tokens, strict=True)):
        print(f"prompt {row}: local  {local_row[prompts.shape[1] :].tolist()}")
        print(f"          remote {remote_row[prompts.shape[1] :].tolist()}")
    identical = torch.equal(local_tokens, remote_tokens)
    print(f"max |logit difference| = {logit_difference:.2e}; greedy tokens identical: {identical}")
    return 0 if identical else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="write the tiny Mixtral checkpoint")
    run = commands.add_parser("compare", help="patch the model against a running gateway and compare")
    for command in (save, run):
        command.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
        command.add_argument("--seed", type=int, default=0, help="seed of the weights (save) or the prompts")
    run.add_argument("--url", default="127.0.0.1:8001", help="the gateway's host:port")
    run.add_argument("--new-tokens", type=int, default=8, help="tokens to generate per prompt")
    args = parser.parse_args()
    if args.command == "save":
        save_tiny_mixtral(args.checkpoint, args.seed)
        return 0
    return compare(args.checkpoint, args.url, args.new_tokens, args.seed)


if __name__ == "__main__":
    sys.exit(main())
