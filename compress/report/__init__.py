"""Reporting: the metrics rows and `compress report`, the papers' published numbers, `compress compare` and
`compress plot`.
"""
