"""Runs NVIDIA's unmodified tritonclient.http against a gateway's REST port, in a process of its own.

(The tests' pattern for third-party clients: tritonclient brings its own protobuf copy and gevent.)
Usage: triton_http_check.py HOST:PORT MODEL INPUT.npy OUT_DIR
Writes the answers to OUT_DIR as .npy files and a result.json with everything else it saw. With
TRITON_CHECK_TOKEN set, every call carries it as an `Authorization: Bearer` header.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as triton


def main() -> None:
    address, model, input_path, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    token = os.environ.get("TRITON_CHECK_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = triton.InferenceServerClient(url=address)
    report = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
        "metadata": client.get_model_metadata(model, headers=headers),
        "server": client.get_server_metadata(headers=headers),
    }
    hidden = np.load(input_path)
    for binary in (True, False):  # Triton's binary tensor data extension, then JSON data both ways
        inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
        inputs[0].set_data_from_numpy(hidden, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput("output", binary_data=binary),
            triton.InferRequestedOutput("expert_ids", binary_data=binary),
        ]
        result = client.infer(
            model, inputs, outputs=outputs, parameters={"layer": 1}, request_id=f"b{binary:d}", headers=headers
        )
        suffix = "binary" if binary else "json"
        np.save(out_dir / f"output-{suffix}.npy", result.as_numpy("output"))
        np.save(out_dir / f"expert_ids-{suffix}.npy", result.as_numpy("expert_ids"))
        report[f"id-{suffix}"] = result.get_response()["id"]
    # no outputs named: tritonclient asks for every output as binary (binary_data_output)
    result = client.infer(model, inputs, headers=headers)
    np.save(out_dir / "output-default.npy", result.as_numpy("output"))
    report["default_outputs"] = [output["name"] for output in result.get_response()["outputs"]]

    bad = [triton.InferInput("hidden_states", [1, hidden.shape[-1]], "FP32")]
    bad[0].set_data_from_numpy(np.full((1, hidden.shape[-1]), np.nan, dtype=np.float32))
    try:
        client.infer(model, bad, headers=headers)
        report["nan_error"] = None
    except triton.InferenceServerException as error:
        report["nan_error"] = {"status": error.status(), "message": error.message()}
    try:
        client.get_model_metadata("no-such-model", headers=headers)
        report["unknown_model_error"] = None
    except triton.InferenceServerException as error:
        report["unknown_model_error"] = {"status": error.status(), "message": error.message()}
    client.close()
    (out_dir / "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
