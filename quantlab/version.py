"""quantlab's version (recorded in every manifest, result row and report)."""

__version__ = "0.1.0"
