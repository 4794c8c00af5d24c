"""The LM's decode step through ONNX Runtime IO binding: the recurrent state stays in ONNX Runtime's
buffers, on the session's device, from one step to the next.

Buffers are preallocated per bucket of rows (powers of two), two per state tensor, used in turn: a
step reads the state the previous step wrote and writes the other buffer. As long as the batch keeps
its rows (most steps) only the tokens go in and the log-probs come out; when rows leave, join or
reorder, the engine's numpy operations read the state (`DeviceTensor` downloads on demand) and the
next step uploads the result once. On the CPU provider "device" buffers are host memory (the
downloads are views), which is how the path is tested without a GPU; on CUDA the same code keeps the
state on the GPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from server.bundle import LoadedGraph

# Providers whose sessions run on a CUDA device (their buffers are allocated there).
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_SMALLEST_BUCKET = 8


def device_of(graph: LoadedGraph) -> str:
    return "cuda" if graph.providers and graph.providers[0] in _CUDA_PROVIDERS else "cpu"


class DeviceTensor:
    """A state tensor in a bound buffer: rows [0, rows) of it. Reading it (indexing, `np.asarray`) gives
    host numpy; valid until the step after next overwrites the buffer, which the engine never outlives
    (it reads a step's state before the next step's state replaces it)."""

    __slots__ = ("_value", "_rows", "_host")

    def __init__(self, value: ort.OrtValue, rows: int):
        self._value = value
        self._rows = rows
        self._host: np.ndarray | None = None

    @property
    def value(self) -> ort.OrtValue:
        return self._value

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._rows, *self._value.shape()[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self._rows

    def host(self) -> np.ndarray:
        if self._host is None:
            self._host = self._value.numpy()[: self._rows]  # CPU: a view; CUDA: one copy to the host
        return self._host

    def __getitem__(self, key):
        return self.host()[key]

    def __array__(self, dtype=None, copy=None):
        array = self.host()
        return array if dtype is None else array.astype(dtype)


class BoundStep:
    """Runs an LM step graph with IO binding; `state` in and out as tuples (numpy or `DeviceTensor`)."""

    def __init__(self, graph: LoadedGraph, token_input: str, lengths_input: str, state_names: tuple[str, ...],
                 state_outputs: tuple[str, ...], state_shapes: list[tuple[int, ...]]):
        self._graph = graph
        self._session = graph.session
        self._device = device_of(graph)
        self._token_input, self._lengths_input = token_input, lengths_input
        self._state_names, self._state_outputs = state_names, state_outputs
        self._state_shapes = state_shapes
        self._buckets: dict[int, list[tuple[ort.OrtValue, ...]]] = {}  # capacity -> [side 0, side 1] buffers
        self._last: tuple | None = None  # the state the last step returned
        self._last_side = 0
        self.bytes_to_device = 0  # host -> device bytes of every call so far (tokens, lengths, uploads)
        self.bytes_to_host = 0  # device -> host bytes (the log-probs)

    @property
    def device(self) -> str:
        return self._device

    def run(self, tokens: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple[DeviceTensor, ...]]:
        """One token per row: (log_probs [B, 1, V] on the host, the new state in bound buffers)."""
        rows = len(tokens)
        buffers = self._bucket(rows)
        binding = self._session.io_binding()
        tokens = np.ascontiguousarray(tokens.reshape(rows, 1), dtype=np.int64)
        lengths = np.ones(rows, dtype=np.int64)
        binding.bind_cpu_input(self._token_input, tokens)
        binding.bind_cpu_input(self._lengths_input, lengths)
        self.bytes_to_device += tokens.nbytes + lengths.nbytes
        if state is self._last and self._last is not None:  # the batch kept its rows: state stays put
            side = 1 - self._last_side
            for name, tensor in zip(self._state_names, state, strict=True):
                self._bind(binding.bind_input, name, tensor.value, rows)
        else:  # new rows or a new order: upload the engine's state once
            side = 0 if self._last is None else 1 - self._last_side
            for name, tensor in zip(self._state_names, state, strict=True):
                array = np.ascontiguousarray(np.asarray(tensor), dtype=np.float32)
                binding.bind_cpu_input(name, array)
                self.bytes_to_device += array.nbytes
        out = buffers[side]
        for name, value in zip(self._state_outputs, out, strict=True):
            self._bind(binding.bind_output, name, value, rows)
        binding.bind_output("log_probs", "cpu")
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        log_probs = binding.get_outputs()[len(self._state_outputs)].numpy()
        self.bytes_to_host += log_probs.nbytes
        new_state = tuple(DeviceTensor(value, rows) for value in out)
        self._last, self._last_side = new_state, side
        return log_probs, new_state

    def _bucket(self, rows: int) -> list[tuple[ort.OrtValue, ...]]:
        capacity = max(_SMALLEST_BUCKET, 1 << (rows - 1).bit_length())
        buffers = self._buckets.get(capacity)
        if buffers is None:
            buffers = self._buckets[capacity] = [
                tuple(ort.OrtValue.ortvalue_from_shape_and_type([capacity, *shape], np.float32, self._device, 0)
                      for shape in self._state_shapes)
                for _ in range(2)]
        return buffers

    def _bind(self, bind, name: str, value: ort.OrtValue, rows: int) -> None:
        """Bind rows [0, rows) of a bucket buffer (contiguous: rows come first)."""
        shape = [rows, *value.shape()[1:]]
        bind(name, value.device_name(), 0, np.float32, shape, value.data_ptr())
