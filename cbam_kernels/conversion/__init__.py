"""Swapping the fused modules into existing models and back: recognise, convert, revert."""
