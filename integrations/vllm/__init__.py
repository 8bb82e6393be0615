"""daser-rag inside vLLM: a v1 KV connector backed by the daser KV store.

- `connector.DaserKVConnector`: loaded by vLLM (`kv_connector="DaserKVConnector"`,
  `kv_connector_module_path="integrations.vllm.connector"`); imports vLLM.
- `prompts.VllmRagPrompter`: turns (question, documents) into a vLLM request whose KV the
  connector can supply: exact prefix-tree reuse, or blended KV staged in the store.
- `plan`: the request-side contract (segments of store keys), no vLLM needed.

See docs/vllm.md.
"""

from integrations.vllm.plan import PLAN_FIELD, Segment, block_chain_segments, parse_plan

__all__ = ["PLAN_FIELD", "Segment", "block_chain_segments", "parse_plan"]
