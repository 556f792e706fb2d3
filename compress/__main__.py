"""`python -m compress ...` = `compress ...`; torchrun starts data-parallel runs this way:
`torchrun --standalone --nproc_per_node=2 -m compress run hydra.run.dir=DIR [overrides]`."""
from compress.cli import main

main()
