"""Storage tiers: host RAM, local disk, shared remote (Redis). All speak EncodedKV."""

from daser_rag.kv.tiers.base import Tier
from daser_rag.kv.tiers.disk import DiskTier
from daser_rag.kv.tiers.host import HostTier

__all__ = ["Tier", "HostTier", "DiskTier"]
