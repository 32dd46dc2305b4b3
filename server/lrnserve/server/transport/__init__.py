"""gRPC transport: protobuf <-> domain conversion, servicers, health, error mapping."""
