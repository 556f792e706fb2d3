"""Structured pruning machinery shared by the channel-pruning methods (see docs/structured-pruning.md).

- `rates`: the `method.compress_rate` forms (float, glob-pattern dict, HRank list notation) and `keep_count`.
- `layouts`: where the HRank/CFDP list notation's rates go, per architecture.
- `features`: `feature_scores`, per-channel scores of feature maps from forward hooks, one pass per batch.
- `autoencoder`, `importance`: SCAP's low-capacity autoencoder, and its readings of raw fidelities and L1 norms as importance.
- `scorers`: the basic criteria (L1 norm, random, HRank's average feature-map rank).
- `engine`: channel groups and surgery through Torch-Pruning, ShortcutA's pruner, save/restore of shapes.
"""
