"""Checks that the MLServer baseline computes what it is said to (bench/serve.py measures it).

Starts it (server.py), sends one request per shape as bench/serve.py builds them, compares the
answer with torch.nn.functional.local_response_norm to 1e-5 and says whether MLServer answered in
raw_output_contents or in typed contents. Exit status 1 on a wrong answer.

    .venv/bin/python bench/mlserver_baseline/check.py [--shapes 1,16,8,8 1,96,55,55]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/, as for bench/serve.py
from mlserver_baseline.server import mlserver

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc


def request_for(shape: tuple[int, ...]) -> tuple[pb.ModelInferRequest, np.ndarray]:
    # as bench/serve.py request_for
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    request = pb.ModelInferRequest(model_name="lrn")
    request.inputs.add(name="input", datatype="FP32", shape=list(shape))
    request.raw_input_contents.append(x.tobytes())
    return request, x


def output_of(response: pb.ModelInferResponse) -> tuple[np.ndarray, str]:
    (out,) = response.outputs
    assert out.name == "output" and out.datatype == "FP32", (out.name, out.datatype)
    if response.raw_output_contents:
        y, layout = np.frombuffer(response.raw_output_contents[0], dtype="<f4"), "raw_output_contents"
    else:
        y, layout = np.asarray(out.contents.fp32_contents, dtype=np.float32), "contents.fp32_contents"
    return y.reshape(tuple(out.shape)), layout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["1,16,8,8", "1,96,55,55"])
    parser.add_argument("--parallel-workers", type=int, default=1, help="MLServer's parallel_workers (default: 1)")
    parser.add_argument("--log", type=Path, default=None, help="keep MLServer's output in this file")
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split(",")) for s in args.shapes]
    with mlserver(log=args.log, parallel_workers=args.parallel_workers) as target:
        print(f"MLServer ready on {target}", flush=True)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for shape in shapes:
                request, x = request_for(shape)
                y, layout = output_of(stub.ModelInfer(request, timeout=60))
                want = F.local_response_norm(torch.from_numpy(x), size=5, alpha=1e-4, beta=0.75, k=1.0).numpy()
                err = float(np.max(np.abs(y - want)))
                print(f"{list(shape)}: output shape {list(y.shape)} in {layout}, max |diff| {err:.2e}", flush=True)
                if y.shape != want.shape or err > 1e-5:
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
