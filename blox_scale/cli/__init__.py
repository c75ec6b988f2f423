"""Thin command-line entry points: blox-train (the readable loop), blox-sample, blox-plan."""
