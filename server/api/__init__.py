"""The gRPC edge of the server: protobuf <-> domain objects (`convert`), domain errors -> status codes
(`errors`), and the thin Seqserve servicer (`servicer`). Protobuf never goes below this package.
"""
