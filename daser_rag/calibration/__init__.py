"""Per-model calibration: make stored chunk KV need less repair (issue 19).

Reused chunk KV is stale above layer 1: each chunk was computed after the system prefix only,
so its hidden states never saw the chunks before it. Selection repairs a share of the tokens;
calibration instead adapts *how the fresh tokens read the stale ones*, once per model, on the
user's own documents, with full prefill as the teacher (no labels):

* a per-layer, per-KV-head scale on the reused context's keys (an attention temperature, as in
  APE) and on its values (the context's contribution), applied when stored KV is placed in the
  prompt's buffer; exact runs and recomputed tokens are never scaled, so r = 1 stays exactly
  full prefill;
* k learned link tokens (soft embeddings) placed between the context and the question
  (KVLink-style), computed fresh per request over the whole context.

Modules: `adapter` (the parameters and their digest), `storage` (the checksummed file keyed by
the model fingerprint), `examples` (prompts from the user's documents, teacher targets),
`student` (the differentiable reuse path), `train` (self-distillation and the held-out check),
`curve` (loss curve CSV/PNG). This package imports torch only inside those modules.
"""

from __future__ import annotations

__all__ = ["DEFAULT_FILENAME"]

DEFAULT_FILENAME = "calibration.safetensors"
"""The calibration file's name in the cache directory (one file per model fingerprint)."""
