"""MLServer custom runtime for the serving benchmark's baseline: torch's stock LRN.

Input "input" (FP32, NCHW), output "output" (FP32, same shape) =
torch.nn.functional.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=1.0).

Written the way MLServer's docs write a custom runtime (decode with NumpyCodec, encode the output
with NumpyCodec): MLServer itself turns a request's raw_input_contents into a list of Python floats
before the runtime sees it, and, when the request used raw_input_contents, packs the response back
into raw_output_contents. That conversion is part of the baseline being measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

SIZE, ALPHA, BETA, K = 5, 1e-4, 0.75, 1.0


class TorchLRN(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = self.decode(payload.inputs[0], default_codec=NumpyCodec)  # np.float32, NCHW
        with torch.inference_mode():
            y = F.local_response_norm(torch.from_numpy(x), size=SIZE, alpha=ALPHA, beta=BETA, k=K)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("output", y.numpy())],
        )
