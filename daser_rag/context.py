"""Who a request runs for, and what it carries, as one typed value.

The tenant rule: only the public boundary (the `Engine` protocol's methods, the public methods
of `CacheAwareGenerator`, the adapters' constructors, the CLI) may default the tenant, and it
defaults to `SHARED_TENANT`, declared here once. Every layer below it (the KV store, the
document indexes, resolution, chunk keys, ingestion, the control-plane planner) takes the
tenant as a required argument: a call site that forgets to thread it is a `TypeError` (and a
mypy error), never a silent fall into the shared tenant's cache.

The service builds one `RequestContext` per request (tenant resolved from body, header or
query and namespaced by the API key; the request's generation parameters; its id) and passes
it down; the generator builds one per generation call. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

from daser_rag import settings
from daser_rag.params import GenerationParams
from daser_rag.types import Timings

SHARED_TENANT: Final[str] = settings.TENANT.default
"""The shared tenant: the one single-tenant callers use when they name none (the empty name).
Tenants only salt chunk keys and document names, so KV is never shared across tenants."""


@dataclass(frozen=True, kw_only=True)
class RequestContext:
    """One request as the layers below the public boundary see it. `tenant` has no default:
    building a context without it is a TypeError."""

    tenant: str
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str | None = None
    timings: Timings = field(default_factory=Timings, compare=False)
    """Filled in as the request runs (mutable on purpose: the value object is frozen, its
    measurements are not)."""

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str):
            raise TypeError(f"tenant must be a string, got {type(self.tenant).__name__}")
        if self.params.tenant != self.tenant:
            if self.params.tenant != SHARED_TENANT:
                raise ValueError(f"conflicting tenants: the context's {self.tenant!r}, the params' "
                                 f"{self.params.tenant!r}")
            # params built without a tenant: the request's tenant is the context's
            object.__setattr__(self, "params", replace(self.params, tenant=self.tenant))


__all__ = ["SHARED_TENANT", "RequestContext"]
