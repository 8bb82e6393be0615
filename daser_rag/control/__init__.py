"""The control plane in front of vLLM: weight-free planning, the wire format the daser vLLM
connector reads, instance routing and failover, and the `VllmEngine` that puts it all behind
the same engine protocol as daser's own embedded engine."""
