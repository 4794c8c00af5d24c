"""Serving side of seqserve: loads ONNX bundles, batches and decodes with numpy, serves gRPC (never torch)."""
