"""Runs NVIDIA's unmodified tritonclient with system shared memory against a gateway, in a process of
its own (tritonclient's `inference` protobuf package cannot share a process with ours), driven as
Triton's simple_grpc_shm_client.py example does. Usage: triton_shm_check.py ADDRESS MODEL INPUT.npy OUT_DIR REPEATS
Writes the answers to OUT_DIR as .npy files and a result.json with everything else it saw.
"""

import json
import os
import queue
import sys
from functools import partial
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from google.protobuf import json_format
from tritonclient.utils import triton_to_np_dtype

IDS_BYTES = 4096  # room for expert_ids (INT32, [T, k]) behind the output
SLOTS = 8  # requests in flight at once in the many-requests part


def infer_through_shm(client, model, hidden, in_region, out_region, out_bytes, ids_bytes):
    inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
    inputs[0].set_shared_memory(in_region, hidden.nbytes)
    outputs = [
        triton.InferRequestedOutput("output"),
        triton.InferRequestedOutput("router_logits"),  # in the message, between two in shared memory
        triton.InferRequestedOutput("expert_ids"),
    ]
    outputs[0].set_shared_memory(out_region, out_bytes)
    outputs[2].set_shared_memory(out_region, ids_bytes, offset=out_bytes)
    return client.infer(model, inputs, outputs=outputs)


def read_outputs(result, out_handle, out_bytes):
    output, ids = result.get_output("output"), result.get_output("expert_ids")
    return (
        shm.get_contents_as_numpy(out_handle, triton_to_np_dtype(output.datatype), output.shape),
        result.as_numpy("router_logits"),
        shm.get_contents_as_numpy(out_handle, triton_to_np_dtype(ids.datatype), ids.shape, offset=out_bytes),
    )


def infer_raw(client, model, hidden):
    inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
    inputs[0].set_data_from_numpy(hidden)
    outputs = [triton.InferRequestedOutput(name) for name in ("output", "router_logits", "expert_ids")]
    result = client.infer(model, inputs, outputs=outputs)
    return result.as_numpy("output"), result.as_numpy("router_logits"), result.as_numpy("expert_ids")


def error_of(call):
    try:
        call()
    except triton.InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return None


