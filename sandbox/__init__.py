"""A privacy-preserving data sandbox: private data usable but invisible.

Analyst code never holds a row: a trusted broker answers validated queries with
differentially private releases. See docs/ and ../shared/design.md.
"""

__version__ = "0.1.0"
