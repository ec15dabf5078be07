"""The analyst SDK: build queries, release them through the broker, emit outputs.

Inside the sandbox (and, later, in notebooks through the HTTP client) the same builder::

    from sandbox.sdk import datasets, count, sum, mean, median, emit
    table = (datasets["enterprises"].filter("industry", "==", "manufacturing")
             .group_by("city").agg(count(), sum("annual_revenue")).release(epsilon=0.1))
    emit("by_city", table)

The SDK imports nothing of the server side: it builds a query spec (plain JSON) and sends
it over the broker channel; the answer is a released table (noisy values with intervals).
``emit`` is the only way anything leaves the sandbox.
"""

TYPE_CHECKING = False  # ``typing`` costs ~10 ms at sandbox start; annotations only
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BrokerError", "Query", "Released", "count", "datasets", "emit", "histogram",
           "mean", "median", "quantile", "sum"]


def __getattr__(name: str) -> "Any":
    """The builder is imported on first use, so the sandbox bootstrap starts fast."""
    if name == "BrokerError":
        from sandbox.sdk.channel import BrokerError
        return BrokerError
    if name in __all__:
        from sandbox.sdk import builder
        return getattr(builder, name)
    raise AttributeError(name)
