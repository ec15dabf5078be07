"""The ``sandbox`` command line and the HTTP client SDK for every role."""
