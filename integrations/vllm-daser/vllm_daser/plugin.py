"""vLLM general plugin: makes `kv_connector: "DaserKVConnector"` resolve without a module path.

Registered as the `vllm.general_plugins` entry point `daser` (pyproject.toml). vLLM calls
`register()` in every process it starts (API server, engine core, workers), possibly more than
once per process; registration is lazy (the connector module is imported only when a config
names it) and idempotent.
"""

from __future__ import annotations

from daser_rag.control.wire import CONNECTOR_NAME  # one name for the plugin and the control plane

CONNECTOR_MODULE = "vllm_daser.connector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:
        pass  # already registered in this process (plugins may be loaded more than once)
    from vllm_daser import blend

    if blend.enabled():  # experimental in-engine selective recompute (see blend.py)
        blend.register_model_class()