def main() -> None:
    address, model, input_path, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    repeats = int(sys.argv[5])
    client = triton.InferenceServerClient(url=address)
    hidden = np.load(input_path)
    tag = os.getpid()
    in_key, out_key = f"/moe_serve_test_in_{tag}", f"/moe_serve_test_out_{tag}"
    out_bytes = hidden.nbytes
    report = {"extensions": client.get_server_metadata(as_json=True).get("extensions", [])}

    client.unregister_system_shared_memory()
    in_handle = shm.create_shared_memory_region("input_data", in_key, hidden.nbytes)
    out_handle = shm.create_shared_memory_region("output_data", out_key, out_bytes + IDS_BYTES)
    shm.set_shared_memory_region(in_handle, [hidden])
    client.register_system_shared_memory("input_data", in_key, hidden.nbytes)
    client.register_system_shared_memory("output_data", out_key, out_bytes + IDS_BYTES)
    report["status"] = client.get_system_shared_memory_status(as_json=True)
    report["status_one"] = client.get_system_shared_memory_status("input_data", as_json=True)

    result = infer_through_shm(client, model, hidden, "input_data", "output_data", out_bytes, IDS_BYTES)
    report["output_parameters"] = {
        # (tritonclient's get_output(as_json=True) returns None: the message is converted here)
        name: json_format.MessageToDict(result.get_output(name), preserving_proto_field_name=True).get("parameters", {})
        for name in ("output", "router_logits", "expert_ids")
    }
    report["raw_output_contents"] = [len(raw) for raw in result.get_response().raw_output_contents]
    for name, value in zip(("output", "logits", "ids"), read_outputs(result, out_handle, out_bytes), strict=True):
        np.save(out_dir / f"shm_{name}.npy", value)
    for name, value in zip(("output", "logits", "ids"), infer_raw(client, model, hidden), strict=True):
        np.save(out_dir / f"raw_{name}.npy", value)

    # ModelStreamInfer, the same request through shared memory
    answers: queue.Queue = queue.Queue()
    client.start_stream(partial(lambda q, result, error: q.put((result, error)), answers))
    inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
    inputs[0].set_shared_memory("input_data", hidden.nbytes)
    outputs = [triton.InferRequestedOutput("output")]
    outputs[0].set_shared_memory("output_data", out_bytes)
    shm.set_shared_memory_region(out_handle, [np.zeros_like(hidden)])
    client.async_stream_infer(model, inputs, outputs=outputs, request_id="stream-shm")
    streamed, stream_error = answers.get(timeout=60)
    client.stop_stream()
    report["stream_error"] = None if stream_error is None else stream_error.message()
    output = streamed.get_output("output")
    np.save(
        out_dir / "streamed.npy",
        shm.get_contents_as_numpy(out_handle, triton_to_np_dtype(output.datatype), output.shape),
    )

    # the bad-input matrix; the gateway must go on serving after each
    def bad_infer(in_region="input_data", in_bytes=hidden.nbytes, in_offset=0, out_size=out_bytes):
        inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
        inputs[0].set_shared_memory(in_region, in_bytes, offset=in_offset)
        outputs = [triton.InferRequestedOutput("output")]
        outputs[0].set_shared_memory("output_data", out_size)
        return lambda: client.infer(model, inputs, outputs=outputs)

    cases = {
        "unknown key": lambda: client.register_system_shared_memory("ghost", f"/moe_serve_absent_{tag}", 64),
        "duplicate name": lambda: client.register_system_shared_memory("input_data", in_key, hidden.nbytes),
        "beyond the segment": lambda: client.register_system_shared_memory("big", in_key, hidden.nbytes + 1),
        "offset beyond the segment": lambda: client.register_system_shared_memory(
            "big", in_key, hidden.nbytes, offset=4
        ),
        "input byte size mismatch": bad_infer(in_bytes=hidden.nbytes - 4),
        "input outside the region": bad_infer(in_offset=4),
        "unknown input region": bad_infer(in_region="nowhere"),
        "output region too small": bad_infer(out_size=out_bytes - 4),
        "status of an unknown name": lambda: client.get_system_shared_memory_status("nowhere"),
        "unregister an unknown name": lambda: client.unregister_system_shared_memory("nowhere"),
        "cuda register": lambda: client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64),
        "cuda status": lambda: client.get_cuda_shared_memory_status(),
    }
    report["errors"], report["served_after"] = {}, {}
    for case, call in cases.items():
        report["errors"][case] = error_of(call)
        report["served_after"][case] = infer_raw(client, model, hidden)[0].shape == hidden.shape

    # many requests, SLOTS at a time, each slot a region of its own at an offset into one object
    slot_in_key, slot_out_key = f"/moe_serve_test_slots_in_{tag}", f"/moe_serve_test_slots_out_{tag}"
    slots_in = shm.create_shared_memory_region("slots_in", slot_in_key, SLOTS * hidden.nbytes)
    slots_out = shm.create_shared_memory_region("slots_out", slot_out_key, SLOTS * out_bytes)
    for slot in range(SLOTS):
        client.register_system_shared_memory(f"in{slot}", slot_in_key, hidden.nbytes, offset=slot * hidden.nbytes)
        client.register_system_shared_memory(f"out{slot}", slot_out_key, out_bytes, offset=slot * out_bytes)
    scales = [0.5, 1.0, 2.0]
    expected = {scale: infer_raw(client, model, (hidden * scale).astype(np.float32))[0] for scale in scales}
    answers, free, mismatches, failures = queue.Queue(), list(range(SLOTS)), 0, []

    def collect() -> None:
        nonlocal mismatches
        slot, scale, error = answers.get(timeout=60)
        if error is not None:
            failures.append(error.message())
        output = shm.get_contents_as_numpy(slots_out, np.float32, hidden.shape, offset=slot * out_bytes)
        mismatches += not np.array_equal(output, expected[scale])
        free.append(slot)

    for index in range(repeats):
        if not free:
            collect()
        slot, scale = free.pop(), scales[index % len(scales)]
        shm.set_shared_memory_region(slots_in, [(hidden * scale).astype(np.float32)], offset=slot * hidden.nbytes)
        inputs = [triton.InferInput("hidden_states", list(hidden.shape), "FP32")]
        inputs[0].set_shared_memory(f"in{slot}", hidden.nbytes)
        outputs = [triton.InferRequestedOutput("output")]
        outputs[0].set_shared_memory(f"out{slot}", out_bytes)
        client.async_infer(
            model,
            inputs,
            partial(lambda slot, scale, result, error: answers.put((slot, scale, error)), slot, scale),
            outputs=outputs,
        )
    while len(free) < SLOTS:
        collect()
    report["repeats"], report["mismatches"], report["failures"] = repeats, mismatches, failures[:3]

    client.unregister_system_shared_memory("input_data")
    report["status_after_one"] = client.get_system_shared_memory_status(as_json=True)
    client.unregister_system_shared_memory()
    report["status_after_all"] = client.get_system_shared_memory_status(as_json=True)
    for handle in (in_handle, out_handle, slots_in, slots_out):
        shm.destroy_shared_memory_region(handle)
    client.close()
    (out_dir / "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
