"""Gguf: parsing a checkpoint once (part of :mod:`mezo_kernels._compat`)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator


@contextlib.contextmanager
def gguf_parse_once() -> Iterator[None]:
    """Speed up a GGUF load about 2x: transformers builds a ``gguf.GGUFReader`` (about 5 s of metadata parsing
    for SmolLM2's 49k-token vocab) once for the tokenizer, once for the config and once for the weights, and a
    ``gguf.TensorNameMap`` once per submodule. Inside this context both are memoized (same file, same arguments,
    read-only objects); the gguf module is restored afterwards. It works because transformers looks both names
    up in the gguf module when it calls them; without gguf it does nothing."""
    try:
        import gguf
    except ImportError:
        yield
        return
    orig = {k: getattr(gguf, k, None) for k in ("GGUFReader", "get_tensor_name_map")}
    if None in orig.values():
        yield
        return
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple, Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = orig["GGUFReader"](path, mode)
        return readers[key]

    def name_map(*args: Any) -> Any:
        if args not in maps:
            maps[args] = orig["get_tensor_name_map"](*args)
        return maps[args]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig["GGUFReader"], orig["get_tensor_name_map"]
        readers.clear()
