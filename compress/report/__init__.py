"""Reporting: the metrics rows, the papers' tables (published numbers, the ApproxConv rows), our runs beside
them (compare) and the figures (plot); the `report`, `compare` and `plot` commands are in compress/commands/.
"""
