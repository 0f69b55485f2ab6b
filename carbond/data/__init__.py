"""Shipped reference tables (read with importlib.resources); see SOURCES.md for their sources and licences."""
