"""Shared pytest configuration. Test helpers live in the helpers/ package (from helpers.tiny_models import ...)."""
