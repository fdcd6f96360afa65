"""sbrbench: prefix-cache benchmarking and forensics for hybrid LLMs."""

__version__ = "0.1.0"
