"""tritonclient.grpc and moe-serve's client in ONE process, imported in the order given, both used.

Usage: coexistence_check.py ORDER ADDRESS MODEL INPUT.npy OUT_DIR, ORDER being `triton-first` or
`ours-first`. Each client sends INPUT.npy to layer 1 of MODEL at ADDRESS (when ADDRESS is `-`, no
gateway: only the message round trips run); each one's request is parsed by the other's messages.
Writes triton_output.npy, ours_output.npy and result.json (what was imported, round-trip checks).
"""

import importlib
import json
import sys
from pathlib import Path

import numpy as np

MODULES = {
    "triton-first": ("tritonclient.grpc", "moe_serve_client", "moe_serve.client"),
    "ours-first": ("moe_serve.client", "moe_serve_client", "tritonclient.grpc"),
}


def round_trips(triton, ours) -> dict[str, bool]:
    """Each library's ModelInferRequest parsed by the other's message class, fields intact."""
    from moe_serve_client.protocol import build_infer_request

    hidden = np.arange(8, dtype=np.float32).reshape(2, 4)
    mine = build_infer_request("m", hidden, 1, ["output"])
    as_theirs = triton.service_pb2.ModelInferRequest.FromString(mine.SerializeToString())
    theirs = triton.service_pb2.ModelInferRequest(model_name="m", id="x")
    theirs.parameters["layer"].int64_param = 3
    as_mine = ours.ModelInferRequest.FromString(theirs.SerializeToString())
    return {
        "ours_to_triton": as_theirs.parameters["layer"].int64_param == 1
        and list(as_theirs.inputs[0].shape) == [2, 4]
        and as_theirs.raw_input_contents[0] == hidden.tobytes(),
        "triton_to_ours": as_mine.parameters["layer"].int64_param == 3 and as_mine.id == "x",
        "separate_classes": type(as_mine) is not type(as_theirs),
    }


def main() -> None:
    order, address, model, input_path, out_dir = sys.argv[1:6]
    imported = [importlib.import_module(name).__name__ for name in MODULES[order]]
    import tritonclient.grpc as triton

    from moe_serve_client import MoEClient
    from moe_serve_client.protos import grpc_predict_v2_pb2 as ours

    report = {"imported": imported, "round_trips": round_trips(triton, ours)}
    if address != "-":
        hidden = np.load(input_path)
        client = triton.InferenceServerClient(url=address)
        inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
        inputs[0].set_data_from_numpy(hidden)
        result = client.infer(model, inputs, outputs=[triton.InferRequestedOutput("output")], parameters={"layer": 1})
        np.save(Path(out_dir) / "triton_output.npy", result.as_numpy("output"))
        with MoEClient(address) as moe_client:
            report["ours_ready"] = moe_client.server_ready(timeout=30)
            answer = moe_client.infer(model, hidden, layer=1, timeout=60)["output"]
        report["ours_output_type"] = type(answer).__module__ + "." + type(answer).__name__
        np.save(Path(out_dir) / "ours_output.npy", answer)
        report["triton_ready"] = client.is_server_ready()
    report["torch_loaded"] = "torch" in sys.modules
    (Path(out_dir) / "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
