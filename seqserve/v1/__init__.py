"""Generated protobuf and gRPC stubs of the seqserve.v1 API; regenerate with proto/generate.sh."""
