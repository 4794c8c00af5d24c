"""seqserve: train recurrent sequence models, export them to ONNX, serve them over gRPC."""
