"""The subcommands besides `compress run`: `report`, `compare` and `plot` (report.py) read run folders and
write tables and figures; `export` (export.py) writes a run's model as a checked ONNX, TorchScript or int8
file. Each parses its own arguments and raises `CompressError`; compress/cli.py dispatches to them.
"""
