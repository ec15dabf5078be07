"""Tests for sandbox.datasets (a package so its conftest is not imported as ``conftest``)."""
