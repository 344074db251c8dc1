"""A stage's config composed ONCE, and params.yaml composed from conf/.

``compose_stage`` / ``load_stage_config`` compose ``conf/<stage>.yaml`` through Hydra's
compose API with the stage's dataclass schema (``imgpipe.config.SCHEMAS``) registered in
Hydra's ConfigStore, so Hydra itself refuses an unknown key or a wrong type; every problem
is one ``PipelineError`` line naming the key and the file. Layers, last wins:
conf/<stage>.yaml < the params file < the command line. Under DVC the Make stage targets set
``IMGPIPE_PARAMS_FILE=params.yaml`` (that is where ``dvc exp run -S lr=1.4`` lands); the
params file is a config node of its own in the composition, not override strings. The
entry points, the ``imgpipe`` subcommands and the sweep all take their config from here.

``compose_params`` writes params.yaml the way ``dvc exp run`` (``hydra.enabled``) does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from imgpipe.config import SCHEMAS, conf_dir, to_plain, to_schema
from imgpipe.errors import PipelineError

PARAMS_FILE_ENV = "IMGPIPE_PARAMS_FILE"
PIPELINE_CONFIG = "pipeline"

SCHEMA_GROUP = "imgpipe_schema"
PARAMS_GROUP = "imgpipe_params"


def register_schemas() -> None:
    """Put each stage's schema into Hydra's ConfigStore under a primary config of its own,
    ``imgpipe_<stage>``: the schema first, then conf/<stage>.yaml over it (so Hydra checks
    every key and type of the file and the overrides). conf/ itself names no schema: DVC
    composes it as plain values."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        group = f"{SCHEMA_GROUP}/{stage}"
        store.store(group=group, name="schema", node=schema, package="_global_", replace=True)
        store.store(
            name=f"imgpipe_{stage}",
            node={"defaults": [{f"{group}@_global_": "schema"}, stage, "_self_"]},
            replace=True,
        )


def compose_stage(
    stage: str,
    overrides: Sequence[str] = (),
    *,
    params_file: str | os.PathLike[str] | None = None,
    return_hydra_config: bool = False,
) -> Any:
    """Compose one stage's config, checked by Hydra against its schema: the DictConfig.

    Layers, last wins: ``conf/<stage>.yaml`` < the params file < ``overrides`` (Hydra
    override strings: ``lr=1.4``; sweeps such as ``lr=choice(1,2)`` are refused: the sweep
    takes them out first). ``params_file``: that file; None: the one IMGPIPE_PARAMS_FILE
    names (set by the Make stage targets under DVC), if any; ``""``: none. Only the stage's
    own keys are read from it (params.yaml holds every stage's). ``return_hydra_config``:
    keep the ``hydra`` node (the sweeper block), as the sweep needs.

    An unknown key, a wrong type, a bad override or an unreadable params file raises
    ``PipelineError`` with one line naming the key and the file.
    """
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    schema = SCHEMAS[stage]
    source = f"conf/{stage}.yaml"
    register_schemas()
    layers = list(overrides)
    path = os.environ.get(PARAMS_FILE_ENV) if params_file is None else os.fspath(params_file)
    if path:
        values = _params_file_values(path, schema)
        ConfigStore.instance().store(
            group=f"{PARAMS_GROUP}/{stage}",
            name="file",
            node=values,
            package="_global_",
            replace=True,
        )
        # Appended defaults merge after the stage file's own values, before the overrides.
        layers.insert(0, f"+{PARAMS_GROUP}/{stage}@_global_=file")
        source = f"{source} < {path}"
    try:
        with initialize_config_dir(str(conf_dir())):
            return compose(
                f"imgpipe_{stage}", overrides=layers, return_hydra_config=return_hydra_config
            )
    except (HydraException, OmegaConfBaseException) as exc:
        raise PipelineError(_one_line(exc, source, schema)) from None
    except yaml.YAMLError as exc:  # a conf/ file that is not YAML (a duplicate key, say)
        mark = getattr(exc, "problem_mark", None)
        where = f"conf/{Path(mark.name).name} line {mark.line + 1}" if mark else f"conf/{stage}"
        raise PipelineError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None


def load_stage_config(
    stage: str,
    overrides: Sequence[str] = (),
    *,
    params_file: str | os.PathLike[str] | None = None,
) -> Any:
    """The typed config a stage runs with (``ProcessDataConfig``, ``TrainConfig``):
    ``compose_stage`` (conf/ < params file < overrides, same arguments), then the value
    rules of the schema's ``__post_init__``. The one door for entry points, commands that
    read the project's settings, and the sweep's base values."""
    cfg = compose_stage(stage, overrides, params_file=params_file)
    return to_schema(SCHEMAS[stage], cfg, f"conf/{stage}.yaml")


def _params_file_values(path: str, schema: type) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise PipelineError(f"{path}: params file not found (run `make params`)") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of config keys")
    known = {f.name for f in fields(schema)}
    return {k: v for k, v in params.items() if k in known}


def _one_line(exc: BaseException, source: str, schema: type) -> str:
    """Hydra's and OmegaConf's messages span several lines: one, naming the key."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    known = ", ".join(sorted(f.name for f in fields(schema)))
    text = str(exc)
    if isinstance(exc, OverrideParseException):
        return f"bad override: {text.splitlines()[0]}"
    if m := re.match(r"Could not override '([^']+)'", text):
        return f"{source}: unknown config key '{m.group(1)}' (known: {known})"
    if m := re.search(r"Ambiguous value for argument '([^']+)'", text):
        return f"override '{m.group(1)}=...' is a sweep: add --multirun"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    key = getattr(cause, "full_key", None) or ""
    if isinstance(cause, ConfigKeyError) and key:
        return f"{source}: unknown config key '{key}' (known: {known})"
    lines = [line for line in text.splitlines() if line.strip()]
    detail = lines[-1] if len(lines) > 1 and "Error merging" in lines[0] else lines[0]
    if key:
        detail = str(cause).splitlines()[0] if cause is not None else detail
        return f"{source}: config key '{key}': {detail}"
    return f"{source}: {detail}"


def stage_config_yaml(config: Any) -> str:
    """A typed config as YAML (``--cfg job``, ``imgpipe config show``)."""
    import yaml

    return yaml.safe_dump(to_plain(config), sort_keys=False)


# --------------------------------------------------------------------------- params.yaml


def compose_params(overrides: list[str] | None = None) -> str:
    """Compose conf/pipeline.yaml the way ``dvc exp run`` does and return the YAML text."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf_dir())):
        cfg = compose(config_name=PIPELINE_CONFIG, overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)
