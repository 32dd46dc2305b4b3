"""Generated Open Inference Protocol v2 and grpc.health.v1 stubs (see proto/generate.py)."""
