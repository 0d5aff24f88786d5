"""The run's configuration: the typed schema, YAML loading with `key=value` overrides, the TPU topology
catalogue that `compile_topology` names, and reading a run's resolved config back.

    from openvision_max.config import load_config
    cfg = load_config(["configs/L14.yml", "global_batch_size=512"])
"""

from openvision_max.config.loading import all_keys, cli_config, config_to_dict, load_config, load_stages
from openvision_max.config.schema import Config, ConfigError

__all__ = ["Config", "ConfigError", "all_keys", "cli_config", "config_to_dict", "load_config", "load_stages"]
