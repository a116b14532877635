"""Runs NVIDIA's unmodified tritonclient against a gateway, in a process of its own.

(As a user's program would: tritonclient alone. Both clients in one process:
coexistence_check.py.) Usage: triton_client_check.py ADDRESS MODEL INPUT.npy OUT_DIR
Writes the answers to OUT_DIR as .npy files and a result.json with everything else it saw.
With TRITON_CHECK_TLS_CA set, it connects with TLS trusting that CA; with TRITON_CHECK_TOKEN, it
sends the token as an `authorization: Bearer` header on every call (tritonclient's own options).
"""

import json
import os
import queue
import sys
from functools import partial
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    address, model, input_path, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    ca, token = os.environ.get("TRITON_CHECK_TLS_CA"), os.environ.get("TRITON_CHECK_TOKEN")
    client = triton.InferenceServerClient(url=address, ssl=ca is not None, root_certificates=ca)
    headers = {"authorization": f"Bearer {token}"} if token else None
    report = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
        "metadata": client.get_model_metadata(model, headers=headers, as_json=True),
    }
    hidden = np.load(input_path)
    inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
    inputs[0].set_data_from_numpy(hidden)
    outputs = [triton.InferRequestedOutput("output"), triton.InferRequestedOutput("expert_ids")]
    result = client.infer(model, inputs, outputs=outputs, parameters={"layer": 1}, request_id="t1", headers=headers)
    np.save(out_dir / "output.npy", result.as_numpy("output"))
    np.save(out_dir / "expert_ids.npy", result.as_numpy("expert_ids"))
    report["response_id"] = result.get_response().id

    bad = [triton.InferInput("hidden_states", [1, hidden.shape[-1]], "FP32")]
    bad[0].set_data_from_numpy(np.full((1, hidden.shape[-1]), np.nan, dtype=np.float32))
    try:
        client.infer(model, bad, headers=headers)
        report["nan_error"] = None
    except triton.InferenceServerException as error:
        report["nan_error"] = {"status": error.status(), "message": error.message()}

    # Triton's extensions: configuration, statistics, repository index, and a stream of inferences
    report["config"] = client.get_model_config(model, headers=headers, as_json=True)["config"]
    report["statistics"] = client.get_inference_statistics(model, headers=headers, as_json=True)
    report["index"] = client.get_model_repository_index(headers=headers, as_json=True)
    report["server_extensions"] = client.get_server_metadata(headers=headers, as_json=True).get("extensions", [])
    answers: queue.Queue = queue.Queue()
    client.start_stream(partial(lambda q, result, error: q.put((result, error)), answers), headers=headers)
    for index in range(hidden.shape[0]):
        row = [triton.InferInput("hidden_states", [1, *hidden.shape[1:]], "FP32")]
        row[0].set_data_from_numpy(hidden[index : index + 1])
        client.async_stream_infer(model, row, outputs=outputs[:1], parameters={"layer": 1}, request_id=f"s{index}")
    client.async_stream_infer(model, bad, request_id="s-bad")
    streamed, stream_errors = {}, []
    for _ in range(hidden.shape[0] + 1):
        result, error = answers.get(timeout=60)
        if error is not None:
            stream_errors.append(error.message())
        else:
            streamed[result.get_response().id] = result.as_numpy("output")[0]
    client.stop_stream()
    np.save(out_dir / "streamed.npy", np.stack([streamed[f"s{index}"] for index in range(hidden.shape[0])]))
    report["stream_errors"] = stream_errors
    client.close()
    (out_dir / "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
