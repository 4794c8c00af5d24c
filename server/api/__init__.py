"""The gRPC edge of the server: protobuf <-> domain objects (`convert`), domain errors -> status codes
(`status`, applied to every call by the interceptor in `errors`), and the thin Seqserve servicer
(`servicer`, with `converse` and `served_model`) beside the Open Inference Protocol's (`inference`,
`inference_convert`). Protobuf never goes below this package.
"""
