"""Layer-wise overlap: prepare layer i+1's stored KV while layer i computes.

Fusion walks the model one layer at a time and needs each stored segment's layer-i KV
(decoded from its codec, moved to the device, keys re-rotated to their new positions) just
before layer i runs. Doing all of that up front puts it on the critical path; a
`LayerLoader` does it in the background, a bounded number of layers ahead:

- CPU: one worker thread. The decode (int8/fp8 dequantization, bf16 -> fp32) and the
  float64 re-rotation of layer i+1 run while the main thread computes layer i.
- CUDA: the worker issues pinned host->device copies, dequantization and re-rotation on a
  side stream and records one event per layer; the consumer makes the compute stream wait
  on that event (no host sync), so the copy engine overlaps the previous layer's kernels.

Segments handed to `fuse` are `StreamedSegment`s; `_LayerFiller` asks them for
`ready_layer(layer, offset)` instead of reading `.keys[layer]`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Union

import torch

from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import EncodedKV
from daser_rag.model.rope import rerotate_keys

Source = Union[EncodedKV, ChunkKV]


def _layer_tensors(src: Source, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Raw stored K/V of one layer (still in storage dtype) and their scales, if quantized."""
    if isinstance(src, ChunkKV):
        return src.keys[layer], src.values[layer], None, None
    t = src.tensors
    ks, vs = t.get("k_scale"), t.get("v_scale")
    return t["k"][layer], t["v"][layer], None if ks is None else ks[layer], None if vs is None else vs[layer]


def _dequant(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    # same arithmetic as codecs.decode: quantized values * fp32 scale, then the compute dtype
    if scale is None:
        return x.to(dtype)
    return (x.to(torch.float32) * scale).to(dtype)


def source_token_ids(src: Source) -> torch.Tensor:
    return src.token_ids if isinstance(src, ChunkKV) else src.tensors["token_ids"]


class LayerLoader:
    """Produces, per layer, the ready-to-write (k, v) of every segment at its offset."""

    def __init__(
        self,
        placements: Sequence[tuple[Source, int]],
        *,
        num_layers: int,
        inv_freq: torch.Tensor,
        device: torch.device | str,
        dtype: torch.dtype,
        depth: int = 2,
    ) -> None:
        self.placements = list(placements)
        self.num_layers = num_layers
        self.inv_freq = inv_freq
        self.device = torch.device(device)
        self.dtype = dtype
        self.depth = max(1, depth)
        self.cuda = self.device.type == "cuda"
        self._slots: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._events: dict[int, Any] = {}
        self._produced = -1
        self._consumed = -1
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, name="daser-layer-loader", daemon=True)
        self._thread.start()

    def segments(self) -> list[StreamedSegment]:
        return [StreamedSegment(self, i, src, off) for i, (src, off) in enumerate(self.placements)]

    # -- producer -------------------------------------------------------------------------
    def _pin_sources(self) -> None:
        """CUDA: page-lock each host entry once, so every per-layer copy is a true async DMA."""
        pinned: list[tuple[Source, int]] = []
        for src, offset in self.placements:
            if isinstance(src, EncodedKV) and src.tensors["k"].device.type == "cpu":
                t = {n: (x if n == "token_ids" else x.pin_memory()) for n, x in src.tensors.items()}
                src = EncodedKV(src.key, src.codec, src.start_pos, t, src.meta)
            elif isinstance(src, ChunkKV) and src.keys.device.type == "cpu":
                src = ChunkKV(src.key, src.token_ids, src.start_pos, src.keys.pin_memory(),
                              src.values.pin_memory(), src.meta)
            pinned.append((src, offset))
        self.placements = pinned

    def _prepare(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for src, offset in self.placements:
            k, v, ks, vs = _layer_tensors(src, layer)
            if self.cuda and k.device.type == "cpu":
                k, v = k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
                ks = None if ks is None else ks.to(self.device, non_blocking=True)
                vs = None if vs is None else vs.to(self.device, non_blocking=True)
            else:
                k, v = k.to(self.device), v.to(self.device)
                ks = None if ks is None else ks.to(self.device)
                vs = None if vs is None else vs.to(self.device)
            delta = offset - src.start_pos
            kf = _dequant(k, ks, torch.float32)
            kf = rerotate_keys(kf, delta, self.inv_freq) if delta else kf
            out.append((kf.to(self.dtype), _dequant(v, vs, self.dtype)))
        return out

    def _run(self) -> None:
        try:
            if self.cuda:
                self._pin_sources()
            for layer in range(self.num_layers):
                with self._cv:
                    while layer - self._consumed > self.depth and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                if self.cuda:
                    with torch.cuda.stream(self._stream):
                        ready = self._prepare(layer)
                        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                        ev.record(self._stream)
                else:
                    ready, ev = self._prepare(layer), None
                with self._cv:
                    self._slots[layer] = ready
                    self._events[layer] = ev
                    self._produced = layer
                    self._cv.notify_all()
        except BaseException as exc:  # surfaced to the consumer, never swallowed
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    # -- consumer -------------------------------------------------------------------------
    def get(self, index: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._cv:
            while self._produced < layer and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise RuntimeError(f"layer loader failed at layer {layer}") from self._error
            k, v = self._slots[layer][index]
            ev = self._events[layer]
            if index == len(self.placements) - 1:  # last segment of this layer: free the slot
                del self._slots[layer]
                self._events.pop(layer, None)
                self._consumed = layer
                self._cv.notify_all()
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            k.record_stream(cur)
            v.record_stream(cur)
        return k, v

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._consumed = self.num_layers
            self._cv.notify_all()
        self._thread.join(timeout=10)


class StreamedSegment:
    """A ChunkKV stand-in for `fuse`: token ids and positions now, layer KV on demand."""

    def __init__(self, loader: LayerLoader, index: int, src: Source, offset: int) -> None:
        self.loader = loader
        self.index = index
        self.key = src.key
        self.token_ids = source_token_ids(src)
        self.start_pos = src.start_pos
        self.offset = offset

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def ready_layer(self, layer: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        if offset != self.offset:
            raise ValueError(f"segment {self.key} was prepared for offset {self.offset}, placed at {offset}")
        return self.loader.get(self.index, layer)
