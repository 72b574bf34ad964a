"""Adapters that run the training clock and its knobs inside other training frameworks."""
