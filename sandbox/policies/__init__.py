"""Data-owner policies: the model, drafting and approval, and evaluation."""
