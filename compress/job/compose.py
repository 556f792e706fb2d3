"""The typed config's Hydra side: the schemas and table-made experiments in Hydra's ConfigStore, and
composing a checked `Config` from command-line style overrides without running anything (`compress run`
goes through Hydra's own entry point; tests, tools and `compress.api` come here).

It lives in `job/`, above `compress.config` and `compress.methods`: registering needs every method's
options class, and the schema module is imported by the layers that the methods use.
"""
from __future__ import annotations

from compress.config import Config, to_config

_registered = False


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore: the root schema (`config_schema`, first in
    configs/config.yaml's defaults), every method's options as `method/<name>`, and the experiment
    table's rows as `experiment/<name>`. Idempotent."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    from compress.job.experiments import register_experiments
    from compress.methods import METHODS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, cls in METHODS.items():
        cs.store(group="method", name=name, node=cls.Options)
    register_experiments(cs)
    _registered = True


def compose(overrides: list[str]) -> Config:
    """Compose and check a config from command-line style overrides, without running anything
    (tests and tools; `compress run` goes through Hydra's own entry point)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(config_module="compress.configs", version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))
