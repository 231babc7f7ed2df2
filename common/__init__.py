"""Shared toolkit for the week-3 lessons: devices, memory, measurement, models, reports, plots, CLI."""
