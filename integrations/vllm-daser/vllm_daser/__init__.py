"""daser-rag inside vLLM: a v1 KV connector backed by the daser KV store.

- `connector.DaserKVConnector`: registered with vLLM by this distribution's plugin
  (`vllm.general_plugins` entry point `daser`), so `kv_connector="DaserKVConnector"` needs no
  module path; imports vLLM.
- `prompts.VllmRagPrompter`: turns (question, documents) into a vLLM request whose KV the
  connector can supply: full reuse of chunks in any order (r=0, inside vLLM), exact
  prefix-tree reuse, or blended KV staged in the store (r>0, fused outside vLLM).
- `plan`: the request-side contract (segments of store keys), no vLLM needed.

See README.md next to this package and docs/vllm.md.
"""

from vllm_daser.plan import PLAN_FIELD, Segment, block_chain_segments, parse_plan, plan_params

__all__ = ["PLAN_FIELD", "Segment", "block_chain_segments", "parse_plan", "plan_params"]
