"""A minimal hybrid (Gated DeltaNet + attention) inference engine with an exact prefix cache."""

__version__ = "0.1.0"
