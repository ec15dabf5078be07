"""Settings for every process of the product."""

from sandbox.config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
