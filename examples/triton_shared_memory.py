"""Triton's system shared memory with NVIDIA's unmodified tritonclient against a moe-serve gateway.

The client puts the hidden states into a POSIX shared-memory object, registers a region of it with
the gateway, and names the regions in the request: the gateway reads the input from shared memory and
writes the output (and the chosen experts) into it, so no tensor bytes travel in the gRPC messages.
The same request is then sent with the tensors in the message; both answers are bit-identical.

Same host only (the key is a name in the gateway's /dev/shm), and the gateway must allow it:

    .venv/bin/moe-serve up --allow-client-shm          # in another terminal: the demo model, gRPC :8001
    .venv/bin/python examples/triton_shared_memory.py  # --url, --model, --hidden, --tokens, --layer

Exits 0 when the two answers are equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import triton_to_np_dtype

TOP_K_ROOM = 64  # expert ids per token the output region has room for (INT32)


def request_in_shared_memory(
    client: triton.InferenceServerClient, model: str, hidden: np.ndarray, layer: int, output_bytes: int
) -> triton.InferResult:
    """The input read from region "moe_input"; output and expert_ids written into region "moe_output"."""
    inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
    inputs[0].set_shared_memory("moe_input", hidden.nbytes)
    outputs = [triton.InferRequestedOutput("output"), triton.InferRequestedOutput("expert_ids")]
    outputs[0].set_shared_memory("moe_output", output_bytes)
    # expert_ids lie behind the output in the same region
    outputs[1].set_shared_memory("moe_output", hidden.shape[0] * TOP_K_ROOM * 4, offset=output_bytes)
    return client.infer(model, inputs, outputs=outputs, parameters={"layer": layer})


def request_in_message(
    client: triton.InferenceServerClient, model: str, hidden: np.ndarray, layer: int
) -> tuple[np.ndarray, np.ndarray]:
    inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
    inputs[0].set_data_from_numpy(hidden)
    outputs = [triton.InferRequestedOutput("output"), triton.InferRequestedOutput("expert_ids")]
    result = client.infer(model, inputs, outputs=outputs, parameters={"layer": layer})
    return result.as_numpy("output"), result.as_numpy("expert_ids")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="the gateway's KServe v2 gRPC address")
    parser.add_argument("--model", default="mixtral-demo")
    parser.add_argument("--hidden", type=int, default=256, help="the model's hidden size")
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--layer", type=int, default=0, help="the MoE layer")
    args = parser.parse_args()

    client = triton.InferenceServerClient(url=args.url)
    if "system_shared_memory" not in client.get_server_metadata(as_json=True).get("extensions", []):
        print("the gateway does not offer system shared memory", file=sys.stderr)
        return 1
    hidden = np.random.default_rng(0).standard_normal((args.tokens, args.hidden)).astype(np.float32)
    output_bytes = hidden.nbytes  # the output has the input's shape and datatype
    # a key of this process's own, so that two runs on one host do not meet
    input_key, output_key = f"/moe_serve_example_in_{os.getpid()}", f"/moe_serve_example_out_{os.getpid()}"
    input_handle = shm.create_shared_memory_region("moe_input", input_key, hidden.nbytes)
    output_size = output_bytes + hidden.shape[0] * TOP_K_ROOM * 4
    output_handle = shm.create_shared_memory_region("moe_output", output_key, output_size)
    try:
        shm.set_shared_memory_region(input_handle, [hidden])
        client.register_system_shared_memory("moe_input", input_key, hidden.nbytes)
        client.register_system_shared_memory("moe_output", output_key, output_size)
        print("registered:", client.get_system_shared_memory_status(as_json=True))

        result = request_in_shared_memory(client, args.model, hidden, args.layer, output_bytes)
        # the answer says where each output lies; its bytes are read from the region, not the message
        located = {}
        for name, offset in (("output", 0), ("expert_ids", output_bytes)):
            tensor = result.get_output(name)
            datatype = triton_to_np_dtype(tensor.datatype)
            located[name] = shm.get_contents_as_numpy(output_handle, datatype, tensor.shape, offset=offset)
        print("through shared memory:", {name: value.shape for name, value in located.items()})
        print("expert ids of the first token:", located["expert_ids"][0])

        output, expert_ids = request_in_message(client, args.model, hidden, args.layer)
        equal = np.array_equal(located["output"], output) and np.array_equal(located["expert_ids"], expert_ids)
        print("equal to the same request sent in the message:", equal)
    finally:
        # by name: without one, Unregister removes every region on the gateway, other clients' too
        for region in ("moe_input", "moe_output"):
            client.unregister_system_shared_memory(region)
        shm.destroy_shared_memory_region(input_handle)
        shm.destroy_shared_memory_region(output_handle)
        client.close()
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
