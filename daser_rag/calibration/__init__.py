"""Per-model calibration: make stored chunk KV need less repair (issue 19).

Reused chunk KV is stale above layer 1: each chunk was computed after the system prefix only,
so its hidden states never saw the chunks before it. Selection repairs a share of the tokens;
calibration instead adapts *how the fresh tokens read the stale ones*, once per model, on the
user's own documents, with full prefill as the teacher (no labels):

* a per-layer, per-KV-head scale on the reused context's keys (an attention temperature, as in
  APE) and on its values (the context's contribution), and a per-layer, per-KV-head bias vector
  on each (the key bias added before RoPE, so it turns with the token's position): the
  systematic part of what stale KV lacks. Applied when stored KV is placed in the prompt's
  buffer; exact runs and recomputed tokens are never touched, so r = 1 stays exactly full
  prefill;
* a token map: per layer and KV head, an affine map of each reused token's own stored K/V
  to a correction of both, fitted in closed form (ridge regression) against full prefill's K/V
  on every reused token of the training prompts (`token_map.py`); applied at placement too,
  before the scales and biases;
* k learned link tokens (soft embeddings) placed between the context and the question
  (KVLink-style), computed fresh per request over the whole context.

A calibration is fitted for one regime, full reuse (r = 0) or a recompute share (the engine's
default, hybrid r = 0.15). An r = 0 fit acts only on r = 0 requests (its scales, fitted for an
all-stale context, over-correct stale KV beside repaired tokens); an r > 0 fit acts wherever
stored KV is reused (`adapter.Calibration.applies_to`).

Modules: `config` (what a run fits), `adapter` (the parameters, their digest, the per-regime
set), `token_map` (the regression and its application), `storage` (the checksummed file keyed by the model fingerprint and regime), `examples`
(prompts from the user's documents, teacher targets, the selection replayed at r > 0),
`student` (the differentiable reuse path), `train` (self-distillation and the held-out check),
`curve` (loss curve CSV/PNG). This package imports torch only inside those modules.
"""

from __future__ import annotations

__all__ = ["DEFAULT_FILENAME"]

DEFAULT_FILENAME = "calibration.safetensors"
"""Unused by the engine (files are named by fingerprint and regime: `storage.default_path`); kept
for callers that imported it."""
