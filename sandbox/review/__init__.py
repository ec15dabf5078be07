"""Review of outputs waiting for release, and releases."""
